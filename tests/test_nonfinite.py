"""A diverging run: stopped at the first NaN/Inf with one line, or its bad updates skipped.

Divergence is forced for real: a learning rate of 1e30 without clipping or warm-up makes the
first update blow the weights up, and the next step's gradient is NaN.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, TINY_CLI, cli_overrides, tiny_config

DIVERGE = {"optimizer.learning_rate": 1e30, "optimizer.grad_clip_norm": 0.0,
           "optimizer.warmup_steps": 0}


def _config(tfds_dir, **overrides):
  return tiny_config(tfds_dir, num_train_steps=4, log_every_steps=1, eval_every_steps=0,
                     checkpoint_every_steps=1, keep_checkpoints=10, **{**DIVERGE, **overrides})


def _params(workdir, config, step):
  from pausejax import build, checkpoint, specials
  from pausejax import data as data_lib
  vocab = specials.load_vocabulary(data_lib.vocab_path(config))
  run = build.build(config, specials.padded_vocab_size(vocab.vocab_size), vocab.pause_id,
                    training=False)
  import jax
  params = checkpoint.load_params(os.path.join(workdir, "checkpoints", str(step)),
                                  run.abstract_params_tree)
  return [np.asarray(x) for x in jax.tree.leaves(params)]


def test_first_nonfinite_step_stops_the_run_before_anything_is_saved(tfds_dir, tmp_path):
  from pausejax import train
  from pausejax.errors import RunError
  config = _config(tfds_dir)
  with pytest.raises(RunError) as e:
    train.train_and_evaluate(config, str(tmp_path))
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith("step 2: non-finite")
  assert "last good checkpoint is step 1" in message and "nonfinite=skip" in message
  # Step 1's update was finite (huge weights, finite loss): saved. Nothing after it.
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]
  assert all(np.isfinite(p).all() for p in _params(tmp_path, config, 1))


def test_skip_leaves_nonfinite_updates_out_and_finishes(tfds_dir, tmp_path):
  from pausejax import train
  config = _config(tfds_dir, nonfinite="skip")
  info = train.train_and_evaluate(config, str(tmp_path))
  # Every update after the first diverges, so each is skipped: the weights stay step 1's.
  assert info["skipped_updates"] == 3
  after_1, after_4 = _params(tmp_path, config, 1), _params(tmp_path, config, 4)
  for a, b in zip(after_1, after_4):
    np.testing.assert_array_equal(a, b)
  assert all(np.isfinite(p).all() for p in after_4)


def test_bad_nonfinite_setting_is_one_line(tfds_dir, tmp_path):
  from pausejax import config as config_lib
  from pausejax.errors import UsageError
  with pytest.raises(UsageError, match=r"^nonfinite='ignore' is invalid: 'stop' .* or 'skip'"):
    config_lib.validate(_config(tfds_dir, nonfinite="ignore"))


@pytest.mark.slow
def test_cli_exits_1_with_one_line(tfds_dir, tmp_path):
  overrides = {**TINY_CLI, "num_train_steps": 4, "eval_every_steps": 0,
               "checkpoint_every_steps": 1, **DIVERGE}
  proc = subprocess.run(
      [sys.executable, "-m", "pausejax.train", "--config=configs/tiny.py",
       f"--workdir={tmp_path}", f"--config.tfds_data_dir={tfds_dir}", *cli_overrides(overrides)],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 1, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "step 2: non-finite" in errors[0], proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
