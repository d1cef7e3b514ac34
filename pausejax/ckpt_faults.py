"""Checkpoint faults: one clear line each, and the last good state kept.

Saving. A save that cannot be written (disk full, quota, permission, a bucket that refuses
writes) raises `SaveError`, a `RunError` (one line, exit code 1) that names the step, the step
directory, the OS or storage error and the last good checkpoint. With async checkpointing the
arrays are written in the background; `Checkpointer.check_saves()`, called after every training
step, raises it as soon as the background save has failed, never waiting for one still running.
The failed save's temporary directory is never read, and the next start deletes it.

Restoring. A checkpoint whose files cannot be read (truncated, deleted, corrupt) is
`Unreadable`. Training then moves it aside, into `<directory>_unreadable/<step>` (never deletes
it), and resumes from the newest checkpoint that restores, with one WARNING line per step moved;
with `checkpoint_on_unreadable="refuse"` it stops with one line instead. Nothing is moved until
an older checkpoint has restored: if none does, the run stops with one line and every
checkpoint stays where it was. Readers (`init_from`, `generate`, `evaluate`) move nothing (a
training run may be writing there): they read the newest checkpoint that restores, loudly, or
refuse. A checkpoint of another model (shapes) is a `UsageError` as before, never "unreadable".

Quiet background errors. After a failed background write, Orbax logs the error with its
traceback from each of its threads, and TensorStore's callbacks into the asyncio loop that Orbax
has already closed print one "Event loop is closed" traceback each (dozens per save). The error
reaches the main thread, which reports it in one line, so `quiet_background_errors` drops
exactly those: Orbax's ERROR records, "Event loop is closed" raised where nothing can catch it,
Orbax's write coroutines that are only closed at exit, and asyncio's "exception was never
retrieved" for the writes left behind by a failed save.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import logging as std_logging
import os
import re
import sys
from typing import Any, Callable, Iterator

from absl import logging

from pausejax.errors import STORAGE_ERRNOS
from pausejax.errors import RunError
from pausejax.errors import UsageError

UNREADABLE_SUFFIX = "_unreadable"

# OS errors a save may meet; TensorFlow's file ops report them by the OS's words only.
_STORAGE_ERRNOS = STORAGE_ERRNOS + (errno.ENOENT,)
# Object stores (GCS) that refuse a write.
_STORAGE_REFUSALS = re.compile(
    r"[^\n]*(?:PERMISSION_DENIED|\b403\b|Forbidden|does not have storage\.\S+ access|"
    r"RESOURCE_EXHAUSTED|quota)[^\n]*", re.IGNORECASE)
_MAX_REASON = 300
_ORBAX = f"{os.sep}orbax{os.sep}"
_save_failed = False  # Set once a failed save was reported: its orphaned writes are noise.


class SaveError(RunError):
  """A checkpoint that could not be written; the message is the one line to print."""


class Unreadable(Exception):
  """A checkpoint that cannot be restored (its files, not the config); the reason, one line."""


# ---------------------------------------------------------------------------------------------
# One line out of a library's exception.

def _chain(error: BaseException) -> list[BaseException]:
  """`error` and its causes, outermost first."""
  seen: list[BaseException] = []
  while error is not None and error not in seen and len(seen) < 20:
    seen.append(error)
    error = error.__cause__ or error.__context__
  return seen


def clean(text: str) -> str:
  """The first line of a TensorFlow/TensorStore message without op names and specs."""
  text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text)
  text = re.sub(r"\s*\[(?:Op:|tensorstore_spec=)[^\n]*", "", text)
  text = re.sub(r"\s+name:\s*$", "", text.strip().split("\n")[0].strip())
  return text if len(text) <= _MAX_REASON else text[:_MAX_REASON - 3] + "..."


def _describe_errno(code: int) -> str:
  return f"{errno.errorcode.get(code, code)}: {os.strerror(code)}"


def reason(error: BaseException) -> str:
  """Why a read or write failed, in a few words: the OS or storage error if there is one."""
  chain = _chain(error)
  for e in chain:
    if isinstance(e, OSError) and e.errno:
      return _describe_errno(e.errno)
  text = "\n".join(str(e) for e in chain)
  code = re.search(r"os_error_code='?(\d+)", text)  # TensorStore's file driver.
  if code:
    return _describe_errno(int(code.group(1)))
  for code in _STORAGE_ERRNOS:  # TensorFlow's file ops give the OS's words only.
    if os.strerror(code) in text:
      return _describe_errno(code)
  refusal = _STORAGE_REFUSALS.search(text)
  if refusal:
    return clean(refusal.group(0))
  innermost = chain[-1]
  return clean(str(innermost)) or type(innermost).__name__


# ---------------------------------------------------------------------------------------------
# Saving.

def save_error(step: int, step_dir: Any, directory: Any, last_good: int | None,
               error: BaseException) -> SaveError:
  """The one line for a save of `step` into `step_dir` that failed with `error`."""
  global _save_failed
  _save_failed = True
  if last_good is None:
    kept = ("No checkpoint was saved before it: free space or fix the storage, then re-run the "
            "same command to start again")
  else:
    kept = (f"The last good checkpoint is step {last_good} in {directory}: free space or fix the "
            "storage, then re-run the same command to resume from it")
  return SaveError(f"step {step}: the checkpoint could not be written to {step_dir} "
                   f"({reason(error)}); the run stopped. {kept}")


# ---------------------------------------------------------------------------------------------
# Restoring.

def moved_aside_path(directory: Any, step: int) -> Any:
  """Where the unreadable checkpoint `step` of `directory` goes: a free name next to it."""
  aside = directory.parent / (directory.name + UNREADABLE_SUFFIX)
  target, n = aside / str(step), 1
  while target.exists():
    n += 1
    target = aside / f"{step}.{n}"
  return target


def move_aside(step_dir: Any, directory: Any, step: int) -> Any:
  """Renames `step_dir` to `moved_aside_path(directory, step)`; returns the new path."""
  target = moved_aside_path(directory, step)
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
    step_dir.rename(target)
  except Exception as e:  # Storage refusing the rename: the run must not go on past it.
    raise RunError(f"checkpoint {step_dir} cannot be restored and cannot be moved aside to "
                   f"{target} ({reason(e)}); move it away yourself and re-run") from None
  return target


def warn(message: str) -> None:
  """One WARNING line on stderr, printed (never filtered by log levels), by process 0 only."""
  import jax  # Here: this module is imported before any backend is chosen.
  if jax.process_index() == 0:
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


def everywhere(ok: bool) -> bool:
  """Whether `ok` holds on every process (a step restores only if it restores everywhere)."""
  import jax
  if jax.process_count() == 1:
    return ok
  import numpy as np
  from jax.experimental import multihost_utils
  return bool(multihost_utils.process_allgather(np.int32(ok)).all())


def restore_newest(ckpt: Any, abstract_state: Any, data_iterator: Any,
                   on_unreadable: str) -> tuple[int | None, Any]:
  """`checkpoint.Checkpointer.restore_newest`: newest first, the unreadable ones moved aside."""
  failed = []
  for step in sorted(ckpt.all_steps(), reverse=True):
    why, state = None, None
    try:
      state = ckpt.restore(step, abstract_state, data_iterator)
    except UsageError:  # Another model or pipeline: an older checkpoint would not fit either.
      raise
    except Unreadable as e:
      why = str(e)
    except Exception as e:  # Orbax and TensorStore raise many types for a damaged file.
      why = reason(e)
    if everywhere(why is None):
      _move_aside_all(ckpt, failed, step)
      return step, state
    why = why or "it cannot be read on another process"
    if on_unreadable == "refuse":
      raise refused(f"checkpoint step {step} in {ckpt.directory}", why)
    failed.append((step, why))
  if failed:
    raise RunError(
        f"no checkpoint in {ckpt.directory} can be restored ("
        + "; ".join(f"step {s}: {why}" for s, why in failed) + "); nothing was moved. Copy a "
        "good checkpoint there, or use a fresh --workdir")
  return None, None


def _move_aside_all(ckpt: Any, failed: list[tuple[int, str]], restored: int) -> None:
  if not failed:
    return
  import jax
  import orbax.checkpoint as ocp
  for step, why in failed:
    if jax.process_index() == 0:
      target = move_aside(ckpt.step_dir(step), ckpt.directory, step)
      warn(f"checkpoint step {step} in {ckpt.directory} cannot be restored ({why}); moved "
           f"aside to {target}; resuming from step {restored}, the newest checkpoint that "
           "restores")
  ocp.multihost.sync_global_processes("pausejax_checkpoints_moved_aside")
  ckpt.reload()  # Orbax lists the steps once; the moved ones must leave its list.


def read_newest(step_dirs: list[Any], read: Callable[[Any], Any], on_unreadable: str) -> Any:
  """`read(step_dir)` of the first of `step_dirs` (newest first) that can be read.

  For readers: nothing is moved; each newer one that cannot be read gets a WARNING line
  ("move_aside") or stops the command with one line ("refuse", or a single step directory).
  """
  failed = []
  for step_dir in step_dirs:
    why, result = None, None
    try:
      result = read(step_dir)
    except UsageError:
      raise
    except Unreadable as e:
      why = str(e)
    except Exception as e:
      why = reason(e)
    if everywhere(why is None):
      for bad, bad_why in failed:
        warn(f"checkpoint {bad} cannot be read ({bad_why}); reading {step_dir} instead, the "
             "newest checkpoint that can be read (nothing was moved)")
      return result
    why = why or "it cannot be read on another process"
    if len(step_dirs) == 1:
      raise RunError(f"checkpoint {step_dir} cannot be read ({why})")
    if on_unreadable == "refuse":
      raise refused(f"checkpoint {step_dir}", why, reader=True)
    failed.append((step_dir, why))
  raise RunError("no checkpoint can be read: " + "; ".join(f"{d}: {why}" for d, why in failed))


def refused(what: str, why: str, *, reader: bool = False) -> RunError:
  """The one line for `what` not restored under checkpoint_on_unreadable="refuse"."""
  if reader:  # generate and evaluate take the setting from the run's config.json.
    return RunError(f"{what} cannot be read ({why}); stopped (checkpoint_on_unreadable=refuse): "
                    "move it away to read an older checkpoint, or set checkpoint_on_unreadable "
                    "to move_aside")
  return RunError(f"{what} cannot be restored ({why}); stopped (checkpoint_on_unreadable="
                  "refuse): move it away to use an older checkpoint, or set "
                  "--config.checkpoint_on_unreadable=move_aside")


# Readers (generate, evaluate) reach the checkpoint through `build.restore_model`: the run's
# policy travels to `checkpoint.load_params_and_step` in this variable.
_READ_POLICY = contextvars.ContextVar("checkpoint_on_unreadable", default="move_aside")


@contextlib.contextmanager
def reading_policy(policy: str) -> Iterator[None]:
  """Checkpoint reads inside use `policy` for an unreadable newest checkpoint."""
  token = _READ_POLICY.set(policy)
  try:
    yield
  finally:
    _READ_POLICY.reset(token)


def read_policy() -> str:
  return _READ_POLICY.get()


# ---------------------------------------------------------------------------------------------
# Quiet background errors.

class _DropOrbaxErrors(std_logging.Filter):
  """Orbax's ERROR records, and asyncio's "exception was never retrieved" for its writes."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno < std_logging.ERROR:
      return True
    if record.name == "asyncio":
      message = record.getMessage()
      return not ("exception was never retrieved" in message and
                  (_save_failed or _ORBAX in message))
    return _ORBAX + "checkpoint" not in (record.pathname or "")


def _quiet_unraisable(previous):
  def hook(unraisable):
    exc, obj = unraisable.exc_value, unraisable.object
    closed_loop = isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"
    code = getattr(obj, "cr_code", None)
    orbax_coroutine = code is not None and _ORBAX in code.co_filename
    if not (closed_loop or orbax_coroutine):
      previous(unraisable)
  hook.pausejax_quiet = True
  return hook


def quiet_background_errors() -> None:
  """Installs the filters described in the module docstring (once; idempotent)."""
  for logger in (logging.get_absl_logger(), std_logging.getLogger("asyncio")):
    if not any(isinstance(f, _DropOrbaxErrors) for f in logger.filters):
      logger.addFilter(_DropOrbaxErrors())
  if not getattr(sys.unraisablehook, "pausejax_quiet", False):
    sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)
