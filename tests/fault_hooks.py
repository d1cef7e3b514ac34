"""Faults injected into a training run: `--config.task_modules=fault_hooks` imports this.

Each fault acts only when its environment variables are set (see tests/test_faults.py):
FAULT_KIND at checkpoint step FAULT_AT_STEP. A corpus of files, for data faults, is registered
as the task "fault_corpus" when CORPUS_DIR is set.
"""

import errno
import os
import resource
import shutil
import signal
import time

from pausejax import checkpoint
from pausejax import tasks

if os.environ.get("CORPUS_DIR"):  # A corpus of files, for data faults.
  tasks.register_pretraining_task(
      "fault_corpus", pause_rate=0.1, shuffle_buffer_size=64,
      files={"train": os.path.join(os.environ["CORPUS_DIR"], "train.jsonl"),
             "validation": os.path.join(os.environ["CORPUS_DIR"], "validation.jsonl.gz")})

KIND = os.environ.get("FAULT_KIND", "")
AT_STEP = int(os.environ.get("FAULT_AT_STEP", "-1"))
_now = {"step": None}
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # Past the write limit: EFBIG, not a kill.


def _limit_writes():
  limit = int(os.environ.get("FAULT_FSIZE_BYTES", "65536"))
  resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


_save = checkpoint.Checkpointer.save
_save_data = checkpoint.DataIteratorHandler.save


def save(self, step, *args, **kwargs):
  _now["step"] = int(step)
  if int(step) == AT_STEP:
    if KIND == "fsize_blocking":  # Full before the save: its first (blocking) writes fail.
      _limit_writes()
    elif KIND == "data_file":  # The data file is swapped for the damaged copy next to it.
      target = os.environ["FAULT_FILE"]
      if os.path.exists(target + ".damaged"):
        shutil.copy(target + ".damaged", target)
      else:
        os.remove(target)
  return _save(self, step, *args, **kwargs)


def save_data(self, directory, args):
  here = _now["step"] == AT_STEP
  if here and KIND == "refuse":  # Storage that refuses writes (a bucket, a read-only mount).
    raise OSError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(directory))
  _save_data(self, directory, args)
  if here and KIND == "fsize_background":  # Full once the arrays are written in the background.
    _limit_writes()
  if KIND == "slow_save":  # A save that takes a while: room for kill -9 inside it.
    time.sleep(float(os.environ["FAULT_DELAY_S"]))


checkpoint.Checkpointer.save = save
checkpoint.DataIteratorHandler.save = save_data
