"""Faults an operator meets: storage refusing writes, damaged checkpoints, damaged data.

Each ends in one line naming what failed, and the next run of the same command continues from the
last good state. The fast tests work on small checkpoints and files directly; the slow ones run
the training CLI with faults injected by tests/fault_hooks.py, which the run imports
(`--config.task_modules=fault_hooks`): a write limit through RLIMIT_FSIZE (no root needed), a
refused write, a delay inside the save for kill -9, a data file damaged mid-run. Resumed runs must
log the losses of an uninterrupted run.
"""

import errno
import gzip
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pausejax import checkpoint
from pausejax import ckpt_faults
from pausejax.errors import RunError
from pausejax.errors import UsageError

from conftest import REPO, TINY_CLI, cli_overrides, tiny_config

TMP_SUFFIX = ".orbax-checkpoint-tmp"


# ---------------------------------------------------------------------------------------------
# One line out of a library's error.

def _raised(error, cause):
  try:
    try:
      raise cause
    except Exception:
      raise error
  except Exception as e:  # noqa: BLE001 - the chained exception itself is the value.
    return e


@pytest.mark.parametrize("error, expected", [
    (OSError(errno.ENOSPC, "No space left on device", "/ckpt/6/x"),
     "ENOSPC: No space left on device"),
    (_raised(Exception("Encountered error while reading array index: <huge spec>"),
             ValueError('OUT_OF_RANGE: Error writing "params.a/0" in OCDBT database: Failed to '
                        "write 11964 bytes to file 6: File too large [os_error_code='27']")),
     "EFBIG: File too large"),
    (RuntimeError("{{function_node __wrapped__SaveV2}} /ckpt/6.orbax-checkpoint-tmp/data/x; "
                  "Disk quota exceeded [Op:SaveV2]"), "EDQUOT: Disk quota exceeded"),
    (RuntimeError("Error writing gs://b/ckpt/6/x: PERMISSION_DENIED: a@b.iam.gserviceaccount.com"
                  " does not have storage.objects.create access [source locations='x']"),
     "Error writing gs://b/ckpt/6/x: PERMISSION_DENIED: a@b.iam.gserviceaccount.com does not "
     "have storage.objects.create access [source locations='x']"),
    (ValueError('DATA_LOSS: Error reading "params.a/.zarray" in OCDBT database: Error decoding '
                "manifest [tensorstore_spec='{\"driver\": \"zarr\"}']\nmore"),
     'DATA_LOSS: Error reading "params.a/.zarray" in OCDBT database: Error decoding manifest'),
])
def test_the_reason_is_the_os_or_storage_error(error, expected):
  assert ckpt_faults.reason(error) == expected


def test_a_save_error_is_one_line_naming_step_path_reason_and_last_good():
  e = ckpt_faults.save_error(20, "/w/checkpoints/20", "/w/checkpoints", 10,
                             OSError(errno.ENOSPC, "No space left on device"))
  assert isinstance(e, RunError) and "\n" not in str(e)
  assert str(e) == (
      "step 20: the checkpoint could not be written to /w/checkpoints/20 (ENOSPC: No space left "
      "on device); the run stopped. The last good checkpoint is step 10 in /w/checkpoints: free "
      "space or fix the storage, then re-run the same command to resume from it")
  first = ckpt_faults.save_error(5, "/w/c/5", "/w/c", None, OSError(errno.EACCES, "x"))
  assert "EACCES: Permission denied" in str(first) and "No checkpoint was saved" in str(first)


def test_checkpoint_on_unreadable_is_validated():
  from pausejax import config as config_lib
  c = config_lib.defaults()
  assert c.checkpoint_on_unreadable == "move_aside"
  c.checkpoint_on_unreadable = "delete"
  with pytest.raises(UsageError, match=r"^checkpoint_on_unreadable='delete' is invalid: "
                                       r"'move_aside' .* or 'refuse'$"):
    config_lib.validate(c)
  c.checkpoint_on_unreadable = "refuse"
  config_lib.validate(c)
  # How a run handles faults, not what it computes: it may change when resuming.
  saved = config_lib.flatten(config_lib.defaults())
  assert config_lib.check_same_run(saved, c, "w") == [
      "checkpoint_on_unreadable: 'move_aside' -> 'refuse'"]


