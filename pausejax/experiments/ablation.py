r"""StdPT/PausePT x StdFT/PauseFT at tiny scale, an M_ft sweep, and M_inf robustness.

    python -m pausejax.experiments.ablation --outdir=runs/ablation [--quick] [--m_ft=10] \
        [--pretrain_steps=...] [--finetune_steps=...] [--eval_examples=...] [--seed=0] [--seeds=1]

The four variants of Goyal et al. (2023), Table 1 / Figure 3, shrunk to a laptop, plus a control:

  pretraining   the embedded Shakespeare corpus, `configs/tiny.py` shapes; StdPT is task
                `shakespeare`, PausePT `shakespeare_pause` (rate 0.1, the paper's). Both from
                the same seed. NoPT (the control) skips pretraining: fine-tuning starts from the
                random initialisation, so the table shows whether pretraining helps at all at this
                scale.
  fine-tuning   `addition` (pausejax.downstream: "123+45=" -> "168"), a task that needs
                computation between reading the prompt and answering; StdFT is M_ft = 0,
                PauseFT is M_ft = --m_ft pauses after the prompt. Parameters from the pretrained
                checkpoint, fresh optimizer (`init_from`).
  evaluation    exact match on the held-out split with greedy pause-aware decoding, M_inf = M_ft.

Then, like the paper's Figures 4 and 5:
  * M_ft sweep: PausePT fine-tuned with each M_ft in `--m_ft_sweep`, evaluated with M_inf = M_ft.
  * M_inf robustness: the NoPT+PauseFT and PausePT+PauseFT models evaluated with M_inf in
    0 .. 2 * M_ft.

With --seeds=K the whole sweep runs K times, for seeds --seed, --seed + 1, ..., --seed + K - 1:
every run of seed s (pretraining and fine-tuning) uses seed s, and seed s's fine-tuning starts from
seed s's pretraining runs. Every score is then the mean over the seeds; results.json keeps the
per-seed values (in seed order) and the half-width of the 95 % confidence interval of the mean
(`exact_match_per_seed` and `exact_match_ci95` in each variant; `m_ft_sweep_per_seed`,
`m_ft_sweep_ci95`, `m_inf_robustness_per_seed` and `m_inf_robustness_ci95` beside the mean
dicts), and the tables show `mean ± ci`.

Writes results.json, results.md (the tables) and ablation.png into --outdir; training runs go to
--outdir/runs/<name>/ (each an ordinary pausejax workdir: metrics.jsonl, TensorBoard, loss.png),
or --outdir/runs/seed<s>/<name>/ when --seeds > 1. Re-running skips runs that have finished
(their checkpoints are reused). --quick shrinks everything to seconds for tests; its numbers mean
nothing.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Sequence

from absl import flags

from pausejax.errors import UsageError
from pausejax.errors import run
from pausejax.experiments import stats


def define_flags() -> None:
  """Flags of the CLI only, so other modules can import this one."""
  flags.DEFINE_string("outdir", None, "Where results and the training runs go.")
  flags.DEFINE_bool("quick", False, "Seconds-long smoke run (numbers mean nothing).")
  flags.DEFINE_integer("m_ft", 10, "Pauses after the prompt for PauseFT (paper: 10).")
  flags.DEFINE_list("m_ft_sweep", ["0", "2", "5", "10"],
                    "M_ft values of the PausePT fine-tuning sweep.")
  flags.DEFINE_integer("pretrain_steps", 0, "Pretraining steps (0: the mode's default).")
  flags.DEFINE_integer("finetune_steps", 0, "Fine-tuning steps (0: the mode's default).")
  flags.DEFINE_integer("eval_examples", 0, "Held-out examples scored (0: the mode's default).")
  flags.DEFINE_integer("seed", 0, "Seed of every run (the first seed when --seeds > 1).")
  flags.DEFINE_integer("seeds", 1, "Repeats of the whole sweep, seeds --seed .. --seed + K - 1; "
                       "scores are then means over the seeds with 95 % confidence intervals.")


# (full, quick) defaults.
PRETRAIN_STEPS = (300, 6)
FINETUNE_STEPS = (1500, 6)
EVAL_EXAMPLES = (300, 8)
FINETUNE_TASK = "addition"
PRETRAINING_NAMES = {"NoPT": "none (random init)", "StdPT": "StdPT", "PausePT": "PausePT"}
TARGETS_LEN = 8  # Up to 4 answer digits + EOS in the embedded tokenizer, with room to spare.


def base_config(quick: bool, seed: int):
  import importlib.util
  path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "tiny.py")
  spec = importlib.util.spec_from_file_location("tiny_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.seed = seed
  c.async_checkpointing = False
  c.keep_checkpoints = 1
  if quick:
    c.seq_len = 32
    c.global_batch_size = 4
    c.model.num_layers = 1
    c.model.d_model = 32
    c.model.num_heads = 2
    c.model.head_dim = 16
    c.model.mlp_dim = 64
    c.num_eval_steps = 1
  return c


def pretrain_config(quick: bool, seed: int, task: str, steps: int, tfds_data_dir: str):
  c = base_config(quick, seed)
  c.task = task
  c.num_train_steps = steps
  c.eval_every_steps = 0
  c.checkpoint_every_steps = steps
  c.log_every_steps = max(1, min(10, steps))
  c.tfds_data_dir = tfds_data_dir
  return c


def finetune_config(quick: bool, seed: int, m_ft: int, steps: int, init_from: str,
                    tfds_data_dir: str):
  c = base_config(quick, seed)
  c.task = FINETUNE_TASK
  c.eval_task = ""
  c.init_from = init_from  # "" for NoPT: the random initialisation of `seed`.
  c.pause.num_finetune = m_ft
  c.targets_len = TARGETS_LEN
  # Room for the longest prompt ("999+999=" is < 12 pieces) and the pauses.
  c.seq_len = 16 + m_ft + TARGETS_LEN
  c.global_batch_size = 4 if quick else 32
  c.num_train_steps = steps
  c.eval_every_steps = 0
  c.checkpoint_every_steps = steps
  c.log_every_steps = max(1, min(20, steps))
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = max(1, steps // 20)
  c.tfds_data_dir = tfds_data_dir
  return c


def train_or_reuse(config, workdir: str) -> None:
  """Trains unless `workdir` already holds the final checkpoint (re-runs reuse it)."""
  from pausejax import checkpoint
  from pausejax import train
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if checkpoint.has_checkpoint(ckpt_dir):
    steps = checkpoint.Checkpointer(ckpt_dir, keep=1, save_every_steps=1, async_save=False)
    try:
      if steps.latest_step() == config.num_train_steps:
        return
    finally:
      steps.close()
  train.train_and_evaluate(config, workdir)


_MODELS: dict[str, Any] = {}  # workdir -> (vocabulary, model): each run is loaded once.


def trained_model(workdir: str, config):
  """(vocabulary, model) of a finished run, loaded once however many M_inf it is scored at."""
  if workdir in _MODELS:
    return _MODELS[workdir]
  from pausejax import build
  from pausejax import data as data_lib
  from pausejax import specials
  vocabulary = specials.load_vocabulary(data_lib.vocab_path(config))
  model, _ = build.restore_model(config, workdir,
                                 specials.padded_vocab_size(vocabulary.vocab_size),
                                 vocabulary.pause_id)
  _MODELS[workdir] = vocabulary, model
  return _MODELS[workdir]


def forget_models() -> None:
  """Drops the loaded models (a runner scoring many runs keeps only one seed's in memory)."""
  _MODELS.clear()


def _exact_match(config, workdir: str, m_inf: int, examples: int) -> float:
  from pausejax import downstream_eval
  vocabulary, model = trained_model(workdir, config)
  result = downstream_eval.evaluate(
      model, FINETUNE_TASK, vocabulary, num_pauses=m_inf, max_len=16 + 2 * m_inf + TARGETS_LEN + 2,
      max_examples=examples, tfds_data_dir=config.tfds_data_dir or None)
  return float(result["metrics"]["exact_match"])  # A percentage, as in T5's metrics.


def aggregate(per_seed: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """The scores of K seeds as reported: per-seed dicts in, one dict out.

  Each entry of `per_seed` holds one seed's "variants" ({name: {..., "exact_match": score}}),
  "m_ft_sweep" ({M_ft: score}) and "m_inf_robustness" ({model: {M_inf: score}}). One seed comes
  back as it is, so K = 1 reports exactly what a single run always did. Several: every score is
  the mean over the seeds, and the per-seed values (in the order given) and the half-width of the
  95 % confidence interval of the mean are added beside it.
  """
  if not per_seed:
    raise ValueError("aggregate needs the scores of at least one seed")
  if len(per_seed) == 1:
    return json.loads(json.dumps(per_seed[0]))  # A copy, as a multi-seed result is.
  first = per_seed[0]
  variants = {}
  for name, v in first["variants"].items():
    scores = [seed["variants"][name]["exact_match"] for seed in per_seed]
    variants[name] = {**v, "exact_match": stats.mean(scores), "exact_match_per_seed": scores,
                      "exact_match_ci95": stats.ci95(scores)}
  sweep = {m: [seed["m_ft_sweep"][m] for seed in per_seed] for m in first["m_ft_sweep"]}
  robust = {name: {m: [seed["m_inf_robustness"][name][m] for seed in per_seed] for m in row}
            for name, row in first["m_inf_robustness"].items()}
  return {
      "variants": variants,
      "m_ft_sweep": {m: stats.mean(v) for m, v in sweep.items()},
      "m_ft_sweep_per_seed": sweep,
      "m_ft_sweep_ci95": {m: stats.ci95(v) for m, v in sweep.items()},
      "m_inf_robustness": {name: {m: stats.mean(v) for m, v in row.items()}
                           for name, row in robust.items()},
      "m_inf_robustness_per_seed": robust,
      "m_inf_robustness_ci95": {name: {m: stats.ci95(v) for m, v in row.items()}
                                for name, row in robust.items()},
  }


def _score_text(mean: float, ci: float | None) -> str:
  return f"{mean:.1f}%" if ci is None else f"{mean:.1f}% ± {ci:.1f}"


def _plot(results: dict[str, Any], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(14, 4))
  names = list(results["variants"])
  cis = [results["variants"][n].get("exact_match_ci95") for n in names]
  axes[0].bar(names, [results["variants"][n]["exact_match"] for n in names],
              yerr=None if None in cis else cis, capsize=4,
              color=["#cccccc", "#888888", "#999999", "#6699cc", "#cc9966", "#cc3333"])
  axes[0].set_ylabel("exact match (%)")
  axes[0].set_title(f"{FINETUNE_TASK}: pretraining x fine-tuning")
  axes[0].tick_params(axis="x", rotation=20)
  sweep = results["m_ft_sweep"]
  sweep_ci = results.get("m_ft_sweep_ci95")
  axes[1].errorbar([int(m) for m in sweep], list(sweep.values()), fmt="o-", capsize=4,
                   yerr=None if sweep_ci is None else [sweep_ci[m] for m in sweep])
  axes[1].set_xlabel("M_ft (= M_inf)")
  axes[1].set_ylabel("exact match (%)")
  axes[1].set_title("PausePT: fine-tuning pauses")
  robust_ci = results.get("m_inf_robustness_ci95")
  for name, robust in results["m_inf_robustness"].items():
    axes[2].errorbar([int(m) for m in robust], list(robust.values()), fmt="o-", capsize=4,
                     label=name,
                     yerr=None if robust_ci is None else [robust_ci[name][m] for m in robust])
  axes[2].axvline(results["settings"]["m_ft"], color="gray", linestyle=":", label="M_ft")
  axes[2].set_xlabel("M_inf")
  axes[2].set_ylabel("exact match (%)")
  axes[2].set_title("PauseFT models: inference pauses")
  axes[2].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _markdown(results: dict[str, Any]) -> str:
  s = results["settings"]
  k = s.get("seeds", 1)
  seeds = "" if k == 1 else (
      f" {k} seeds ({s['seed']} to {s['seed'] + k - 1}): every score is the mean over the seeds "
      f"± the half-width of its 95 % confidence interval (Student t, {k - 1} "
      f"degree{'s' if k > 2 else ''} of freedom).")
  lines = [
      f"# Pause ablation on `{FINETUNE_TASK}` ({'quick' if s['quick'] else 'full'} mode)", "",
      f"Pretraining {s['pretrain_steps']} steps on the embedded corpus; fine-tuning "
      f"{s['finetune_steps']} steps; exact match on {s['eval_examples']} held-out examples; "
      f"M_ft = {s['m_ft']}, M_inf = M_ft unless stated.{seeds} "
      f"Wall time {results['wall_time_s']:.0f} s.",
      "", "| pretraining | fine-tuning | exact match |", "| --- | --- | --- |"]
  for name, v in results["variants"].items():
    lines.append(f"| {v['pretraining']} | {v['finetuning']} | "
                 f"{_score_text(v['exact_match'], v.get('exact_match_ci95'))} |")
  sweep = results["m_ft_sweep"]
  sweep_ci = results.get("m_ft_sweep_ci95", {})
  lines += ["", "M_ft sweep (PausePT; M_inf = M_ft):", "",
            "| M_ft | " + " | ".join(sweep) + " |",
            "| --- |" + " --- |" * len(sweep),
            "| exact match | " + " | ".join(_score_text(v, sweep_ci.get(m))
                                           for m, v in sweep.items()) + " |",
            "", f"M_inf robustness (PauseFT models, M_ft = {s['m_ft']}):", ""]
  robust = results["m_inf_robustness"]
  robust_ci = results.get("m_inf_robustness_ci95", {})
  m_infs = list(next(iter(robust.values())))
  lines += ["| model \\ M_inf | " + " | ".join(m_infs) + " |",
            "| --- |" + " --- |" * len(m_infs)]
  for name, row in robust.items():
    cis = robust_ci.get(name, {})
    lines.append(f"| {name} | " + " | ".join(_score_text(v, cis.get(m))
                                             for m, v in row.items()) + " |")
  return "\n".join(lines) + "\n"


def main(argv):
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  quick, seed, num_seeds, m_ft = f.quick, f.seed, f.seeds, f.m_ft
  if m_ft < 1:
    raise UsageError.setting("--m_ft", m_ft, "a positive number of pauses (PauseFT's M_ft)")
  if num_seeds < 1:
    raise UsageError.setting("--seeds", num_seeds,
                             "a positive integer (repeats of the sweep, seeds --seed, --seed + 1, "
                             "...)")
  try:
    sweep = sorted({int(m) for m in f.m_ft_sweep})
  except ValueError:
    sweep = [-1]
  if not sweep or sweep[0] < 0:
    raise UsageError.setting("--m_ft_sweep", ",".join(f.m_ft_sweep),
                             "comma-separated non-negative integers, e.g. 0,2,5,10")
  for name in ("pretrain_steps", "finetune_steps", "eval_examples"):
    if f[name].value < 0:
      raise UsageError.setting(f"--{name}", f[name].value,
                               "a non-negative integer (0: the mode's default)")
  mode = 1 if quick else 0
  pre_steps = f.pretrain_steps or PRETRAIN_STEPS[mode]
  ft_steps = f.finetune_steps or FINETUNE_STEPS[mode]
  examples = f.eval_examples or EVAL_EXAMPLES[mode]
  from pausejax.experiments import parity
  outdir = parity.check_outdir(f.outdir)

  from pausejax import config as config_lib
  from pausejax import corpus
  tfds_dir = os.path.join(outdir, "tensorflow_datasets")
  seeds = list(range(seed, seed + num_seeds))
  # One seed keeps the single-seed layout, so earlier outdirs are reused as they are.
  runs = {s: os.path.join(outdir, "runs", *([] if num_seeds == 1 else [f"seed{s}"]))
          for s in seeds}
  ft_ms = sorted(set(sweep) | {0, m_ft})
  # Every config of every seed is validated before the first run starts.
  pre_cfgs, ft_cfgs = {}, {}
  for s in seeds:
    pre_cfgs[s] = {name: pretrain_config(quick, s, task, pre_steps, tfds_dir)
                   for name, task in (("StdPT", "shakespeare"),
                                      ("PausePT", "shakespeare_pause"))}
    init_dirs = {"NoPT": "", **{pt: os.path.join(runs[s], pt) for pt in pre_cfgs[s]}}
    ft_cfgs[s] = {(pt, m): finetune_config(quick, s, m, ft_steps, init_dirs[pt], tfds_dir)
                  for pt in init_dirs for m in ft_ms if pt == "PausePT" or m in (0, m_ft)}
    for c in list(pre_cfgs[s].values()) + list(ft_cfgs[s].values()):
      config_lib.validate(c)
  corpus.ensure_prepared(corpus.EMBEDDED_TFDS_NAME, tfds_dir)

  t0 = time.time()
  total = sum(len(pre_cfgs[s]) + len(ft_cfgs[s]) for s in seeds)
  done = 0

  def progress(what: str) -> None:
    elapsed = time.time() - t0
    eta = f"{elapsed / done * (total - done):.0f}s" if done else "--"
    print(f"[ablation {done}/{total} runs | {elapsed:.0f}s elapsed | ETA {eta}] {what}",
          flush=True)

  for s in seeds:
    of_seed = "" if num_seeds == 1 else f", seed {s}"
    for name, c in pre_cfgs[s].items():
      progress(f"pretraining {name} (task {c.task}){of_seed}")
      train_or_reuse(c, os.path.join(runs[s], name))
      done += 1
    for (pt, m), c in ft_cfgs[s].items():
      progress(f"fine-tuning {pt} with M_ft={m}{of_seed}")
      train_or_reuse(c, os.path.join(runs[s], f"{pt}_ft{m}"))
      done += 1

  def seed_scores(s: int) -> dict[str, Any]:
    """The scores of seed s's runs, as aggregate takes them."""

    def score(pt: str, m: int, m_inf: int) -> float:
      return _exact_match(ft_cfgs[s][(pt, m)], os.path.join(runs[s], f"{pt}_ft{m}"), m_inf,
                          examples)

    variants = {}
    for pt in PRETRAINING_NAMES:
      for ft, m in (("StdFT", 0), ("PauseFT", m_ft)):
        variants[f"{pt}+{ft}"] = {"pretraining": PRETRAINING_NAMES[pt],
                                  "finetuning": f"{ft} (M_ft={m})", "m_ft": m,
                                  "exact_match": score(pt, m, m)}
    sweep_scores = {str(m): (variants["PausePT+StdFT"]["exact_match"] if m == 0 else
                             variants["PausePT+PauseFT"]["exact_match"] if m == m_ft else
                             score("PausePT", m, m)) for m in sweep}
    m_infs = sorted({0, m_ft // 2, m_ft, (3 * m_ft) // 2, 2 * m_ft})
    robust = {f"{pt}+PauseFT": {str(m_inf): score(pt, m_ft, m_inf) for m_inf in m_infs}
              for pt in ("NoPT", "PausePT")}
    return {"variants": variants, "m_ft_sweep": sweep_scores, "m_inf_robustness": robust}

  print("[ablation] evaluating", flush=True)
  scores = aggregate([seed_scores(s) for s in seeds])
  results = {
      "settings": {"quick": quick, "seed": seed, "seeds": num_seeds, "m_ft": m_ft,
                   "pretrain_steps": pre_steps, "finetune_steps": ft_steps,
                   "eval_examples": examples, "task": FINETUNE_TASK},
      **scores,
      "wall_time_s": time.time() - t0,
  }
  with open(os.path.join(outdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  with open(os.path.join(outdir, "results.md"), "w") as f:
    f.write(_markdown(results))
  _plot(results, os.path.join(outdir, "ablation.png"))
  print(_markdown(results), flush=True)


if __name__ == "__main__":
  define_flags()
  run(main)
