"""Writes a SLURM batch script for multi-node GPU training and submits it with sbatch.

`srun` starts one process per GPU (default) or per node. Inside each, jax.distributed finds the
coordinator (first node of the step), the process count (SLURM_NTASKS) and its id (SLURM_PROCID)
from SLURM's variables, via `pausejax.distributed.initialize()`.
"""

from __future__ import annotations

import os
import shlex
import sys

if __package__ in (None, ""):  # Run as `python launch/slurm.py`: make `launch` importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch import _common  # pylint: disable=g-import-not-at-top
from launch import gpu  # pylint: disable=g-import-not-at-top
from launch._common import UsageError, check  # pylint: disable=g-import-not-at-top

EPILOG = """\
Everything after `--` goes to `python -m pausejax.train`. Run from the repository root on a
login node whose filesystem the compute nodes share (same venv path, same checkout).

examples:
  # 4 nodes x 8 GPUs, one process per GPU, 2 days, resubmitted by SLURM after a preemption:
  python launch/slurm.py --nodes=4 --gpus_per_node=8 --partition=gpu --time=2-00:00:00 \\
      --requeue -- --config=configs/c4_130m.py --workdir=/shared/runs/c4_130m_pause

  # Look at the script first, or keep it and submit it yourself:
  python launch/slurm.py --nodes=2 --dry-run -- \\
      --config=configs/tiny.py --workdir=/shared/pj > job.sbatch
  sbatch job.sbatch
"""


def batch_script(a, train_argv: list[str]) -> str:
  """The sbatch script. Every #SBATCH value was checked to be one plain word."""
  per_gpu = a.process_per == "gpu"
  tasks = a.gpus_per_node if per_gpu else 1
  lines = [
      "#!/bin/bash",
      f"# pausejax training: {a.nodes} node(s) x {a.gpus_per_node} GPU(s), one process per "
      f"{a.process_per}.",
      f"#SBATCH --job-name={a.job_name}",
      f"#SBATCH --nodes={a.nodes}",
      f"#SBATCH --ntasks-per-node={tasks}",
      f"#SBATCH --gpus-per-node={a.gpus_per_node}",
      f"#SBATCH --output={a.output}",
  ]
  for flag, value in (("partition", a.partition), ("account", a.account), ("time", a.time),
                      ("cpus-per-task", a.cpus_per_task)):
    if value is not None:
      lines.append(f"#SBATCH --{flag}={value}")
  if a.exclusive:
    lines.append("#SBATCH --exclusive")
  if a.requeue:  # Preempted jobs go back to the queue; training resumes from the workdir.
    lines += ["#SBATCH --requeue", "#SBATCH --open-mode=append"]
  lines += ["", "set -euo pipefail", "",
            "# XLA settings for speed (launch/gpu.py explains each one)."]
  env = gpu.perf_env(a.mem_fraction, a.perf_flags, a.xla_flags)
  if not per_gpu:
    # jax's SLURM detection would give each process only GPU number SLURM_LOCALID (= 0 here);
    # with one process per node, each must keep all of its node's GPUs.
    env["JAX_LOCAL_DEVICE_IDS"] = ",".join(str(i) for i in range(a.gpus_per_node))
  env.update(a.env)
  lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
  srun = ["srun", "--kill-on-bad-exit=1", a.python, "-m", a.module] + list(train_argv)
  lines += ["",
            "# One task per " + a.process_per + "; --kill-on-bad-exit ends the job when any "
            "process fails.",
            shlex.join(srun), ""]
  return "\n".join(lines)


def main(argv: list[str]) -> int:
  own, train_argv = _common.split_at_double_dash(argv)
  p = _common.parser("launch/slurm.py", __doc__.splitlines()[0], EPILOG)
  p.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
  p.add_argument("--gpus_per_node", type=int, default=8, help="GPUs per node (default 8)")
  p.add_argument("--process_per", choices=("gpu", "node"), default="gpu",
                 help="one JAX process per GPU (default) or per node")
  p.add_argument("--partition", default=None, help="SLURM partition")
  p.add_argument("--account", default=None, help="SLURM account")
  p.add_argument("--time", default=None, help="time limit, e.g. 24:00:00 or 2-00:00:00")
  p.add_argument("--job_name", default="pausejax", help="job name (default pausejax)")
  p.add_argument("--output", default="slurm-%x-%j.out",
                 help="log file pattern (default slurm-%%x-%%j.out)")
  p.add_argument("--cpus_per_task", type=int, default=None, help="CPUs per task")
  p.add_argument("--exclusive", action="store_true", help="do not share nodes with other jobs")
  p.add_argument("--requeue", action="store_true", help="requeue the job after a preemption")
  gpu.add_gpu_flags(p)
  a = p.parse_args(own)
  gpu.check_gpu_flags(a)
  for flag, value in (("--nodes", a.nodes), ("--gpus_per_node", a.gpus_per_node)):
    if value < 1:
      raise UsageError.setting(flag, value, "an integer >= 1")
  if a.cpus_per_task is not None and a.cpus_per_task < 1:
    raise UsageError.setting("--cpus_per_task", a.cpus_per_task, "an integer >= 1")
  # These land in #SBATCH lines, which sbatch reads itself: allow one plain word only.
  word = r"[A-Za-z0-9_.,+-]+"
  check(word, "--job_name", a.job_name, "letters, digits and . _ , + -")
  for flag, value in (("--partition", a.partition), ("--account", a.account)):
    if value is not None:
      check(word, flag, value, "letters, digits and . _ , + -")
  if a.time is not None:
    check(r"([0-9]+-)?[0-9]+(:[0-9]+){0,2}", "--time", a.time, "MM, HH:MM:SS or D-HH:MM:SS")
  check(r"[A-Za-z0-9_.%/+-]+", "--output", a.output, "a path of letters, digits and . _ %% / + -")
  if not train_argv:
    raise UsageError("no training flags: put them after `--`, e.g. -- --config=... --workdir=...")

  script = batch_script(a, train_argv)
  if a.dry_run:
    sys.stdout.write(script)
    return 0
  result = _common.Runner(dry_run=False).run(["sbatch", "--parsable"], capture=True,
                                             stdin_text=script)
  job_id = result.stdout.strip().split(";")[0]
  print(f"submitted job {job_id}; follow it with: squeue -j {job_id}")
  return 0


if __name__ == "__main__":
  sys.exit(_common.main_wrapper(main))
