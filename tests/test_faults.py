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
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pausejax import checkpoint
from pausejax import ckpt_faults
from pausejax.errors import RunError
from pausejax.errors import UsageError

from conftest import REPO, tiny_config

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
