"""Shared by the launch tests: run a launch script as a user would, with fake tools on PATH.

Loaded by path (see `load()` in each test file), so it works whatever pytest's import mode is.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
FAKES = pathlib.Path(__file__).resolve().parent

# Variables that would change what the scripts do; the tests set what they need explicitly.
_SCRUBBED = ("PAUSEJAX_TPU_NAME", "CLOUDSDK_CORE_PROJECT", "CLOUDSDK_COMPUTE_ZONE", "XLA_FLAGS",
             "PAUSEJAX_COORDINATOR", "PAUSEJAX_NUM_PROCESSES", "PAUSEJAX_PROCESS_ID",
             "PAUSEJAX_UPDATE_GOLDEN", "JAX_PLATFORMS", "XDG_STATE_HOME")


class Tools:
  """A temp bin/ with the fake executables, and the environment that puts it first on PATH."""

  def __init__(self, tmp: pathlib.Path):
    self.tmp = tmp
    self.bin = tmp / "bin"
    self.bin.mkdir(parents=True, exist_ok=True)
    for name in ("gcloud", "sbatch", "srun"):
      # Same script, but run by this Python (a `python3` found through PATH may be a slow shim).
      text = (FAKES / name).read_text().split("\n", 1)[1]
      (self.bin / name).write_text(f"#!{sys.executable}\n{text}")
      (self.bin / name).chmod(0o755)
    self.gcloud_log = tmp / "gcloud.jsonl"
    self.sbatch_log = tmp / "sbatch.jsonl"
    self.srun_log = tmp / "srun.jsonl"
    self.env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
    self.env.update(PATH=f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
                    FAKE_GCLOUD_LOG=str(self.gcloud_log), FAKE_SBATCH_LOG=str(self.sbatch_log),
                    FAKE_SRUN_LOG=str(self.srun_log),
                    GCE_METADATA_IP="127.0.0.1:9",  # Workers' metadata lookups fail at once.
                    XDG_STATE_HOME=str(tmp / "state"))  # Where babysit writes what it does.

  def run(self, script: str, *args: str, timeout: float = 60, **env) -> subprocess.CompletedProcess:
    """`python launch/<script> args...` from a scratch directory; returns the finished process."""
    full_env = dict(self.env, **env)
    cwd = self.tmp / "cwd"
    cwd.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, str(REPO / "launch" / script), *args], cwd=cwd,
                          env=full_env, capture_output=True, text=True, timeout=timeout)

  @staticmethod
  def _read(path: pathlib.Path) -> list[dict]:
    if not path.exists():
      return []
    return [json.loads(line) for line in path.read_text().splitlines()]

  def gcloud_calls(self) -> list[list[str]]:
    return [c["argv"] for c in self._read(self.gcloud_log)]

  def sbatch_calls(self) -> list[dict]:
    return self._read(self.sbatch_log)

  def srun_calls(self) -> list[dict]:
    return self._read(self.srun_log)

  def clear(self) -> None:
    for path in (self.gcloud_log, self.sbatch_log, self.srun_log,
                 pathlib.Path(str(self.gcloud_log) + ".counters")):
      if path.exists():
        path.unlink()


# A stand-in for a worker's `.venv/bin/python`: records how it was started, then exits with
# $FAKE_TRAIN_EXIT (default 0) after $FAKE_TRAIN_SLEEP seconds. On SIGTERM it notes the signal in
# `terms`, takes a second (like saving a last checkpoint) and exits with $FAKE_TRAIN_ON_TERM.
FAKE_PYTHON = """#!{python}
import json, os, signal, sys, time
def on_term(signum, frame):
  with open("terms", "a") as f:
    f.write("TERM\\n")
  time.sleep(1.0)
  sys.exit(int(os.environ.get("FAKE_TRAIN_ON_TERM", "143")))
signal.signal(signal.SIGTERM, on_term)
with open("argv.json", "w") as f:
  json.dump({{"argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ)}}, f)
print("fake training started", flush=True)
time.sleep(float(os.environ.get("FAKE_TRAIN_SLEEP", "0")))
sys.exit(int(os.environ.get("FAKE_TRAIN_EXIT", "0")))
"""


def install_fake_python(project_dir: pathlib.Path) -> None:
  """Makes `project_dir/.venv/bin/python` the recording stand-in."""
  path = project_dir / ".venv" / "bin" / "python"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(FAKE_PYTHON.format(python=sys.executable))
  path.chmod(0o755)


def wait_for(path: pathlib.Path, timeout: float = 20.0) -> str:
  """Waits until `path` exists and is non-empty; returns its text."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if path.exists() and path.read_text().strip():
      return path.read_text()
    time.sleep(0.05)
  raise AssertionError(f"{path} did not appear within {timeout} s")


def error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.strip()]
