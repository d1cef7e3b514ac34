"""Golden files for the --dry-run output of every launch subcommand.

After an intended change, regenerate them and review the diff:
  PAUSEJAX_UPDATE_GOLDEN=1 python -m pytest tests/test_launch_golden.py
"""

from __future__ import annotations

import os
import pathlib

import pytest


from fakes import harness as h  # tests/ is on sys.path (pytest rootdir conftest).
GOLDEN = pathlib.Path(__file__).parent / "golden"
UPDATE = os.environ.get("PAUSEJAX_UPDATE_GOLDEN") == "1"

POD = ["tpu_pod.py", "--name=pj-v5p", "--zone=us-east5-a", "--project=my-proj", "--dry-run"]
TRAIN = ["--", "--config=configs/c4_130m.py", "--workdir=gs://my-bucket/runs/c4_130m_pause",
         "--config.tfds_data_dir=gs://my-bucket/tfds"]
GPU_FLAGS = ["--python=python3", "--dry-run"]

CASES = {
    "tpu_pod_create": [*POD, "create", "--accelerator_type=v5p-32", "--spot"],
    "tpu_pod_create_queued": [*POD, "--queued", "create", "--accelerator_type=v6e-16",
                              "--reserved"],
    "tpu_pod_setup": [*POD, "setup"],
    "tpu_pod_setup_git": [*POD, "setup", "--repo=https://github.com/example/pausejax.git",
                          "--ref=v1.0", "--remote_dir=~/src/pj"],
    "tpu_pod_run": [*POD, "run", "--env=TPU_STDERR_LOG_LEVEL=0", *TRAIN],
    "tpu_pod_run_restart": [*POD, "run", "--restart-on-preemption", "--accelerator_type=v5p-32",
                            "--spot", "--max_restarts=5", "--poll_seconds=300", *TRAIN],
    "tpu_pod_status": [*POD, "status"],
    "tpu_pod_logs": [*POD, "logs", "--worker=3", "--lines=50", "--follow"],
    "tpu_pod_stop": [*POD, "stop"],
    "tpu_pod_delete": [*POD, "delete"],
    "tpu_pod_delete_queued": [*POD, "--queued", "delete"],
    "tpu_pod_babysit": [*POD, "babysit", "--accelerator_type=v5p-32", "--spot", *TRAIN],
    "tpu_pod_create_multislice": [
        *POD, "--node_count=2", "create", "--accelerator_type=v5p-32", "--spot",
        "--network=my-vpc", "--subnetwork=my-subnet",
        "--service_account=trainer@my-proj.iam.gserviceaccount.com", "--scopes=cloud-platform",
        "--labels=team=lm"],
    "tpu_pod_run_multislice": [*POD, "--node_count=2", "--internal_ip", "run", *TRAIN],
    "tpu_pod_status_multislice": [*POD, "--node_count=2", "status"],
    "gpu": ["gpu.py", *GPU_FLAGS, "--env=NCCL_DEBUG=WARN", "--", "--config=configs/c4_130m.py",
            "--workdir=/data/runs/c4_130m_pause"],
    "gpu_no_perf_flags": ["gpu.py", *GPU_FLAGS, "--no-perf_flags", "--mem_fraction=0.75", "--",
                          "--config=configs/tiny.py", "--workdir=/tmp/pj"],
    "slurm_per_gpu": ["slurm.py", *GPU_FLAGS, "--nodes=4", "--gpus_per_node=8",
                      "--partition=gpu", "--account=lm-team", "--time=2-00:00:00", "--requeue",
                      "--", "--config=configs/c4_130m.py", "--workdir=/shared/runs/c4_130m_pause"],
    "slurm_per_node": ["slurm.py", *GPU_FLAGS, "--nodes=2", "--gpus_per_node=4",
                       "--process_per=node", "--job_name=pj-small", "--cpus_per_task=32",
                       "--exclusive", "--output=logs/%x-%j.out", "--",
                       "--config=configs/tiny.py", "--workdir=/shared/runs/tiny"],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_dry_run_matches_golden(name, tmp_path):
  tools = h.Tools(tmp_path)
  script, *args = CASES[name]
  r = tools.run(script, *args)
  assert r.returncode == 0, r.stderr
  # Dry runs run nothing: the fake tools must not have been called.
  assert tools.gcloud_calls() == [] and tools.sbatch_calls() == []
  text = r.stdout.replace(str(h.REPO), "<repo>")
  path = GOLDEN / f"{name}.txt"
  if UPDATE:
    path.write_text(text)
  assert path.exists(), f"no golden file {path}; run with PAUSEJAX_UPDATE_GOLDEN=1"
  assert text == path.read_text()


def test_every_golden_file_has_a_case():
  assert sorted(p.stem for p in GOLDEN.glob("*.txt")) == sorted(CASES)
