"""Training metrics: metrics.jsonl + TensorBoard, a progress line with ETA, MFU, loss plot, summary.

`Progress` measures the rate and ETA of any loop (training steps here, examples in
`pausejax.evaluate`); `MetricsLogger.write_texts` puts Markdown in TensorBoard's Text tab.

One `MetricsLogger` per run. Only the lead host writes files; the others only log.

  logger = MetricsLogger(workdir, total_steps=cfg.num_train_steps,
                         is_lead_host=jax.process_index() == 0)
  logger.truncate_after(restored_step)   # -1 on a fresh start; before the first write
  ...
  logger.write(step, {"train_loss": loss, "tokens_per_sec": tps, "mfu": mfu})
  logger.progress(step, {"train_loss": loss, "tokens_per_sec": tps, "mfu": mfu})
  ...
  logger.close()
  plot_losses(logger.metrics_path, os.path.join(workdir, PLOT_FILENAME))

Every file goes through `pausejax.fs`, so a gs:// workdir gets them next to its checkpoints.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import re
import sys
import time
from typing import Any, Callable, Mapping, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from pausejax import fs

METRICS_FILENAME = "metrics.jsonl"
PLOT_FILENAME = "loss.png"


class MetricsLogger:
  """Writes scalars to `workdir/metrics.jsonl` and TensorBoard, prints progress lines.

  On a local workdir each `write` appends a line. Object stores (gs://) cannot append, so there
  the logger keeps the file's content in memory (read once, on the first write or truncation)
  and rewrites the whole file atomically on every write: for a file of a few thousand short
  lines, written every `log_every_steps`, that is one small upload and a rename each time.
  """

  def __init__(self, workdir: str, *, total_steps: int, is_lead_host: bool = True,
               clock: Callable[[], float] = time.perf_counter, stream: TextIO | None = None):
    """`clock` and `stream` (default: sys.stdout at print time) exist so tests need not sleep."""
    self.workdir = workdir
    self.metrics_path = os.path.join(workdir, METRICS_FILENAME)
    self.tensorboard_dir = workdir
    self.total_steps = int(total_steps)
    self.is_lead_host = is_lead_host
    self._stream = stream
    self._steps = Progress(self.total_steps, clock=clock)  # Started by the first progress call.
    # Non-local metrics.jsonl: its whole content, None until first read.
    self._remote_text: str | None = None
    if is_lead_host:
      fs.makedirs(workdir)
    # Lead host: absl log + TF summary files in workdir. Others: absl log only. What
    # clu's create_default_writer builds, minus its epath.Path(logdir), which accepts only the
    # schemes epath knows: the TF summary writer itself takes any tf.io.gfile path.
    from clu import metric_writers  # Here, not at the top: it loads TensorFlow.
    writers = [metric_writers.LoggingWriter()]
    if is_lead_host:
      writers.append(metric_writers.SummaryWriter(workdir))
    self._writer = metric_writers.AsyncMultiWriter(writers)
    self._closed = False

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Appends `{"step": step, **scalars}` to metrics.jsonl; writes the TensorBoard scalars."""
    if "step" in scalars:
      raise ValueError("'step' is reserved for the step number; rename that scalar")
    values = {name: _plain_number(value) for name, value in scalars.items()}
    if self.is_lead_host:
      # Non-finite values are written as NaN/Infinity.
      line = json.dumps({"step": int(step), **values}) + "\n"
      if fs.is_local(self.metrics_path):
        # Opening per call keeps no handle on a file that truncate_after may replace; closing
        # flushes, so a killed run leaves only complete lines.
        fs.append_text(self.metrics_path, line)
      else:
        if self._remote_text is None:
          self._remote_text = (fs.read_text(self.metrics_path)
                               if fs.exists(self.metrics_path) else "")
        self._remote_text += line
        fs.write_text(self.metrics_path, self._remote_text)
    self._writer.write_scalars(int(step), values)

  def progress(self, step: int, scalars: Mapping[str, Any]) -> str:
    """Prints (lead host) and returns one line: step, loss, tokens/s, MFU, ETA.

    Reads `train_loss` (or `loss`), `tokens_per_sec` and `mfu` (a fraction) from `scalars` when
    present. The time per step is measured from the first call on, so the first steps after a
    (re)start, which include compilation, are left out, and a resumed run's step numbers work.
    Time spent between calls on evaluation or checkpoints counts, since the rest of the run has it.
    """
    step = int(step)
    _, eta = self._steps.update(step)
    width = len(str(self.total_steps))
    parts = [f"step {step:>{width}d}/{self.total_steps}"]
    loss = scalars.get("train_loss", scalars.get("loss"))
    if loss is not None:
      parts.append(f"loss {float(loss):.3f}")
    if scalars.get("tokens_per_sec") is not None:
      parts.append(f"{format_si(scalars['tokens_per_sec'])} tok/s")
    if scalars.get("mfu") is not None:
      parts.append(f"MFU {100 * float(scalars['mfu']):.1f}%")
    parts.append(f"ETA {eta}")
    line = " | ".join(parts)
    if self.is_lead_host:
      print(line, file=self._stream or sys.stdout, flush=True)
    return line

  def truncate_after(self, step: int) -> None:
    """Keeps only the lines of metrics.jsonl with step <= `step` (atomically; lead host only).

    Call it before the first write: with the restored step when resuming, so the file matches an
    uninterrupted run's, or with -1 for a fresh start in a used workdir (drops all lines, including
    an old run's step-0 evaluation). Unparseable (torn) lines are dropped too.
    """
    if not self.is_lead_host or not fs.exists(self.metrics_path):
      return
    kept = "".join(line for line, row in _read_lines(self.metrics_path)
                   if row is not None and row.get("step", math.inf) <= step)
    fs.write_text(self.metrics_path, kept)
    if not fs.is_local(self.metrics_path):
      self._remote_text = kept

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    """Markdown texts in TensorBoard's Text tab (lead host), e.g. sample predictions."""
    self._writer.write_texts(int(step), dict(texts))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """The run's settings in TensorBoard's HParams tab (lists shown as text). Once per run."""
    self._writer.write_hparams({k: v if isinstance(v, (bool, int, float, str)) else str(v)
                                for k, v in hparams.items()})

  def close(self) -> None:
    """Flushes and closes the metric writers. Safe to call twice."""
    if not self._closed:
      self._closed = True
      self._writer.close()

  def __enter__(self) -> MetricsLogger:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


class Progress:
  """Rate and time left of a loop over `total` units, measured from the first `update` on.

  The first update only starts the clock: what came before it (compilation, in the first steps
  after a (re)start) is left out, and a resumed loop's counts work. `MetricsLogger.progress`
  (training steps) and `pausejax.evaluate` (examples) both use it.
  """

  def __init__(self, total: int, *, clock: Callable[[], float] = time.perf_counter):
    self.total = int(total)
    self._clock = clock
    self._start: tuple[int, float] | None = None  # (done, time) at the first update.

  def update(self, done: int) -> tuple[float | None, str]:
    """(units per second, or None before anything is measured; the ETA as text) at `done`."""
    now = self._clock()
    if self._start is None:
      self._start = (done, now)
    first, first_time = self._start
    if done <= first:
      return None, "--"  # Nothing measured yet beyond the (compiling) first units.
    seconds_per_unit = (now - first_time) / (done - first)
    rate = 1 / seconds_per_unit if seconds_per_unit > 0 else None
    return rate, format_duration(seconds_per_unit * max(self.total - done, 0))

  def line(self, done: int, label: str, unit: str) -> str:
    """One progress line, e.g. `addition 48/500 examples | 12.3 examples/s | ETA 37s`."""
    rate, eta = self.update(done)
    parts = [f"{label} {done}/{self.total} {unit}"]
    if rate is not None:
      parts.append(f"{format_si(rate)} {unit}/s")
    parts.append(f"ETA {eta}")
    return " | ".join(parts)


def _plain_number(value: Any) -> int | float:
  """JAX/NumPy scalars (and bools) as plain Python ints or floats, for JSON and TensorBoard."""
  value = np.asarray(value)
  if value.size != 1:
    raise ValueError(f"expected a scalar, got shape {value.shape}")
  value = value.reshape(()).item()
  if isinstance(value, int):  # bool is an int too.
    return int(value)
  return float(value)


def _read_lines(path: str) -> list[tuple[str, dict | None]]:
  """(raw line, parsed object or None when it does not parse) for each line of a jsonl file."""
  # Split on "\n" only (str.splitlines would also split on the other line breaks of Unicode).
  *lines, last = fs.read_text(path).split("\n")
  lines = [line + "\n" for line in lines] + ([last] if last else [])
  out = []
  for line in lines:
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      row = None
    if line.endswith("\n") and isinstance(row, dict):
      out.append((line, row))
    else:
      out.append((line, None))  # A torn last line lacks its newline.
  return out


def read_metrics(path: str) -> list[dict]:
  """The parsed rows of a metrics.jsonl file, skipping lines that do not parse."""
  return [row for _, row in _read_lines(path) if row is not None]


# ---------------------------------------------------------------------------------------------
# MFU

# Dense (no 2:4 sparsity) bf16 peak FLOP/s per chip, keyed by a word sequence of jax's
# `device.device_kind`; the longest matching key wins ("TPU v5 lite" before "TPU v5").
PEAK_FLOPS_PER_CHIP: dict[str, float] = {
    # cloud.google.com/tpu/docs/system-architecture-tpu-vm and the per-version pages (v3, v4, v5e,
    # v5p, v6e): "peak compute per chip (bf16)".
    "TPU v3": 123e12,
    "TPU v4": 275e12,
    "TPU v4 lite": 138e12,  # v4i; Jouppi et al., "Ten Lessons From Three Generations", ISCA 2021.
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5": 459e12,  # v5p reports "TPU v5" (see jax's test_util.is_device_tpu).
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    # NVIDIA datasheets list bf16 tensor-core FLOP/s "with sparsity"; dense is half of that.
    # A100 datasheet: 312 TFLOP/s dense for both SXM4 and PCIe ("NVIDIA A100-SXM4-80GB", ...).
    "A100": 312e12,
    # H100/H200 datasheets: SXM 1979 -> 989 dense; PCIe 1513 -> 756; NVL 1671 -> 835. The SXM
    # value is the default: SXM parts name no form factor ("NVIDIA H100 80GB HBM3", "NVIDIA H200").
    "H100": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200": 989e12,
    "H200 NVL": 835e12,
    "GH200": 989e12,  # Grace Hopper: an H100-class SXM GPU.
    "L4": 121e12,  # L4 datasheet: 242 with sparsity.
}
# TPU v3 shows each of a chip's two TensorCores as its own jax device; v4/v5p (megacore), v5e and
# v6e show one device per chip, as do GPUs.
DEVICES_PER_CHIP: dict[str, int] = {"TPU v3": 2}


def lookup_peak_flops(device_kind: str) -> tuple[str, float] | None:
  """(table key, dense bf16 peak FLOP/s per chip) for a device kind string, or None if unknown."""
  kind = device_kind.lower()
  # Whole words only, so "L4" does not match "NVIDIA L40S".
  matches = [key for key in PEAK_FLOPS_PER_CHIP
             if re.search(rf"(?<![a-z0-9]){re.escape(key.lower())}(?![a-z0-9])", kind)]
  if not matches:
    return None
  key = max(matches, key=len)
  return key, PEAK_FLOPS_PER_CHIP[key]


@functools.cache
def measure_matmul_flops(device: Any = None, *, n: int = 1024, dtype: Any = jnp.float32,
                         warmup: int = 2, repeats: int = 7) -> float:
  """Achievable FLOP/s of one jitted n x n matmul on `device` (best of `repeats`), cached."""
  device = device or jax.devices()[0]
  x = jax.device_put(jax.random.normal(jax.random.key(0), (n, n), dtype), device)
  matmul = jax.jit(lambda a, b: a @ b)
  for _ in range(warmup):  # Compile and warm caches.
    matmul(x, x).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(x, x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / max(best, 1e-9)


# float32 FLOPs per cycle per core: two FMA units of 16 (AVX-512), 8 (AVX2) or 4 (AVX) lanes.
_CPU_FLOPS_PER_CYCLE = (("avx512f", 64), ("avx2", 32), ("avx", 16))


def cpu_nominal_flops(cpuinfo: str | None = None, cores: int | None = None,
                      max_khz: str | None = None) -> tuple[float, str] | None:
  """(nominal float32 peak FLOP/s of this host's CPUs, how): cores x clock x FLOP/cycle.

  A constant of the machine, unlike a timed probe: the clock is the cpufreq maximum when Linux
  exposes it, else /proc/cpuinfo's "cpu MHz"; FLOP/cycle follows the widest vector FMA the flags
  show. Logical CPUs count as cores (SMT siblings share FMA units, so MFU reads low with SMT).
  None where /proc/cpuinfo says too little (e.g. no clock on ARM).
  """
  if cpuinfo is None:  # This machine's; given text (tests) reads nothing else either.
    try:
      with open("/proc/cpuinfo") as f:
        cpuinfo = f.read()
      if os.path.exists(_CPUFREQ_MAX):
        with open(_CPUFREQ_MAX) as f:
          max_khz = f.read()
    except OSError:
      return None
  mhz = [float(m) for m in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo, re.M)]
  if max_khz:
    mhz = [int(max_khz) / 1000]
  flags = set((re.findall(r"^flags\s*:(.*)$", cpuinfo, re.M) or [""])[0].split())
  if not mhz:
    return None
  isa, per_cycle = next(((f, n) for f, n in _CPU_FLOPS_PER_CYCLE if f in flags), ("scalar", 8))
  if isa == "avx2" and "fma" not in flags:
    isa, per_cycle = "avx", 16
  cores = cores or len(os.sched_getaffinity(0))
  ghz = max(mhz) / 1000
  return (cores * ghz * 1e9 * per_cycle,
          f"nominal: {cores} cores x {ghz:.2f} GHz x {per_cycle} float32 FLOP/cycle ({isa})")


_CPUFREQ_MAX = "/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq"


def peak_flops_per_device(device: Any = None) -> tuple[float, str]:
  """(peak FLOP/s of one jax device, how it was obtained).

  Known accelerators use the spec-sheet table, CPUs their nominal peak (`cpu_nominal_flops`), so
  MFU does not move with the load of the moment. Unknown accelerators (and CPUs that do not say
  their clock) are measured with `measure_matmul_flops`. CPU devices forced by
  --xla_force_host_platform_device_count share the host's cores, so the host's peak is split
  among them.
  """
  device = device or jax.devices()[0]
  kind = getattr(device, "device_kind", "")
  found = lookup_peak_flops(kind) if device.platform != "cpu" else None
  if found is not None:
    key, per_chip = found
    per_chip_devices = DEVICES_PER_CHIP.get(key, 1)
    how = f"spec sheet: {key} ({kind}) dense bf16 {per_chip / 1e12:g} TFLOP/s per chip"
    if per_chip_devices > 1:
      how += f", {per_chip_devices} devices per chip"
    return per_chip / per_chip_devices, how
  nominal = cpu_nominal_flops() if device.platform == "cpu" else None
  if nominal is not None:
    rate, how = nominal
  else:
    dtype = jnp.float32 if device.platform == "cpu" else jnp.bfloat16
    rate = measure_matmul_flops(device, dtype=dtype)
    where = device.platform if kind in ("", device.platform) else f"{device.platform} ({kind})"
    how = f"measured: jitted {jnp.dtype(dtype).name} matmul probe on {where}"
  shared_by = len(jax.local_devices(backend="cpu")) if device.platform == "cpu" else 1
  if shared_by > 1:
    how += f", host's {format_si(rate)}FLOP/s split over its {shared_by} devices"
  return rate / shared_by, how


def mfu(flops_per_step: float, step_seconds: float, num_devices: int,
        peak_per_device: float) -> float:
  """Model FLOPs utilization: achieved FLOP/s over the peak of all devices (a fraction)."""
  if step_seconds <= 0 or num_devices <= 0 or peak_per_device <= 0:
    raise ValueError(f"need positive step_seconds, num_devices and peak_per_device, got "
                     f"{step_seconds}, {num_devices}, {peak_per_device}")
  return flops_per_step / step_seconds / (num_devices * peak_per_device)


# ---------------------------------------------------------------------------------------------
# Plot and summary


def plot_losses(metrics_jsonl: str, out_png: str, *, title: str | None = None) -> None:
  """Saves a PNG of train_loss (line) and eval_loss (line with markers) against step.

  Both paths may be local or gs://; the PNG is rendered in memory and written atomically.
  """
  from matplotlib.figure import Figure  # Figure without pyplot: no global backend state.

  rows = read_metrics(metrics_jsonl) if fs.exists(metrics_jsonl) else []
  fig = Figure(figsize=(8, 4.5), dpi=120, layout="constrained")
  ax = fig.add_subplot()
  for key, label, style in (("train_loss", "train loss", "-"), ("eval_loss", "eval loss", "o-")):
    points = sorted((row["step"], row[key]) for row in rows if row.get(key) is not None)
    if points:
      steps, losses = zip(*points)
      ax.plot(steps, losses, style, lw=1.5, ms=4, label=f"{label} (final {losses[-1]:.3f})")
  if ax.lines:
    ax.legend()
  else:
    ax.text(0.5, 0.5, "no losses logged yet", ha="center", va="center", transform=ax.transAxes)
  run_dir = os.path.dirname(
      os.path.abspath(metrics_jsonl) if fs.is_local(metrics_jsonl) else metrics_jsonl)
  run_name = os.path.basename(run_dir)
  ax.set(xlabel="training step", ylabel="cross-entropy (nats / token)",
         title=title or f"Loss vs step: {run_name}")
  ax.grid(alpha=0.3)
  png = io.BytesIO()
  fig.savefig(png, format="png")
  fs.write_bytes(out_png, png.getvalue())


def format_duration(seconds: float) -> str:
  """12s, 4m12s, 1h03m, 2d05h; '--' for negative or non-finite input."""
  if seconds is None or not math.isfinite(seconds) or seconds < 0:
    return "--"
  s = int(round(seconds))
  if s < 60:
    return f"{s}s"
  if s < 3600:
    return f"{s // 60}m{s % 60:02d}s"
  if s < 86400:
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
  return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_si(x: float) -> str:
  """3 significant digits with a k/M/G/T suffix: 812, 41.2k, 1.5M."""
  x = float(x)
  for div, suffix in ((1, ""), (1e3, "k"), (1e6, "M"), (1e9, "G"), (1e12, "T")):
    text = f"{x / div:.3g}"
    if abs(float(text)) < 1000 or suffix == "T":
      return text + suffix
  raise AssertionError("unreachable")


def _pct(x: Any) -> str:
  return f"{100 * float(x):.1f}%"


def _loss(x: Any) -> str:
  return f"{float(x):.4f}"


def _time_split(split: Mapping[str, float]) -> str:
  """{"input": s, ..., "wall": s} -> `input 4% | compute 81% | ... of 2m10s` (parts over 0)."""
  wall = float(split["wall"])
  parts = [f"{name} {100 * float(v) / wall:.0f}%" for name, v in split.items()
           if name != "wall" and float(v) > 0 and wall > 0]
  return " | ".join(parts) + f" of {format_duration(wall)}"


# Keys format_summary understands; any other keys are listed after them as they are.
SUMMARY_KEYS = (
    "params", "steps", "total_steps", "tokens_real", "tokens_total", "pause_fraction",
    "final_train_loss", "first_eval_loss", "final_eval_loss", "first_eval_accuracy",
    "final_eval_accuracy", "wall_seconds", "time_split", "tokens_per_sec", "mfu", "peak_flops",
    "peak_how", "workdir", "metrics_path", "plot_path", "checkpoint_dir", "tensorboard_dir")
# Other names accepted for some of them.
_SUMMARY_ALIASES = {"train_loss": "final_train_loss", "wall_time": "wall_seconds",
                    "peak_source": "peak_how", "real_tokens": "tokens_real"}


def _normalize_summary(info: Mapping[str, Any]) -> dict[str, Any]:
  """Applies the aliases, flattens {"first_eval": {"eval_loss": x}} to first_eval_loss, adds the
  paths this module writes in `workdir`, and drops None values."""
  out = {}
  for key, value in info.items():
    if key in ("first_eval", "final_eval") and isinstance(value, Mapping):
      prefix = key.split("_")[0]
      out.update({f"{prefix}_{k}": v for k, v in value.items() if k.startswith("eval_")})
    else:
      out[_SUMMARY_ALIASES.get(key, key)] = value
  if out.get("workdir"):
    out.setdefault("metrics_path", os.path.join(out["workdir"], METRICS_FILENAME))
    out.setdefault("plot_path", os.path.join(out["workdir"], PLOT_FILENAME))
    out.setdefault("tensorboard_dir", out["workdir"])
  return {k: v for k, v in out.items() if v is not None}


def format_summary(info: Mapping[str, Any]) -> str:
  """A one-screen end-of-run table from whichever of `SUMMARY_KEYS` (and others) are present."""
  info = _normalize_summary(info)

  def joined(sep: str, **formats: Callable[[Any], str]) -> str | None:
    """The present keys' formatted values joined by `sep`; None when none is present."""
    return sep.join(fmt(info[k]) for k, fmt in formats.items() if k in info) or None

  rows = {
      "model params": lambda: joined("", params=lambda n: f"{format_si(n)} ({int(n):,})"),
      "steps": lambda: joined(" / ", steps=str, total_steps=str),
      "tokens seen": lambda: joined(" / ", tokens_real=lambda n: f"{format_si(n)} real",
                                    tokens_total=lambda n: f"{format_si(n)} total"),
      "pause fraction": lambda: joined("", pause_fraction=_pct),
      "final train loss": lambda: joined("", final_train_loss=_loss),
      "eval loss": lambda: joined(" -> ", first_eval_loss=_loss, final_eval_loss=_loss),
      "eval accuracy": lambda: joined(" -> ", first_eval_accuracy=_pct, final_eval_accuracy=_pct),
      "wall time": lambda: joined("", wall_seconds=format_duration),
      "time split": lambda: joined("", time_split=_time_split),
      "throughput": lambda: joined("", tokens_per_sec=lambda x: f"{format_si(x)} tokens/s"),
      "MFU": lambda: joined("", mfu=_pct),
      "peak FLOP/s": lambda: joined(", ", peak_flops=lambda x: f"{format_si(x)}FLOP/s per device",
                                    peak_how=str),
      "workdir": lambda: joined("", workdir=str),
      "metrics": lambda: joined("", metrics_path=str),
      "loss plot": lambda: joined("", plot_path=str),
      "checkpoints": lambda: joined("", checkpoint_dir=str),
      "tensorboard": lambda: joined("", tensorboard_dir=lambda d: f"tensorboard --logdir {d}"),
  }
  lines = []
  for label, render in rows.items():
    try:
      text = render()
    except (TypeError, ValueError):  # A value of an unexpected type: flag it, do not crash.
      text = "? (unexpected value)"
    if text is not None:
      lines.append((label, text))
  for key, value in info.items():
    if key not in SUMMARY_KEYS:
      lines.append((key, f"{value:.4g}" if isinstance(value, float) else str(value)))

  width = max((len(label) for label, _ in lines), default=0)
  body = [f"{label:<{width}}  {text}" for label, text in lines]
  rule = "-" * max([len("run summary")] + [len(line) for line in body])
  return "\n".join([rule, "run summary", rule, *body, rule])
