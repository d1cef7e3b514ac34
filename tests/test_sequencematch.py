"""SequenceMatch's loss, model samples and training (pausejax.sequencematch)."""

import json
import math
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from pausejax import backspace
from pausejax import sequencematch

from conftest import REPO
from conftest import cli_overrides
from conftest import tiny_config

EOS, BS = 1, 40


def _slow_chi2(logits, targets, weights, segments, is_model, gamma, alpha):
  """L_chi2 straight from its definition, one row and one position at a time."""
  def lse(x):
    m = max(x)
    return m + math.log(sum(math.exp(v - m) for v in x))
  data_r, every_r, every_v = [], [], []
  batch, length, _ = logits.shape
  for b in range(batch):
    for t in range(length):
      if weights[b, t] <= 0:
        continue
      done = targets[b, t] == EOS
      if not done and (t == length - 1 or segments[b, t + 1] != segments[b, t]):
        continue  # The next state is not in the row.
      q = float(logits[b, t, targets[b, t]])
      v = lse([float(x) for x in logits[b, t]])
      v_next = 0.0 if done else lse([float(x) for x in logits[b, t + 1]])
      r = q - gamma * v_next
      every_r.append(r)
      every_v.append(v - gamma * v_next)
      if not is_model[b]:
        data_r.append(r)
  return (-np.mean(data_r) + np.mean(every_v) + np.mean(np.square(every_r)) / (4 * alpha))


def test_chi2_loss_equals_the_slow_reference():
  rng = np.random.default_rng(0)
  batch, length, vocab = 4, 7, 12
  logits = rng.normal(size=(batch, length, vocab)).astype(np.float32) * 2
  targets = rng.integers(2, vocab, size=(batch, length))
  targets[0, 3] = EOS          # A terminal in the middle of row 0 (V(s') = 0 there).
  targets[2, 6] = EOS          # A terminal at a row's end: kept.
  weights = np.ones((batch, length), np.int32)
  weights[1, :2] = 0           # A prompt.
  weights[3, 5:] = 0           # Padding.
  segments = np.ones((batch, length), np.int32)
  segments[1, 4:] = 2          # Packed: row 1's position 3 has no next state.
  is_model = np.array([False, False, True, True])
  batch_d = {"decoder_target_tokens": jnp.asarray(targets),
             "decoder_loss_weights": jnp.asarray(weights),
             "decoder_segment_ids": jnp.asarray(segments)}
  for gamma, alpha in [(0.998, 0.01), (0.5, 1.0), (1.0, 0.3)]:
    got = sequencematch.chi2_terms(jnp.asarray(logits), batch_d, jnp.asarray(is_model),
                                   gamma=gamma, alpha=alpha, eos_id=EOS)
    want = _slow_chi2(logits, targets, weights, segments, is_model, gamma, alpha)
    np.testing.assert_allclose(float(got["chi2_loss"]), want, rtol=2e-5)
    assert float(got["chi2_loss"]) == pytest.approx(
        -float(got["chi2_reward"]) + float(got["chi2_value"]) + float(got["chi2_reg"]), rel=1e-5)


def test_the_loss_prefers_the_data_policy():
  """For one state with two actions, data always taking action 2: the loss is lower for logits
  that put more mass on action 2 than for the reverse (the objective points the right way)."""
  targets = jnp.array([[2, EOS]])
  batch = {"decoder_target_tokens": targets, "decoder_loss_weights": jnp.ones((1, 2), jnp.int32)}
  def loss(good):
    logits = jnp.full((1, 2, 4), -5.0).at[0, 0, 2].set(good).at[0, 0, 3].set(-good)
    logits = logits.at[0, 1, EOS].set(3.0)
    return float(sequencematch.chi2_terms(logits, batch, jnp.array([False]), gamma=0.9,
                                          alpha=1.0, eos_id=EOS)["chi2_loss"])
  assert loss(2.0) < loss(-2.0)


def test_sample_rows_carry_the_edit_structure_and_only_the_model_moves_have_weight():
  rows = sequencematch.sample_rows([[0, 5, 6]], [[7, 30, BS, 8, EOS]], seq_len=10,
                                   backspace_id=BS)
  full = [0, 5, 6, 7, 30, BS, 8, EOS]
  want = backspace.edit_structure(np.array(full[:-1] + [0] * 3), None, backspace_id=BS)
  np.testing.assert_array_equal(rows["decoder_input_tokens"][0], want[0])
  np.testing.assert_array_equal(rows["decoder_lifetimes"][0], want[2])
  assert rows["decoder_target_tokens"][0].tolist() == full[1:] + [0] * 3
  assert rows["decoder_loss_weights"][0].tolist() == [0, 0, 1, 1, 1, 1, 1, 0, 0, 0]
  assert rows["decoder_segment_ids"][0].tolist() == [1] * 7 + [0] * 3


