r"""Does thinking time help when pretraining is relevant? The pause ablation on the reasoning mix.

    python -m pausejax.experiments.reasoning_ablation --outdir=runs/reasoning [--quick] \
        [--seeds=3] [--seed=0] [--task=reason_chain] [--m_ft=8] \
        [--pretrain_steps=...] [--finetune_steps=...] [--eval_examples=...]

Goyal et al. (2023)'s four variants, StdPT/PausePT x StdFT/PauseFT, with a pretraining corpus
that is relevant to the downstream task and K seeds per cell:

  pretraining   `reasoning_mix` (StdPT) or `reasoning_mix_pause` (PausePT: pause rate 0.1): half
                generated arithmetic, variable chains and list problems (pausejax.reasoning), half
                the embedded plays. `MODEL` shapes (4 layers x 128), 128-token sequences.
  control       NoPT: StdFT from the random initialisation, to show whether pretraining helps.
  fine-tuning   --task (default `reason_chain`: "a=7;b=a+5;c=b*2;c=? " -> "24", depth 2-4),
                M_ft = 0 (StdFT) or --m_ft (PauseFT) pauses after the prompt, parameters from the
                pretraining checkpoint of the same seed, fresh optimizer. The downstream task is
                scored on `--curve_examples` held-out problems `--curve_points` times while
                fine-tuning (the learning curves). One more run per seed puts PausePT + PauseFT's
                pauses *before* the prompt (`pause.position=prepend`, the paper's ablation).
  evaluation    greedy pause-aware decoding, exact match on the first --eval_examples held-out
                problems of --task and of its extrapolation task (`<task>_long` where registered:
                deeper chains / longer lists than pretraining or fine-tuning ever saw), with
                M_inf = M_ft; the PauseFT models also with M_inf in {0, M/2, 2M}.

Every cell is the mean over the seeds with the half-width of its 95 % confidence interval
(Student t, K - 1 degrees of freedom). Comparisons are paired by seed (the same seed's
pretraining data, initialisation and fine-tuning data): the table gives the mean difference, its
95 % interval, and whether the interval excludes zero.

Writes results.json, results.md and reasoning_ablation.png into --outdir; runs go to
--outdir/runs/seed<s>/<name>/ (ordinary workdirs: metrics.jsonl, TensorBoard, loss.png). Re-running
reuses finished runs. --quick shrinks everything to seconds for tests; its numbers mean nothing.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Sequence

from absl import flags

from pausejax.errors import UsageError
from pausejax.errors import run
from pausejax.experiments import ablation
from pausejax.experiments import stats


def define_flags() -> None:
  """Flags of the CLI only, so other modules can import this one."""
  flags.DEFINE_string("outdir", None, "Where results and the training runs go.")
  flags.DEFINE_bool("quick", False, "Seconds-long smoke run (numbers mean nothing).")
  flags.DEFINE_integer("seeds", 3, "Seeds per cell: --seed .. --seed + K - 1 (at least 2 for "
                       "intervals).")
  flags.DEFINE_integer("seed", 0, "The first seed.")
  flags.DEFINE_string("task", "reason_chain", "Registered generative downstream task.")
  flags.DEFINE_integer("m_ft", 8, "PauseFT's pauses (M); M_inf is swept over 0, M/2, M, 2M.")
  flags.DEFINE_integer("pretrain_steps", 0, "Pretraining steps (0: the mode's default).")
  flags.DEFINE_integer("finetune_steps", 0, "Fine-tuning steps (0: the mode's default).")
  flags.DEFINE_integer("eval_examples", 0, "Held-out problems scored at the end (0: default).")
  flags.DEFINE_integer("curve_points", 5, "Downstream scores taken while fine-tuning.")
  flags.DEFINE_integer("curve_examples", 0, "Held-out problems per curve point (0: default).")


# (full, quick) defaults.
PRETRAIN_STEPS = (400, 4)
FINETUNE_STEPS = (500, 4)
EVAL_EXAMPLES = (300, 8)
CURVE_EXAMPLES = (100, 4)
MODEL = dict(num_layers=4, d_model=128, num_heads=2, head_dim=64, mlp_dim=512)
PRETRAIN_SEQ_LEN, PRETRAIN_BATCH = 128, 16
FINETUNE_BATCH = 16
TARGETS_LEN = 12          # The longest answer (8 sorted digits) + EOS, with room.
PROMPT_ROOM = 40          # BOS + the longest training prompt (a depth-4 chain is <= 27 pieces).
EVAL_ROOM = 64            # ... and of an extrapolation prompt (depth-6 chains, <= 39 pieces).
PRETRAININGS = {"StdPT": "reasoning_mix", "PausePT": "reasoning_mix_pause"}
# name: (pretraining or None for the random initialisation, PauseFT?, pause position).
VARIANTS = {
    "NoPT+StdFT": (None, False, "append"),
    "StdPT+StdFT": ("StdPT", False, "append"),
    "StdPT+PauseFT": ("StdPT", True, "append"),
    "PausePT+StdFT": ("PausePT", False, "append"),
    "PausePT+PauseFT": ("PausePT", True, "append"),
    "PausePT+PauseFT prepend": ("PausePT", True, "prepend"),
}
SWEPT = ("StdPT+PauseFT", "PausePT+PauseFT")  # Scored at every M_inf of the sweep.
# (a, b, what a - b measures), on the main task and the extrapolation task.
COMPARISONS = (
    ("PausePT+PauseFT", "StdPT+StdFT", "pauses in both stages vs none (the paper's headline)"),
    ("StdPT+PauseFT", "StdPT+StdFT", "pauses in fine-tuning only"),
    ("PausePT+StdFT", "StdPT+StdFT", "pauses in pretraining only"),
    ("PausePT+PauseFT", "StdPT+PauseFT", "pause-pretraining, given pause fine-tuning"),
    ("PausePT+PauseFT", "PausePT+StdFT", "pause fine-tuning, given pause-pretraining"),
    ("StdPT+StdFT", "NoPT+StdFT", "pretraining on the mix vs none"),
    ("PausePT+PauseFT", "PausePT+PauseFT prepend", "pauses after the prompt vs before it"),
)


def model_config(c, quick: bool):
  if not quick:
    for k, v in MODEL.items():
      c.model[k] = v
  return c


def pretrain_config(quick: bool, seed: int, name: str, steps: int, tfds_dir: str):
  c = model_config(ablation.base_config(quick, seed), quick)
  c.task = PRETRAININGS[name]
  c.eval_task = ""
  if not quick:
    c.seq_len, c.global_batch_size = PRETRAIN_SEQ_LEN, PRETRAIN_BATCH
  c.num_train_steps = steps
  c.eval_every_steps = 0
  c.checkpoint_every_steps = steps
  c.log_every_steps = max(1, min(20, steps))
  c.optimizer.warmup_steps = max(1, min(20, steps // 10))
  c.tfds_data_dir = tfds_dir
  return c


def finetune_config(quick: bool, seed: int, task: str, m_ft: int, position: str, steps: int,
                    init_from: str, tfds_dir: str, curve_points: int, curve_examples: int):
  c = model_config(ablation.base_config(quick, seed), quick)
  c.task = task
  c.eval_task = ""
  c.init_from = init_from  # "" for NoPT: the random initialisation of `seed`.
  c.pause.num_finetune = m_ft
  c.pause.position = position
  c.targets_len = TARGETS_LEN
  c.seq_len = PROMPT_ROOM + m_ft + TARGETS_LEN
  c.global_batch_size = 4 if quick else FINETUNE_BATCH
  c.num_train_steps = steps
  c.eval_every_steps = 0
  c.checkpoint_every_steps = steps
  c.log_every_steps = max(1, min(20, steps))
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = max(1, steps // 20)
  c.eval_tasks = task
  c.downstream_eval_every_steps = max(1, steps // curve_points)
  c.downstream_eval_max_examples = curve_examples
  c.tfds_data_dir = tfds_dir
  return c


def m_infs(m: int) -> list[int]:
  return sorted({0, m // 2, m, 2 * m})


def exact_match(config, workdir: str, task: str, m_inf: int, examples: int) -> float:
  """Exact match (%) of a finished fine-tuning run on `task`'s held-out split with M_inf."""
  from pausejax import downstream_eval
  vocabulary, model = ablation.trained_model(workdir, config)
  result = downstream_eval.evaluate(
      model, task, vocabulary, num_pauses=m_inf, pause_position=config.pause.position,
      max_len=EVAL_ROOM + 2 * m_inf + TARGETS_LEN, max_examples=examples,
      tfds_data_dir=config.tfds_data_dir or None)
  return float(result["metrics"]["exact_match"])


