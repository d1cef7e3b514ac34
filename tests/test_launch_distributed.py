"""pausejax.distributed: which route initialize() takes, and a real two-process run over gloo."""

from __future__ import annotations

import http.server
import os
import pathlib
import subprocess
import sys
import threading

import jax
import pytest

from pausejax import distributed
from pausejax.errors import UsageError

REPO = pathlib.Path(__file__).resolve().parents[1]
_ROUTE_ENVS = ("PAUSEJAX_COORDINATOR", "PAUSEJAX_NUM_PROCESSES", "PAUSEJAX_PROCESS_ID",
               "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
               "SLURM_LOCALID", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES",
               "TPU_SKIP_MDS_QUERY", "MEGASCALE_NUM_SLICES", "GCE_METADATA_IP")


@pytest.fixture
def calls(monkeypatch):
  """Records jax.distributed.initialize / config.update calls instead of making them."""
  for name in _ROUTE_ENVS:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(distributed, "_done", False)
  monkeypatch.setattr(distributed, "_running_in_cloud_tpu_vm", lambda: False)
  record = []
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(jax.distributed, "initialize",
                      lambda **kwargs: record.append(("initialize", kwargs)))
  monkeypatch.setattr(jax.config, "update", lambda *args: record.append(("config",) + args))
  return record


def test_nothing_to_do_on_a_single_host(calls):
  distributed.initialize()
  assert calls == []


def test_explicit_environment_connects_with_gloo(calls, monkeypatch):
  monkeypatch.setenv("PAUSEJAX_COORDINATOR", "127.0.0.1:1234")
  monkeypatch.setenv("PAUSEJAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("PAUSEJAX_PROCESS_ID", "3")
  distributed.initialize()
  distributed.initialize()  # Idempotent.
  assert calls == [
      ("config", "jax_cpu_collectives_implementation", "gloo"),
      ("initialize", dict(coordinator_address="127.0.0.1:1234", num_processes=4, process_id=3))]


@pytest.mark.parametrize("env,message", [
    ({"PAUSEJAX_COORDINATOR": "127.0.0.1:1"}, "set without PAUSEJAX_NUM_PROCESSES"),
    ({"PAUSEJAX_COORDINATOR": "nohostport", "PAUSEJAX_NUM_PROCESSES": "2",
      "PAUSEJAX_PROCESS_ID": "0"}, "PAUSEJAX_COORDINATOR='nohostport' is invalid"),
    ({"PAUSEJAX_COORDINATOR": "h:1", "PAUSEJAX_NUM_PROCESSES": "two",
      "PAUSEJAX_PROCESS_ID": "0"}, "PAUSEJAX_NUM_PROCESSES='two' is invalid"),
    ({"PAUSEJAX_COORDINATOR": "h:1", "PAUSEJAX_NUM_PROCESSES": "2",
      "PAUSEJAX_PROCESS_ID": "2"}, "PAUSEJAX_PROCESS_ID=2 is invalid"),
])
def test_bad_explicit_environment_is_a_usage_error(calls, monkeypatch, env, message):
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  with pytest.raises(UsageError, match=message):
    distributed.initialize()
  assert calls == []


def _slurm(monkeypatch, ntasks, in_step=True):
  env = dict(SLURM_JOB_ID="77", SLURM_NTASKS=str(ntasks), SLURM_PROCID="0", SLURM_LOCALID="0")
  if in_step:  # Set by srun for each step, absent in the batch script itself.
    env["SLURM_STEP_NODELIST"] = "node[001-002]"
  for k, v in env.items():
    monkeypatch.setenv(k, v)


def test_slurm_with_several_tasks_uses_auto_detection(calls, monkeypatch):
  _slurm(monkeypatch, ntasks=16)
  distributed.initialize()
  assert calls == [("initialize", {})]


@pytest.mark.parametrize("ntasks,in_step", [(1, True), (16, False)])
def test_slurm_single_task_or_outside_srun_does_nothing(calls, monkeypatch, ntasks, in_step):
  _slurm(monkeypatch, ntasks, in_step)
  distributed.initialize()
  assert calls == []


def test_gke_tpu_workers_from_environment(calls, monkeypatch):
  monkeypatch.setattr(distributed, "_running_in_cloud_tpu_vm", lambda: True)
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "host-0")
  distributed.initialize()
  assert calls == []  # One host: nothing to coordinate.
  monkeypatch.setattr(distributed, "_done", False)
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "host-0,host-1,host-2,host-3")
  distributed.initialize()
  assert calls == [("initialize", {})]


class _Metadata(http.server.BaseHTTPRequestHandler):
  """A stand-in GCE metadata server on 127.0.0.1."""
  endpoints = ""
  tpu_env = None  # The `tpu-env` attribute; None = not there (404).
  headers_seen: list = []

  def do_GET(self):  # pylint: disable=invalid-name
    _Metadata.headers_seen.append((self.path, self.headers.get("Metadata-Flavor")))
    body = None
    if self.path.endswith("/worker-network-endpoints"):
      body = _Metadata.endpoints
    elif self.path.endswith("/tpu-env"):
      body = _Metadata.tpu_env
    if body is not None:
      self.send_response(200)
      self.end_headers()
      self.wfile.write(body.encode())
    else:
      self.send_response(404)
      self.end_headers()

  def log_message(self, *args):
    pass


@pytest.fixture
def metadata_server(monkeypatch):
  server = http.server.HTTPServer(("127.0.0.1", 0), _Metadata)
  thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
  thread.start()
  monkeypatch.setenv("GCE_METADATA_IP", f"127.0.0.1:{server.server_port}")
  _Metadata.headers_seen = []
  _Metadata.tpu_env = None
  yield _Metadata
  server.shutdown()