def test_prompts_come_from_the_data_rows_without_noise():
  # A pretraining row: BOS a n <bs> b c ... (targets shifted); prompt_len 3 -> BOS a b.
  targets = np.array([[10, 50, BS, 11, 12, 13, 0, 0]])
  inputs = np.concatenate([[[0]], targets[:, :-1]], axis=1)
  weights = (targets != 0).astype(np.int32)
  got = sequencematch.prompts_from({"decoder_input_tokens": inputs,
                                    "decoder_target_tokens": targets,
                                    "decoder_loss_weights": weights}, 2, 3, BS)
  assert got == [[0, 10, 11], [0, 10, 11]]
  # A fine-tuning row: the prompt is everything before the first target with loss.
  weights = np.array([[0, 0, 0, 1, 1, 1, 0, 0]])
  got = sequencematch.prompts_from({"decoder_input_tokens": inputs,
                                    "decoder_target_tokens": np.array([[7, 8, 9, 4, 5, 1, 0, 0]]),
                                    "decoder_loss_weights": weights}, 1, 6, BS)
  assert got == [[0, 7, 8, 9]]  # prompt_len (6) does not reach into the answer.


def _sm_config(tfds_dir, **overrides):
  settings = {"backspace.rate": 0.1, "backspace.max_per_sequence": 4,
              "sequencematch.weight": 0.5, "sequencematch.bc_steps": 2,
              "sequencematch.model_rows": 4, "sequencematch.buffer_size": 8,
              "sequencematch.refresh_every_steps": 4, "sequencematch.sample_tokens": 16,
              "sequencematch.prompt_len": 8, "num_train_steps": 8, "checkpoint_every_steps": 4,
              "eval_every_steps": 4}
  settings.update(overrides)
  return settings


def test_sequencematch_training_runs_and_logs_its_parts(tfds_dir, tmp_path):
  from pausejax import train
  config = tiny_config(tfds_dir, **_sm_config(tfds_dir))
  info = train.train_and_evaluate(config, str(tmp_path / "w"))
  assert info["steps"] == 8 and np.isfinite(info["train_loss"])
  rows = [json.loads(l) for l in open(tmp_path / "w" / "metrics.jsonl")]
  weights = {r["step"]: r["chi2_weight"] for r in rows if "chi2_weight" in r}
  assert weights[2] == 0.0 and weights[8] == 0.5  # MLE first, then the mix.
  samples = [r for r in rows if "sample_backspace_rate" in r]
  assert [r["step"] for r in samples] == [0, 4]
  assert all(r["sample_tokens"] > 0 for r in samples)


@pytest.mark.slow
def test_resume_with_the_replay_buffer_is_bit_exact(tfds_dir, tmp_path):
  """Resumed from step 6 (buffer sampled at step 4, not renewed before step 8): the losses of the
  uninterrupted run, which needs the buffer from the checkpoint."""
  import shutil
  from pausejax import checkpoint
  from pausejax import train
  overrides = _sm_config(tfds_dir, checkpoint_every_steps=2, keep_checkpoints=10,
                         log_every_steps=1)
  full, part = tmp_path / "full", tmp_path / "part"
  train.train_and_evaluate(tiny_config(tfds_dir, **overrides), str(full))
  shutil.copytree(full, part)
  shutil.rmtree(part / "checkpoints" / "8")
  assert checkpoint.latest_step(str(part / "checkpoints")) == 6
  info = train.train_and_evaluate(tiny_config(tfds_dir, **overrides), str(part))
  assert info["steps_this_run"] == 2
  losses = lambda d: {r["step"]: r["train_loss"] for r in map(json.loads, open(d / "metrics.jsonl"))
                      if "train_loss" in r}
  a, b = losses(full), losses(part)
  assert a[7] == b[7] and a[8] == b[8], (a, b)


@pytest.mark.parametrize("key,value,valid", [
    ("sequencematch.gamma", 0.0, "(0, 1]"), ("sequencematch.gamma", 1.5, "(0, 1]"),
    ("sequencematch.alpha", 0, "> 0"), ("sequencematch.weight", 2.0, "[0, 1]"),
    ("sequencematch.buffer_size", 0, "positive")])
def test_bad_sequencematch_settings_are_one_error(tfds_dir, key, value, valid):
  from pausejax import config as config_lib
  from pausejax.errors import UsageError
  with pytest.raises(UsageError, match=key.replace(".", r"\.")) as e:
    config_lib.validate(tiny_config(tfds_dir, **{key: value}))
  assert valid in str(e.value)


@pytest.mark.slow
def test_cli_bad_gamma_and_rate_exit_2_with_one_line_and_nothing_written(tfds_dir, tmp_path):
  for setting in ("--config.sequencematch.gamma=0", "--config.backspace.rate=1.5"):
    work = tmp_path / "w"
    r = subprocess.run([sys.executable, "-m", "pausejax.train", "--config=configs/tiny.py",
                        f"--workdir={work}", f"--config.tfds_data_dir={tfds_dir}", setting],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and setting.split("=")[0][len("--config."):] in errors[0]
    assert "Traceback" not in r.stderr and not work.exists()
