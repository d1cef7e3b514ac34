"""The whole Humpback pipeline and its demonstration, `--quick`, on the embedded world.

Every stage runs for real on a 1-layer model (base pretraining, M_yx, M0, augmentation, two
curation rounds, M1, M2 and the demonstration's other mixes); the numbers mean nothing, the
bookkeeping is checked: counts that agree across stages and files, re-runs that skip finished
stages, and an augmentation stopped part-way that resumes to the same candidates.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  outdir = tmp_path_factory.mktemp("humpback_demo")
  result = subprocess.run(
      [sys.executable, "-m", "pausejax.experiments.humpback", f"--outdir={outdir}", "--quick"],
      cwd=REPO, env=ENV, capture_output=True, text=True, timeout=1500)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return outdir


def _jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _rerun(outdir):
  """The pipeline command with the settings the demonstration ran it with."""
  return subprocess.run(
      [sys.executable, "-m", "pausejax.humpback", f"--workdir={outdir / 'pipeline'}", "--quick",
       f"--config.tfds_data_dir={outdir / 'tensorflow_datasets'}",
       "--config.finetune.backward_steps=24"],  # The runner's: twice the 12 quick steps.
      cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)


def test_report_counts_agree_with_files(demo):
  pipe = demo / "pipeline"
  report = json.loads((pipe / "report.json").read_text())
  assert list(report)[:9] == ["base", "data", "backward", "m0", "augment", "curate1", "m1",
                              "curate2", "m2"]
  data, augment = report["data"], report["augment"]
  assert data["seed_train"] + data["seed_validation"] == data["seed_pairs"] == 24 + 12
  assert data["segments"] == data["filters"]["kept"] == augment["segments"] == 20
  candidates = _jsonl(pipe / "augment" / "candidates.jsonl")
  assert len(candidates) == augment["candidates"] == 20 - augment["empty_instructions"]
  segments = [r["text"] for r in _jsonl(pipe / "data" / "segments.jsonl")]
  outputs = [c["output"] for c in candidates]
  assert outputs == [s for s in segments if s in outputs]  # Every candidate once, in order.
  for k in (1, 2):
    r = report[f"curate{k}"]
    scores = _jsonl(pipe / f"curate{k}" / "scores.jsonl")
    assert len(scores) == r["candidates"] == len(candidates)
    assert r["parsed"] + r["unparseable"] == r["candidates"]
    assert sum(r["histogram"].values()) == r["parsed"]
    kept = [s for s in scores if s["score"] is not None and s["score"] >= r["threshold"]]
    assert len(kept) == r["kept"] == len(_jsonl(pipe / f"curate{k}" / "curated.jsonl"))
    assert {"precision", "recall", "correct_candidates"} <= set(r["against_truth"])
  for stage, steps in (("backward", 24), ("m0", 12), ("m1", 12), ("m2", 12)):
    assert report[stage]["steps"] == steps  # The runner gives M_yx twice the steps.
    assert os.path.isdir(pipe / stage / "checkpoints")


def test_stage_tasks_are_registered_for_other_commands(demo):
  """`<workdir>/tasks.py` lets inspect_data (another process) read a stage's mixture."""
  pipe = demo / "pipeline"
  config = json.loads((pipe / "m1" / "config.json").read_text())
  assert config["task"] == "humpback_mix1"
  assert config["task_modules"].endswith("tasks.py")
  result = subprocess.run(
      [sys.executable, "-m", "pausejax.inspect_data", "--config=configs/tiny.py",
       f"--config.task_modules={pipe / 'tasks.py'}", "--config.task=humpback_seed",
       "--num_examples=1", f"--config.tfds_data_dir={demo / 'tensorflow_datasets'}"],
      cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "humpback_seed" in result.stdout and "Answer in the style of an AI Assistant" in \
      result.stdout


def test_results_table_and_plot(demo):
  results = json.loads((demo / "results.json").read_text())
  assert len(results["models"]) == 8
  for m in results["models"].values():
    assert m["n"] == 8 and 0 <= m["interval"][0] <= m["exact_match"] <= m["interval"][1]
  assert [r["round"] for r in results["curation"]] == [1, 2]
  text = (demo / "results.md").read_text()
  assert "| seed+A5 (no tags) |" in text and "precision" in text
  assert (demo / "humpback.png").stat().st_size > 0


def test_rerun_skips_finished_stages(demo):
  pipe = demo / "pipeline"
  before = (pipe / "augment" / "candidates.jsonl").stat().st_mtime_ns
  result = _rerun(demo)
  assert result.returncode == 0, result.stderr[-3000:]
  skipped = [ln for ln in result.stdout.splitlines() if ln.endswith("already done; skipped")]
  assert len(skipped) == 9, result.stdout[-2000:]
  assert (pipe / "augment" / "candidates.jsonl").stat().st_mtime_ns == before


def test_augmentation_stopped_part_way_resumes_to_the_same_candidates(demo):
  """As after kill -9 between two batches: finished batch files stay, the rest is redone."""
  pipe = demo / "pipeline"
  aug = pipe / "augment"
  expected = (aug / "candidates.jsonl").read_text()
  parts = sorted(os.listdir(aug / "parts"))
  assert len(parts) == 3  # 20 segments in batches of 8.
  shutil.copy(aug / "parts" / parts[0], demo / "first_part")
  os.remove(aug / "parts" / parts[-1])
  os.remove(aug / "candidates.jsonl")
  os.remove(aug / "stage.json")
  result = _rerun(demo)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "humpback: augment done" in result.stdout
  assert "augment 20/20 segments" in result.stdout  # Only the last batch was made.
  assert "augment 8/20" not in result.stdout and "augment 16/20" not in result.stdout
  assert (aug / "candidates.jsonl").read_text() == expected
  assert (aug / "parts" / parts[0]).read_text() == (demo / "first_part").read_text()


def test_likelihood_rating_matches_row_by_row_scores(demo):
  """`curate.method=likelihood`: the batched, padded scoring picks the rating a plain one-row
  forward pass per candidate answer picks."""
  import numpy as np
  import jax.numpy as jnp
  from pausejax import humpback
  from pausejax import humpback_data as hd
  model = humpback.StageModel(str(demo / "pipeline" / "m0"))
  prompts = [hd.forward_prompt(hd.curation_prompt("Sort the words: b a", out, "{instruction} "
                                                  "{output}"), hd.SEED_TAG)
             for out in ("a b", "b a", "KING")]
  got = model.best_rating(prompts)
  v = model.vocab
  for prompt, rating in zip(prompts, got):
    scores = []
    for r in hd.RATINGS:
      answer = list(v.encode(f"Score: {r}")) + [v.eos_id]
      pauses = [v.pause_id] * model.pauses if model.append else []
      row = model.prompt_ids(prompt, len(answer)) + pauses + answer
      logits = np.asarray(model.model(jnp.asarray([row])).astype(jnp.float32))[0]
      logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
      start = len(row) - len(answer)
      scores.append(sum(logp[start - 1 + j, answer[j]] for j in range(len(answer))))
    assert rating == hd.RATINGS[int(np.argmax(scores))]


def test_pause_model_pipeline_uses_m_ft_everywhere(demo, tmp_path):
  """On a base run with M_ft = 2 pauses, every fine-tuning stage inserts them and decoding
  (augmentation, curation) uses the same M_inf; likelihood curation end to end."""
  workdir = tmp_path / "pauses"
  result = subprocess.run(
      [sys.executable, "-m", "pausejax.humpback", f"--workdir={workdir}", "--quick",
       f"--config.base={demo / 'pipeline' / 'base'}", "--config.iterations=1",
       "--config.finetune.num_pauses=2", "--config.curate.method=likelihood",
       f"--config.tfds_data_dir={demo / 'tensorflow_datasets'}"],
      cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  assert not (workdir / "base").exists()  # The given base was used.
  for stage in ("backward", "m0", "m1"):
    config = json.loads((workdir / stage / "config.json").read_text())
    assert config["pause"]["num_finetune"] == 2
    assert config["init_from"] == str(demo / "pipeline" / "base" / "checkpoints")
  report = json.loads((workdir / "report.json").read_text())
  r = report["curate1"]
  assert r["method"] == "likelihood" and r["parsed"] == r["candidates"] == 20
  assert "curate2" not in report and "m2" not in report
