"""Writes a SLURM batch script for multi-node GPU training and submits it with sbatch.

`srun` starts one process per GPU (default) or per node. Inside each, jax.distributed finds the
coordinator (first node of the step), the process count (SLURM_NTASKS) and its id (SLURM_PROCID)
from SLURM's variables, via `pausejax.distributed.initialize()`.

Stopping and resuming: `--signal_seconds` before the time limit SLURM sends SIGTERM to every
training process (as preemption does), which saves a checkpoint and exits with code 75 ("stopped
early"). With `--requeue` the script then requeues the job, which resumes from the workdir; exit
code 0 means training finished.
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

# The input pipeline (tf.data reading, tokenizing, packing) runs in each training process.
DEFAULT_CPUS_PER_GPU = 8
# Time between SIGTERM and the time limit: the current step, then a checkpoint save. SLURM kills
# everything KillWait (default 30 s) after the limit's own SIGTERM, too little for a save.
DEFAULT_SIGNAL_SECONDS = 300
MAX_SIGNAL_SECONDS = 65535  # sbatch --signal's limit.

EPILOG = """\
Everything after `--` goes to `python -m pausejax.train`. Run from the repository root on a
login node whose filesystem the compute nodes share (same venv path, same checkout).

examples:
  # 4 nodes x 8 GPUs, one process per GPU, 2 days per job. SIGTERM 5 minutes before the time
  # limit saves a checkpoint; --requeue puts the job back in the queue, and it resumes:
  python launch/slurm.py --nodes=4 --gpus_per_node=8 --partition=gpu --time=2-00:00:00 \\
      --requeue -- --config=configs/c4_130m.py --workdir=/shared/runs/c4_130m_pause

  # A cluster that takes GPUs only as generic resources (#SBATCH --gres=gpu:8):
  python launch/slurm.py --nodes=2 --gpu_request=gres --requeue -- ...

  # Look at the script first, or keep it and submit it yourself:
  python launch/slurm.py --nodes=2 --dry-run -- \\
      --config=configs/tiny.py --workdir=/shared/pj > job.sbatch
  sbatch job.sbatch

The job's exit code is training's: 0 finished, 75 stopped early with a checkpoint saved (with
--requeue the job was requeued; without, submit it again to resume), anything else failed.
"""


def time_limit_seconds(value: str) -> int:
  """Seconds in a --time value: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (as sbatch)."""
  days, dash, rest = value.rpartition("-")
  parts = [int(p) for p in rest.split(":")]
  if dash:  # D-HH[:MM[:SS]]
    hours, minutes, seconds = (parts + [0, 0])[:3]
    return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
  if len(parts) == 3:
    hours, minutes, seconds = parts
  else:  # MM[:SS]
    hours, (minutes, seconds) = 0, (parts + [0])[:2]
  return (hours * 60 + minutes) * 60 + seconds


def _xla_flags_export(ours: list[str], extra: list[str]) -> str | None:
  """`export XLA_FLAGS=...` with the job's own XLA_FLAGS between ours and --xla_flags (the last
  value of a flag wins, as in launch/gpu.py); None when there is nothing to add."""
  if not ours and not extra:
    return None
  parts = []
  if ours:
    parts += [shlex.quote(" ".join(ours)), '"${XLA_FLAGS:+ $XLA_FLAGS}"']
  else:
    parts.append('"${XLA_FLAGS:+$XLA_FLAGS }"')
  if extra:
    parts.append(shlex.quote((" " if ours else "") + " ".join(extra)))
  return "export XLA_FLAGS=" + "".join(parts)


def batch_script(a, train_argv: list[str]) -> str:
  """The sbatch script. Every #SBATCH value was checked to be one plain word."""
  per_gpu = a.process_per == "gpu"
  tasks = a.gpus_per_node if per_gpu else 1
  if a.gpu_request == "gres":
    gpus = f"#SBATCH --gres=gpu:{a.gpus_per_node}"
  else:
    gpus = f"#SBATCH --gpus-per-node={a.gpus_per_node}"
  lines = [
      "#!/bin/bash",
      f"# pausejax training: {a.nodes} node(s) x {a.gpus_per_node} GPU(s), one process per "
      f"{a.process_per}.",
      f"#SBATCH --job-name={a.job_name}",
      f"#SBATCH --nodes={a.nodes}",
      f"#SBATCH --ntasks-per-node={tasks}",
      gpus,
      f"#SBATCH --cpus-per-task={a.cpus_per_task}",
      f"#SBATCH --output={a.output}",
  ]
  for flag, value in (("partition", a.partition), ("account", a.account), ("time", a.time)):
    if value is not None:
      lines.append(f"#SBATCH --{flag}={value}")
  if a.signal_seconds:
    lines += [f"# SIGTERM to each training process {a.signal_seconds} s before the time limit "
              "(SLURM may",
              "# send it up to 60 s earlier): it saves a checkpoint and exits with code 75.",
              f"#SBATCH --signal=TERM@{a.signal_seconds}"]
  if a.exclusive:
    lines.append("#SBATCH --exclusive")
  if a.requeue:  # Preempted or stopped-early jobs go back to the queue and resume from the workdir.
    lines += ["#SBATCH --requeue", "#SBATCH --open-mode=append"]
  lines += ["", "set -euo pipefail", "",
            "# XLA settings for speed (launch/gpu.py explains each one). XLA_FLAGS from the job's",
            "# environment come after ours, --xla_flags last: the last value of a flag wins."]
  env = gpu.perf_env(a.mem_fraction, False, "")  # XLA_FLAGS is merged in the script instead.
  lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
  xla_flags = _xla_flags_export(list(gpu.PERF_XLA_FLAGS) if a.perf_flags else [],
                                a.xla_flags.split())
  if xla_flags:
    lines.append(xla_flags)
  if not per_gpu:
    # jax's SLURM detection would give each process only GPU number SLURM_LOCALID (= 0 here);
    # with one process per node, each must keep all of its node's GPUs.
    lines.append("export JAX_LOCAL_DEVICE_IDS=" +
                 ",".join(str(i) for i in range(a.gpus_per_node)))
  lines += [f"export {k}={shlex.quote(v)}" for k, v in a.env]
  srun = ["srun", "--kill-on-bad-exit=1", f"--cpus-per-task={a.cpus_per_task}", a.python, "-m",
          a.module] + list(train_argv)
  stopped = _common.EXIT_STOPPED_EARLY
  lines += [
      "",
      f"# One task per {a.process_per}. srun gets --cpus-per-task itself: Slurm 22.05 to 23.02 "
      "do not",
      "# pass it on from #SBATCH, which leaves each task one CPU. --kill-on-bad-exit ends the "
      "step",
      "# when any process fails, instead of leaving the others waiting in a collective.",
      "rc=0",
      shlex.join(srun) + " || rc=$?",
      "",
      f"# {stopped}: training stopped early (SIGTERM: time limit, preemption) with a checkpoint "
      "saved.",
      f"if [[ $rc -eq {stopped} ]]; then",
  ]
  if a.requeue:
    lines += ['  echo "pausejax: stopped early with a checkpoint saved; requeueing job '
              '$SLURM_JOB_ID to resume"',
              '  scontrol requeue "$SLURM_JOB_ID" ||',
              '    echo "pausejax: requeue failed; submit this script again to resume" >&2']
  else:
    lines += ['  echo "pausejax: stopped early with a checkpoint saved; submit this script again '
              'to resume" >&2']
  lines += ["fi", 'exit "$rc"', ""]
  return "\n".join(lines)


