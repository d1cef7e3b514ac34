r"""The Humpback demonstration: does self-curated backtranslated data help, in a checkable world?

    python -m pausejax.experiments.humpback --outdir=runs/humpback_demo [--quick] \
        [--base_steps=N] [--steps=N] [--seed=0]

Runs the whole `pausejax.humpback` pipeline on the embedded world (`pausejax.humpback_world`:
four checkable instruction templates over the Shakespeare corpus; a pool of true answers and
shuffled-word distractors), in --outdir/pipeline, with the backward model trained for twice
the steps, then fine-tunes the same base on other data mixes with the same steps as M0, and
scores every model on the world's held-out instructions:

  seed              M0: the seed pairs only
  seed+uncurated    seed + every candidate pair (no curation)
  seed+A4           M1: seed + the candidates M0 rated >= 4
  seed+A5           seed + the candidates M0 rated 5
  M2                seed + the candidates M1 rated >= 4
  ... (no tags)     seed+uncurated, seed+A4, seed+A5 without the paper's tags

Reports the precision and recall of each curation round against the world's truth (is the
generated instruction one whose right answer is the segment?), held-out exact match per model
and per instruction kind (greedy, with the seed tag for tagged models, as the paper prompts at
inference) with a 95 % Wilson interval, in results.json, results.md and humpback.png. Re-running
reuses every finished stage. --quick shrinks everything to a smoke run; its numbers mean nothing.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

from absl import flags

from pausejax.errors import UsageError
from pausejax.errors import run


def define_flags() -> None:
  flags.DEFINE_string("outdir", None, "Where results and the pipeline's runs go.")
  flags.DEFINE_bool("quick", False, "Smoke run (numbers mean nothing).")
  flags.DEFINE_integer("base_steps", 0, "Pretraining steps of the base (0: the mode's default).")
  flags.DEFINE_integer("steps", 0, "Fine-tuning steps of every model (0: the mode's default).")
  flags.DEFINE_integer("seed", 0, "Seed of the world, the runs and the sampling.")


# (full, quick) defaults.
BASE_STEPS = (800, 20)
STEPS = (300, 12)
# name -> (data: "uncurated", "A4", "A5" or "A4@M1" on top of seed, tagged).
VARIANTS = {
    "seed+uncurated": ("uncurated", True),
    "seed+A5": ("A5", True),
    "seed+uncurated (no tags)": ("uncurated", False),
    "seed+A4 (no tags)": ("A4", False),
    "seed+A5 (no tags)": ("A5", False),
}
VARIANTS_FILE = "variants.json"


def _stage_name(name: str) -> str:
  return "v_" + "".join(ch if ch.isalnum() else "_" for ch in name).strip("_")


def register_variants(workdir: str) -> None:
  """Registers the variant mixes written under `workdir` (the pipeline's directory)."""
  from pausejax import humpback_data as hd
  hd.register_run(workdir)
  settings = json.loads(open(os.path.join(workdir, hd.RUN_SETTINGS_FILE)).read())
  path = os.path.join(workdir, VARIANTS_FILE)
  if not os.path.exists(path):
    return
  seed_files = {"train": os.path.join(workdir, "data", "seed_train.jsonl"),
                "validation": os.path.join(workdir, "data", "seed_validation.jsonl")}
  hd.register_pairs_task("hbv_seed_untagged", seed_files, vocab_path=settings["vocab_path"])
  for name, spec in json.loads(open(path).read()).items():
    task = _stage_name(name)
    if not spec["count"]:  # Nothing to add: the seed pairs alone.
      hd.register_mixture(task, {"humpback_seed" if spec["tags"] else "hbv_seed_untagged": 1})
      continue
    hd.register_pairs_task(task + "_data", {"train": spec["file"]},
                           vocab_path=settings["vocab_path"],
                           tag=settings["web_tag"] if spec["tags"] else "")
    seed_task = "humpback_seed" if spec["tags"] else "hbv_seed_untagged"
    hd.register_mixture(task, {seed_task: spec["num_seed"], task + "_data": spec["count"]})


VARIANT_TASKS_TEXT = (
    '"""Registers the demonstration\'s data mixes (pausejax.experiments.humpback)."""\n'
    "import os\n\nfrom pausejax.experiments import humpback\n\n"
    "humpback.register_variants(os.path.dirname(os.path.abspath(__file__)))\n")


def _variant_data(pipe, name: str, source: str) -> dict[str, Any]:
  from pausejax import humpback_data as hd
  workdir = pipe.workdir
  if source == "uncurated":
    pairs = hd.read_jsonl(os.path.join(workdir, "augment", "candidates.jsonl"))
  else:
    scores = hd.read_jsonl(os.path.join(workdir, "curate1", "scores.jsonl"))
    low = 5 if source == "A5" else 4
    pairs = [r for r in scores if r["score"] is not None and r["score"] >= low]
  path = os.path.join(workdir, "variants", _stage_name(name) + ".jsonl")
  count = hd.write_jsonl(path, [{"instruction": p["instruction"], "output": p["output"]}
                                for p in pairs])
  return {"file": path, "count": count}


def wilson(k: int, n: int) -> tuple[float, float]:
  """95 % Wilson score interval of a proportion k / n."""
  if n == 0:
    return (0.0, 0.0)
  z, p = 1.96, k / n
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  return (max(0.0, centre - half), min(1.0, centre + half))


def exact_match(model_dir: str, eval_pairs, tag: str, batch_size: int = 64) -> dict[str, Any]:
  """Greedy answers to the held-out instructions; exact match overall and per kind."""
  from pausejax import humpback
  from pausejax import humpback_data as hd
  from pausejax import metrics
  model = humpback.StageModel(model_dir)
  longest = max(len(model.vocab.encode(p["output"])) for p in eval_pairs) + 2
  hits, progress = [], metrics.Progress(len(eval_pairs))
  samples = []
  for i in range(0, len(eval_pairs), batch_size):
    batch = eval_pairs[i:i + batch_size]
    answers = model.generate([hd.forward_prompt(p["instruction"], tag) for p in batch],
                             max_new_tokens=longest)
    for p, a in zip(batch, answers):
      hits.append(a.strip() == p["output"].strip())
      if len(samples) < 3:
        samples.append({"instruction": p["instruction"], "target": p["output"],
                        "prediction": a.strip()})
    print(f"  {progress.line(len(hits), os.path.basename(model_dir), 'answers')}", flush=True)
  out = {"exact_match": sum(hits) / len(hits), "n": len(hits),
         "interval": wilson(sum(hits), len(hits)), "samples": samples, "by_kind": {}}
  for kind in sorted({p["kind"] for p in eval_pairs}):
    k = [h for h, p in zip(hits, eval_pairs) if p["kind"] == kind]
    out["by_kind"][kind] = sum(k) / len(k)
  return out


def _markdown(results: dict[str, Any]) -> str:
  lines = ["## Curation against the world's truth", "",
           "| round | scorer | candidates | correct | parsed | kept | precision | recall |",
           "|---|---|---|---|---|---|---|---|"]
  for r in results["curation"]:
    fmt = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
    lines.append(f"| {r['round']} | {r['scorer']} | {r['candidates']} | {r['correct']} | "
                 f"{r['parsed']} | {r['kept']} | {fmt(r['precision'])} | {fmt(r['recall'])} |")
  kinds = sorted({k for m in results["models"].values() for k in m["by_kind"]})
  lines += ["", "## Held-out exact match (greedy)", "",
            "| model | training pairs | exact match | 95 % interval | " + " | ".join(kinds) + " |",
            "|---|---|---|---|" + "---|" * len(kinds)]
  for name, m in results["models"].items():
    lo, hi = m["interval"]
    lines.append(f"| {name} | {m['pairs']} | {100 * m['exact_match']:.1f} % | "
                 f"{100 * lo:.1f}–{100 * hi:.1f} | " +
                 " | ".join(f"{100 * m['by_kind'].get(k, 0):.1f}" for k in kinds) + " |")
  return "\n".join(lines) + "\n"


def _plot(results: dict[str, Any], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = list(results["models"])
  em = [100 * results["models"][n]["exact_match"] for n in names]
  err = [[100 * (m["exact_match"] - m["interval"][0]) for m in results["models"].values()],
         [100 * (m["interval"][1] - m["exact_match"]) for m in results["models"].values()]]
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), width_ratios=[2.2, 1])
  ax1.barh(names, em, xerr=err, color="#4c72b0")
  ax1.invert_yaxis()
  ax1.set_xlabel("held-out exact match (%), 95 % interval")
  rounds = results["curation"]
  x = range(len(rounds))
  prec = [r["precision"] or 0 for r in rounds]
  rec = [r["recall"] or 0 for r in rounds]
  ax2.bar([i - 0.2 for i in x], prec, 0.4, label="precision")
  ax2.bar([i + 0.2 for i in x], rec, 0.4, label="recall")
  ax2.set_xticks(list(x), [f"round {r['round']}\n({r['scorer']})" for r in rounds])
  ax2.set_ylim(0, 1)
  ax2.legend()
  ax2.set_title("self-curation vs the world's truth")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  for name in ("base_steps", "steps"):
    if getattr(f, name) < 0:
      raise UsageError.setting(f"--{name}", getattr(f, name), "an integer >= 0 (0: default)")
  from pausejax import humpback
  from pausejax import humpback_data as hd
  from pausejax.experiments import parity
  outdir = parity.check_outdir(f.outdir)
  mode = 1 if f.quick else 0
  c = humpback.defaults()
  c.seed = f.seed
  c.base_steps = f.base_steps or BASE_STEPS[mode]
  c.finetune.steps = f.steps or STEPS[mode]
  # Writing the instruction is the backward model's harder job (copying words it must reorder).
  c.finetune.backward_steps = 2 * c.finetune.steps
  c.tfds_data_dir = os.path.join(outdir, "tensorflow_datasets")
  c = humpback.resolve(c, f.quick)
  workdir = os.path.join(outdir, "pipeline")
  humpback.start(c, workdir)
  t0 = time.time()
  pipe = humpback.Pipeline(c, workdir)
  pipe.run()

  # The other mixes, from the same base with the same steps.
  num_seed = pipe.report["data"]["seed_train"]
  specs = {}
  for name, (source, tags) in VARIANTS.items():
    spec = _variant_data(pipe, name, "A4" if source == "A4" else source)
    specs[name] = spec | {"tags": tags, "num_seed": num_seed}
  open(os.path.join(workdir, VARIANTS_FILE), "w").write(json.dumps(specs, indent=2))
  open(os.path.join(workdir, "variant_tasks.py"), "w").write(VARIANT_TASKS_TEXT)
  register_variants(workdir)

  def train_variant(name):
    config = pipe.finetune_config(_stage_name(name), "humpback_seed", c.finetune.steps)
    config.task_modules += "," + os.path.join(workdir, "variant_tasks.py")
    return pipe._train(config, _stage_name(name), c.finetune.steps)

  for name in VARIANTS:
    pipe.stage(_stage_name(name), train_variant, name)

  # Held-out exact match.
  eval_pairs = hd.read_jsonl(os.path.join(workdir, "world", "eval.jsonl"))
  models = {"seed (M0)": ("m0", True, num_seed),
            "seed+uncurated": None, "seed+A4 (M1)": ("m1", True, None), "seed+A5": None,
            "M2 (seed+A4 by M1)": ("m2", True, None)}
  models.update({n: None for n in VARIANTS if "no tags" in n})
  results: dict[str, Any] = {"models": {}, "curation": []}
  for name, where in models.items():
    if where is None:
      stage, tags = _stage_name(name), VARIANTS[name][1]
      pairs = num_seed + specs[name]["count"]
    else:
      stage, tags, _ = where
      k = int(stage[1:])
      pairs = num_seed + (pipe.report[f"curate{k}"]["kept"] if k else 0)
    print(f"[humpback demo] scoring {name}", flush=True)
    em = exact_match(pipe.dir(stage), eval_pairs, c.tags.seed if tags else "")
    results["models"][name] = em | {"pairs": pairs, "stage": stage, "tags": tags}
  for k in range(1, c.iterations + 1):
    r = pipe.report[f"curate{k}"]
    truth = r["against_truth"]
    results["curation"].append({
        "round": k, "scorer": r["scorer"], "candidates": r["candidates"],
        "correct": truth["correct_candidates"], "parsed": r["parsed"], "kept": r["kept"],
        "precision": truth["precision"], "recall": truth["recall"],
        "histogram": r["histogram"]})
  results["settings"] = {"base_steps": c.base_steps, "finetune_steps": c.finetune.steps,
                         "quick": bool(f.quick), "seed": f.seed,
                         "world": c.world.to_dict(), "augment": c.augment.to_dict(),
                         "curate_method": c.curate.method, "threshold": c.curate.threshold}
  results["report"] = pipe.report
  results["wall_time_s"] = time.time() - t0
  open(os.path.join(outdir, "results.json"), "w").write(json.dumps(results, indent=2) + "\n")
  text = _markdown(results)
  open(os.path.join(outdir, "results.md"), "w").write(text)
  _plot(results, os.path.join(outdir, "humpback.png"))
  print(text, flush=True)
  return 0


if __name__ == "__main__":
  define_flags()
  run(main)
