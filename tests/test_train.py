"""End-to-end training on the embedded corpus: loss falls, outputs exist, resume is exact."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, TINY_CLI, cli_overrides, tiny_config


def _read(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _losses(lines):
  """{(step, key): value} for every loss the run logged."""
  return {(l["step"], k): l[k] for l in lines for k in ("train_loss", "eval_loss") if k in l}


def _train(config, workdir):
  from pausejax import train
  return train.train_and_evaluate(config, str(workdir))


@pytest.fixture(scope="module")
def reference_run(tfds_dir, tmp_path_factory):
  """An uninterrupted 12-step run, to compare interrupted runs against."""
  workdir = tmp_path_factory.mktemp("reference")
  _train(tiny_config(tfds_dir), workdir)
  return _read(workdir)


def test_training_loss_falls_and_outputs_exist(tfds_dir, tmp_path):
  config = tiny_config(tfds_dir, num_train_steps=40, eval_every_steps=20, num_eval_steps=4,
                       checkpoint_every_steps=20, **{"optimizer.learning_rate": 1e-2})
  info = _train(config, tmp_path)
  lines = _read(tmp_path)
  train_losses = [l["train_loss"] for l in lines if "train_loss" in l]
  evals = [l for l in lines if "eval_loss" in l]
  assert [l["step"] for l in evals] == [20, 40]
  # From ~ln(8064) = 9.0 at initialisation: the model must have learnt real statistics.
  assert evals[-1]["eval_loss"] < math.log(8064) - 2.5, evals
  assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
  assert train_losses[-1] < train_losses[0] - 2.0
  for key in ("learning_rate", "grad_norm", "pause_fraction", "tokens_per_sec",
              "real_tokens_per_sec", "mfu"):
    assert all(key in l for l in lines if "train_loss" in l), key
  for l in lines:
    if "train_loss" in l:  # One CPU device here: per-device throughput is the total.
      assert l["tokens_per_sec_per_device"] == pytest.approx(l["tokens_per_sec"])
  # About rate * L / (L + rate * L) of the input positions are pauses.
  fractions = [l["pause_fraction"] for l in lines if "pause_fraction" in l]
  assert 0.05 < sum(fractions) / len(fractions) < 0.12
  for name in ("loss.png", "summary.txt"):
    assert os.path.getsize(tmp_path / name) > 0
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["20", "40"]
  assert info["steps"] == 40


def test_rate_zero_has_no_pauses(tfds_dir, tmp_path):
  _train(tiny_config(tfds_dir, num_train_steps=2, eval_every_steps=0, task="shakespeare"),
         tmp_path)
  assert all(l["pause_fraction"] == 0.0 for l in _read(tmp_path) if "pause_fraction" in l)


@pytest.mark.slow
def test_finished_run_rerun_is_a_no_op(tfds_dir, tmp_path):
  config = tiny_config(tfds_dir, num_train_steps=4, eval_every_steps=0)
  _train(config, tmp_path)
  before = _read(tmp_path)
  _train(config, tmp_path)
  assert _read(tmp_path) == before


def _start(workdir, tfds_dir):
  cmd = [sys.executable, "-m", "pausejax.train", "--config=configs/tiny.py",
         f"--workdir={workdir}", f"--config.tfds_data_dir={tfds_dir}", *cli_overrides(TINY_CLI)]
  return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def _wait_for_step(proc, workdir, step, timeout=300):
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"run ended early: {proc.stdout.read()[-3000:]}")
    if os.path.exists(path) and any(l.get("step", 0) >= step for l in _read(workdir)):
      return
    time.sleep(0.2)
  raise AssertionError("timed out")


@pytest.mark.slow
def test_resume_after_kill_logs_the_same_losses(tfds_dir, tmp_path, reference_run):
  """kill -9 part-way, re-run the same command: every later loss equals the uninterrupted run's."""
  proc = _start(tmp_path, tfds_dir)
  _wait_for_step(proc, tmp_path, 8)  # Past the step-6 checkpoint.
  proc.kill()
  proc.wait()
  assert os.listdir(tmp_path / "checkpoints")
  _train(tiny_config(tfds_dir, async_checkpointing=True), tmp_path)
  assert _losses(_read(tmp_path)) == _losses(reference_run)  # Bitwise, on CPU.


@pytest.mark.slow
def test_sigterm_checkpoints_the_current_step_and_resumes(tfds_dir, tmp_path, reference_run):
  proc = _start(tmp_path, tfds_dir)
  _wait_for_step(proc, tmp_path, 2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  from pausejax.errors import EXIT_STOPPED_EARLY
  assert proc.returncode == EXIT_STOPPED_EARLY == 75, out[-3000:]  # Stopped early, not finished.
  assert "SIGTERM" in out
  from pausejax import checkpoint
  stopped_at = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), keep=3,
                                       save_every_steps=6).latest_step()
  assert stopped_at is not None and stopped_at < 12
  _train(tiny_config(tfds_dir), tmp_path)
  assert _losses(_read(tmp_path)) == _losses(reference_run)


@pytest.mark.slow
def test_gradient_accumulation_matches_one_big_batch(tfds_dir, tmp_path):
  base = tiny_config(tfds_dir, num_train_steps=4, eval_every_steps=0, log_every_steps=1)
  _train(base, tmp_path / "one")
  accumulated = tiny_config(tfds_dir, num_train_steps=4, eval_every_steps=0, log_every_steps=1,
                            microbatches=4)
  _train(accumulated, tmp_path / "four")
  one, four = _losses(_read(tmp_path / "one")), _losses(_read(tmp_path / "four"))
  assert one.keys() == four.keys() and len(one) == 5  # 4 train losses + the final eval.
  for key in one:
    assert four[key] == pytest.approx(one[key], rel=1e-4), key
  # Not trivially equal: the updates changed the loss from step to step.
  assert len({round(v, 4) for v in one.values()}) == 5
