"""One error type for bad user input, and the CLI wrapper that turns it into exit code 2.

Every command-line entry point runs through `run`, so a bad setting anywhere prints one line
(`error: <setting>=<value> is invalid: <what is valid>`) and exits 2 before anything is written.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from absl import app
from absl import flags

EXIT_USAGE = 2


class UsageError(Exception):
  """Bad user input. The message is one line that a user can act on."""

  @classmethod
  def setting(cls, name: str, value: Any, valid: str) -> "UsageError":
    return cls(f"{name}={value!r} is invalid: {valid}")


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # Unknown flag, bad --config.key override, missing config file...
    message = " ".join(str(e).split())
    sys.stderr.write(f"error: {message}\nPass --help to see the flags.\n")
    sys.exit(EXIT_USAGE)


def run(main: Callable[[list[str]], Any]) -> None:
  """`absl.app.run` whose flag errors and `UsageError`s exit with code 2 and one line."""

  def guarded(argv):
    try:
      return main(argv)
    except UsageError as e:
      sys.stderr.write(f"error: {e}\n")
      sys.stderr.flush()
      sys.exit(EXIT_USAGE)

  app.run(guarded, flags_parser=_parse_flags)
