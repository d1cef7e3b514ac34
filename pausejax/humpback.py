r"""Humpback (instruction backtranslation, Li et al. 2023) on a pausejax base model: one command.

    python -m pausejax.humpback --workdir=runs/humpback [--quick]          # the embedded world
    python -m pausejax.humpback --workdir=runs/hb --config.seed_file=seed.jsonl \
        --config.text_file=web.jsonl --config.base=runs/c4_130m [--config.finetune.steps=2000]

Seed pairs are JSON lines `{"instruction": ..., "output": ...}`; unlabelled text is JSON lines
`{"text": ...}` or plain text (one segment per paragraph); `base` is a pausejax run directory
(its latest checkpoint and config.json). Each stage works in its own subdirectory of --workdir
and ends by writing `stage.json` there; a re-run skips every stage that has one, and resumes a
stage that was stopped part-way (training from its checkpoint, augmentation and curation from
their last finished batch, never duplicating or losing a candidate):

  base/       only without `base`: pretrain a small model on the embedded corpus
  data/       seed pairs (some held out for eval loss); segments filtered as in the paper
              (`filters.*`: length in characters, exact and near duplicates, repetitive text)
  backward/   M_yx: fine-tuned from the base on (output -> instruction), loss on the instruction
  m0/         M0: fine-tuned from the base on the seed pairs (tag: `tags.seed`)
  augment/    one instruction per segment from M_yx (T = 0.7, top-p 0.9): candidates.jsonl
  curate1/    M0 rates every candidate with the 5-point prompt (`curate.template`, ending in
              "Score: <rating>", parsed with the paper's pattern; unparseable = rejected) or, with
              `curate.method=likelihood`, picks the rating whose "Score: r" is most likely after
              the prompt (for models too small to follow a rubric); keeps score >= threshold
  m1/         fine-tuned from the base on seed + curated pairs (a seqio Mixture; curated pairs
              tagged `tags.web`)
  curate2/    M1 rates the candidates again
  m2/         fine-tuned on seed + the pairs M1 kept: the final model

Every fine-tuning stage uses `finetune.*` and inserts `finetune.num_pauses` (M_ft) pauses, as
PauseFT does; decoding uses the same M_inf. The stage data are registered seqio tasks (read by
`<workdir>/tasks.py`), so e.g. `python -m pausejax.inspect_data --config=configs/tiny.py
--config.task_modules=<workdir>/tasks.py --config.task=humpback_mix1` shows them. The workdir's
`report.json` counts what each stage read, made and kept (with the embedded world also the
precision and recall of each curation against the world's truth).

With no seed_file/text_file, the data are the embedded world (`pausejax.humpback_world`): three
checkable instruction templates over the Shakespeare corpus, an unlabelled pool of true answers
and distractors, and rating examples in the seed set.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Sequence

from absl import flags
import ml_collections
from ml_collections import config_flags
import numpy as np

from pausejax import config as config_lib
from pausejax import fs
from pausejax import humpback_data as hd
from pausejax import humpback_world as world_lib
from pausejax import metrics
from pausejax.errors import EXIT_STOPPED_EARLY
from pausejax.errors import UsageError
from pausejax.errors import check_writable_dir
from pausejax.errors import run

SETTINGS_FILE, REPORT_FILE, DONE_FILE = "humpback.json", "report.json", "stage.json"


class StoppedEarly(Exception):
  """A training stage stopped on SIGTERM with its checkpoint saved."""
METHODS = ("generate", "likelihood")


def defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed_file = ""            # Seed pairs (JSON lines); "" with text_file "": the embedded world.
  c.text_file = ""            # Unlabelled segments (JSON lines {"text"} or plain text).
  c.base = ""                 # A pausejax run directory; "" = pretrain one (stage base/).
  c.tfds_data_dir = ""        # Where the embedded corpus is prepared (base pretraining only).
  c.seed = 0
  c.seed_validation = 20      # Seed pairs held out for the fine-tuning runs' eval loss.
  c.iterations = 2            # Curate-and-train rounds: 2 = M1 and M2, as in the paper.
  c.base_steps = 1000         # Pretraining steps of the base/ stage (a 4x192 model).
  c.filters = ml_collections.ConfigDict(dataclasses.asdict(hd.SegmentFilter()))
  c.filters.max_segments = 0  # Keep the first N segments after filtering (0 = all).
  c.finetune = ml_collections.ConfigDict()
  c.finetune.steps = 300
  c.finetune.backward_steps = 0   # M_yx's steps (0 = finetune.steps).
  c.finetune.batch_size = 16
  c.finetune.learning_rate = 1e-3
  c.finetune.warmup_steps = 20
  c.finetune.seq_len = 256
  c.finetune.targets_len = 64     # Answer (or instruction) tokens; the prompt gets the rest.
  c.finetune.num_pauses = 0       # M_ft = M_inf: pauses after every prompt.
  c.finetune.position = "append"
  c.augment = ml_collections.ConfigDict()
  c.augment.temperature = 0.7
  c.augment.top_p = 0.9
  c.augment.max_new_tokens = 48
  c.augment.batch_size = 32
  c.curate = ml_collections.ConfigDict()
  c.curate.method = "generate"
  c.curate.threshold = 4          # Keep score >= 4 (the paper's A4) or 5 (A5).
  c.curate.template = hd.PAPER_TEMPLATE
  c.curate.max_new_tokens = 16
  c.curate.batch_size = 32
  c.tags = ml_collections.ConfigDict()
  c.tags.use = True
  c.tags.seed = hd.SEED_TAG
  c.tags.web = hd.WEB_TAG
  c.world = ml_collections.ConfigDict(dataclasses.asdict(world_lib.Sizes()))
  del c.world.seed  # The pipeline's seed.
  return c


# The embedded world's short segments and prompts, and --quick's sizes: each applies to the
# keys still at their defaults (a key set on the command line wins).
_WORLD = {"filters.min_chars": 3, "filters.max_chars": 200, "filters.dedup": False,
          "filters.near_dup_jaccard": 1.0, "curate.template": world_lib.DEMO_TEMPLATE,
          "finetune.seq_len": 128, "finetune.targets_len": 32, "augment.max_new_tokens": 32}
_QUICK = {"base_steps": 20, "seed_validation": 4, "finetune.steps": 12,
          "finetune.batch_size": 4, "augment.batch_size": 8, "curate.batch_size": 8,
          "finetune.seq_len": 96, "world.num_seed": 24, "world.num_ratings": 12,
          "world.num_pool": 20, "world.num_eval": 8, "augment.max_new_tokens": 12,
          "curate.max_new_tokens": 6}
QUICK_MODEL = {"num_layers": 1, "d_model": 32, "num_heads": 2, "head_dim": 16, "mlp_dim": 64}
BASE_MODEL = {"num_layers": 4, "d_model": 192, "num_heads": 3, "head_dim": 64, "mlp_dim": 512}


def _get(c, key):
  for part in key.split("."):
    c = c[part]
  return c


def _set(c, key, value):
  *path, last = key.split(".")
  for part in path:
    c = c[part]
  c[last] = value


def resolve(c: ml_collections.ConfigDict, quick: bool) -> ml_collections.ConfigDict:
  """The settings the run uses: world and quick values for keys left at their defaults."""
  c = ml_collections.ConfigDict(c.to_dict())
  base = defaults()
  embedded = not c.seed_file and not c.text_file
  for table, on in ((_WORLD, embedded), (_QUICK, quick)):
    for key, value in table.items():
      if on and _get(c, key) == _get(base, key):
        _set(c, key, value)
  with c.unlocked():
    c.quick, c.embedded = bool(quick), embedded
  return c


def validate(c: ml_collections.ConfigDict) -> None:
  """One UsageError line for the first bad setting; nothing is written before this passes."""
  def need(ok, key, valid):
    if not ok:
      raise UsageError.setting(f"--config.{key}", _get(c, key), valid)
  def positive_int(key):
    value = _get(c, key)
    need(isinstance(value, int) and not isinstance(value, bool) and value >= 1, key,
         "an integer >= 1")
  need(bool(c.seed_file) == bool(c.text_file), "seed_file" if c.text_file else "text_file",
       "set both seed_file and text_file, or neither (the embedded world)")
  if c.seed_file:  # Read once here, so a bad line stops the run before anything is written.
    hd.read_pairs(c.seed_file)
    hd.read_segments(c.text_file)
  if c.base:
    need(config_lib.load_saved(c.base) is not None, "base",
         "a pausejax run directory with config.json and checkpoints/")
  for key in ("seed_validation", "iterations", "base_steps", "finetune.steps",
              "finetune.batch_size", "finetune.seq_len", "finetune.targets_len",
              "augment.max_new_tokens", "augment.batch_size", "curate.max_new_tokens",
              "curate.batch_size", "world.num_seed", "world.num_pool", "world.num_eval"):
    positive_int(key)
  need(c.iterations <= 9, "iterations", "an integer in [1, 9]")
  need(c.finetune.targets_len < c.finetune.seq_len, "finetune.targets_len",
       f"an integer below finetune.seq_len ({c.finetune.seq_len})")
  need(isinstance(c.finetune.num_pauses, int) and c.finetune.num_pauses >= 0,
       "finetune.num_pauses", "an integer >= 0")
  need(c.finetune.position in ("append", "prepend"), "finetune.position", "append or prepend")
  need(c.finetune.learning_rate > 0, "finetune.learning_rate", "a number > 0")
  need(c.augment.temperature >= 0, "augment.temperature", "a number >= 0 (0 = greedy)")
  need(0 < c.augment.top_p <= 1, "augment.top_p", "a number in (0, 1]")
  need(c.curate.method in METHODS, "curate.method", " or ".join(METHODS))
  need(c.curate.threshold in hd.RATINGS, "curate.threshold", "a rating in 1..5 (the paper: 4 "
       "or 5)")
  need(0 < c.world.distractor_fraction < 1, "world.distractor_fraction", "a number in (0, 1)")
  need(isinstance(c.world.num_ratings, int) and c.world.num_ratings >= 0, "world.num_ratings",
       "an integer >= 0")
  hd.check_template(c.curate.template)
  hd.SegmentFilter(**{k: v for k, v in c.filters.items() if k != "max_segments"}).validate()


# ----------------------------------------------------------------------------------------------
# Stages.

class Pipeline:
  """The stages of one Humpback run in `workdir` (see the module docstring)."""

  def __init__(self, c: ml_collections.ConfigDict, workdir: str):
    self.c, self.workdir = c, workdir
    self.report: dict[str, Any] = {}
    self._report_path = os.path.join(workdir, REPORT_FILE)
    if os.path.exists(self._report_path):
      self.report = json.loads(fs.read_text(self._report_path))

  def dir(self, stage: str) -> str:
    return os.path.join(self.workdir, stage)

  def done(self, stage: str) -> dict | None:
    path = os.path.join(self.dir(stage), DONE_FILE)
    return json.loads(fs.read_text(path)) if os.path.exists(path) else None

  def finish(self, stage: str, counts: dict[str, Any]) -> dict[str, Any]:
    fs.write_text(os.path.join(self.dir(stage), DONE_FILE), json.dumps(counts, indent=2) + "\n")
    self.report[stage] = counts
    fs.write_text(self._report_path, json.dumps(self.report, indent=2) + "\n")
    print(f"humpback: {stage} done: {_brief(counts)}", flush=True)
    return counts

  def stage(self, name: str, fn, *args) -> dict[str, Any]:
    counts = self.done(name)
    if counts is not None:
      print(f"humpback: {name} already done; skipped", flush=True)
      self.report[name] = counts
      return counts
    os.makedirs(self.dir(name), exist_ok=True)
    return self.finish(name, fn(*args))

  # -- data ------------------------------------------------------------------------------------

  def base_run(self) -> str:
    return self.c.base or self.dir("base")

  def vocab_path(self) -> str:
    from pausejax import data as data_lib
    return data_lib.vocab_path(config_lib.for_reading(self.base_run(), None))

  def data(self) -> dict[str, Any]:
    c, out = self.c, self.dir("data")
    seed_file, text_file, counts = c.seed_file, c.text_file, {}
    if c.embedded:
      sizes = world_lib.Sizes(**c.world.to_dict(), seed=c.seed)
      paths = world_lib.build(os.path.join(self.workdir, "world"), sizes, c.curate.template)
      seed_file, text_file = paths["seed"], paths["pool"]
    pairs = hd.read_pairs(seed_file)
    train, validation = hd.split_validation(pairs, c.seed_validation, c.seed)
    segments = hd.read_segments(text_file)
    kept, counts = hd.SegmentFilter(
        **{k: v for k, v in c.filters.items() if k != "max_segments"}).apply(segments)
    if c.filters.max_segments:
      kept = kept[:c.filters.max_segments]
      counts["kept"] = len(kept)
    if not kept:
      raise UsageError.setting("--config.filters.min_chars", c.filters.min_chars,
                               f"bounds that keep some of the {len(segments)} segments of "
                               f"{text_file} ({_brief(counts)})")
    hd.write_jsonl(os.path.join(out, "seed_train.jsonl"), train)
    hd.write_jsonl(os.path.join(out, "seed_validation.jsonl"), validation)
    hd.write_jsonl(os.path.join(out, "segments.jsonl"), [{"text": t} for t in kept])
    return {"seed_pairs": len(pairs), "seed_train": len(train),
            "seed_validation": len(validation), "filters": counts, "segments": len(kept)}

  def write_task_module(self) -> str:
    """`<workdir>/tasks.py`: registers the stage data (task_modules of every stage's run)."""
    settings = {"vocab_path": self.vocab_path(),
                "seed_tag": self.c.tags.seed if self.c.tags.use else "",
                "web_tag": self.c.tags.web if self.c.tags.use else ""}
    fs.write_text(os.path.join(self.workdir, hd.RUN_SETTINGS_FILE),
                  json.dumps(settings, indent=2) + "\n")
    path = os.path.join(self.workdir, hd.TASKS_FILE)
    fs.write_text(path, hd.TASKS_MODULE_TEXT)
    return path

  # -- training ----------------------------------------------------------------------------------

  def pretrain_base(self) -> dict[str, Any]:
    c = config_lib.defaults()
    c.task = "shakespeare"
    c.tfds_data_dir = self.c.tfds_data_dir
    c.seq_len, c.global_batch_size = (64, 4) if self.c.quick else (256, 8)
    c.optimizer.learning_rate, c.optimizer.warmup_steps = 3e-3, max(1, self.c.base_steps // 20)
    for key, value in (QUICK_MODEL if self.c.quick else BASE_MODEL).items():
      c.model[key] = value
    return self._train(c, "base", self.c.base_steps)

  def finetune_config(self, task: str, eval_task: str, steps: int) -> ml_collections.ConfigDict:
    """The base run's model and vocabulary, fine-tuned on `task` from its parameters."""
    c = config_lib.for_reading(self.base_run(), None)
    f = self.c.finetune
    c.task, c.eval_task = task, eval_task
    c.task_modules = os.path.join(self.workdir, hd.TASKS_FILE)
    c.vocab_path = self.vocab_path()
    c.tfds_data_dir = self.c.tfds_data_dir
    c.init_from = os.path.join(self.base_run(), "checkpoints")
    c.pause.rate = None
    c.pause.num_finetune, c.pause.position = f.num_pauses, f.position
    c.backspace.rate, c.sequencematch.weight = 0.0, 0.0
    c.seq_len, c.targets_len, c.global_batch_size = f.seq_len, f.targets_len, f.batch_size
    c.microbatches, c.data_shards, c.pack = 1, 0, False
    c.optimizer.learning_rate, c.optimizer.warmup_steps = f.learning_rate, f.warmup_steps
    c.seed = self.c.seed
    return c

  def _train(self, config, stage: str, steps: int) -> dict[str, Any]:
    from pausejax import train
    config.num_train_steps = steps
    config.eval_every_steps = 0
    config.num_eval_steps = 0
    config.checkpoint_every_steps = max(1, steps // 2)
    config.keep_checkpoints = 1
    config.async_checkpointing = False
    config.log_every_steps = max(1, min(10, steps))
    info = train.train_and_evaluate(config, self.dir(stage))
    if info.get("preempted"):  # SIGTERM: the checkpoint is saved; a re-run resumes the stage.
      raise StoppedEarly(stage)
    final = info.get("final_eval") or {}
    return {"steps": steps, "task": config.task, "eval_loss": final.get("eval_loss"),
            "train_loss": info.get("train_loss")}

  def train_forward(self, stage: str, task: str) -> dict[str, Any]:
    hd.register_run(self.workdir)  # What the stages before this one wrote.
    return self._train(self.finetune_config(task, "humpback_seed", self.c.finetune.steps),
                       stage, self.c.finetune.steps)

  def train_backward(self) -> dict[str, Any]:
    steps = self.c.finetune.backward_steps or self.c.finetune.steps
    hd.register_run(self.workdir)
    return self._train(self.finetune_config("humpback_backward", "", steps), "backward", steps)

  # -- augmentation and curation ---------------------------------------------------------------

  def augment(self) -> dict[str, Any]:
    c = self.c.augment
    segments = [r["text"] for r in hd.read_jsonl(os.path.join(self.dir("data"),
                                                              "segments.jsonl"))]
    model = StageModel(self.dir("backward"))

    def batch_fn(index, texts):
      prompts = [hd.backward_prompt(t) for t in texts]
      made = model.generate(prompts, max_new_tokens=c.max_new_tokens,
                            temperature=c.temperature, top_p=c.top_p,
                            seed=self.c.seed * 100_003 + index)
      return [{"instruction": i.strip(), "output": t} for i, t in zip(made, texts)]

    rows = _in_batches(self.dir("augment"), segments, c.batch_size, batch_fn, "augment",
                       "segments")
    candidates = [r for r in rows if r["instruction"]]
    hd.write_jsonl(os.path.join(self.dir("augment"), "candidates.jsonl"), candidates)
    return {"segments": len(segments), "candidates": len(candidates),
            "empty_instructions": len(rows) - len(candidates)}

  def curate(self, k: int) -> dict[str, Any]:
    c, stage = self.c.curate, f"curate{k}"
    scorer = StageModel(self.dir("m0" if k == 1 else f"m{k - 1}"))
    candidates = hd.read_jsonl(os.path.join(self.dir("augment"), "candidates.jsonl"))
    tag = self.c.tags.seed if self.c.tags.use else ""

    def batch_fn(index, pairs):
      del index
      prompts = [hd.forward_prompt(hd.curation_prompt(p["instruction"], p["output"],
                                                       c.template), tag) for p in pairs]
      if c.method == "likelihood":
        scores = scorer.best_rating(prompts)
        return [p | {"score": s, "raw": f"Score: {s}"} for p, s in zip(pairs, scores)]
      texts = scorer.generate(prompts, max_new_tokens=c.max_new_tokens)
      return [p | {"score": hd.parse_score(t), "raw": t} for p, t in zip(pairs, texts)]

    rows = _in_batches(self.dir(stage), candidates, c.batch_size, batch_fn, stage,
                       "candidates")
    hd.write_jsonl(os.path.join(self.dir(stage), "scores.jsonl"), rows)
    kept = [{"instruction": r["instruction"], "output": r["output"]} for r in rows
            if r["score"] is not None and r["score"] >= c.threshold]
    hd.write_jsonl(os.path.join(self.dir(stage), "curated.jsonl"), kept)
    histogram = {str(s): sum(r["score"] == s for r in rows) for s in hd.RATINGS}
    counts = {"scorer": "m0" if k == 1 else f"m{k - 1}", "method": c.method,
              "candidates": len(rows), "parsed": sum(r["score"] is not None for r in rows),
              "unparseable": sum(r["score"] is None for r in rows), "histogram": histogram,
              "threshold": c.threshold, "kept": len(kept)}
    if self.c.embedded:
      counts["against_truth"] = curation_quality(rows, c.threshold)
    return counts

  # -- the whole road --------------------------------------------------------------------------

  def run(self) -> dict[str, Any]:
    if not self.c.base:
      self.stage("base", self.pretrain_base)
    self.stage("data", self.data)
    self.write_task_module()
    self.stage("backward", self.train_backward)
    self.stage("m0", self.train_forward, "m0", "humpback_seed")
    self.stage("augment", self.augment)
    for k in range(1, self.c.iterations + 1):
      self.stage(f"curate{k}", self.curate, k)
      self.stage(f"m{k}", self.train_forward, f"m{k}", f"humpback_mix{k}")
    return self.report


def curation_quality(rows: Sequence[dict], threshold: int) -> dict[str, Any]:
  """Precision and recall of keeping score >= threshold, against the embedded world's oracle."""
  world = world_lib.World()
  good = [world.correct(r["instruction"], r["output"]) for r in rows]
  kept = [r["score"] is not None and r["score"] >= threshold for r in rows]
  true_kept = sum(g and k for g, k in zip(good, kept))
  return {"correct_candidates": int(sum(good)), "kept": int(sum(kept)),
          "precision": true_kept / sum(kept) if any(kept) else None,
          "recall": true_kept / sum(good) if any(good) else None}


def _in_batches(directory: str, items: Sequence[Any], batch_size: int, fn, label: str,
                unit: str) -> list[dict]:
  """fn(batch index, items) over fixed batches; each finished batch is one file in parts/
  (written whole), so a stopped run resumes at the first missing batch, dropping nothing."""
  parts = os.path.join(directory, "parts")
  os.makedirs(parts, exist_ok=True)
  num_batches = -(-len(items) // batch_size)
  progress = metrics.Progress(len(items))
  rows: list[dict] = []
  for b in range(num_batches):
    path = os.path.join(parts, f"{b:05d}.jsonl")
    if os.path.exists(path):
      rows.extend(hd.read_jsonl(path))
      continue
    made = fn(b, list(items[b * batch_size:(b + 1) * batch_size]))
    hd.write_jsonl(path, made)
    rows.extend(made)
    print(f"humpback: {progress.line(len(rows), label, unit)}", flush=True)
  return rows


def _brief(counts: dict[str, Any]) -> str:
  return ", ".join(f"{k} {v}" for k, v in counts.items() if not isinstance(v, dict))


# ----------------------------------------------------------------------------------------------
# A finished stage's model, decoding as its run was fine-tuned (M_inf = M_ft, position, prefix).

class StageModel:

  def __init__(self, workdir: str):
    from pausejax import build
    from pausejax import data as data_lib
    from pausejax import registry
    from pausejax import sinks
    from pausejax import specials
    self.config = config_lib.for_reading(workdir, None)
    self.vocab = specials.load_vocabulary(data_lib.vocab_path(self.config))
    self.model, _ = build.restore_model(self.config, workdir,
                                        specials.padded_vocab_size(self.vocab.vocab_size),
                                        self.vocab.pause_id)
    self.start = sinks.start_ids(registry.start_token(self.config), self.vocab.sink_id)
    self.pauses = int(self.config.pause.num_finetune)
    self.append = self.config.pause.position == "append"
    self.max_len = int(self.config.seq_len)

  def prompt_ids(self, text: str, room: int) -> list[int]:
    """start (+ pauses if prepended) + the prompt's ids, cut from the front of the text's
    middle so that `room` more positions (pauses if appended, the answer) fit in max_len."""
    budget = self.max_len - room - len(self.start) - self.pauses
    ids = list(self.vocab.encode(text))
    if len(ids) > budget:  # Keep the start and the final "...Answer:"/"Instruction:" cue.
      tail = 8
      ids = ids[:max(0, budget - tail)] + ids[-tail:]
    pre = [] if self.append else [self.vocab.pause_id] * self.pauses
    return self.start + pre + ids

  def generate(self, prompts: Sequence[str], *, max_new_tokens: int, temperature: float = 0.0,
               top_p: float = 1.0, seed: int = 0) -> list[str]:
    from pausejax import decode
    ids = [self.prompt_ids(p, max_new_tokens) for p in prompts]
    size = len(ids)
    gen = decode.generate(
        self.model, ids + [ids[0]] * (_bucket(size) - size), max_new_tokens=max_new_tokens,
        num_pauses=self.pauses if self.append else 0, pause_id=self.vocab.pause_id,
        eos_id=self.vocab.eos_id, max_len=self.max_len, temperature=temperature, top_p=top_p,
        seed=seed, vocab_size=self.vocab.vocab_size,
        prefix_lm=bool(self.config.get("prefix_lm", False)),
        bos_id=self.start[0] if self.start else None)
    return [self.vocab.decode(t) for t in gen.tokens[:size]]

  def best_rating(self, prompts: Sequence[str]) -> list[int]:
    """Per prompt, the rating r whose answer "Score: r" has the highest log-likelihood."""
    import jax.numpy as jnp
    answers = [list(self.vocab.encode(f"Score: {r}")) + [self.vocab.eos_id] for r in hd.RATINGS]
    room = max(len(a) for a in answers)
    rows, starts, counts = [], [], []
    for p in prompts:
      prompt = self.prompt_ids(p, room) + ([self.vocab.pause_id] * self.pauses
                                           if self.append else [])
      for a in answers:
        rows.append(prompt + a)
        starts.append(len(prompt))
        counts.append(len(a))
    tokens = np.zeros((len(rows), self.max_len), np.int32)
    for i, r in enumerate(rows):
      tokens[i, :len(r)] = r
    logits = np.asarray(self.model(jnp.asarray(tokens)).astype(jnp.float32))
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    scores = np.array([sum(logp[i, s - 1 + j, rows[i][s + j]] for j in range(n))
                       for i, (s, n) in enumerate(zip(starts, counts))])
    return [int(hd.RATINGS[k]) for k in scores.reshape(len(prompts), -1).argmax(axis=1)]


def _bucket(n: int) -> int:
  """Batch sizes rounded up to a power of two: few compiled shapes for the last batch."""
  return 1 << max(0, (n - 1).bit_length())


# ----------------------------------------------------------------------------------------------
# Command line.

def _check_same(c: ml_collections.ConfigDict, workdir: str) -> None:
  """A re-run must be the same pipeline: its finished stages were made with these settings."""
  path = os.path.join(workdir, SETTINGS_FILE)
  if not os.path.exists(path):
    return
  saved = config_lib.flatten(json.loads(fs.read_text(path)))
  now = config_lib.flatten(c)
  changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
  if changed:
    raise UsageError.setting(
        "--workdir", workdir, f"a new directory, or the settings of the run already there "
        f"(changed: {', '.join(changed[:5])}); its finished stages were made with those")


def start(c: ml_collections.ConfigDict, workdir: str) -> None:
  """Checks the resolved settings against `workdir` (before anything is written), then saves
  them there."""
  validate(c)
  _check_same(c, workdir)
  check_writable_dir(workdir, "workdir")
  os.makedirs(workdir, exist_ok=True)
  fs.write_text(os.path.join(workdir, SETTINGS_FILE), c.to_json_best_effort(indent=2) + "\n")


def main(argv):
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments {argv[1:]}; settings go in --config.key=value")
  workdir = flags.FLAGS.workdir
  if not workdir:
    raise UsageError.setting("--workdir", workdir, "give a directory, e.g. runs/humpback")
  c = resolve(flags.FLAGS.config, flags.FLAGS.quick)
  start(c, workdir)
  t0 = time.time()
  try:
    Pipeline(c, workdir).run()
  except StoppedEarly as e:
    print(f"humpback: stopped in stage {e} on SIGTERM, its checkpoint saved; re-run the same "
          "command to resume", flush=True)
    return EXIT_STOPPED_EARLY
  print(f"humpback: finished in {metrics.format_duration(time.time() - t0)}; report "
        f"{os.path.join(workdir, REPORT_FILE)}", flush=True)
  return 0


def define_flags() -> None:
  config_flags.DEFINE_config_dict(
      "config", defaults(), "Pipeline settings; override any with --config.key=value (e.g. "
      "--config.seed_file=seed.jsonl --config.text_file=web.jsonl --config.base=runs/base).",
      lock_config=True)
  flags.DEFINE_string("workdir", None, "Pipeline directory: one subdirectory per stage, "
                      "report.json. Re-running skips finished stages.")
  flags.DEFINE_bool("quick", False, "Tiny sizes (a 1-layer model, a few steps and examples) "
                    "for tests; keys set on the command line win.")


if __name__ == "__main__":
  define_flags()
  run(main)