_STORAGE_FAULT = """
import errno, sys
from pausejax.errors import run
def main(argv):
  raise OSError(errno.ENOSPC, "No space left on device", "/w/metrics.jsonl")
run(main)
"""


def test_storage_errors_at_the_top_of_a_command_are_one_line():
  r = subprocess.run([sys.executable, "-c", _STORAGE_FAULT], cwd=REPO, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 1, r.stderr[-2000:]
  assert r.stderr.strip().splitlines()[-1] == (
      "error: /w/metrics.jsonl: No space left on device (ENOSPC)")
  assert "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------------
# Saves that cannot be written (small states, no training).

def _state(step: int) -> dict:
  base = jnp.arange(64 * 1024, dtype=jnp.float32)
  return {"step": jnp.asarray(step, jnp.int32),
          "params": {"a": base + step, "b": (base * step).reshape(256, 256)}}


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state)


def _pipeline():
  import tensorflow as tf
  return tf.data.Dataset.range(1000).shuffle(64, seed=3).batch(4).repeat()


def test_a_refused_save_names_step_path_error_and_last_good(tmp_path, monkeypatch):
  directory = tmp_path / "ckpt"
  with checkpoint.Checkpointer(directory, keep=3, save_every_steps=1) as ckpt:
    ckpt.save(1, _state(1), iter(_pipeline()))
    ckpt.wait_until_finished()

    def refuse(self, path, args):
      raise OSError(errno.EACCES, "Permission denied", str(path))
    monkeypatch.setattr(checkpoint.DataIteratorHandler, "save", refuse)
    with pytest.raises(ckpt_faults.SaveError) as e:
      ckpt.save(2, _state(2), iter(_pipeline()))
  assert str(e.value).startswith(
      f"step 2: the checkpoint could not be written to {directory}/2 (EACCES: Permission "
      f"denied); the run stopped. The last good checkpoint is step 1 in {directory}:")
  monkeypatch.undo()
  with checkpoint.Checkpointer(directory, keep=3, save_every_steps=1) as ckpt:
    assert ckpt.all_steps() == [1] and not [p for p in os.listdir(directory) if TMP_SUFFIX in p]


# ---------------------------------------------------------------------------------------------
# Checkpoints that cannot be restored.

def _saved(directory, steps=(1, 2, 3)):
  with checkpoint.Checkpointer(directory, keep=len(steps), save_every_steps=1,
                               async_save=False) as ckpt:
    for step in steps:
      ckpt.save(step, _state(step), iter(_pipeline()))


def _largest(directory):
  files = [os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs]
  return max(files, key=os.path.getsize)


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


