"""Multi-process JAX start-up: one call, first thing, in every command-line entry point.

`initialize()` picks one of three routes:

1. `PAUSEJAX_COORDINATOR`, `PAUSEJAX_NUM_PROCESSES` and `PAUSEJAX_PROCESS_ID` are set (by
   `launch/local.py`, which runs N local CPU processes as N "hosts"): connect them explicitly.
2. A multi-host Cloud TPU slice, a multislice (several slices, even of one host each), or a
   SLURM step with more than one task: call `jax.distributed.initialize()` with no arguments and
   let JAX's own cluster detection fill in the coordinator, process count and id. The checks
   below mirror the ones in jax/_src/clusters/ (jax 0.10.2) so that we only call it where that
   detection will succeed. For a multislice, jax reads MEGASCALE_NUM_SLICES (and the slice id
   and coordinator) from the environment, or else from the `tpu-env` metadata attribute, which
   is where a Cloud TPU queued resource puts them; so does this module.
3. Anything else (a laptop, one GPU host, a single-host TPU VM): nothing to do.

SLURM note: JAX's SLURM detection gives every process only the GPU numbered SLURM_LOCALID. That
is right for one task per GPU; with one task per node set `JAX_LOCAL_DEVICE_IDS=0,1,...` (which
`launch/slurm.py` does) so that each process keeps all of its node's GPUs.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request

import jax

from pausejax.errors import UsageError

COORDINATOR_ENV = "PAUSEJAX_COORDINATOR"
NUM_PROCESSES_ENV = "PAUSEJAX_NUM_PROCESSES"
PROCESS_ID_ENV = "PAUSEJAX_PROCESS_ID"
_EXPLICIT_ENVS = (COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV)

# The variables jax's SlurmCluster.is_env_present() requires; SLURM_STEP_NODELIST exists only
# inside an `srun` step, so a bare `sbatch` script is (correctly) not treated as distributed.
_SLURM_ENVS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
               "SLURM_LOCALID")

_METADATA_URL = "http://{host}/computeMetadata/v1/instance/attributes/{key}"

_done = False  # The decision is made once per process; later calls are no-ops.


def _explicit_settings() -> tuple[str, int, int] | None:
  """The (coordinator, num_processes, process_id) from PAUSEJAX_* variables, or None."""
  present = [name for name in _EXPLICIT_ENVS if name in os.environ]
  if not present:
    return None
  if len(present) != len(_EXPLICIT_ENVS):
    missing = ", ".join(n for n in _EXPLICIT_ENVS if n not in present)
    raise UsageError(f"{', '.join(present)} set without {missing}: set all three or none")
  coordinator = os.environ[COORDINATOR_ENV]
  host, _, port = coordinator.rpartition(":")
  if not host or not port.isdigit():
    raise UsageError.setting(COORDINATOR_ENV, coordinator, "HOST:PORT, e.g. 127.0.0.1:12345")
  num_processes = _int_env(NUM_PROCESSES_ENV, minimum=1)
  process_id = _int_env(PROCESS_ID_ENV, minimum=0)
  if process_id >= num_processes:
    raise UsageError.setting(PROCESS_ID_ENV, process_id,
                             f"0 <= id < {NUM_PROCESSES_ENV}={num_processes}")
  return coordinator, num_processes, process_id


def _int_env(name: str, minimum: int) -> int:
  value = os.environ[name]
  try:
    number = int(value)
  except ValueError:
    number = minimum - 1
  if number < minimum:
    raise UsageError.setting(name, value, f"an integer >= {minimum}")
  return number


def _slurm_multi_task() -> bool:
  """A SLURM step that JAX's cluster detection recognises, with more than one task."""
  if not all(name in os.environ for name in _SLURM_ENVS):
    return False
  try:
    return int(os.environ["SLURM_NTASKS"]) > 1
  except ValueError:
    return False


def _tpu_metadata(key: str) -> str | None:
  """One attribute from the GCE metadata server (only reachable on a Cloud TPU VM)."""
  host = os.environ.get("GCE_METADATA_IP", "metadata.google.internal")
  request = urllib.request.Request(_METADATA_URL.format(host=host, key=key),
                                   headers={"Metadata-Flavor": "Google"})
  try:
    with urllib.request.urlopen(request, timeout=10) as response:
      return response.read().decode()
  except (urllib.error.URLError, OSError):
    return None


def _tpu_env_value(key: str) -> str | None:
  """`key` from the `tpu-env` metadata attribute (lines like `MEGASCALE_NUM_SLICES: '2'`), read
  the way jax's cloud_tpu_cluster.get_tpu_env_value reads it."""
  text = _tpu_metadata("tpu-env")
  value = None
  for line in (text or "").splitlines():
    name, sep, rest = line.partition(":")
    if sep and name.strip() == key:
      value = rest.strip().strip("'")
  return value


def _running_in_cloud_tpu_vm() -> bool:
  # Set by jax's own Cloud TPU start-up during `import jax` (libtpu present and TPU chips on PCI).
  from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
  return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def _multihost_tpu() -> bool:
  """A Cloud TPU VM that is one of several hosts (GKE, GCE TPU VM or multislice)."""
  if not _running_in_cloud_tpu_vm():
    return False
  slices = os.environ.get("MEGASCALE_NUM_SLICES")
  if slices is not None and slices.isdigit() and int(slices) > 1:  # Multislice.
    return True
  hosts = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES")
  if hosts is not None:  # GKE publishes the worker list in the environment.
    return len(hosts.split(",")) > 1
  if os.environ.get("TPU_SKIP_MDS_QUERY") is not None:
    return False
  endpoints = _tpu_metadata("worker-network-endpoints")  # GCE TPU VM: one entry per host.
  if endpoints is not None and len(endpoints.split(",")) > 1:
    return True
  if slices is None:  # A multislice of one-host slices: the count is only in the metadata.
    slices = _tpu_env_value("MEGASCALE_NUM_SLICES") or "1"
    return slices.isdigit() and int(slices) > 1
  return False


def initialize() -> None:
  """Connects this process to the others of a multi-process run; a no-op for one process.

  Must run before anything touches a JAX device. Safe to call more than once.

  Raises:
    UsageError: PAUSEJAX_* variables are set but incomplete or malformed.
  """
  global _done
  if _done or jax.distributed.is_initialized():
    _done = True
    return
  explicit = _explicit_settings()
  if explicit is not None:
    coordinator, num_processes, process_id = explicit
    # CPU processes exchange collectives over TCP with gloo (jax has no other CPU transport
    # without MPI); the setting only affects the CPU backend.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
  elif _slurm_multi_task() or _multihost_tpu():
    jax.distributed.initialize()
  _done = True


def is_lead_host() -> bool:
  """True on the one process that should write shared files and print progress."""
  return jax.process_index() == 0