def curve(workdir: str, task: str) -> dict[int, float]:
  """{step: exact match} logged while fine-tuning."""
  from pausejax import metrics
  key = f"downstream/{task}/exact_match"
  rows = metrics.read_metrics(os.path.join(workdir, metrics.METRICS_FILENAME))
  return {int(r["step"]): float(r[key]) for r in rows if key in r}


def summarise(values: Sequence[float]) -> dict[str, Any]:
  return {"mean": stats.mean(values), "ci95": stats.ci95(values), "per_seed": list(values)}


def compare(cells_per_seed: Sequence[dict[str, float]], a: str, b: str) -> dict[str, Any]:
  """a - b paired by seed: mean, 95 % interval half-width, and whether it excludes zero."""
  diffs = [s[a] - s[b] for s in cells_per_seed]
  ci = stats.ci95(diffs)
  mean = stats.mean(diffs)
  return {"a": a, "b": b, "difference": mean, "ci95": ci, "per_seed": diffs,
          "beyond_interval": ci is not None and abs(mean) > ci}


def comparisons(cells_per_seed: Sequence[dict[str, float]], tasks: Sequence[str], m: int
                ) -> list[dict[str, Any]]:
  """Every comparison of COMPARISONS on every task, and M_inf != M against M_inf = M_ft."""
  pairs = [(t, a, b, what) for t in tasks for a, b, what in COMPARISONS]
  pairs += [(tasks[0], f"PausePT+PauseFT/M_inf={mi}", "PausePT+PauseFT",
             f"M_inf = {mi} instead of M_ft = {m}") for mi in m_infs(m) if mi != m]
  return [{"task": t, "what": what, "label": f"{a} − {b}",
           **compare(cells_per_seed, f"{t}/{a}", f"{t}/{b}")} for t, a, b, what in pairs]


