"""launch/gpu.py and launch/slurm.py: the environment they set, the flags XLA must accept, sbatch
submission, and the batch script run by bash against fake srun and scontrol."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys

import pytest


from fakes import harness as h  # tests/ is on sys.path (pytest rootdir conftest).
sys.path.insert(0, str(h.REPO))
from launch import gpu  # pylint: disable=g-import-not-at-top,wrong-import-position
from launch import slurm  # pylint: disable=g-import-not-at-top,wrong-import-position

TRAIN = ["--config=configs/tiny.py", "--workdir=/tmp/pj"]
JOB_ID = "991"


@pytest.fixture
def tools(tmp_path):
  t = h.Tools(tmp_path)
  # The batch script also runs `scontrol requeue`; its fake goes next to the harness's ones.
  text = (h.FAKES / "scontrol").read_text().split("\n", 1)[1]
  (t.bin / "scontrol").write_text(f"#!{sys.executable}\n{text}")
  (t.bin / "scontrol").chmod(0o755)
  t.env["FAKE_SCONTROL_LOG"] = str(tmp_path / "scontrol.jsonl")
  return t


def _scontrol_calls(tmp_path) -> list[list[str]]:
  log = tmp_path / "scontrol.jsonl"
  return [json.loads(l)["argv"] for l in log.read_text().splitlines()] if log.exists() else []


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


def test_gpu_exit_code_is_trainings(tools, tmp_path):
  # gpu.py execs training, so 75 ("stopped early, run again to resume") reaches the caller.
  h.install_fake_python(tmp_path / "cwd")
  python = str(tmp_path / "cwd" / ".venv" / "bin" / "python")
  r = tools.run("gpu.py", f"--python={python}", "--", *TRAIN, FAKE_TRAIN_EXIT="75")
  assert r.returncode == 75, r.stderr


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
  assert call["argv"] == ["--parsable"] and call["script"] == dry.stdout
  assert call["directives"][:5] == ["--job-name=pausejax", "--nodes=2", "--ntasks-per-node=4",
                                    "--gpus-per-node=4", "--cpus-per-task=8"]
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


def _submit(tools, *args) -> dict:
  """Submits to the fake sbatch; returns its record, with the #SBATCH options sbatch reads."""
  tools.clear()
  r = tools.run("slurm.py", "--python=python3", *args, "--", *TRAIN)
  assert r.returncode == 0, r.stderr
  (call,) = tools.sbatch_calls()
  return call


