"""What every launch script shares: flag errors, `--` splitting, and running or printing commands.

The launch scripts use only the standard library, so they also run on a laptop that has no JAX.
Every external command is an argv list; nothing here ever goes through a local shell.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import re
import shlex
import subprocess
import sys
import threading
from typing import Callable, Sequence

EXIT_USAGE = 2  # Bad flags or flag values.
EXIT_FAILED = 1  # A command we ran failed.
# pausejax.train stopped before num_train_steps with a checkpoint saved: resume, do not count it
# as finished (= pausejax.errors.EXIT_STOPPED_EARLY; launch/ does not import pausejax).
EXIT_STOPPED_EARLY = 75

# Lines in a tool's stderr that mean "the cloud said no for lack of quota or capacity".
_QUOTA_PATTERNS = ("quota limit", "resource_exhausted", "quota exceeded", "insufficient quota",
                   "no more capacity", "stockout")


class UsageError(Exception):
  """A bad flag value; the message is one line."""

  @classmethod
  def setting(cls, flag: str, value: object, valid: str) -> "UsageError":
    return cls(f"{flag}={value!r} is invalid: {valid}")


class CommandError(Exception):
  """An external command failed; the message is one line saying what to do."""


class ArgumentParser(argparse.ArgumentParser):
  """argparse that reports a bad flag as one `error:` line and exit code 2."""

  def error(self, message: str):
    raise UsageError(f"{self.prog}: {message} (see --help)")


def parser(prog: str, description: str, epilog: str = "") -> ArgumentParser:
  return ArgumentParser(prog=prog, description=description, epilog=epilog,
                        formatter_class=argparse.RawDescriptionHelpFormatter)


def split_at_double_dash(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Splits `[own flags] -- [passed-through argv]`; the part after `--` is never parsed here."""
  argv = list(argv)
  if "--" in argv:
    i = argv.index("--")
    return argv[:i], argv[i + 1:]
  return argv, []


def check(pattern: str, flag: str, value: str, valid: str) -> str:
  """Returns `value` if it fully matches `pattern`, else raises a one-line UsageError."""
  if not isinstance(value, str) or not re.fullmatch(pattern, value):
    raise UsageError.setting(flag, value, valid)
  return value


def env_assignments(pairs: Sequence[str], flag: str = "--env") -> list[tuple[str, str]]:
  """Parses repeated `KEY=VALUE` flags; the value is kept verbatim (it never meets a shell)."""
  out = []
  for pair in pairs:
    key, sep, value = pair.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
      raise UsageError.setting(flag, pair, "KEY=VALUE with KEY a shell variable name")
    out.append((key, value))
  return out


def flag_value(argv: Sequence[str], name: str) -> str | None:
  """The last value of `--name=V` or `--name V` in a passed-through argv, else None."""
  value = None
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      value = arg.split("=", 1)[1]
    elif arg == f"--{name}" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


@dataclasses.dataclass
class Result:
  returncode: int
  stdout: str
  stderr: str


class Runner:
  """Runs argv lists, or with `dry_run` prints each one (`shlex.join`, one per line) instead."""

  def __init__(self, dry_run: bool, out=None):
    self.dry_run = dry_run
    self.out = out or sys.stdout

  def comment(self, text: str) -> None:
    if self.dry_run:
      self.out.write(f"# {text}\n")
      self.out.flush()

  def run(self, argv: Sequence[str], *, capture: bool = False, check: bool = True,
          echo_stderr: bool = True, stdin_text: str | None = None) -> Result:
    """Runs `argv`; on failure (with `check`) raises CommandError with one explaining line.

    stderr is passed through as it arrives (unless `echo_stderr` is False) and its tail kept for
    the error message; stdout is inherited, or returned when `capture`.
    """
    argv = [str(a) for a in argv]
    if self.dry_run:
      self.out.write(shlex.join(argv) + "\n")
      self.out.flush()
      return Result(0, "", "")
    try:
      proc = subprocess.Popen(argv, stdout=subprocess.PIPE if capture else None,
                              stderr=subprocess.PIPE,
                              stdin=subprocess.PIPE if stdin_text is not None else None,
                              text=True, errors="replace")
    except FileNotFoundError:
      raise CommandError(f"{argv[0]!r} was not found on PATH; install it first") from None
    tail: collections.deque[str] = collections.deque(maxlen=40)
    pump = threading.Thread(target=_pump_stderr, args=(proc.stderr, tail, echo_stderr),
                            daemon=True)
    pump.start()
    if stdin_text is not None:
      proc.stdin.write(stdin_text)
      proc.stdin.close()
    stdout = proc.stdout.read() if capture else ""
    returncode = proc.wait()
    pump.join()
    result = Result(returncode, stdout, "".join(tail))
    if check and returncode != 0:
      raise CommandError(explain_failure(argv, returncode, result.stderr))
    return result


def _pump_stderr(stream, tail, echo: bool) -> None:
  for line in stream:
    tail.append(line)
    if echo:
      sys.stderr.write(line)
      sys.stderr.flush()


def explain_failure(argv: Sequence[str], returncode: int, stderr: str) -> str:
  """One line: which command failed, and the stderr line that says why."""
  lines = [line.strip() for line in stderr.splitlines() if line.strip()]
  what = shlex.join(argv[:5]) + (" ..." if len(argv) > 5 else "")
  for line in lines:
    if any(p in line.lower() for p in _QUOTA_PATTERNS):
      return (f"`{what}` was refused for lack of quota or capacity: {line} -- try another zone, a "
              "smaller accelerator type, --spot/--queued, or ask for more quota")
  reason = f": {lines[-1]}" if lines else ""
  return f"`{what}` failed with exit code {returncode}{reason}"


def main_wrapper(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None
                 ) -> int:
  """Runs `main`, turning UsageError into exit 2 and CommandError into exit 1, one line each."""
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    return int(main(argv) or 0)
  except UsageError as e:
    sys.stderr.write(f"error: {e}\n")
    return EXIT_USAGE
  except CommandError as e:
    sys.stderr.write(f"error: {e}\n")
    return EXIT_FAILED
  except KeyboardInterrupt:
    sys.stderr.write("interrupted\n")
    return 130
