"""Start-up of the command-line programs: a quick --help and a stderr free of native noise.

`python -m pausejax.<program>` imports this package before the program itself, and
`pausejax/__init__.py` calls `begin()` then. It acts for the programs only: a library should not
change how its host program prints.

1. --help. absl parses flags inside `app.run`, after the program's imports, which take seconds
   (TensorFlow, SeqIO, Orbax, Flax). `--help` (also `-h`, `-?`, `--helpshort`) is answered here
   instead: the program's flag definitions (its `define_flags()`, or its top-level
   `flags.DEFINE_*(...)` statements) are read from its source and run with absl and
   ml_collections alone, and absl's own parser prints the help, as the program would have. A
   program whose definitions need anything else is imported as usual, as it is for `--helpfull`
   (which lists every library's flags too).

2. Native noise. TensorFlow and the CUDA stubs it loads log from C++ before any log level applies
   (TF_CPP_MIN_LOG_LEVEL does not hide them: tensorflow/tensorflow#100442), and tensorflow-text's
   SentencePiece logs at INFO every time an input pipeline starts. So fd 2 goes through a small
   child process that drops exactly the lines `NOISE` matches and passes everything else on as
   it comes. A child process rather than a thread, so that a crash's last lines still get out.
   TF_CPP_MIN_LOG_LEVEL defaults to 2 (no TensorFlow INFO or WARNING logs); a user's value wins,
   and TF_CPP_MIN_LOG_LEVEL=0 also turns the filter off: every native line then shows.
"""

from __future__ import annotations

import ast
import atexit
import os
import re
import select
import signal
import sys
import time
from typing import Sequence

# Asking for the program's own flags; -h is not an absl flag, `errors.run` reads it as --help.
SHORT_HELP = frozenset({"-h", "--help", "-help", "-?", "--?", "--helpshort", "-helpshort"})
HELP = SHORT_HELP | {"--helpfull", "-helpfull", "--helpxml", "-helpxml"}

# Whole stderr lines that tell a pausejax user nothing. TensorFlow only feeds the input pipeline
# (it is kept off the GPUs), so its CUDA set-up is never the user's concern.
NOISE = tuple(re.compile(p) for p in (
    # absl C++ logging, once per native library that logs before logging is initialised.
    rb"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$",
    rb"cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine, GPU will not be used\.$",
    rb"cuda_platform\.cc:\d+\] failed call to cuInit: ",
    # TensorFlow's CUDA libraries next to JAX's register the same factories twice.
    rb"\] Unable to register cu(DNN|FFT|BLAS) factory: Attempting to register factory for plugin ",
    rb"computation_placer\.cc:\d+\] computation placer already registered\. ",
    # tensorflow-text, for each pipeline, when the SentencePiece model has no normalization map.
    rb"^normalizer\.cc\(\d+\) LOG\(INFO\) precompiled_charsmap is empty\. "
    rb"use identity normalization\.$",
))

_READ_SIZE = 1 << 16
# A partial line (a progress bar, a prompt) waits this long for the rest of its line.
_PARTIAL_LINE_WAIT_S = 0.2
# At exit, how long to wait for the filter to pass on the last lines. Subprocesses that inherited
# stderr and outlive the program keep it open longer; their lines still get out, just later.
_EXIT_WAIT_S = 2.0


def cli_module(orig_argv: Sequence[str]) -> str | None:
  """The module `python [options] -m pausejax.<program> ...` runs ("pausejax.train"), or None."""
  i = 1
  while i < len(orig_argv):
    arg = orig_argv[i]
    if arg == "-m":
      module = orig_argv[i + 1] if i + 1 < len(orig_argv) else None
      break
    if arg.startswith("-m"):
      module = arg[2:]
      break
    if arg in ("-X", "-W", "--check-hash-based-pycs"):  # Options that take the next argument.
      i += 2
    elif arg.startswith("-") and arg not in ("-", "-c"):
      i += 1
    else:  # A script, -c code or stdin.
      return None
  else:
    return None
  return module if module and module.startswith("pausejax.") else None


def asks_for_help(args: Sequence[str], kinds: frozenset[str] = HELP) -> bool:
  """Whether `args` (program arguments, no argv[0]) ask for help before any `--`."""
  for arg in args:
    if arg == "--":
      return False
    if arg in kinds:
      return True
  return False


