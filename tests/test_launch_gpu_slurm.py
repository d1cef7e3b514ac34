"""launch/gpu.py and launch/slurm.py: the environment they set, the flags XLA must accept, and
sbatch submission (against a fake sbatch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


from fakes import harness as h  # tests/ is on sys.path (pytest rootdir conftest).
sys.path.insert(0, str(h.REPO))
from launch import gpu  # pylint: disable=g-import-not-at-top,wrong-import-position

TRAIN = ["--config=configs/tiny.py", "--workdir=/tmp/pj"]


@pytest.fixture
def tools(tmp_path):
  return h.Tools(tmp_path)


def _run_gpu(tools, tmp_path, *args, **env):
  h.install_fake_python(tmp_path / "cwd")  # Writes argv.json into the working directory.
  python = str(tmp_path / "cwd" / ".venv" / "bin" / "python")
  r = tools.run("gpu.py", f"--python={python}", *args, **env)
  assert r.returncode == 0, r.stderr
  return json.loads((tmp_path / "cwd" / "argv.json").read_text())


def test_gpu_execs_training_with_the_performance_settings(tools, tmp_path):
  record = _run_gpu(tools, tmp_path, "--env=NCCL_DEBUG=WARN", "--", *TRAIN)
  assert record["argv"] == ["-m", "pausejax.train", *TRAIN]
  assert record["env"]["XLA_FLAGS"].split() == list(gpu.PERF_XLA_FLAGS)
  assert record["env"]["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.9"
  assert record["env"]["NCCL_DEBUG"] == "WARN"


def test_gpu_user_xla_flags_come_last_so_they_win(tools, tmp_path):
  record = _run_gpu(tools, tmp_path, "--xla_flags=--xla_gpu_triton_gemm_any=true",
                    "--mem_fraction=0.5", "--", *TRAIN,
                    XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=false")
  assert record["env"]["XLA_FLAGS"].split() == [
      *gpu.PERF_XLA_FLAGS, "--xla_gpu_enable_latency_hiding_scheduler=false",
      "--xla_gpu_triton_gemm_any=true"]
  assert record["env"]["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.5"


def test_gpu_without_performance_flags(tools, tmp_path):
  record = _run_gpu(tools, tmp_path, "--no-perf_flags", "--", *TRAIN)
  assert "XLA_FLAGS" not in record["env"]


def _xla_accepts(flags: list[str]) -> subprocess.CompletedProcess:
  # XLA parses XLA_FLAGS when the first backend starts and aborts on any flag it does not know;
  # the GPU flags are parsed (and ignored) by the CPU backend too.
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags))
  return subprocess.run([sys.executable, "-c", "import jax; jax.numpy.ones(2).block_until_ready()"],
                        env=env, capture_output=True, text=True, timeout=120)


def test_installed_xla_knows_every_performance_flag():
  r = _xla_accepts(list(gpu.PERF_XLA_FLAGS))
  assert r.returncode == 0, r.stderr[-2000:]


def test_the_xla_flag_check_can_fail():
  # A flag XLA removed: the check above would catch it if it were in PERF_XLA_FLAGS.
  r = _xla_accepts(["--xla_gpu_enable_async_collectives=true"])
  assert r.returncode != 0 and "Unknown flag" in r.stderr


@pytest.mark.parametrize("args", [
    ["--mem_fraction=0", "--", *TRAIN], ["--mem_fraction=1.5", "--", *TRAIN],
    ["--module=pausejax/train", "--", *TRAIN], ["--xla_flags=xla_gpu_x=1", "--", *TRAIN],
    ["--env=NOEQUALS", "--", *TRAIN],
])
def test_gpu_bad_flags_exit_2(tools, args):
  r = tools.run("gpu.py", *args)
  assert r.returncode == 2 and h.error_lines(r.stderr)[0].startswith("error: ")


def test_slurm_submits_the_dry_run_script(tools):
  args = ["--nodes=2", "--gpus_per_node=4", "--partition=gpu", "--python=python3", "--", *TRAIN]
  dry = tools.run("slurm.py", "--dry-run", *args)
  assert dry.returncode == 0 and tools.sbatch_calls() == []
  r = tools.run("slurm.py", *args, FAKE_SBATCH_JOB_ID="991;cluster-a")
  assert r.returncode == 0, r.stderr
  assert "submitted job 991" in r.stdout
  (call,) = tools.sbatch_calls()
  assert call == {"argv": ["--parsable"], "script": dry.stdout}
  assert subprocess.run(["bash", "-n"], input=dry.stdout, text=True).returncode == 0


def test_slurm_sbatch_error_gives_one_clear_message(tools):
  r = tools.run("slurm.py", "--account=nope", "--", *TRAIN,
                FAKE_SBATCH_STDERR="sbatch: error: Batch job submission failed: Invalid account "
                "or account/partition combination specified")
  assert r.returncode == 1
  errors = [l for l in h.error_lines(r.stderr) if l.startswith("error:")]
  assert errors == ["error: `sbatch --parsable` failed with exit code 1: sbatch: error: Batch job "
                    "submission failed: Invalid account or account/partition combination "
                    "specified"]


@pytest.mark.parametrize("process_per,tasks,device_ids", [("gpu", "4", None),
                                                          ("node", "1", "0,1,2,3")])
def test_slurm_script_environment_per_layout(tools, tmp_path, process_per, tasks, device_ids):
  r = tools.run("slurm.py", "--dry-run", "--gpus_per_node=4", f"--process_per={process_per}",
                "--", *TRAIN)
  assert r.returncode == 0, r.stderr
  assert f"#SBATCH --ntasks-per-node={tasks}" in r.stdout.splitlines()
  script = tmp_path / "job.sbatch"
  script.write_text(r.stdout)
  subprocess.run(["bash", str(script)], env=tools.env, check=True, cwd=tmp_path)
  (srun,) = tools.srun_calls()
  assert srun["env"].get("JAX_LOCAL_DEVICE_IDS") == device_ids
  assert srun["env"]["XLA_FLAGS"].split() == list(gpu.PERF_XLA_FLAGS)
  assert srun["argv"][-2:] == TRAIN


def test_slurm_needs_training_flags(tools):
  r = tools.run("slurm.py", "--nodes=2")
  assert r.returncode == 2 and "no training flags" in r.stderr