def _run_job(tools, tmp_path, script: str, **env) -> subprocess.CompletedProcess:
  """Runs the batch script as the job's first node would, with the fake srun and scontrol."""
  path = tmp_path / "job.sbatch"
  path.write_text(script)
  tools.clear()
  return subprocess.run(["bash", str(path)], env=dict(tools.env, SLURM_JOB_ID=JOB_ID, **env),
                        cwd=tmp_path, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("requeue,train_exit,requeued", [
    (True, 75, True), (True, 0, False), (True, 1, False), (False, 75, False), (False, 0, False)])
def test_slurm_job_requeues_only_when_training_stopped_early(tools, tmp_path, requeue, train_exit,
                                                             requeued):
  call = _submit(tools, *(["--requeue"] if requeue else []))
  assert ("--requeue" in call["directives"]) == requeue  # scontrol requeue needs it.
  r = _run_job(tools, tmp_path, call["script"], FAKE_SRUN_EXIT=str(train_exit))
  assert r.returncode == train_exit  # 0 ends the job COMPLETED; 75 and failures do not.
  assert _scontrol_calls(tmp_path) == ([["requeue", JOB_ID]] if requeued else [])
  if train_exit == 75 and not requeue:
    assert "submit this script again to resume" in r.stderr


def test_slurm_job_says_so_when_the_requeue_fails(tools, tmp_path):
  call = _submit(tools, "--requeue")
  r = _run_job(tools, tmp_path, call["script"], FAKE_SRUN_EXIT="75",
               FAKE_SCONTROL_STDERR=f"Requested operation is presently disabled for job {JOB_ID}")
  assert r.returncode == 75
  assert "requeue failed; submit this script again to resume" in r.stderr


def test_slurm_time_limit_signal_stops_training_with_a_checkpoint_and_requeues(tools, tmp_path):
  h.install_fake_python(tmp_path / "proj")
  python = str(tmp_path / "proj" / ".venv" / "bin" / "python")
  r = tools.run("slurm.py", "--dry-run", f"--python={python}", "--time=1:00:00", "--requeue",
                "--", *TRAIN)
  assert r.returncode == 0, r.stderr
  assert "#SBATCH --signal=TERM@300" in r.stdout.splitlines()
  (tmp_path / "job.sbatch").write_text(r.stdout)
  job = subprocess.Popen(["bash", str(tmp_path / "job.sbatch")], cwd=tmp_path,
                         env=dict(tools.env, SLURM_JOB_ID=JOB_ID, FAKE_SRUN_RUN="1",
                                  FAKE_TRAIN_SLEEP="60", FAKE_TRAIN_ON_TERM="75"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  task_pid = None
  try:
    h.wait_for(tmp_path / "argv.json")  # Training is up, its SIGTERM handler installed.
    (srun,) = tools.srun_calls()
    task_pid = srun["task_pid"]
    os.kill(task_pid, signal.SIGTERM)  # What --signal=TERM@300 makes slurmstepd do.
    out, err = job.communicate(timeout=30)
  finally:
    if job.poll() is None:  # Only after a failure above: leave nothing running.
      job.kill()
      if task_pid is not None:
        with contextlib.suppress(ProcessLookupError):
          os.kill(task_pid, signal.SIGKILL)
  assert job.returncode == 75, err
  assert (tmp_path / "terms").read_text() == "TERM\n"
  assert _scontrol_calls(tmp_path) == [["requeue", JOB_ID]]
  assert f"requeueing job {JOB_ID}" in out


@pytest.mark.parametrize("args,directive", [
    ([], "--signal=TERM@300"), (["--signal_seconds=900", "--time=2-00:00:00"], "--signal=TERM@900"),
    (["--signal_seconds=0"], None)])
def test_slurm_signal_before_the_time_limit(tools, args, directive):
  signals = [d for d in _submit(tools, *args)["directives"] if d.startswith("--signal")]
  assert signals == ([directive] if directive else [])


@pytest.mark.parametrize("args,cpus", [
    (["--gpus_per_node=4"], "8"), (["--gpus_per_node=4", "--process_per=node"], "32"),
    (["--cpus_per_task=12"], "12")])
def test_slurm_cpus_per_task_reach_srun(tools, tmp_path, args, cpus):
  # srun of Slurm 22.05 to 23.02 does not take --cpus-per-task from #SBATCH: it needs its own.
  call = _submit(tools, *args)
  assert f"--cpus-per-task={cpus}" in call["directives"]
  r = _run_job(tools, tmp_path, call["script"])
  assert r.returncode == 0, r.stderr
  (srun,) = tools.srun_calls()
  assert f"--cpus-per-task={cpus}" in srun["argv"][:srun["argv"].index("python3")]


@pytest.mark.parametrize("args,gpus", [([], "--gpus-per-node=4"),
                                       (["--gpu_request=gres"], "--gres=gpu:4")])
def test_slurm_gpu_request(tools, args, gpus):
  directives = _submit(tools, "--gpus_per_node=4", *args)["directives"]
  assert [d for d in directives if d.startswith(("--gres", "--gpus"))] == [gpus]


_EXTRA = "--xla_gpu_triton_gemm_any=true"  # From --xla_flags.
_JOBS = "--xla_dump_to=/tmp/dump"  # XLA_FLAGS in the job's environment.


@pytest.mark.parametrize("args,job_flags,expected", [
    ([f"--xla_flags={_EXTRA}"], _JOBS, [*gpu.PERF_XLA_FLAGS, _JOBS, _EXTRA]),
    (["--no-perf_flags", f"--xla_flags={_EXTRA}"], _JOBS, [_JOBS, _EXTRA]),
    (["--no-perf_flags"], _JOBS, [_JOBS]),
    ([f"--xla_flags={_EXTRA}"], None, [*gpu.PERF_XLA_FLAGS, _EXTRA]),
    (["--no-perf_flags"], None, None)])
def test_slurm_merges_the_jobs_xla_flags_like_gpu_py(tools, tmp_path, args, job_flags, expected):
  call = _submit(tools, *args)
  r = _run_job(tools, tmp_path, call["script"], **({"XLA_FLAGS": job_flags} if job_flags else {}))
  assert r.returncode == 0, r.stderr
  (srun,) = tools.srun_calls()
  flags = srun["env"].get("XLA_FLAGS")
  assert (flags.split() if flags is not None else None) == expected


@pytest.mark.parametrize("value,seconds", [("30", 1800), ("30:15", 1815), ("2:00:00", 7200),
                                           ("1-0", 86400), ("1-2:30", 95400),
                                           ("2-00:00:00", 172800)])
def test_time_limit_seconds(value, seconds):
  assert slurm.time_limit_seconds(value) == seconds


@pytest.mark.parametrize("args", [
    ["--gpu_request=gpus"], ["--signal_seconds=-1"], ["--signal_seconds=65536"],
    ["--cpus_per_task=0"], ["--time=4"], ["--time=5:00", "--signal_seconds=300"],
    ["--time=2-00:00:00:00"],
])
def test_slurm_bad_flags_exit_2(tools, args):
  r = tools.run("slurm.py", *args, "--", *TRAIN)
  assert r.returncode == 2, r.stderr
  assert h.error_lines(r.stderr)[0].startswith("error: ") and tools.sbatch_calls() == []
