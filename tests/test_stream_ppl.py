"""Tests for pausejax.stream_ppl: streaming perplexity in four modes, in-process and as a CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, TINY_CLI, cli_overrides
from pausejax import model as model_lib
from pausejax import stream_ppl
from pausejax.errors import UsageError

V = 128


@pytest.fixture(scope="module")
def model():
  cfg = model_lib.ModelConfig(vocab_size=V, num_layers=2, d_model=32, num_heads=4, head_dim=8,
                              mlp_dim=64, tied_embeddings=True)
  return model_lib.Decoder(cfg, rngs=nnx.Rngs(0))


def _tokens(n: int, seed: int = 0) -> list[int]:
  return np.asarray(jax.random.randint(jax.random.key(seed), (n,), 0, V)).tolist()


def _forward_ppl(model, tokens) -> float:
  """exp(mean NLL) of every next token from one forward pass."""
  tokens_1xN = jnp.array([tokens])
  logits_NxV = model(tokens_1xN[:, :-1])[0]
  nll_N = jax.nn.logsumexp(logits_NxV, -1) - logits_NxV[jnp.arange(len(tokens) - 1),
                                                        tokens_1xN[0, 1:]]
  return math.exp(float(jnp.mean(nll_N)))


def test_every_mode_is_the_forward_pass_while_nothing_is_evicted(model):
  """A cache (and windows, and dense slots) covering the whole stream: four times one answer."""
  tokens = _tokens(40)
  results = stream_ppl.evaluate_stream(model, tokens, num_sinks=2, window=38, dense_len=40,
                                       chunk=16, progress=False)
  expected = _forward_ppl(model, tokens)
  for mode, summary in results["modes"].items():
    assert summary["ppl"] == pytest.approx(expected, rel=1e-5), mode
    assert summary["ppl"] == pytest.approx(math.exp(summary["nll_mean"]))
    assert summary["tokens"] == 39 and summary["complete"]
    assert summary["curve"]["tokens"][-1] == 39
    assert summary["curve"]["ppl"][-1] == pytest.approx(summary["ppl"], rel=1e-4)


def test_peak_cache_is_constant_and_dense_stops_when_full(model, capsys):
  short, long = _tokens(200, 1), _tokens(400, 1)
  kwargs = dict(num_sinks=1, window=7, dense_len=32, chunk=64, recompute_batch=32)
  a = stream_ppl.evaluate_stream(model, short, **kwargs)["modes"]
  b = stream_ppl.evaluate_stream(model, long, **kwargs)["modes"]
  for mode in stream_ppl.MODES:
    assert a[mode]["peak_cache_bytes"] == b[mode]["peak_cache_bytes"] > 0, mode
  # 2 layers x (keys + values) x 8 slots x 4 heads x 8 dims x float32, + the length counter.
  assert a["sinks"]["peak_cache_bytes"] == a["window"]["peak_cache_bytes"] == 2 * 2 * 8 * 32 * 4 + 4
  assert (a["dense"]["tokens"], b["dense"]["tokens"]) == (32, 32)
  assert not b["dense"]["complete"] and b["sinks"]["tokens"] == 399 and b["sinks"]["complete"]
  assert (b["window"]["num_sinks"], b["window"]["window"]) == (0, 8)
  assert (b["sinks"]["num_sinks"], b["sinks"]["window"]) == (1, 7)
  # The same prefix gives the same running perplexity, however long the stream goes on.
  assert a["sinks"]["curve"]["ppl"][0] == b["sinks"]["curve"]["ppl"][0]
  printed = capsys.readouterr().out
  assert "ETA" in printed and "sinks     ppl" in printed


@pytest.mark.parametrize("settings, message", [
    (dict(num_sinks=1, window=0), "window=0 is invalid"),
    (dict(num_sinks=5, window=4), "num_sinks=5 is invalid: at most window=4"),
    (dict(num_sinks=1, window=4, modes=["dense", "sink"]), "modes='dense,sink' is invalid"),
])
def test_bad_settings_raise_usage_error(model, settings, message):
  with pytest.raises(UsageError, match=message):
    stream_ppl.evaluate_stream(model, _tokens(30), dense_len=16, progress=False, **settings)


# ----------------------------------------------------------------------------------------------
# The command line, on a real (2-step) training run.

def _cli(*args):
  cmd = [sys.executable, "-m", "pausejax.stream_ppl", *args]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained_workdir(tfds_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("trained")
  cmd = [sys.executable, "-m", "pausejax.train", "--config=configs/tiny.py",
         f"--workdir={workdir}", f"--config.tfds_data_dir={tfds_dir}",
         *cli_overrides({**TINY_CLI, "num_train_steps": 2, "eval_every_steps": 0})]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  return workdir


@pytest.mark.slow
def test_cli_streams_the_validation_split_20_times_the_cache(trained_workdir, tmp_path):
  outdir = tmp_path / "out"
  proc = _cli(f"--workdir={trained_workdir}", f"--outdir={outdir}", "--num_sinks=1",
              "--window=15", "--max_tokens=400", "--chunk=128")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "ETA" in proc.stdout
  with open(outdir / "results.json") as f:
    results = json.load(f)
  with open(outdir / "stream_ppl.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  settings, modes = results["settings"], results["modes"]
  assert settings["stream_tokens"] == 400 >= 20 * settings["cache_slots"] == 20 * 16
  assert settings["step"] == 2 and settings["dense_len"] == 64
  assert list(modes) == list(stream_ppl.MODES)
  assert modes["dense"]["tokens"] == 64 and not modes["dense"]["complete"]
  for mode in ("window", "sinks", "recompute"):
    assert modes[mode]["tokens"] == 399 and modes[mode]["tokens_per_sec"] > 0
  assert modes["window"]["peak_cache_bytes"] == modes["sinks"]["peak_cache_bytes"]
  # The numbers are the library's for the same checkpoint and stream.
  from pausejax import build, config as config_lib, data as data_lib, specials
  config = config_lib.for_reading(str(trained_workdir), None)
  vocabulary = specials.load_vocabulary(data_lib.vocab_path(config))
  tokens = stream_ppl.stream_tokens(config, vocabulary, None, 400)
  assert tokens[0] == 0  # The run's start id (BOS) begins the stream.
  model, _ = build.restore_model(config, str(trained_workdir),
                                 specials.padded_vocab_size(vocabulary.vocab_size),
                                 vocabulary.pause_id)
  assert modes["dense"]["ppl"] == pytest.approx(_forward_ppl(model, tokens[:65]), rel=1e-4)
  again = stream_ppl.evaluate_stream(model, tokens, modes=["sinks"], num_sinks=1, window=15,
                                     dense_len=64, progress=False)
  assert again["modes"]["sinks"]["ppl"] == pytest.approx(modes["sinks"]["ppl"], rel=1e-5)


@pytest.mark.parametrize("extra, message", [
    (["--num_sinks=1", "--window=0"], "error: --window=0 is invalid: an integer >= 1"),
    (["--num_sinks=9", "--window=8"], "error: --num_sinks=9 is invalid: at most --window=8"),
    (["--modes=dense,windows"], "error: --modes='dense,windows' is invalid"),
])
def test_cli_bad_flags_exit_2_before_anything_is_read(tmp_path, extra, message):
  proc = _cli(f"--workdir={tmp_path}", f"--outdir={tmp_path / 'out'}", *extra)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr[-3000:]
  assert not os.path.exists(tmp_path / "out")


@pytest.mark.slow
def test_cli_without_checkpoint_exits_2(tmp_path):
  proc = _cli(f"--workdir={tmp_path / 'nothing'}", f"--outdir={tmp_path / 'out'}")
  assert proc.returncode == 2, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: --workdir=") and "no complete checkpoint" in last, last
  assert not os.path.exists(tmp_path / "out")


@pytest.mark.slow
def test_cli_text_shorter_than_the_cache_exits_2(trained_workdir, tmp_path):
  text = tmp_path / "short.txt"
  text.write_text("To be, or not to be")
  proc = _cli(f"--workdir={trained_workdir}", f"--outdir={tmp_path / 'out'}",
              f"--text_file={text}", "--num_sinks=4", "--window=28")
  assert proc.returncode == 2, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: --text_file='{text}' is invalid: the stream has "), last
  assert "longer than the cache (--num_sinks + --window = 32)" in last
  proc = _cli(f"--workdir={trained_workdir}", f"--outdir={tmp_path / 'out'}", "--max_tokens=20",
              "--num_sinks=4", "--window=28")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: --max_tokens=20 is invalid")
  assert not os.path.exists(tmp_path / "out")