def main(argv: list[str]) -> int:
  own, train_argv = _common.split_at_double_dash(argv)
  p = _common.parser("launch/slurm.py", __doc__.splitlines()[0], EPILOG)
  p.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
  p.add_argument("--gpus_per_node", type=int, default=8, help="GPUs per node (default 8)")
  p.add_argument("--process_per", choices=("gpu", "node"), default="gpu",
                 help="one JAX process per GPU (default) or per node")
  p.add_argument("--gpu_request", choices=("gpus-per-node", "gres"), default="gpus-per-node",
                 help="ask for the GPUs with #SBATCH --gpus-per-node=N (default) or "
                      "--gres=gpu:N (for clusters that reject the former)")
  p.add_argument("--partition", default=None, help="SLURM partition")
  p.add_argument("--account", default=None, help="SLURM account")
  p.add_argument("--time", default=None, help="time limit, e.g. 24:00:00 or 2-00:00:00")
  p.add_argument("--job_name", default="pausejax", help="job name (default pausejax)")
  p.add_argument("--output", default="slurm-%x-%j.out",
                 help="log file pattern (default slurm-%%x-%%j.out)")
  p.add_argument("--cpus_per_task", type=int, default=None,
                 help=f"CPUs per training process, given to sbatch and srun (default "
                      f"{DEFAULT_CPUS_PER_GPU} per GPU of the process)")
  p.add_argument("--signal_seconds", type=int, default=DEFAULT_SIGNAL_SECONDS,
                 help="send training SIGTERM this many seconds before the time limit, so it "
                      f"saves a checkpoint (default {DEFAULT_SIGNAL_SECONDS}; 0: no signal)")
  p.add_argument("--exclusive", action="store_true", help="do not share nodes with other jobs")
  p.add_argument("--requeue", action="store_true",
                 help="requeue the job after a preemption, or when training stopped early "
                      "(exit code 75), so it resumes")
  gpu.add_gpu_flags(p)
  a = p.parse_args(own)
  gpu.check_gpu_flags(a)
  for flag, value in (("--nodes", a.nodes), ("--gpus_per_node", a.gpus_per_node)):
    if value < 1:
      raise UsageError.setting(flag, value, "an integer >= 1")
  if a.cpus_per_task is None:
    a.cpus_per_task = DEFAULT_CPUS_PER_GPU * (1 if a.process_per == "gpu" else a.gpus_per_node)
  if a.cpus_per_task < 1:
    raise UsageError.setting("--cpus_per_task", a.cpus_per_task, "an integer >= 1")
  if not 0 <= a.signal_seconds <= MAX_SIGNAL_SECONDS:
    raise UsageError.setting("--signal_seconds", a.signal_seconds,
                             f"0 (no signal) to {MAX_SIGNAL_SECONDS} seconds")
  # These land in #SBATCH lines, which sbatch reads itself: allow one plain word only.
  word = r"[A-Za-z0-9_.,+-]+"
  check(word, "--job_name", a.job_name, "letters, digits and . _ , + -")
  for flag, value in (("--partition", a.partition), ("--account", a.account)):
    if value is not None:
      check(word, flag, value, "letters, digits and . _ , + -")
  if a.time is not None:
    check(r"([0-9]+-)?[0-9]+(:[0-9]+){0,2}", "--time", a.time, "MM, HH:MM:SS or D-HH:MM:SS")
    limit = time_limit_seconds(a.time)
    if a.signal_seconds >= limit:  # The signal would come at the start, and stop every job.
      raise UsageError.setting("--signal_seconds", a.signal_seconds,
                               f"shorter than --time={a.time} ({limit} s), or 0")
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
