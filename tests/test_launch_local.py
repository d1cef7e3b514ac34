"""launch/local.py: N local CPU processes standing in for the N hosts of a pod."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest


from fakes import harness as h  # tests/ is on sys.path (pytest rootdir conftest).

# A "two-host" program: joins the other process, checks the topology, and runs collectives whose
# values need both processes' data.
PROGRAM = """
import sys
import jax, numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from pausejax import distributed
distributed.initialize()
assert jax.process_count() == 2, jax.process_count()
assert jax.device_count() == 4 and jax.local_device_count() == 2, jax.devices()
mesh = Mesh(np.array(jax.devices()), ("d",))
local = np.arange(2, dtype=np.float32) + 2 * jax.process_index() + 1  # p0: 1,2  p1: 3,4
x = multihost_utils.host_local_array_to_global_array(local, mesh, P("d"))
total = jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, P()))(x)
ids = multihost_utils.process_allgather(np.array([jax.process_index() * 10 + 7]))
# One write() for the whole line: gloo's C++ threads print to the same stdout at their own times.
sys.stdout.write(
    f"RESULT sum={float(total)} ids={ids.ravel().tolist()} lead={distributed.is_lead_host()}\\n")
sys.stdout.flush()
"""


@pytest.fixture
def tools(tmp_path):
  tools = h.Tools(tmp_path)
  tools.env["PYTHONPATH"] = os.pathsep.join(
      [str(h.REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
  return tools


def test_two_local_hosts_run_cross_process_collectives(tools):
  r = tools.run("local.py", "--num_processes=2", "--devices_per_process=2", "--",
                sys.executable, "-c", PROGRAM, timeout=120)
  assert r.returncode == 0, r.stdout + r.stderr
  results = sorted(line[:5] + line[line.index("RESULT"):] for line in r.stdout.splitlines()
                   if "RESULT" in line)
  assert results == ["[p0] RESULT sum=10.0 ids=[7, 17] lead=True",
                     "[p1] RESULT sum=10.0 ids=[7, 17] lead=False"]


def test_each_process_gets_its_environment(tools, tmp_path):
  program = ("import json, os, sys; keys = ['JAX_PLATFORMS', 'XLA_FLAGS', 'PAUSEJAX_COORDINATOR',"
             " 'PAUSEJAX_NUM_PROCESSES', 'PAUSEJAX_PROCESS_ID']; "
             "print(json.dumps({k: os.environ[k] for k in keys})); "
             "print('to stderr', file=sys.stderr)")
  r = tools.run("local.py", "--num_processes=3", "--devices_per_process=4", "--port=23456", "--",
                sys.executable, "-c", program, XLA_FLAGS="--xla_dump_to=/tmp/x "
                "--xla_force_host_platform_device_count=9")
  assert r.returncode == 0, r.stderr
  envs = {}
  for line in r.stdout.splitlines():
    prefix, text = line.split(" ", 1)
    envs[prefix] = json.loads(text)
  assert sorted(envs) == ["[p0]", "[p1]", "[p2]"]
  for i in range(3):
    assert envs[f"[p{i}]"] == {
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=4",
        "PAUSEJAX_COORDINATOR": "127.0.0.1:23456", "PAUSEJAX_NUM_PROCESSES": "3",
        "PAUSEJAX_PROCESS_ID": str(i)}
  assert sorted(r.stderr.splitlines()) == ["[p0] to stderr", "[p1] to stderr", "[p2] to stderr"]


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  # A zombie (exited, not yet reaped by init) counts as gone.
  stat = pathlib.Path(f"/proc/{pid}/stat")
  return not (stat.exists() and stat.read_text().split(") ")[1].startswith("Z"))


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if not _alive(pid):
      return True
    time.sleep(0.05)
  return False


def test_one_failing_process_stops_the_others_and_sets_the_exit_code(tools, tmp_path):
  # Process 1 fails once process 0 is up (its pid file exists); process 0 would sleep a minute.
  program = f"""
import os, pathlib, sys, time
me = int(os.environ["PAUSEJAX_PROCESS_ID"])
pid_file = pathlib.Path({str(tmp_path / "p0.pid")!r})
if me == 0:
  pid_file.write_text(str(os.getpid()))
  time.sleep(60)
else:
  while not pid_file.exists():
    time.sleep(0.05)
  print("giving up", flush=True)
  sys.exit(3)
"""
  start = time.monotonic()
  r = tools.run("local.py", "--num_processes=2", "--", sys.executable, "-c", program)
  assert r.returncode == 3, r.stderr
  assert time.monotonic() - start < 30  # Did not wait for process 0's sleep.
  assert "[p1] giving up" in r.stdout
  assert "process 1 exited with code 3; stopping the others" in r.stderr
  assert _wait_gone(int((tmp_path / "p0.pid").read_text()))


def test_a_process_that_stopped_early_waits_for_the_others(tools, tmp_path):
  # Exit code 75 (stopped before the last step, checkpoint saved) is no failure: the other
  # hosts stop at the same step and must be left to finish; the launcher then returns 75.
  program = """
import os, sys, time
if os.environ["PAUSEJAX_PROCESS_ID"] == "0":
  sys.exit(75)
time.sleep(1.0)
print("finished my part", flush=True)
sys.exit(75)
"""
  r = tools.run("local.py", "--num_processes=2", "--", sys.executable, "-c", program)
  assert r.returncode == 75, r.stderr
  assert "[p1] finished my part" in r.stdout and "stopping the others" not in r.stderr


def test_ctrl_c_stops_every_process(tools, tmp_path):
  program = f"""
import os, pathlib, time
me = os.environ["PAUSEJAX_PROCESS_ID"]
pathlib.Path({str(tmp_path)!r}, "pid" + me).write_text(str(os.getpid()))
time.sleep(60)
"""
  proc = subprocess.Popen([sys.executable, str(h.REPO / "launch" / "local.py"),
                           "--num_processes=2", "--", sys.executable, "-c", program],
                          env=tools.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  pid_files = [tmp_path / "pid0", tmp_path / "pid1"]
  pids = [int(h.wait_for(f)) for f in pid_files]
  proc.send_signal(signal.SIGINT)
  _, stderr = proc.communicate(timeout=30)
  assert proc.returncode == 130, stderr
  assert "interrupted; stopping all processes" in stderr
  assert all(_wait_gone(pid) for pid in pids)


@pytest.mark.parametrize("args", [
    ["--num_processes=0", "--", "true"],
    ["--num_processes=2", "--devices_per_process=0", "--", "true"],
    ["--num_processes=2", "--port=70000", "--", "true"],
    ["--num_processes=2"],  # No command.
    ["--", "true"],  # --num_processes is required.
])
def test_bad_flags_exit_2(tools, args):
  r = tools.run("local.py", *args)
  assert r.returncode == 2
  lines = h.error_lines(r.stderr)
  assert len(lines) == 1 and lines[0].startswith("error: ")


def test_missing_program_is_reported(tools):
  r = tools.run("local.py", "--num_processes=1", "--", "/nonexistent/prog")
  assert r.returncode == 1
  assert h.error_lines(r.stderr) == ["error: cannot start '/nonexistent/prog': No such file or "
                                     "directory"]
