"""Bad input: one clear error naming the setting, exit code 2, nothing written."""

import os
import subprocess
import sys

import pytest

from pausejax.errors import UsageError

from conftest import REPO, TINY_CLI, cli_overrides, tiny_config


def _snapshot(path):
  if not os.path.exists(path):
    return None
  return sorted((os.path.relpath(os.path.join(d, f), path), os.path.getmtime(os.path.join(d, f)))
                for d, _, files in os.walk(path) for f in files)


def _expect_error(config, workdir, *words):
  from pausejax import train
  before = _snapshot(workdir)
  with pytest.raises(UsageError) as e:
    train.train_and_evaluate(config, str(workdir))
  message = str(e.value)
  assert "\n" not in message
  for w in words:
    assert w in message, (w, message)
  assert _snapshot(workdir) == before  # Nothing written (a fresh workdir is not even created).
  return message


@pytest.mark.parametrize("rate", [1.0, -0.1, 3])
def test_pause_rate_outside_unit_interval(tfds_dir, tmp_path, rate):
  _expect_error(tiny_config(tfds_dir, **{"pause.rate": rate}), tmp_path / "w", "pause.rate",
                "[0, 1)")


@pytest.mark.parametrize("seq_len", [0, -5, 1])
def test_bad_seq_len(tfds_dir, tmp_path, seq_len):
  _expect_error(tiny_config(tfds_dir, seq_len=seq_len), tmp_path / "w", "seq_len")


def test_seq_len_too_short_for_the_pause_rate(tfds_dir, tmp_path):
  # num_pauses(0.75, 2) = 2 pauses would leave no real token; num_pauses(0.5, 2) = 1 leaves one.
  _expect_error(tiny_config(tfds_dir, seq_len=2, task="shakespeare", **{"pause.rate": 0.75}),
                tmp_path / "w", "seq_len", "real token")
  from pausejax import data as data_lib
  data_lib.prepare(tiny_config(tfds_dir, seq_len=2, task="shakespeare", **{"pause.rate": 0.5}))


def test_pause_rate_set_twice_is_refused(tfds_dir, tmp_path):
  msg = _expect_error(tiny_config(tfds_dir, task="shakespeare_pause", **{"pause.rate": 0.2}),
                      tmp_path / "w", "pause.rate=0.2", "leave it unset", "rate 0.1",
                      "--config.task=shakespeare --config.pause.rate=0.2")
  assert msg.startswith("pause.rate=0.2 is invalid")
  # The task's own rate, given again, is no clash.
  from pausejax import data as data_lib
  data = data_lib.prepare(tiny_config(tfds_dir, task="shakespeare_pause", **{"pause.rate": 0.1}))
  assert [p.pause_rate for p in data.train.parts] == [0.1]


def test_unknown_task(tfds_dir, tmp_path):
  msg = _expect_error(tiny_config(tfds_dir, task="c5_pause"), tmp_path / "w", "task", "c5_pause")
  assert "shakespeare_pause" in msg  # Says what is valid.


def test_unknown_eval_task(tfds_dir, tmp_path):
  _expect_error(tiny_config(tfds_dir, eval_task="nope"), tmp_path / "w", "eval_task", "nope")


@pytest.mark.parametrize("key", ["num_train_steps", "eval_every_steps", "checkpoint_every_steps",
                                 "num_eval_steps", "optimizer.warmup_steps"])
def test_negative_step_counts(tfds_dir, tmp_path, key):
  _expect_error(tiny_config(tfds_dir, **{key: -1}), tmp_path / "w", key, "non-negative")


def test_missing_vocab_file(tfds_dir, tmp_path):
  _expect_error(tiny_config(tfds_dir, vocab_path=str(tmp_path / "nope.model")), tmp_path / "w",
                "vocab_path", "nope.model")


def test_c4_not_prepared(tmp_path):
  _expect_error(tiny_config(str(tmp_path / "empty_tfds"), task="c4_pause"), tmp_path / "w",
                "c4/en:3.1.0", "not prepared", "tfds build")
  assert not os.path.exists(tmp_path / "empty_tfds" / "c4")


def test_unwritable_workdir(tfds_dir, tmp_path):
  a_file = tmp_path / "file"
  a_file.write_text("x")
  _expect_error(tiny_config(tfds_dir), a_file / "run", "workdir", "not a directory")
  _expect_error(tiny_config(tfds_dir), "/proc/pausejax_run", "workdir", "cannot write")


def test_odd_head_dim(tfds_dir, tmp_path):
  _expect_error(tiny_config(tfds_dir, **{"model.head_dim": 33}), tmp_path / "w", "model.head_dim")


@pytest.mark.slow
def test_checkpoint_of_another_model_shape(tfds_dir, tmp_path):
  from pausejax import train
  train.train_and_evaluate(tiny_config(tfds_dir, num_train_steps=2, eval_every_steps=0,
                                       checkpoint_every_steps=2), str(tmp_path))
  other = tiny_config(tfds_dir, num_train_steps=4, **{"model.d_model": 96})
  msg = _expect_error(other, tmp_path, "model.d_model", "config.json")  # The saved config.
  assert "96" in msg and "64" in msg
  # A run from before config.json was saved: the checkpoint's own shapes catch it.
  os.remove(tmp_path / "config.json")
  msg = _expect_error(other, tmp_path, "checkpoint", "shape")
  assert "96" in msg and "64" in msg


def _cli(args, env=None):
  return subprocess.run([sys.executable, "-m", "pausejax.train", *args], cwd=REPO,
                        capture_output=True, text=True, env={**os.environ, **(env or {})})


def _error_lines(stderr):
  return [l for l in stderr.splitlines() if l.startswith("error:")]


def test_cli_exits_2_with_one_line(tfds_dir, tmp_path):
  r = _cli(["--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}",
            f"--config.tfds_data_dir={tfds_dir}", "--config.pause.rate=1.5"])
  assert r.returncode == 2, r.stderr[-2000:]
  assert _error_lines(r.stderr) == [
      "error: pause.rate=1.5 is invalid: unset (the task's rate), or a fraction in [0, 1) for a "
      "task without a pause step, e.g. 0.1 for the paper's PausePT"]
  assert "Traceback" not in r.stderr
  assert not os.path.exists(tmp_path / "w")


def test_cli_unknown_config_key_exits_2(tmp_path):
  r = _cli(["--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}", "--config.pause.rat=0.2"])
  assert r.returncode == 2
  assert _error_lines(r.stderr) == [
      'error: --config.pause.rat names no config key; did you mean "rate"?']
  assert not os.path.exists(tmp_path / "w")


def test_cli_batch_not_divisible_by_devices(tfds_dir, tmp_path):
  r = _cli(["--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}",
            f"--config.tfds_data_dir={tfds_dir}", *cli_overrides(TINY_CLI),
            "--config.global_batch_size=6"],
           env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  assert r.returncode == 2, r.stderr[-2000:]
  (line,) = _error_lines(r.stderr)
  assert "global_batch_size=6" in line and "4" in line
  assert not os.path.exists(tmp_path / "w")


def test_cli_missing_config_file_exits_2(tmp_path):
  r = _cli(["--config=configs/nope.py", f"--workdir={tmp_path / 'w'}"])
  assert r.returncode == 2
  assert _error_lines(r.stderr) == ["error: --config: cannot load the config file: [Errno 2] No "
                                    "such file or directory: 'configs/nope.py'"]