def begin() -> None:
  """Start-up of `python -m pausejax.<program>`; does nothing on any other import."""
  # While Python locates the -m module it has imported this package but not yet the module, and
  # sys.argv[0] is "-m".
  module = cli_module(getattr(sys, "orig_argv", ()))
  if module is None or not sys.argv or sys.argv[0] != "-m":
    return
  path = _source_path(module)
  if path is not None and asks_for_help(sys.argv[1:], SHORT_HELP):
    quick_help(path)  # Exits, unless the program must define its flags itself.
  user_level = os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if user_level != "0":
    filter_stderr()


# ------------------------------------------------------------------------------------------------
# --help without the program's imports.

def _source_path(module: str) -> str | None:
  package_dir = os.path.dirname(os.path.abspath(__file__))
  path = os.path.join(package_dir, *module.split(".")[1:]) + ".py"
  return path if os.path.isfile(path) else None


def _defines_flags(node: ast.stmt) -> bool:
  """`flags.DEFINE_x(...)` or `_X = config_flags.DEFINE_x(...)` at the top of a module."""
  value = getattr(node, "value", None)
  return (isinstance(node, (ast.Expr, ast.Assign, ast.AnnAssign))
          and isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute)
          and isinstance(value.func.value, ast.Name)
          and value.func.value.id in ("flags", "config_flags")
          and value.func.attr.startswith("DEFINE"))


def _is_literal_constant(node: ast.stmt) -> bool:
  """`NAME = <literal>` at the top of a module: safe to run, and flag definitions may use it."""
  if not (isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) for t in node.targets)):
    return False
  try:
    ast.literal_eval(node.value)
  except (ValueError, TypeError):
    return False
  return True


def _is_future_import(node: ast.stmt) -> bool:
  return isinstance(node, ast.ImportFrom) and node.module == "__future__"


def _is_main_guard(node: ast.stmt) -> bool:
  test = getattr(node, "test", None)
  return (isinstance(node, ast.If) and isinstance(test, ast.Compare)
          and isinstance(test.left, ast.Name) and test.left.id == "__name__")


def _called_name(node: ast.stmt) -> str | None:
  if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
    func = node.value.func
    return func.id if isinstance(func, ast.Name) else None
  return None


def flag_definitions(source: str, filename: str) -> tuple[str | None, ast.Module] | None:
  """(docstring, the statements that define the flags) of a program, or None if unsure.

  Sure means: the `if __name__ == "__main__":` block only calls `define_flags()` and
  `run(main)`, and the flags come from that `define_flags` or from top-level `DEFINE` calls.
  The statements keep the module's order and include its `NAME = <literal>` constants and
  `from __future__` imports.
  """
  tree = ast.parse(source, filename)
  guards = [n for n in tree.body if _is_main_guard(n)]
  if len(guards) != 1:
    return None
  calls = [_called_name(n) for n in guards[0].body]
  if not set(calls) <= {"define_flags", "run"} or "run" not in calls:
    return None
  definitions = [n for n in tree.body if _defines_flags(n)
                 or ("define_flags" in calls and isinstance(n, ast.FunctionDef)
                     and n.name == "define_flags")]
  if not definitions:
    return None
  body = [n for n in tree.body
          if n in definitions or _is_literal_constant(n) or _is_future_import(n)]
  if "define_flags" in calls:
    body.append(ast.parse("define_flags()").body[0])
  return ast.get_docstring(tree, clean=False), ast.Module(body=body, type_ignores=[])