def _score_text(cell: dict[str, Any]) -> str:
  ci = cell.get("ci95")
  return f"{cell['mean']:.1f}" + ("" if ci is None else f" ± {ci:.1f}")


def markdown(results: dict[str, Any]) -> str:
  s = results["settings"]
  tasks, cells, m = s["tasks"], results["cells"], s["m_ft"]
  lines = [
      f"# Pause ablation on the reasoning mix ({'quick' if s['quick'] else 'full'} mode)", "",
      f"Pretraining {s['pretrain_steps']} steps on `reasoning_mix` (PausePT: "
      f"`reasoning_mix_pause`); fine-tuning {s['finetune_steps']} steps on `{tasks[0]}`; "
      f"exact match (%) on {s['eval_examples']} held-out problems; M_ft = {m}, M_inf = M_ft "
      f"unless stated. {s['seeds']} seeds ({', '.join(map(str, s['seed_list']))}): mean ± the "
      f"half-width of the 95 % confidence interval. Wall time {results['wall_time_s']:.0f} s.",
      "", "| variant | " + " | ".join(f"`{t}`" for t in tasks) + " |",
      "| --- |" + " --- |" * len(tasks)]
  for name in VARIANTS:
    lines.append(f"| {name} | " + " | ".join(_score_text(cells[f"{t}/{name}"]) for t in tasks)
                 + " |")
  lines += ["", f"M_inf sweep on `{tasks[0]}` (models fine-tuned with M_ft = {m}):", "",
            "| model \\ M_inf | " + " | ".join(map(str, m_infs(m))) + " |",
            "| --- |" + " --- |" * len(m_infs(m))]
  for name in SWEPT:
    lines.append(f"| {name} | " + " | ".join(
        _score_text(cells[f"{tasks[0]}/{name}" + ("" if mi == m else f"/M_inf={mi}")])
        for mi in m_infs(m)) + " |")
  lines += ["", "Comparisons (a − b, paired by seed; beyond = the 95 % interval excludes 0):", "",
            "| task | a − b | what it measures | difference | beyond the interval? |",
            "| --- | --- | --- | --- | --- |"]
  for c in results["comparisons"]:
    ci = "" if c["ci95"] is None else f" ± {c['ci95']:.1f}"
    beyond = "**yes**" if c["beyond_interval"] else "no"
    lines.append(f"| `{c['task']}` | {c['label']} | {c['what']} | {c['difference']:+.1f}{ci} "
                 f"| {beyond} |")
  return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  s, cells, curves = results["settings"], results["cells"], results["curves"]
  tasks, m = s["tasks"], s["m_ft"]
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
  names = list(VARIANTS)
  width = 0.8 / len(tasks)
  for i, task in enumerate(tasks):
    got = [cells[f"{task}/{n}"] for n in names]
    axes[0].bar(np.arange(len(names)) + i * width, [c["mean"] for c in got], width,
                yerr=[c["ci95"] or 0.0 for c in got], capsize=3, label=task)
  axes[0].set_xticks(np.arange(len(names)) + width * (len(tasks) - 1) / 2)
  axes[0].set_xticklabels(names, rotation=25, ha="right", fontsize=8)
  axes[0].set_ylabel("exact match (%), mean ± 95 % CI")
  axes[0].set_title(f"{s['seeds']} seeds per variant")
  axes[0].legend()
  for name in names:
    steps = sorted(curves[name], key=int)
    mean = np.array([curves[name][k]["mean"] for k in steps])
    ci = np.array([curves[name][k]["ci95"] or 0.0 for k in steps])
    x = [int(k) for k in steps]
    axes[1].plot(x, mean, "o-", label=name, markersize=3)
    axes[1].fill_between(x, mean - ci, mean + ci, alpha=0.15)
  axes[1].set_xlabel("fine-tuning step")
  axes[1].set_ylabel(f"exact match (%) on {s['curve_examples']} held-out")
  axes[1].set_title(f"learning curves on {tasks[0]}")
  axes[1].legend(fontsize=7)
  for name in SWEPT:
    got = [cells[f"{tasks[0]}/{name}" + ("" if mi == m else f"/M_inf={mi}")] for mi in m_infs(m)]
    axes[2].errorbar(m_infs(m), [c["mean"] for c in got], yerr=[c["ci95"] or 0.0 for c in got],
                     fmt="o-", capsize=4, label=name)
  axes[2].axvline(m, color="gray", linestyle=":", label="M_ft")
  axes[2].set_xlabel("M_inf")
  axes[2].set_ylabel("exact match (%)")
  axes[2].set_title(f"inference pauses on {tasks[0]}")
  axes[2].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _positive(name: str, value: int, what: str, minimum: int = 1) -> None:
  if value < minimum:
    raise UsageError.setting(f"--{name}", value, what)


