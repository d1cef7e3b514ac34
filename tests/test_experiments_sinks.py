"""The sink experiment runner: its quick mode end to end, its table, and its bad inputs."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from pausejax.experiments import sinks

CLI = [sys.executable, "-m", "pausejax.experiments.sinks"]


def _run(args, timeout=1200):
  return subprocess.run(CLI + args, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_pretraining_configs_differ_only_in_how_sequences_start_and_attend():
  configs = {n: sinks.pretrain_config(n, True, 0, 5, "/tmp/tfds") for n in sinks.MODELS}
  base = configs["bos"].to_dict()
  expected = {
      "vanilla": {("start_token",): "none"},
      "zero_sink": {("start_token",): "none", ("model", "zero_sink"): True},
      "learnable_sink": {("task",): "shakespeare_sink"},
      "bos": {},
      "pause": {("task",): "shakespeare_pause", ("start_token",): "none"},
  }

  def flat(d, prefix=()):
    out = {}
    for k, v in d.items():
      out.update(flat(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,): v})
    return out

  for name, c in configs.items():
    mine, theirs = flat(c.to_dict()), flat(base)
    assert {k: v for k, v in mine.items() if theirs.get(k) != v} == expected[name], name


def test_markdown_table_has_a_row_per_model_and_the_pause_sink_line():
  label = lambda s: f"{s}+{16 - s}"
  scores = {label(s): {"ppl": 10.0 + s} for s in sinks.SINKS}
  scores.update(recompute={"ppl": 9.5}, dense={"ppl": 9.0})
  results = {"settings": {"window": 16, "stream_tokens": 200, "seq_len": 32},
             "models": {name: dict(scores) for name in sinks.MODELS}}
  results["models"]["pause"]["pause+15"] = {"ppl": 12.25}
  md = sinks._markdown(results)
  rows = [l for l in md.splitlines() if l.startswith("| ") and "model" not in l]
  assert len(rows) == len(sinks.MODELS)
  assert rows[0].startswith("| vanilla (no start token) | 10.00 | 11.00 | 12.00 | 14.00 | 9.50 |"
                            " 9.00 |")
  assert "(pause+15): 12.25" in md and "1+15: 11.00" in md


@pytest.mark.slow
def test_quick_mode_writes_results_and_a_one_layer_window_equals_the_recompute_oracle(tmp_path):
  out = tmp_path / "sinks"
  proc = _run([f"--outdir={out}", "--quick"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "ETA" in proc.stdout
  results = json.loads((out / "results.json").read_text())
  assert (out / "results.md").exists() and (out / "sinks.png").stat().st_size > 0
  window = results["settings"]["window"]
  assert window == 16 and set(results["models"]) == set(sinks.MODELS)
  for name, scores in results["models"].items():
    assert scores["dense"]["tokens"] == results["settings"]["seq_len"]
    assert scores[f"0+{window}"]["tokens"] == results["settings"]["stream_tokens"] - 1
    # Known answer: with one layer a cached key/value depends on its token alone, so window
    # attention over the last W cached tokens (positions inside the cache) is the oracle's fresh
    # pass over those W + 1 tokens.
    assert scores[f"0+{window}"]["ppl"] == pytest.approx(scores["recompute"]["ppl"], rel=1e-4)
    sizes = {scores[f"{s}+{window - s}"]["peak_cache_bytes"] for s in sinks.SINKS}
    assert len(sizes) == 1  # The same cache however it is split.
  assert f"pause+{window - 1}" in results["models"]["pause"]
  assert all(os.path.exists(out / "runs" / n / "config.json") for n in sinks.MODELS)


@pytest.mark.parametrize("args, setting", [(["--stream_tokens=10"], "--stream_tokens"),
                                           (["--steps=-1"], "--steps")])
def test_bad_flags_exit_2_and_write_nothing(tmp_path, args, setting):
  out = tmp_path / "sinks"
  proc = _run([f"--outdir={out}", "--quick"] + args, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and setting in errors[0]
  assert not os.path.exists(out / "runs") and not os.path.exists(out / "results.json")
