"""Runs N local CPU processes that behave like the N hosts of a pod.

Each process gets its own slice of fake CPU devices and the PAUSEJAX_* variables that
`pausejax.distributed.initialize()` turns into `jax.distributed.initialize(...)`, so multi-host
code paths (process_count() > 1, cross-process collectives, per-host data shards, checkpoints
written by several processes) run on one machine.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

if __package__ in (None, ""):  # Run as `python launch/local.py`: make `launch` importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch import _common  # pylint: disable=g-import-not-at-top

EPILOG = """\
examples:
  # A 2-host "pod" with 4 CPU devices per host, running a short training job:
  python launch/local.py --num_processes=2 --devices_per_process=4 -- \\
      python -m pausejax.train --config=configs/tiny.py --workdir=/tmp/pj_2host

  # Any program works; each process sees PAUSEJAX_PROCESS_ID=0..N-1:
  python launch/local.py --num_processes=2 -- \\
      python -c 'import os; print(os.environ["PAUSEJAX_PROCESS_ID"])'

Output lines are prefixed [p0], [p1], ... If one process exits non-zero the others are stopped
and its exit code is returned (75, "stopped early, resume", waits for the others and is returned
when all are done); Ctrl-C stops all of them.
"""

_GRACE_SECONDS = 5.0  # Between SIGTERM and SIGKILL when stopping the other processes.


class _Stop(Exception):
  """SIGTERM/SIGINT arrived: stop every process."""


def free_port() -> int:
  """A TCP port on 127.0.0.1 that was free a moment ago (the coordinator binds it next)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(base: dict[str, str], *, process_id: int, num_processes: int,
                devices_per_process: int, port: int) -> dict[str, str]:
  """The environment of process `process_id`."""
  env = dict(base)
  # Keep the caller's other XLA flags, but this launcher owns the device count.
  kept = [f for f in env.get("XLA_FLAGS", "").split()
          if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(
      kept + [f"--xla_force_host_platform_device_count={devices_per_process}"])
  env["JAX_PLATFORMS"] = "cpu"
  env["PAUSEJAX_COORDINATOR"] = f"127.0.0.1:{port}"
  env["PAUSEJAX_NUM_PROCESSES"] = str(num_processes)
  env["PAUSEJAX_PROCESS_ID"] = str(process_id)
  return env


def _pump(stream, sink, prefix: bytes, lock: threading.Lock) -> None:
  """Copies `stream` to `sink` line by line, each line prefixed; whole lines never interleave."""
  for line in iter(stream.readline, b""):
    if not line.endswith(b"\n"):
      line += b"\n"
    with lock:
      sink.write(prefix + line)
      sink.flush()
  stream.close()


def _exit_code(returncode: int) -> int:
  return 128 - returncode if returncode < 0 else returncode  # Killed by signal N -> 128 + N.


def _stop_all(procs: list[subprocess.Popen]) -> None:
  """SIGTERM each still-running process group we started, then SIGKILL what is left."""
  running = [p for p in procs if p.poll() is None]
  for p in running:
    try:
      os.killpg(p.pid, signal.SIGTERM)  # pgid == pid: each was started in its own session.
    except ProcessLookupError:
      pass
  deadline = time.monotonic() + _GRACE_SECONDS
  for p in running:
    try:
      p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      try:
        os.killpg(p.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      p.wait()


def _supervise(procs: list[subprocess.Popen]) -> int:
  """Waits until all exit 0 (-> 0) or one fails (-> stop the rest, return its code).

  EXIT_STOPPED_EARLY is no failure: the other hosts stop at the same step, so wait for them and
  return it (the run is to be resumed, not finished).
  """
  clean = (0, _common.EXIT_STOPPED_EARLY)
  while True:
    codes = [p.poll() for p in procs]
    for i, code in enumerate(codes):
      if code not in (None, *clean):
        sys.stderr.write(f"[launch] process {i} exited with code {code}; stopping the others\n")
        _stop_all(procs)
        return _exit_code(code)
    if all(code in clean for code in codes):
      return max(codes)
    time.sleep(0.05)


def _raise_stop(signum, frame):
  del signum, frame
  raise _Stop()


def main(argv: list[str]) -> int:
  own, cmd = _common.split_at_double_dash(argv)
  p = _common.parser("launch/local.py", __doc__.splitlines()[0], EPILOG)
  p.add_argument("--num_processes", type=int, required=True, help="how many local 'hosts'")
  p.add_argument("--devices_per_process", type=int, default=1,
                 help="fake CPU devices per process (default 1)")
  p.add_argument("--port", type=int, default=None,
                 help="coordinator port on 127.0.0.1 (default: a free one)")
  args = p.parse_args(own)
  if args.num_processes < 1:
    raise _common.UsageError.setting("--num_processes", args.num_processes, "an integer >= 1")
  if args.devices_per_process < 1:
    raise _common.UsageError.setting("--devices_per_process", args.devices_per_process,
                                     "an integer >= 1")
  if args.port is not None and not 1 <= args.port <= 65535:
    raise _common.UsageError.setting("--port", args.port, "a TCP port, 1..65535")
  if not cmd:
    raise _common.UsageError(
        "no command given: put it after `--`, e.g. -- python -m pausejax.train ...")
  port = args.port or free_port()

  lock = threading.Lock()
  procs: list[subprocess.Popen] = []
  pumps: list[threading.Thread] = []
  previous = {s: signal.signal(s, _raise_stop) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    for i in range(args.num_processes):
      env = process_env(os.environ, process_id=i, num_processes=args.num_processes,
                        devices_per_process=args.devices_per_process, port=port)
      try:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, start_new_session=True)
      except OSError as e:
        raise _common.CommandError(f"cannot start {cmd[0]!r}: {e.strerror}") from None
      procs.append(proc)
      prefix = f"[p{i}] ".encode()
      for stream, sink in ((proc.stdout, sys.stdout.buffer), (proc.stderr, sys.stderr.buffer)):
        pump = threading.Thread(target=_pump, args=(stream, sink, prefix, lock), daemon=True)
        pump.start()
        pumps.append(pump)
    code = _supervise(procs)
  except _Stop:
    sys.stderr.write("[launch] interrupted; stopping all processes\n")
    code = 130
  finally:
    for s in previous:  # A second Ctrl-C must not interrupt the clean-up.
      signal.signal(s, signal.SIG_IGN)
    _stop_all(procs)
    for s, handler in previous.items():
      signal.signal(s, handler)
  for pump in pumps:
    pump.join(timeout=5)
  return code


if __name__ == "__main__":
  sys.exit(_common.main_wrapper(main))
