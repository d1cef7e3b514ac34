"""The parity runner's outputs: its progress line, results.md's table, parity.png and the files
written together.

Everything after `Progress` reads the `results` dict that `parity.sweep` returns (runs of (n, M)
cells with their curves, means over seeds and confidence intervals) and nothing else.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
import time
from typing import Any

FILES = ("results.json", "results.md", "parity.png")


class Progress:
  """One status line with an ETA, rewritten in place on a terminal, else every `every_s` seconds.

  Work is counted in token-steps (steps x sequence length), since a step's cost grows with it,
  once per (n, M) whatever the number of seeds (they run in the same steps); runs that stop early
  take their unused work out of the total.
  """

  def __init__(self, total_work: float, stream=None, every_s: float = 10.0):
    from pausejax.metrics import format_duration
    self._fmt = format_duration
    self.total = float(total_work)
    self.stream = stream or sys.stderr
    self.tty = self.stream.isatty()
    self.every_s, self.start, self.last = every_s, time.perf_counter(), -math.inf

  def update(self, label: str, work_done: float, force: bool = False) -> None:
    now = time.perf_counter()
    if not (force or self.tty or now - self.last >= self.every_s):
      return
    self.last = now
    elapsed = now - self.start
    frac = min(1.0, work_done / self.total) if self.total else 1.0
    eta = elapsed * (1 - frac) / frac if frac > 0 else math.nan
    line = (f"parity {100 * frac:3.0f}% | {label} | {self._fmt(elapsed)} elapsed, "
            f"ETA {self._fmt(eta)}")
    self.stream.write(("\r\033[K" + line) if self.tty else line + "\n")
    self.stream.flush()

  def close(self) -> None:
    if self.tty:
      self.stream.write("\n")
      self.stream.flush()


def _cell(results: dict[str, Any], n: int, spec: str) -> dict[str, Any]:
  return next(r for r in results["runs"] if r["num_bits"] == n and r["pauses"] == spec)


def accuracy_text(record: dict[str, Any]) -> str:
  """The final accuracy, with its 95 % confidence interval when there are several seeds."""
  ci = record.get("final_accuracy_ci95")
  return f"{record['final_accuracy']:.3f}" + ("" if ci is None else f" ± {ci:.3f}")


def results_table(results: dict[str, Any]) -> str:
  """Markdown: final held-out accuracy (mean ± 95 % CI over seeds when several), rows n,
  columns M (resolved M in brackets if relative)."""
  s = results["settings"]
  head = "| n | " + " | ".join(f"M = {p}" for p in s["pauses"]) + " |"
  rows = [head, "|---|" + "---|" * len(s["pauses"])]
  for n in s["num_bits"]:
    cells = []
    for spec in s["pauses"]:
      r = _cell(results, n, spec)
      text = accuracy_text(r)
      if not re.fullmatch(r"\d+", spec):
        text += f" (M={r['num_pauses']})"
      cells.append(text)
    rows.append(f"| {n} | " + " | ".join(cells) + " |")
  return "\n".join(rows)


def results_markdown(results: dict[str, Any], command: str) -> str:
  s = results["settings"]
  k = s.get("seeds", 1)
  if k == 1:
    seeds = f"seed {s['seed']}"
  else:
    seeds = (f"{k} seeds ({s['seed']} to {s['seed'] + k - 1}, each with its own weights and "
             f"strings): every cell is the mean over the seeds ± the half-width of its 95 % "
             f"confidence interval (Student t, {k - 1} degrees of freedom)")
  # Older results.json files predate these settings: they had RoPE, no hints, fresh strings.
  train = (f"a fixed set of {s['train_size']} training strings"
           if s.get("train_size") else "fresh training strings")
  return "\n".join([
      "# Parity with pause tokens",
      "",
      f"Final held-out accuracy (chance 0.5) of a 2-layer causal decoder (d_model {s['d_model']}, "
      f"{s['num_heads']} heads, positions {s.get('positions', 'rope')}) on n-bit parity with M "
      f"pauses after the bits{', threshold hints before the answer' if s.get('hints') else ''}; "
      f"up to {s['steps']} steps of batch {s['batch_size']} from {train}, {s['num_eval']} "
      f"held-out strings per n (fewer when 2^n is small), {seeds}. Wall time "
      f"{results['wall_s']:.0f} s.",
      "",
      results_table(results),
      "",
      f"Command: `{command}`",
      ""])


def plot(results: dict[str, Any], out_png: str) -> None:
  """Accuracy vs step (one panel per n, one line per M) and final accuracy vs n per M: means over
  seeds, with the range of the seeds shaded and 95 % confidence intervals when there are several."""
  from matplotlib.figure import Figure  # No pyplot: no global backend state (Agg via savefig).

  s = results["settings"]
  ns, specs = s["num_bits"], s["pauses"]
  fig = Figure(figsize=(4 * (len(ns) + 1), 3.6), dpi=110, layout="constrained")
  axes = fig.subplots(1, len(ns) + 1, squeeze=False)[0]
  colors = {spec: f"C{i}" for i, spec in enumerate(specs)}
  for ax, n in zip(axes, ns):
    for spec in specs:
      r = _cell(results, n, spec)
      steps = [p["step"] for p in r["curve"]]
      ax.plot(steps, [p["eval_accuracy"] for p in r["curve"]], "-", color=colors[spec],
              label=f"M={r['num_pauses']}")
      per_seed = [p.get("eval_accuracy_per_seed", [p["eval_accuracy"]]) for p in r["curve"]]
      if max(len(a) for a in per_seed) > 1:
        ax.fill_between(steps, [min(a) for a in per_seed], [max(a) for a in per_seed],
                        color=colors[spec], alpha=0.2, lw=0)
    ax.set(title=f"n = {n}", xlabel="training step", ylabel="held-out accuracy",
           ylim=(0, 1.02))
    ax.axhline(0.5, color="gray", lw=0.8, ls=":")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  ax = axes[-1]
  for spec in specs:
    cells = [_cell(results, n, spec) for n in ns]
    cis = [r.get("final_accuracy_ci95") for r in cells]
    ax.errorbar(ns, [r["final_accuracy"] for r in cells], fmt="o-", color=colors[spec],
                yerr=None if None in cis else cis, capsize=3, label=f"M = {spec}")
  ax.axhline(0.5, color="gray", lw=0.8, ls=":")
  ax.set(title="final accuracy vs n", xlabel="n (bits)", ylabel="held-out accuracy",
         ylim=(0, 1.02), xscale="log")
  ax.minorticks_off()  # Log-scale minor labels would overprint the n ticks.
  ax.set_xticks(ns, [str(n) for n in ns])
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.suptitle("2-layer causal decoder on n-bit parity, M pauses after the bits")
  fig.savefig(out_png, format="png")


def write_outputs(results: dict[str, Any], outdir: str, command: str) -> None:
  """Writes the three files into a temporary folder, then moves each into place."""
  os.makedirs(outdir, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=outdir, prefix=".parity-") as tmp:
    with open(os.path.join(tmp, "results.json"), "w") as f:
      json.dump(dict(results, command=command), f, indent=1)
    with open(os.path.join(tmp, "results.md"), "w") as f:
      f.write(results_markdown(results, command))
    plot(results, os.path.join(tmp, "parity.png"))
    for name in FILES:
      os.replace(os.path.join(tmp, name), os.path.join(outdir, name))