DAMAGE = {
    "truncated array file": lambda step_dir: _truncate(_largest(step_dir / "state")),
    "deleted array file": lambda step_dir: os.remove(_largest(step_dir / "state")),
    "truncated metadata": lambda step_dir: _truncate(step_dir / "state" / "_METADATA"),
    "deleted metadata": lambda step_dir: os.remove(step_dir / "state" / "_METADATA"),
    "truncated data position": lambda step_dir: _truncate(_largest(step_dir / "data")),
    "deleted data position index": lambda step_dir: os.remove(
        next((step_dir / "data").glob("*.index"))),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_an_unreadable_newest_checkpoint_is_moved_aside_for_the_newest_that_restores(
    tmp_path, capsys, damage):
  directory = tmp_path / "checkpoints"
  _saved(directory)
  DAMAGE[damage](directory / "3")
  with checkpoint.Checkpointer(directory, keep=3, save_every_steps=1) as ckpt:
    it = iter(_pipeline())
    step, state = ckpt.restore_newest(_abstract(_state(0)), it)
    assert step == 2 and ckpt.all_steps() == [1, 2] and ckpt.latest_step() == 2
    assert ckpt.data_position_restored
  np.testing.assert_array_equal(state["params"]["a"], _state(2)["params"]["a"])
  assert sorted(os.listdir(directory)) == ["1", "2"]
  assert os.listdir(tmp_path / "checkpoints_unreadable") == ["3"]  # Moved, not deleted.
  (line,) = capsys.readouterr().err.strip().splitlines()
  assert line.startswith(f"WARNING: checkpoint step 3 in {directory} cannot be restored (")
  assert line.endswith(f"); moved aside to {tmp_path}/checkpoints_unreadable/3; resuming from "
                       "step 2, the newest checkpoint that restores")


def test_moved_aside_steps_never_overwrite_each_other(tmp_path, capsys):
  directory = tmp_path / "checkpoints"
  for _ in range(2):
    shutil.rmtree(directory, ignore_errors=True)
    _saved(directory)
    DAMAGE["truncated array file"](directory / "3")
    DAMAGE["truncated metadata"](directory / "2")
    with checkpoint.Checkpointer(directory, keep=3, save_every_steps=1) as ckpt:
      assert ckpt.restore_newest(_abstract(_state(0)))[0] == 1
  assert sorted(os.listdir(tmp_path / "checkpoints_unreadable")) == ["2", "2.2", "3", "3.2"]
  assert len(capsys.readouterr().err.strip().splitlines()) == 4


def test_refuse_stops_with_one_line_and_moves_nothing(tmp_path):
  directory = tmp_path / "checkpoints"
  _saved(directory)
  DAMAGE["truncated array file"](directory / "3")
  with checkpoint.Checkpointer(directory, keep=3, save_every_steps=1) as ckpt:
    with pytest.raises(RunError) as e:
      ckpt.restore_newest(_abstract(_state(0)), on_unreadable="refuse")
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith(f"checkpoint step 3 in {directory} cannot be restored (")
  assert message.endswith("); stopped (checkpoint_on_unreadable=refuse): move it away to use an "
                          "older checkpoint, or set --config.checkpoint_on_unreadable=move_aside")
  assert sorted(os.listdir(directory)) == ["1", "2", "3"]
  assert not (tmp_path / "checkpoints_unreadable").exists()


def test_when_no_checkpoint_restores_nothing_is_moved(tmp_path):
  directory = tmp_path / "checkpoints"
  _saved(directory, steps=(1, 2))
  for step in ("1", "2"):
    DAMAGE["truncated array file"](directory / step)
  with checkpoint.Checkpointer(directory, keep=3, save_every_steps=1) as ckpt:
    with pytest.raises(RunError, match=rf"^no checkpoint in {directory} can be restored \(step 2: "
                                       r".*; step 1: .*\); nothing was moved"):
      ckpt.restore_newest(_abstract(_state(0)))
  assert sorted(os.listdir(directory)) == ["1", "2"]


def test_a_checkpoint_of_another_model_is_still_a_usage_error(tmp_path):
  directory = tmp_path / "checkpoints"
  _saved(directory, steps=(1,))
  other = {"step": jnp.zeros((), jnp.int32), "params": {"a": jnp.zeros(3), "b": jnp.zeros(3)}}
  with checkpoint.Checkpointer(directory, keep=3, save_every_steps=1) as ckpt:
    with pytest.raises(UsageError, match="params.a has shape"):
      ckpt.restore_newest(_abstract(other))
  assert os.listdir(directory) == ["1"]


def test_readers_use_the_newest_readable_checkpoint_and_move_nothing(tmp_path, capsys):
  directory = tmp_path / "checkpoints"
  _saved(directory)
  DAMAGE["truncated array file"](directory / "3")
  abstract = _abstract(_state(0))["params"]
  params, step = checkpoint.load_params_and_step(str(tmp_path), abstract)
  assert step == 2
  np.testing.assert_array_equal(params["b"], _state(2)["params"]["b"])
  (line,) = capsys.readouterr().err.strip().splitlines()
  assert line.startswith(f"WARNING: checkpoint {directory}/3 cannot be read (")
  assert line.endswith(f"); reading {directory}/2 instead, the newest checkpoint that can be "
                       "read (nothing was moved)")
  assert sorted(os.listdir(directory)) == ["1", "2", "3"]
  # Refused, by the argument or by the reading policy (generate, evaluate).
  with pytest.raises(RunError, match=rf"^checkpoint {directory}/3 cannot be read \(.*\); stopped "
                                     r"\(checkpoint_on_unreadable=refuse\): move it away to read "
                                     r"an older checkpoint, or set checkpoint_on_unreadable to "
                                     r"move_aside$"):
    checkpoint.load_params(str(directory), abstract, on_unreadable="refuse")
  with checkpoint.reading_policy("refuse"), pytest.raises(RunError, match="refuse"):
    checkpoint.load_params(str(directory), abstract)
  # One step named: nothing else to read.
  with pytest.raises(RunError, match=rf"^checkpoint {directory}/3 cannot be read \(OUT_OF_RANGE"):
    checkpoint.load_params(str(directory / "3"), abstract)


# ---------------------------------------------------------------------------------------------
# Data files damaged under a stream.

def _stream(pattern):
  import tensorflow as tf
  from pausejax import readers
  ds = readers.file_source({"train": pattern}).get_dataset("train", shuffle=False)
  with pytest.raises(tf.errors.OpError) as e:
    for _ in ds.as_numpy_iterator():
      pass
  line = readers.error_line(e.value)
  assert "\n" not in line
  return line


@pytest.mark.parametrize("name", ["docs.txt.gz", "lines.jsonl.gz"])
def test_a_gzip_cut_short_is_one_line_naming_the_file(tmp_path, name):
  text = ("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(50_000))
          if name.endswith(".jsonl.gz") else "".join(f"doc {i}\n\n" for i in range(50_000)))
  data = gzip.compress(text.encode())
  (tmp_path / name).write_bytes(data[:len(data) // 2])
  assert _stream(str(tmp_path / name)) == (
      f"{tmp_path / name} is cut short or damaged (Compressed file ended before the "
      "end-of-stream marker was reached); a .gz file must be whole (check it with gzip -t)")


def test_a_gz_name_without_gzip_inside_is_one_line_naming_the_file(tmp_path):
  (tmp_path / "plain.jsonl.gz").write_text('{"text": "not compressed"}\n')
  assert _stream(str(tmp_path / "plain.jsonl.gz")) == (
      f"{tmp_path / 'plain.jsonl.gz'} is not gzip data (it starts with b'{{\"'); a .gz name "
      "needs gzip content")


@pytest.mark.parametrize("name", ["gone.jsonl", "gone.txt.gz"])
def test_a_file_deleted_under_a_stream_is_one_line_naming_it(tmp_path, name):
  from pausejax import readers
  import tensorflow as tf
  path = tmp_path / name
  path.write_bytes(gzip.compress(b"a") if name.endswith(".gz") else b'{"text": "a"}\n')
  ds = readers.file_source({"train": str(path)}).get_dataset("train", shuffle=False)
  path.unlink()
  with pytest.raises(tf.errors.OpError) as e:
    list(ds.as_numpy_iterator())
  assert readers.error_line(e.value) == f"{path}: No such file or directory"


def test_whole_gzip_files_still_read_whole(tmp_path):
  from pausejax import readers
  (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(b'{"text": "one"}\n{"text": "two"}'))
  (tmp_path / "b.txt.gz").write_bytes(gzip.compress(b"three\n\nfour") +
                                      gzip.compress(b"\n\nfive\n"))  # Two gzip members.
  (tmp_path / "empty.txt.gz").write_bytes(b"")
  source = readers.file_source({"train": str(tmp_path / "*.jsonl.gz"),
                                "validation": str(tmp_path / "*.txt.gz")})
  texts = lambda split: [x["text"].decode() for x in source.get_dataset(
      split, shuffle=False).as_numpy_iterator()]
  assert texts("train") == ["one", "two"]
  assert texts("validation") == ["three", "four", "five"]


# ---------------------------------------------------------------------------------------------
# The training CLI under faults (slow): each fault, its line and exit code, then the same
# command again, which must log the losses of an uninterrupted run.

RUN = {"checkpoint_every_steps": 3, "keep_checkpoints": 3}  # Checkpoints at 3, 6, 9, 12.


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _losses(workdir):
  return {(l["step"], k): l[k] for l in _metrics(workdir)
          for k in ("train_loss", "eval_loss") if k in l}


def _error_lines(stderr):
  return [l for l in stderr.splitlines() if l.startswith("error:")]


def _steps(directory):
  return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


@pytest.fixture(scope="module")
def hooks():
  """The directory of fault_hooks.py, the faults a run imports with task_modules=fault_hooks."""
  return os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def reference(tfds_dir, tmp_path_factory):
  """An uninterrupted 12-step run (workdir, losses), checkpoints at steps 6, 9 and 12."""
  from pausejax import train
  workdir = tmp_path_factory.mktemp("reference")
  train.train_and_evaluate(tiny_config(tfds_dir, **RUN), str(workdir))
  return str(workdir), _losses(workdir)


def _train_cmd(workdir, tfds_dir, **overrides):
  return [sys.executable, "-m", "pausejax.train", "--config=configs/tiny.py",
          f"--workdir={workdir}", f"--config.tfds_data_dir={tfds_dir}",
          *cli_overrides({**TINY_CLI, **RUN, **overrides})]


def _env(hooks, **variables):
  return {**os.environ, "PYTHONPATH": hooks, **{k: str(v) for k, v in variables.items()}}


def _train(workdir, tfds_dir, hooks, overrides=None, **variables):
  return subprocess.run(
      _train_cmd(workdir, tfds_dir, task_modules="fault_hooks", **(overrides or {})), cwd=REPO,
      env=_env(hooks, **variables), capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("kind, error", [
    ("fsize_background", "EFBIG: File too large"),  # The arrays, written in the background.
    ("fsize_blocking", "EFBIG: File too large"),    # The data position, written before return.
    ("refuse", "EACCES: Permission denied"),
])
def test_a_save_that_cannot_be_written_stops_the_run_at_once_with_one_line(
    tfds_dir, tmp_path, hooks, reference, kind, error):
  workdir = tmp_path / "run"
  r = _train(workdir, tfds_dir, hooks, FAULT_KIND=kind, FAULT_AT_STEP=6)
  assert r.returncode == 1, r.stderr[-3000:]
  assert _error_lines(r.stderr) == [
      f"error: step 6: the checkpoint could not be written to {workdir}/checkpoints/6 ({error}); "
      f"the run stopped. The last good checkpoint is step 3 in {workdir}/checkpoints: free space "
      "or fix the storage, then re-run the same command to resume from it"]
  for noise in ("Traceback", "Event loop is closed", "exception was never retrieved"):
    assert noise not in r.stderr, r.stderr[-3000:]
  # At once: the next log step at most, never the next save (step 9).
  assert max(l["step"] for l in _metrics(workdir)) <= 8
  assert _steps(workdir / "checkpoints")[0] == "3"

  r = _train(workdir, tfds_dir, hooks)  # Space freed: the same command.
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Resumed from step 3" in r.stdout
  assert not [p for p in _steps(workdir / "checkpoints") if TMP_SUFFIX in p]
  assert _losses(workdir) == reference[1]


def _copy_unfinished(reference, target):
  """The reference run as it was at step 9 (its step-12 checkpoint removed)."""
  shutil.copytree(reference, target)
  shutil.rmtree(os.path.join(target, "checkpoints", "12"))
  return target


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated array file", "deleted metadata",
                                    "truncated data position"])
def test_an_unreadable_newest_checkpoint_is_moved_aside_and_the_run_resumes(
    tfds_dir, tmp_path, reference, damage):
  import pathlib
  workdir = pathlib.Path(_copy_unfinished(reference[0], tmp_path / "run"))
  DAMAGE[damage](workdir / "checkpoints" / "9")
  r = subprocess.run(_train_cmd(workdir, tfds_dir), cwd=REPO, capture_output=True, text=True,
                     timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  (warning,) = [l for l in r.stderr.splitlines() if l.startswith("WARNING: checkpoint")]
  assert warning.startswith(
      f"WARNING: checkpoint step 9 in {workdir}/checkpoints cannot be restored (")
  assert warning.endswith(f"moved aside to {workdir}/checkpoints_unreadable/9; resuming from "
                          "step 6, the newest checkpoint that restores")
  assert "Traceback" not in r.stderr
  assert "Resumed from step 6" in r.stdout
  assert _steps(workdir / "checkpoints_unreadable") == ["9"]
  assert _losses(workdir) == reference[1]


@pytest.mark.slow
def test_refuse_keeps_an_unreadable_checkpoint_where_it_is(tfds_dir, tmp_path, reference):
  import pathlib
  workdir = pathlib.Path(_copy_unfinished(reference[0], tmp_path / "run"))
  DAMAGE["truncated array file"](workdir / "checkpoints" / "9")
  r = subprocess.run(_train_cmd(workdir, tfds_dir, checkpoint_on_unreadable="refuse"),
                     cwd=REPO, capture_output=True, text=True, timeout=900)
  assert r.returncode == 1, r.stderr[-3000:]
  (line,) = _error_lines(r.stderr)
  assert line.startswith(f"error: checkpoint step 9 in {workdir}/checkpoints cannot be restored "
                         "(OUT_OF_RANGE")
  assert line.endswith("(checkpoint_on_unreadable=refuse): move it away to use an older "
                       "checkpoint, or set --config.checkpoint_on_unreadable=move_aside")
  assert "Traceback" not in r.stderr
  assert _steps(workdir / "checkpoints") == ["6", "9"]


@pytest.mark.slow
def test_readers_and_init_from_read_the_newest_checkpoint_that_restores(
    tfds_dir, tmp_path, reference):
  import pathlib
  workdir = pathlib.Path(shutil.copytree(reference[0], tmp_path / "run"))
  DAMAGE["truncated array file"](workdir / "checkpoints" / "12")
  expected = (f"WARNING: checkpoint {workdir}/checkpoints/12 cannot be read (OUT_OF_RANGE",
              f"reading {workdir}/checkpoints/9 instead, the newest checkpoint that can be read "
              "(nothing was moved)")
  commands = {
      "generate": [sys.executable, "-m", "pausejax.generate", f"--workdir={workdir}",
                   "--prompt=ROMEO:", "--max_new_tokens=2"],
      "evaluate": [sys.executable, "-m", "pausejax.evaluate", f"--workdir={workdir}",
                   "--eval_task=addition", "--max_examples=2"],
      "init_from": _train_cmd(tmp_path / "finetune", tfds_dir, num_train_steps=1,
                              init_from=str(workdir)),
  }
  for name, command in commands.items():
    r = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (name, r.stderr[-3000:])
    (warning,) = [l for l in r.stderr.splitlines() if l.startswith("WARNING: checkpoint")]
    assert warning.startswith(expected[0]) and warning.endswith(expected[1]), (name, warning)
    assert name == "init_from" or "checkpoint step 9" in r.stdout, (name, r.stdout)
  assert _steps(workdir / "checkpoints") == ["12", "6", "9"]
  # The run's own setting, read from its config.json, makes readers refuse.
  saved = json.loads((workdir / "config.json").read_text())
  (workdir / "config.json").write_text(json.dumps({**saved, "checkpoint_on_unreadable": "refuse"}))
  r = subprocess.run(commands["generate"], cwd=REPO, capture_output=True, text=True, timeout=900)
  assert r.returncode == 1, r.stderr[-3000:]
  (line,) = _error_lines(r.stderr)
  assert line.startswith(f"error: checkpoint {workdir}/checkpoints/12 cannot be read (")
  assert "checkpoint_on_unreadable=refuse" in line


def _tmp_dirs(directory):
  return [p for p in _steps(directory) if TMP_SUFFIX in p]


def _wait(condition, proc, what, timeout_s=300):
  deadline = time.monotonic() + timeout_s
  while not condition():
    if proc.poll() is not None:
      raise AssertionError(f"the run ended before {what} (exit code {proc.returncode})")
    if time.monotonic() > deadline:
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(0.01)


@pytest.mark.slow
def test_kill_9_at_random_moments_then_the_same_command_finishes_exactly(
    tfds_dir, tmp_path, hooks, reference):
  seed = random.randrange(10**6)
  rng = random.Random(seed)
  workdir = tmp_path / "run"
  directory = workdir / "checkpoints"
  log = tmp_path / "stdout.txt"
  # Each save waits 1.5 s after writing the data position: a kill then lands inside a save.
  env = _env(hooks, FAULT_KIND="slow_save", FAULT_DELAY_S=1.5)
  moments = [("inside a save", rng.uniform(0, 1.4)), ("any time", rng.uniform(0, 6)),
             ("inside a save", rng.uniform(0, 1.4))]
  landed_in_save = []
  for where, delay_s in moments:
    with open(log, "w") as out:
      proc = subprocess.Popen(_train_cmd(workdir, tfds_dir, task_modules="fault_hooks"),
                              cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
      # The banner comes after the start-up's clean-up of a killed save's leftovers.
      _wait(lambda: "pausejax:" in log.read_text(), proc, "the start")
      if where == "inside a save":
        _wait(lambda: _tmp_dirs(directory), proc, "a save")
      time.sleep(delay_s)
      if proc.poll() is not None:  # It finished first: nothing left to interrupt.
        break
      landed_in_save.append(bool(_tmp_dirs(directory)))
      proc.send_signal(signal.SIGKILL)
      proc.wait(timeout=60)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  assert any(landed_in_save), (seed, landed_in_save)
  r = subprocess.run(_train_cmd(workdir, tfds_dir, task_modules="fault_hooks"), cwd=REPO,
                     env=_env(hooks), capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, (seed, r.stderr[-3000:])
  assert not _tmp_dirs(directory)
  assert _losses(workdir) == reference[1], seed


# Data faults: the eval file of a corpus damaged at step 3; the eval at step 6 reads it.

def _corpus(directory):
  os.makedirs(directory, exist_ok=True)
  words = "to be or not that is the question whether nobler in mind suffer slings".split()
  rng = random.Random(1)
  docs = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(60)]
  with open(os.path.join(directory, "train.jsonl"), "w") as f:
    f.writelines(json.dumps({"text": d}) + "\n" for d in docs[:50])
  lines = "".join(json.dumps({"text": d}) + "\n" for d in docs[50:])  # Read whole by an eval.
  with gzip.open(os.path.join(directory, "validation.jsonl.gz"), "wt") as f:
    f.write(lines)
  return lines


@pytest.fixture(scope="module")
def corpus_reference(tfds_dir, tmp_path_factory, hooks):
  corpus = str(tmp_path_factory.mktemp("corpus"))
  _corpus(corpus)
  workdir = tmp_path_factory.mktemp("corpus_reference")
  r = _train(workdir, tfds_dir, hooks, {"task": "fault_corpus"}, CORPUS_DIR=corpus)
  assert r.returncode == 0, r.stderr[-3000:]
  return _losses(workdir)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["missing", "truncated gzip", "malformed line"])
def test_an_eval_file_damaged_mid_run_is_one_line_naming_it(
    tfds_dir, tmp_path, hooks, corpus_reference, fault):
  corpus = str(tmp_path / "corpus")
  lines = _corpus(corpus)
  path = os.path.join(corpus, "validation.jsonl.gz")
  whole = open(path, "rb").read()
  if fault == "truncated gzip":
    open(path + ".damaged", "wb").write(whole[:len(whole) // 2])
    expected = (f"{path} is cut short or damaged (Compressed file ended before the end-of-stream "
                "marker was reached); a .gz file must be whole (check it with gzip -t)")
  elif fault == "malformed line":
    bad = lines.splitlines()
    bad[6] = bad[6][:-3]
    with gzip.open(path + ".damaged", "wt") as f:
      f.write("\n".join(bad) + "\n")
    expected = f"{path}:7 is not JSON ("
  else:
    expected = f"{path}: No such file or directory"
  workdir = tmp_path / "run"
  r = _train(workdir, tfds_dir, hooks, {"task": "fault_corpus"}, CORPUS_DIR=corpus,
             FAULT_KIND="data_file", FAULT_AT_STEP=3, FAULT_FILE=path)
  assert r.returncode == 1, r.stderr[-3000:]
  (line,) = _error_lines(r.stderr)
  assert line.startswith(f"error: the eval data cannot be read: {expected}"), line
  assert "Traceback" not in r.stderr
  open(path, "wb").write(whole)  # Repaired: the same command resumes from step 3.
  r = _train(workdir, tfds_dir, hooks, {"task": "fault_corpus"}, CORPUS_DIR=corpus)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Resumed from step 3" in r.stdout
  assert _losses(workdir) == corpus_reference


def test_a_tfrecord_cut_short_names_the_task_split_and_dataset(tfds_dir, tmp_path):
  """TFRecord errors name no file: the line says which data was being read."""
  from pausejax import data as data_lib
  copy = shutil.copytree(tfds_dir, tmp_path / "tfds")
  (path,) = [os.path.join(d, f) for d, _, fs in os.walk(copy) for f in fs
             if "validation.tfrecord" in f]
  _truncate(path)
  config = tiny_config(str(copy), num_eval_steps=0)
  data = data_lib.prepare(config)
  batches = data_lib.eval_dataset(data, config, data_lib.ShardPlan(1, (0,), 8))
  with pytest.raises(RunError) as e:
    for _ in batches:
      pass
  assert re.fullmatch(
      r"the eval data cannot be read: truncated record at \d+' failed with Read less bytes than "
      rf"requested \(in task shakespeare_pause, split validation: TFDS pausejax_shakespeare\S* in "
      rf"{copy}\)", str(e.value)), str(e.value)