def main(argv):
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  quick, m = f.quick, f.m_ft
  _positive("seeds", f.seeds, "a positive integer (seeds --seed, --seed + 1, ...; 3 or more "
            "for useful intervals)")
  _positive("m_ft", m, "a positive number of pauses (PauseFT's M_ft)")
  _positive("curve_points", f.curve_points, "a positive number of scores while fine-tuning")
  for name in ("pretrain_steps", "finetune_steps", "eval_examples", "curve_examples"):
    _positive(name, f[name].value, "a non-negative integer (0: the mode's default)", 0)
  from pausejax import downstream
  from pausejax import tasks  # noqa: F401  Registers the embedded tasks, reason_* among them.
  recipe = downstream.resolve(f.task, setting="--task")
  if recipe.kind != "generative" or "exact_match" not in recipe.metric_fns:
    raise UsageError.setting("--task", f.task, "a generative downstream task (exact match), "
                             "e.g. reason_chain, reason_add, reason_sort")
  task_list = [f.task] + ([f"{f.task}_long"] if downstream.recipe(f"{f.task}_long") else [])
  mode = 1 if quick else 0
  pre_steps = f.pretrain_steps or PRETRAIN_STEPS[mode]
  ft_steps = f.finetune_steps or FINETUNE_STEPS[mode]
  examples = f.eval_examples or EVAL_EXAMPLES[mode]
  curve_examples = f.curve_examples or CURVE_EXAMPLES[mode]
  from pausejax.experiments import parity
  outdir = parity.check_outdir(f.outdir)

  from pausejax import config as config_lib
  from pausejax import corpus
  tfds_dir = os.path.join(outdir, "tensorflow_datasets")
  seeds = list(range(f.seed, f.seed + f.seeds))

  def workdir(s: int, name: str) -> str:
    return os.path.join(outdir, "runs", f"seed{s}", name.replace("+", "_").replace(" ", "_"))

  # Every config of every seed is validated before the first run starts.
  jobs = []  # (seed, run name, config) in the order they run.
  ft_cfgs = {}
  for s in seeds:
    for name in PRETRAININGS:
      jobs.append((s, name, pretrain_config(quick, s, name, pre_steps, tfds_dir)))
    for name, (pt, pause_ft, position) in VARIANTS.items():
      init = workdir(s, pt) if pt else ""
      c = finetune_config(quick, s, f.task, m if pause_ft else 0, position, ft_steps, init,
                          tfds_dir, f.curve_points, curve_examples)
      ft_cfgs[s, name] = c
      jobs.append((s, name, c))
  for _, _, c in jobs:
    config_lib.validate(c)
  corpus.ensure_prepared(corpus.EMBEDDED_TFDS_NAME, tfds_dir)

  t0 = time.time()
  for done, (s, name, c) in enumerate(jobs):
    elapsed = time.time() - t0
    eta = f"{elapsed / done * (len(jobs) - done):.0f}s" if done else "--"
    print(f"[reasoning ablation {done}/{len(jobs)} runs | {elapsed:.0f}s elapsed | ETA {eta}] "
          f"seed {s}: {name}", flush=True)
    ablation.train_or_reuse(c, workdir(s, name))

  print("[reasoning ablation] scoring", flush=True)
  cells_per_seed = []
  for s in seeds:
    cells = {}
    for name in VARIANTS:
      for task in task_list:
        cells[f"{task}/{name}"] = exact_match(ft_cfgs[s, name], workdir(s, name), task,
                                              ft_cfgs[s, name].pause.num_finetune, examples)
      for mi in (m_infs(m) if name in SWEPT else ()):
        if mi != m:  # M_inf = M_ft is the cell above.
          cells[f"{task_list[0]}/{name}/M_inf={mi}"] = exact_match(
              ft_cfgs[s, name], workdir(s, name), task_list[0], mi, examples)
    cells_per_seed.append(cells)
    ablation.forget_models()  # One seed's models in memory at a time.
  per_seed_curves = {name: [curve(workdir(s, name), f.task) for s in seeds] for name in VARIANTS}
  results = {
      "settings": {"quick": quick, "seed": f.seed, "seeds": f.seeds, "seed_list": seeds,
                   "m_ft": m, "tasks": task_list, "pretrain_steps": pre_steps,
                   "finetune_steps": ft_steps, "eval_examples": examples,
                   "curve_examples": curve_examples, "model": MODEL if not quick else "quick"},
      "cells": {k: summarise([c[k] for c in cells_per_seed]) for k in cells_per_seed[0]},
      "comparisons": comparisons(cells_per_seed, task_list, m),
      "curves": {name: {str(step): summarise([c[step] for c in got])
                        for step in sorted(set.intersection(*(set(c) for c in got)))}
                 for name, got in per_seed_curves.items()},
      "wall_time_s": time.time() - t0,
  }
  with open(os.path.join(outdir, "results.json"), "w") as fh:
    json.dump(results, fh, indent=2)
  table = markdown(results)
  with open(os.path.join(outdir, "results.md"), "w") as fh:
    fh.write(table)
  plot(results, os.path.join(outdir, "reasoning_ablation.png"))
  print(table, flush=True)


if __name__ == "__main__":
  define_flags()
  run(main)
