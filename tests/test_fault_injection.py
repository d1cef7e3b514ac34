"""Fault injection through the training CLI (slow): each fault, its one line and exit code, then
the same command again, which must log the losses of an uninterrupted run. Faults come from
tests/fault_hooks.py, which the run imports (`--config.task_modules=fault_hooks`): a write limit
through RLIMIT_FSIZE (no root needed), a refused write, a delay inside the save for kill -9, a
data file damaged mid-run. The fast checks of the same faults are in test_faults.py.
"""

import gzip
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, TINY_CLI, cli_overrides, tiny_config
from test_faults import DAMAGE, TMP_SUFFIX


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