@pytest.mark.parametrize("endpoints,multi", [
    ("w-0:uid0:10.0.0.2", False),
    ("w-0:uid0:10.0.0.2,w-1:uid1:10.0.0.3", True),
])
def test_gce_tpu_vm_asks_the_metadata_server(calls, monkeypatch, metadata_server, endpoints,
                                            multi):
  monkeypatch.setattr(distributed, "_running_in_cloud_tpu_vm", lambda: True)
  metadata_server.endpoints = endpoints
  distributed.initialize()
  assert calls == ([("initialize", {})] if multi else [])
  asked = ["worker-network-endpoints"] + ([] if multi else ["tpu-env"])  # One host: multislice?
  assert metadata_server.headers_seen == [
      (f"/computeMetadata/v1/instance/attributes/{key}", "Google") for key in asked]


@pytest.mark.parametrize("tpu_env,multi", [
    ("ZONE: 'us-east5-a'\nMEGASCALE_NUM_SLICES: '2'\nMEGASCALE_SLICE_ID: '1'\n", True),
    ("MEGASCALE_NUM_SLICES: '1'\n", False),
    ("ZONE: 'us-east5-a'\n", False),
])
def test_a_multislice_of_one_host_slices_is_found_in_the_tpu_env_metadata(
    calls, monkeypatch, metadata_server, tpu_env, multi):
  # Each slice has one host, and the slice count is only in the metadata (a queued resource
  # with --node-count): jax reads it there, so the hosts must be joined.
  monkeypatch.setattr(distributed, "_running_in_cloud_tpu_vm", lambda: True)
  metadata_server.endpoints = "w-0:uid0:10.0.0.2"
  metadata_server.tpu_env = tpu_env
  distributed.initialize()
  assert calls == ([("initialize", {})] if multi else [])


def test_megascale_num_slices_in_the_environment_wins(calls, monkeypatch, metadata_server):
  monkeypatch.setattr(distributed, "_running_in_cloud_tpu_vm", lambda: True)
  monkeypatch.setenv("MEGASCALE_NUM_SLICES", "1")
  metadata_server.endpoints = "w-0:uid0:10.0.0.2"
  metadata_server.tpu_env = "MEGASCALE_NUM_SLICES: '4'\n"
  distributed.initialize()
  assert calls == []  # As in jax: the variable, when set, is what counts.


def test_tpu_skip_mds_query_is_respected(calls, monkeypatch, metadata_server):
  monkeypatch.setattr(distributed, "_running_in_cloud_tpu_vm", lambda: True)
  monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")
  distributed.initialize()
  assert calls == [] and metadata_server.headers_seen == []


def test_not_a_tpu_vm_here():
  # This machine has no TPU: jax's own Cloud TPU start-up must have said so.
  assert distributed._running_in_cloud_tpu_vm() is False  # pylint: disable=protected-access


# A real run: two processes x two CPU devices, joined through PAUSEJAX_* and gloo.
PROGRAM = """
import sys
import jax, numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, PartitionSpec as P
from pausejax import distributed
distributed.initialize()
distributed.initialize()
mesh = Mesh(np.array(jax.devices()), ("d",))
# Each device holds its global index + 1; psum over all four devices needs both processes.
local = np.array([2 * jax.process_index() + 1, 2 * jax.process_index() + 2], np.float32)
x = multihost_utils.host_local_array_to_global_array(local, mesh, P("d"))
total = jax.jit(jax.shard_map(lambda v: jax.lax.psum(v, "d"), mesh=mesh, in_specs=P("d"),
                              out_specs=P("d")))(x)
mine = [float(s.data[0]) for s in total.addressable_shards]
names = multihost_utils.process_allgather(np.array([100 + jax.process_index()]))
# One write() for the whole line: gloo's C++ threads print to the same stdout at their own times.
result = (jax.process_index(), jax.process_count(), jax.device_count(), mine,
          names.ravel().tolist(), distributed.is_lead_host())
sys.stdout.write("RESULT " + " ".join(map(str, result)) + "\\n")
sys.stdout.flush()
"""


def _route_env(route: str, i: int, port: str) -> dict[str, str]:
  if route == "explicit":  # What launch/local.py sets.
    return dict(PAUSEJAX_COORDINATOR=f"127.0.0.1:{port}", PAUSEJAX_NUM_PROCESSES="2",
                PAUSEJAX_PROCESS_ID=str(i))
  # What `srun` sets for a two-task step on one node; jax's own SLURM detection must take over.
  return dict(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
              SLURM_PROCID=str(i), SLURM_LOCALID=str(i), JAX_COORDINATOR_PORT=port)


@pytest.mark.parametrize("route", ["explicit", "slurm"])
def test_two_processes_psum_and_allgather_over_gloo(route):
  port = subprocess.check_output(
      [sys.executable, "-c", "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); "
       "print(s.getsockname()[1])"], text=True).strip()
  procs = []
  for i in range(2):
    env = {k: v for k, v in os.environ.items() if k not in _ROUTE_ENVS}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               **_route_env(route, i, port))
    procs.append(subprocess.Popen([sys.executable, "-c", PROGRAM], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE))
  outputs = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=120)
      assert p.returncode == 0, err
      outputs += [line[line.index("RESULT"):] for line in out.splitlines() if "RESULT" in line]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert outputs == ["RESULT 0 2 4 [10.0, 10.0] [100, 101] True",
                     "RESULT 1 2 4 [10.0, 10.0] [100, 101] False"]
