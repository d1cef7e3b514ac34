"""Trains on one GPU host with all of its GPUs: sets the XLA settings that matter, then execs.

One process drives every local GPU (JAX sees them all as devices), so there is nothing to
coordinate and `pausejax.distributed.initialize()` does nothing. For several hosts use
launch/slurm.py, which shares the settings below.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

if __package__ in (None, ""):  # Run as `python launch/gpu.py`: make `launch` importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch import _common  # pylint: disable=g-import-not-at-top
from launch._common import UsageError  # pylint: disable=g-import-not-at-top

# XLA flags for transformer training on NVIDIA GPUs. Each one exists in jaxlib 0.10.2 (an unknown
# flag in XLA_FLAGS aborts the process; tests/test_launch_gpu_slurm.py checks they parse).
PERF_XLA_FLAGS = (
    # Schedule collectives (all-gather / reduce-scatter of FSDP, gradient all-reduce) to overlap
    # with compute, using a latency model instead of running them as soon as they are ready.
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    # In a loop over layers (jax.lax.scan), issue the next iteration's all-gather / reduce-scatter /
    # all-reduce during the current iteration, so the communication hides behind the matmuls.
    "--xla_gpu_enable_pipelined_all_gather=true",
    "--xla_gpu_enable_pipelined_reduce_scatter=true",
    "--xla_gpu_enable_pipelined_all_reduce=true",
    # Double-buffer such loops (unrolled by two), so one iteration's communication can overlap
    # the neighbouring iteration's compute.
    "--xla_gpu_enable_while_loop_double_buffering=true",
    # Merge small collectives into fewer large ones (up to 128 MiB each): NCCL reaches its
    # bandwidth only on large messages. Tune per model if memory is tight.
    "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728",
    "--xla_gpu_all_reduce_combine_threshold_bytes=134217728",
)
# Not set on purpose: --xla_gpu_triton_gemm_any (Triton for every matmul; cuBLAS is usually as
# fast or faster for LM-sized bf16 matmuls, so leave XLA's autotuned choice), and flags that were
# removed from XLA (--xla_gpu_enable_async_collectives, --xla_gpu_graph_level), which now abort.
# NCCL variables are left at NCCL's defaults: the right ones (NCCL_IB_*, NCCL_SOCKET_IFNAME...)
# depend on the cluster's network; pass them with --env.

DEFAULT_MEM_FRACTION = 0.9  # JAX preallocates 75% by default; training wants most of the GPU.

EPILOG = """\
Everything after `--` goes to `python -m pausejax.train`.

examples:
  python launch/gpu.py -- --config=configs/c4_130m.py --workdir=/data/runs/c4_130m_pause \\
      --config.tfds_data_dir=/data/tfds

  # See the environment and command without running anything:
  python launch/gpu.py --dry-run -- --config=configs/tiny.py --workdir=/tmp/pj

  # Extra XLA flags (appended, so they win) and environment variables:
  python launch/gpu.py --xla_flags=--xla_gpu_triton_gemm_any=true --env=NCCL_DEBUG=WARN -- ...

The exit code is training's: 0 finished, 75 stopped early on SIGTERM with a checkpoint saved
(run the same command again to resume).
"""


def perf_env(mem_fraction: float, perf_flags: bool, extra_xla_flags: str,
             existing_xla_flags: str = "") -> dict[str, str]:
  """The variables to set: our XLA flags, then the caller's (later flags win), memory fraction."""
  flags = list(PERF_XLA_FLAGS) if perf_flags else []
  flags += existing_xla_flags.split() + extra_xla_flags.split()
  env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": f"{mem_fraction:g}"}
  if flags:
    env["XLA_FLAGS"] = " ".join(flags)
  return env


def add_gpu_flags(p) -> None:
  """Flags shared with launch/slurm.py."""
  p.add_argument("--python", default=sys.executable,
                 help="Python that runs training (default: this one)")
  p.add_argument("--module", default="pausejax.train",
                 help="module to run (default pausejax.train)")
  p.add_argument("--mem_fraction", type=float, default=DEFAULT_MEM_FRACTION,
                 help=f"XLA_PYTHON_CLIENT_MEM_FRACTION (default {DEFAULT_MEM_FRACTION})")
  p.add_argument("--xla_flags", default="", help="more XLA flags, appended to the defaults")
  p.add_argument("--perf_flags", action=argparse.BooleanOptionalAction, default=True,
                 help="set the XLA performance flags above (default on)")
  p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                 help="environment variable for training (repeatable)")
  p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                 help="print instead of running")


def check_gpu_flags(a) -> None:
  if not 0.0 < a.mem_fraction <= 1.0:
    raise UsageError.setting("--mem_fraction", a.mem_fraction, "a fraction in (0, 1]")
  if not a.python or a.python.startswith("-"):
    raise UsageError.setting("--python", a.python, "a Python interpreter path")
  _common.check(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", "--module", a.module,
                "a dotted module name like pausejax.train")
  bad = [f for f in a.xla_flags.split() if not f.startswith("--xla_")]
  if bad:
    raise UsageError.setting("--xla_flags", a.xla_flags, "space-separated --xla_... flags")
  a.env = _common.env_assignments(a.env)


def main(argv: list[str]) -> int:
  own, train_argv = _common.split_at_double_dash(argv)
  p = _common.parser("launch/gpu.py", __doc__.splitlines()[0], EPILOG)
  add_gpu_flags(p)
  a = p.parse_args(own)
  check_gpu_flags(a)
  env = perf_env(a.mem_fraction, a.perf_flags, a.xla_flags, os.environ.get("XLA_FLAGS", ""))
  env.update(a.env)
  cmd = [a.python, "-m", a.module] + train_argv
  if a.dry_run:
    print(shlex.join(["env"] + [f"{k}={v}" for k, v in env.items()] + cmd))
    return 0
  sys.stdout.flush()
  try:
    os.execvpe(cmd[0], cmd, dict(os.environ, **env))  # Signals then reach training directly.
  except OSError as e:
    raise _common.CommandError(f"cannot start {cmd[0]!r}: {e.strerror}") from None


if __name__ == "__main__":
  sys.exit(_common.main_wrapper(main))