def quick_help(path: str) -> None:
  """Prints --help of the program at `path` as its `run(main)` would, and exits.

  Returns, leaving absl as it was, if the flag definitions need more than absl and ml_collections.
  """
  try:
    with open(path, encoding="utf-8") as f:
      found = flag_definitions(f.read(), path)
  except (OSError, SyntaxError, ValueError):  # The program's own import reports it better.
    return
  if found is None:
    return
  doc, definitions = found
  from absl import app
  from absl import flags
  from ml_collections import config_flags

  from pausejax import errors

  before = set(flags.FLAGS)
  main = sys.modules["__main__"]
  argv0, main_doc = sys.argv[0], main.__doc__

  def undo():  # Leaves absl as it was, for the program to define and parse its flags itself.
    flags.FLAGS.unparse_flags()
    for name in set(flags.FLAGS) - before - {"help", "helpshort", "helpfull", "helpxml", "?",
                                              "only_check_args"}:
      delattr(flags.FLAGS, name)
    sys.argv[0], main.__doc__ = argv0, main_doc

  sys.argv[0] = path  # As runpy sets it: absl files the program's flags under this name.
  try:
    exec(compile(definitions, path, "exec"),
         {"__name__": "__main__", "__file__": path, "flags": flags, "config_flags": config_flags})
  except Exception:  # They need more than absl and ml_collections.
    undo()
    return
  main.__doc__ = doc  # absl prints __main__'s docstring above the flags.
  app.define_help_flags()
  errors.parse_flags(sys.argv)  # Prints the help and exits...
  undo()  # ...unless the help flag was the value of another flag (`--workdir --help`).


# ------------------------------------------------------------------------------------------------
# The stderr filter.

def is_noise(line: bytes) -> bool:
  line = line.rstrip(b"\r\n")
  return any(p.search(line) for p in NOISE)


def _write_all(fd: int, data: bytes) -> None:
  while data:
    data = data[os.write(fd, data):]


def forward(source: int, dest: int) -> None:
  """Copies `source` to `dest` until end of file, leaving out the lines that are noise."""
  pending = b""  # The start of a line whose end has not come yet.
  while True:
    if pending and not select.select([source], [], [], _PARTIAL_LINE_WAIT_S)[0]:
      _write_all(dest, pending)  # A line that stays partial is no log line: let it out.
      pending = b""
    chunk = os.read(source, _READ_SIZE)
    if not chunk:
      break
    data = pending + chunk
    end = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1
    if len(data) - end > _READ_SIZE:  # Too long for a log line.
      end = len(data)
    pending = data[end:]
    _write_all(dest, b"".join(line for line in data[:end].splitlines(keepends=True)
                              if not is_noise(line)))
  _write_all(dest, pending)


def filter_stderr() -> None:
  """Sends fd 2 through a child process running `forward` for the rest of this process."""
  try:
    sys.stderr.flush()
    original = os.dup(2)
  except (OSError, ValueError, AttributeError):  # No stderr to filter.
    return
  read_end, write_end = os.pipe()
  try:
    pid = os.fork()
  except (OSError, AttributeError):  # No fork (Windows) or no processes left: plain stderr.
    for fd in (original, read_end, write_end):
      os.close(fd)
    return
  if pid == 0:
    _run_filter(read_end, write_end, original)
  os.close(read_end)
  os.dup2(write_end, 2)
  os.close(write_end)
  atexit.register(_end_filter, pid, original)


def _run_filter(read_end: int, write_end: int, original: int) -> None:
  """The child: forwards until every writer has closed the pipe, then exits."""
  status = 0
  try:
    # Signals for the program (Ctrl-C, a scheduler's SIGTERM to the whole job) are not for the
    # filter: it stays until the program, having handled them, closes its stderr.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGTSTP):
      signal.signal(signum, signal.SIG_IGN)
    # Only the program writes to the pipe; and a reader of stdout waits for every copy to close.
    for fd in {write_end, 0, 1} - {read_end, original}:
      try:
        os.close(fd)
      except OSError:
        pass
    forward(read_end, original)
  except BaseException:
    status = 1  # Stderr itself is broken (say EPIPE): there is nowhere to report anything.
  finally:
    os._exit(status)


def _end_filter(pid: int, original: int) -> None:
  """At exit: stderr back to the original, and time for the filter to pass on the last lines."""
  try:
    sys.stderr.flush()
  except (OSError, ValueError):
    pass
  os.dup2(original, 2)  # Closes this process's end of the pipe.
  os.close(original)
  deadline = time.monotonic() + _EXIT_WAIT_S
  while time.monotonic() < deadline:
    try:
      if os.waitpid(pid, os.WNOHANG)[0]:
        return
    except ChildProcessError:
      return
    time.sleep(0.005)
