"""One error type for bad user input, and the CLI wrapper that turns it into exit code 2.

Every command-line entry point runs through `run`, so a bad setting anywhere prints one line
(`error: <setting>=<value> is invalid: <what is valid>`) and exits 2 before anything is written.
A run that cannot go on (`RunError`), and storage that refuses a write (`STORAGE_ERRNOS`), print
one line too and exit 1.
"""

from __future__ import annotations

import errno
import os
import re
import sys
import tempfile
from typing import Any, Callable

from absl import app
from absl import flags
from absl import logging

from pausejax import startup

EXIT_USAGE = 2
EXIT_FAILURE = 1


class UsageError(Exception):
  """Bad user input. The message is one line that a user can act on."""

  @classmethod
  def setting(cls, name: str, value: Any, valid: str) -> "UsageError":
    return cls(f"{name}={value!r} is invalid: {valid}")


# A training run that stopped before num_train_steps (SIGTERM: preemption, maintenance, a time
# limit) with its checkpoint saved: "resume me", not "finished" (EX_TEMPFAIL). launch/ keeps a
# copy of the number (it runs without this package).
EXIT_STOPPED_EARLY = 75


class RunError(Exception):
  """A run that cannot go on (a diverged loss, a fault): one line, exit code 1, state kept."""


# OS errors of storage that refuses a write or read (full, over quota, read-only, denied, I/O):
# at the top of a command they are one line and exit code 1, not a traceback.
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM,
                  errno.EROFS, errno.EIO)


def check_writable_dir(path: str, setting: str) -> str:
  """The absolute `path`; UsageError naming `setting` unless it is, or can become, a writable
  directory. Creates nothing (object-store paths like gs:// are left to the first write)."""
  if "://" in path:
    return path
  absolute = os.path.abspath(path)
  if os.path.exists(absolute) and not os.path.isdir(absolute):
    raise UsageError.setting(setting, path, "exists and is not a directory")
  probe = absolute
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise UsageError.setting(setting, path, f"{probe} is a file, not a directory")
  try:  # os.access says yes to root even on read-only mounts: really try (and leave nothing).
    with tempfile.TemporaryFile(dir=probe):
      pass
  except OSError as e:
    raise UsageError.setting(setting, path,
                             f"cannot write in {probe} ({e.strerror}); choose a writable path")
  return absolute


def _one_line(text: str) -> str:
  return " ".join(text.replace("\\n", " ").split())


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parse of `argv`; a flag error prints one line and exits 2, --help (-h) exits 0."""
  end = argv.index("--") if "--" in argv else len(argv)
  argv = [("--help" if a == "-h" else a) for a in argv[:end]] + argv[end:]
  try:
    return flags.FLAGS(argv)
  except SystemExit as e:  # absl prints the help and exits 1; asking for help is no failure.
    if e.code == 1 and startup.asks_for_help(argv[1:]):
      sys.exit(0)
    raise
  except flags.Error as e:  # Unknown flag, badly typed --config.key=value...
    message = _one_line(str(e))
  except (KeyError, AttributeError) as e:  # ml_collections: --config.<key> that does not exist.
    detail = _one_line(str(e.args[0] if e.args else e)).replace("\\", "")
    key = re.findall(r"'([^']+)'", detail)[:1] or [""]
    key = key[0]
    culprit = next((a.split("=")[0] for a in argv[1:] if a.startswith("--config.")
                    and key in a.split("=")[0].split(".")), "a --config.key override")
    hint = re.search(r'Did you mean "([^"]+)"', detail)
    message = f"{culprit} names no config key" + (
        f'; did you mean "{hint.group(1)}"?' if hint else "; see the config file for valid keys")
  except OSError as e:  # --config=<file> that cannot be read.
    message = _one_line(str(e))
  sys.stderr.write(f"error: {message}\nPass --help to see the flags.\n")
  sys.exit(EXIT_USAGE)


def run(main: Callable[[list[str]], Any]) -> None:
  """`absl.app.run` whose flag errors and `UsageError`s exit with code 2 and one line."""

  def guarded(argv):
    # Libraries (TFDS, SeqIO, Orbax) log every file they touch at INFO; the CLIs print what a
    # user needs themselves. --verbosity=0 (or -v 0) brings the INFO logs back.
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    try:
      return main(argv)
    except UsageError as e:
      sys.stderr.write(f"error: {e}\n")
      sys.stderr.flush()
      sys.exit(EXIT_USAGE)
    except RunError as e:
      sys.stderr.write(f"error: {e}\n")
      sys.stderr.flush()
      sys.exit(EXIT_FAILURE)
    except OSError as e:
      if "config file" not in str(e):  # config_flags reports a bad --config=<file> lazily.
        if e.errno not in STORAGE_ERRNOS:
          raise
        # Storage that refuses a write (a full disk, ...): the file and the OS's words suffice.
        where = f"{e.filename}: " if e.filename else ""
        sys.stderr.write(f"error: {where}{e.strerror} ({errno.errorcode[e.errno]})\n")
        sys.stderr.flush()
        sys.exit(EXIT_FAILURE)
      reason = re.findall(r"\[Errno \d+\] [^\n]+", str(e)) or [_one_line(str(e))]
      sys.stderr.write(f"error: --config: cannot load the config file: {reason[-1]}\n")
      sys.exit(EXIT_USAGE)

  app.run(guarded, flags_parser=parse_flags)
