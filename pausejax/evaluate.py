r"""Evaluate a trained (pause-token) model on downstream tasks, through SeqIO evaluation.

    python -m pausejax.evaluate --workdir=runs/ft_addition \
        [--eval_task=addition] [--num_pauses=10] [--max_examples=200] [--json]

Reads the run's settings from `<workdir>/config.json` (model, vocabulary, task, and how it was
fine-tuned: `pause.num_finetune`, `pause.position`, `prefix_lm`; each can be overridden by its
flag) and the parameters of its latest checkpoint, read-only (not the optimizer state). `--config`
is needed only for runs without config.json, and must otherwise agree with it. It builds the
task's evaluation view (`pausejax.downstream`) and runs `seqio.Evaluator` with:

  generative tasks       greedy pause-aware decoding (`pausejax.decode.generate`): the prompt is
                         BOS + inputs + M_inf `<pause>`s, the answer is what follows the last
                         pause, up to EOS or `--max_new_tokens` (with the config's
                         `prefix_lm`, BOS + inputs + pauses attend to each other both ways;
                         with `--max_backspaces`, default the run's
                         `backspace.max_per_sequence`, it may delete its own tokens, and the
                         answer is the text after the deletions);
  multiple choice        each option scored by its log-likelihood after BOS + inputs + pauses;
  last word (LAMBADA)    whether every token of the last word is the greedy choice.

BOS is the id 0 that seqio's feature converters put in front of every training sequence.
M_inf = `--num_pauses`, by default the run's `pause.num_finetune` (0 when it has none); with
`pause.position="prepend"` the pauses go before the inputs instead (BOS + pauses + inputs), as in
fine-tuning. Prints a table (or, with `--json`, one JSON line per task) and writes
`<workdir>/eval_<task>.json`.

In Python, `evaluate(model, "addition", vocabulary, num_pauses=10)` does the same for a model in
memory (e.g. M_inf sweeps without checkpoints).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Sequence

from absl import flags
from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import seqio
import tensorflow as tf

from pausejax import build
from pausejax import checkpoint
from pausejax import config as config_lib
from pausejax import data as data_lib  # Also keeps TensorFlow off the accelerators.
from pausejax import decode
from pausejax import distributed
from pausejax import downstream
from pausejax import fs
from pausejax import model as model_lib
from pausejax import registry
from pausejax import sinks
from pausejax import specials
from pausejax.errors import UsageError
from pausejax.errors import run

POSITIONS = ("append", "prepend")
_NUM_SAMPLES = 5  # Generative predictions shown in the JSON output.


@dataclasses.dataclass(frozen=True)
class Settings:
  """How to evaluate; `from_config` fills it from a run config."""
  num_pauses: int = 0              # M_inf.
  pause_position: str = "append"   # Where fine-tuning put the pauses: after or before the inputs.
  prefix_lm: bool = False          # Fine-tuned with a bidirectional prefix (config.prefix_lm).
  max_len: int = 256               # Positions per row: start + inputs + pauses + answer.
  start_token: str = "bos"         # What every sequence starts with (pausejax.sinks).
  max_new_tokens: int = 0          # Generation budget (0: the longest target, EOS included,
                                   # + 2 moves per allowed <backspace>).
  max_backspaces: int = 0          # <backspace> moves per answer (backspace.max_per_sequence).
  max_examples: int = 0            # First N examples of the split (0: all).
  batch_size: int = 16
  metrics: tuple[str, ...] = ()    # Metric names (empty: the task's).
  tfds_data_dir: str | None = None

  def validate(self) -> None:
    def is_int(v):
      return isinstance(v, (int, np.integer)) and not isinstance(v, bool)
    if not is_int(self.num_pauses) or self.num_pauses < 0:
      raise UsageError.setting("num_pauses", self.num_pauses, "an integer >= 0")
    if self.start_token not in (sinks.BOS, sinks.SINK, sinks.NONE):
      raise UsageError.setting("start_token", self.start_token, "'bos', 'sink' or 'none'")
    if self.pause_position not in POSITIONS:
      raise UsageError.setting("pause.position", self.pause_position, " or ".join(POSITIONS))
    if not is_int(self.max_backspaces) or self.max_backspaces < 0:
      raise UsageError.setting("max_backspaces", self.max_backspaces, "an integer >= 0")
    for name in ("max_new_tokens", "max_examples"):
      if not is_int(getattr(self, name)) or getattr(self, name) < 0:
        raise UsageError.setting(name, getattr(self, name), "an integer >= 0 (0 = automatic)")
    for name in ("max_len", "batch_size"):
      if not is_int(getattr(self, name)) or getattr(self, name) < 1:
        raise UsageError.setting(name, getattr(self, name), "an integer >= 1")

  @classmethod
  def from_config(cls, config, **overrides) -> Settings:
    pause_cfg = config.pause
    values = dict(num_pauses=pause_cfg.get("num_finetune", 0),
                  pause_position=pause_cfg.get("position", "append"),
                  prefix_lm=bool(config.get("prefix_lm", False)),
                  max_len=config.seq_len, tfds_data_dir=config.tfds_data_dir or None,
                  start_token=registry.start_token(config),
                  max_backspaces=(config.get("backspace") or {}).get("max_per_sequence", 0))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)


@dataclasses.dataclass
class _Example:
  index: int          # seqio's example index (the order of the cached dataset).
  inputs: list[int]
  targets: list[int]  # Generative: EOS included.


def _examples(model_dataset: tf.data.Dataset) -> list[_Example]:
  """Inputs and targets back from seqio's PrefixLM model features (prefix = inputs + 1)."""
  out = []
  for index, ex in model_dataset.as_numpy_iterator():
    num_inputs = int(ex["decoder_causal_attention"].sum()) - 1
    num_targets = int(ex["decoder_loss_weights"].sum())
    tokens = ex["decoder_target_tokens"].tolist()
    out.append(_Example(int(index), tokens[:num_inputs],
                        tokens[num_inputs:num_inputs + num_targets]))
  return out


@functools.partial(jax.jit, static_argnames=("graphdef", "prefix_lm"))
def _score(graphdef, state, tokens_BxS, start_B, count_B, vocab_size, *, prefix_lm: bool):
  """Per row: [log-likelihood, count, all-greedy] of tokens_BxS[start : start + count]."""
  model = nnx.merge(graphdef, state)
  positions_S = jnp.arange(tokens_BxS.shape[1])
  kwargs = {}
  if prefix_lm:  # seqio's decoder_causal_attention: BOS + inputs (+ pauses) see each other.
    kwargs["prefix_BxL"] = positions_S[None] < start_B[:, None]
  logits_BxSxV = model(tokens_BxS, **kwargs).astype(jnp.float32)
  next_BxS = jnp.roll(tokens_BxS, -1, axis=1)  # Position p predicts token p + 1.
  logp_BxS = jnp.take_along_axis(jax.nn.log_softmax(logits_BxSxV), next_BxS[..., None],
                                 axis=-1)[..., 0]
  valid_V = jnp.arange(logits_BxSxV.shape[-1]) < vocab_size
  greedy_BxS = jnp.argmax(jnp.where(valid_V, logits_BxSxV, -jnp.inf), axis=-1) == next_BxS
  scored_BxS = ((positions_S[None] >= start_B[:, None] - 1)
                & (positions_S[None] < (start_B + count_B)[:, None] - 1))
  return jnp.stack([jnp.sum(jnp.where(scored_BxS, logp_BxS, 0.0), axis=1),
                    count_B.astype(jnp.float32),
                    jnp.all(greedy_BxS | ~scored_BxS, axis=1).astype(jnp.float32)], axis=1)


def _batches(items: Sequence[Any], size: int):
  for i in range(0, len(items), size):
    yield items[i:i + size]


class TaskEvaluation:
  """One task's evaluation, prepared: data loaded and checked before any model is needed."""

  def __init__(self, recipe: downstream.DownstreamRecipe,
               vocabulary: specials.SpecialsVocabulary, settings: Settings):
    settings.validate()
    self.recipe, self.vocabulary, self.settings = recipe, vocabulary, settings
    # What every training sequence started with: BOS (seqio's shifted-in id 0), <sink>, or none.
    self._start = sinks.start_ids(settings.start_token, vocabulary.sink_id)
    metric_fns = downstream.resolve_metrics(settings.metrics or recipe.metric_fns, recipe.kind)
    self.generative = recipe.kind == "generative"
    recipe.ensure_prepared(settings.tfds_data_dir)
    self._name = f"{recipe.name}#evaluate"
    task = recipe.build(vocabulary, mode="eval", tfds_data_dir=settings.tfds_data_dir,
                        max_examples=settings.max_examples or None, metric_fns=metric_fns,
                        name=self._name)
    seqio.TaskRegistry.remove(self._name)
    seqio.TaskRegistry.add_provider(self._name, task)
    try:
      self._evaluator = seqio.Evaluator(
          self._name, feature_converter=seqio.PrefixLMFeatureConverter(pack=False),
          eval_split=recipe.eval_split, async_compute_metrics=False)
    finally:
      seqio.TaskRegistry.remove(self._name)
    if not self._evaluator.eval_tasks:
      raise UsageError.setting("eval_task", recipe.name,
                               f"a task with a {recipe.eval_split!r} split")
    self.examples = _examples(self._evaluator.cached_model_datasets[self._name])
    if not self.examples:
      raise UsageError.setting("eval_task", recipe.name,
                               f"a task with examples in its {recipe.eval_split!r} split")
    # A deletion costs two moves: the token and its <backspace>.
    self.max_new_tokens = settings.max_new_tokens or (
        max(len(e.targets) for e in self.examples) + 2 * settings.max_backspaces)
    self._check_lengths()
    self._predictions: dict[int, list[int]] = {}

  def _check_lengths(self) -> None:
    s = self.settings
    for i, e in enumerate(self.examples):
      answer = self.max_new_tokens if self.generative else len(e.targets)
      # Decoding never feeds back its last token (it needs no slot); scoring reads a full row.
      total = len(self._start) + len(e.inputs) + s.num_pauses + answer - (1 if self.generative else 0)
      if total > s.max_len:
        what = "max_new_tokens" if self.generative else "answer tokens"
        raise UsageError(
            f"max_len={s.max_len} is too small for example {i} of {self.recipe.name}: start + "
            f"{len(e.inputs)} prompt tokens + num_pauses={s.num_pauses} + {answer} {what} = "
            f"{total}; raise --max_len (or --config.seq_len), or lower --num_pauses")

  @property
  def num_examples(self) -> int:
    """Source examples (a multiple-choice example counts once, whatever its options)."""
    if self.recipe.kind != "multiple_choice":
      return len(self.examples)
    task_ds = self._evaluator.cached_task_datasets[self._name]
    return len({int(ex["idx"][0]) for ex in task_ds.as_numpy_iterator()})

  def _prompt(self, inputs: list[int]) -> list[int]:
    if self.settings.pause_position == "prepend":
      return self._start + [self.vocabulary.pause_id] * self.settings.num_pauses + inputs
    return self._start + inputs  # decode.generate appends the pauses.

  def _predict_fn(self, model, dataset, model_feature_shapes=None):
    del model_feature_shapes
    s = self.settings
    append = s.pause_position == "append"
    out = []
    for batch in _batches(_examples(dataset), s.batch_size):
      prompts = [self._prompt(e.inputs) for e in batch]
      prompts += [prompts[0]] * (s.batch_size - len(prompts))  # One compiled shape.
      gen = decode.generate(
          model, prompts, max_new_tokens=self.max_new_tokens,
          num_pauses=s.num_pauses if append else 0, pause_id=self.vocabulary.pause_id,
          eos_id=self.vocabulary.eos_id, max_len=s.max_len,
          vocab_size=self.vocabulary.vocab_size, prefix_lm=s.prefix_lm,
          bos_id=self._start[0] if self._start else None,
          **(dict(backspace_id=self.vocabulary.backspace_id, max_backspaces=s.max_backspaces)
             if s.max_backspaces else {}))
      for e, tokens in zip(batch, gen.tokens):
        self._predictions[e.index] = tokens
        out.append((e.index, tokens + [0] * (self.max_new_tokens - len(tokens))))
    return out

  def _score_fn(self, model, dataset, model_feature_shapes=None):
    del model_feature_shapes
    s = self.settings
    graphdef, state = nnx.split(model)
    pauses = [self.vocabulary.pause_id] * s.num_pauses
    out = []
    for batch in _batches(_examples(dataset), s.batch_size):
      tokens_BxS = np.zeros((s.batch_size, s.max_len), np.int32)  # Right padding.
      start_B = np.ones((s.batch_size,), np.int32)
      count_B = np.zeros((s.batch_size,), np.int32)
      for b, e in enumerate(batch):
        prompt = self._prompt(e.inputs) + (pauses if s.pause_position == "append" else [])
        row = prompt + e.targets
        tokens_BxS[b, :len(row)] = row
        start_B[b], count_B[b] = len(prompt), len(e.targets)
      rows = np.asarray(_score(graphdef, state, tokens_BxS, start_B, count_B,
                               np.int32(self.vocabulary.vocab_size), prefix_lm=s.prefix_lm))
      out.extend((e.index, rows[b].tolist()) for b, e in enumerate(batch))
    return out

  def run(self, model: model_lib.Decoder) -> dict[str, Any]:
    """Runs the model on every example; returns metrics and settings as a JSON-able dict."""
    self._predictions.clear()
    metrics, _ = self._evaluator.evaluate(
        compute_metrics=True,
        predict_fn=functools.partial(self._predict_fn, model),
        score_fn=functools.partial(self._score_fn, model))
    values = metrics.result()[self._name]
    s = self.settings
    result = {
        "task": self.recipe.name, "kind": self.recipe.kind, "split": self.recipe.eval_split,
        "num_examples": self.num_examples, "num_pauses": s.num_pauses,
        "pause_position": s.pause_position, "prefix_lm": s.prefix_lm,
        "metrics": {k: float(v) for k, v in values.items()},
    }
    if self.generative:
      result["max_new_tokens"] = self.max_new_tokens
      result["samples"] = self._samples()
    return result

  def _samples(self) -> list[dict[str, str]]:
    decode_ = self.vocabulary.decode
    return [{"inputs": decode_(e.inputs), "targets": decode_(e.targets),
             "prediction": decode_(self._predictions.get(e.index, []))}
            for e in self.examples[:_NUM_SAMPLES]]

  def close(self) -> None:
    self._evaluator.close()


def evaluate(model: model_lib.Decoder, task: str, vocabulary: specials.SpecialsVocabulary,
             **settings) -> dict[str, Any]:
  """Evaluates `model` on the downstream task named `task`; keyword args are `Settings`."""
  evaluation = TaskEvaluation(downstream.resolve(task), vocabulary, Settings(**settings))
  try:
    return evaluation.run(model)
  finally:
    evaluation.close()


# ----------------------------------------------------------------------------------------------
# Command line.

def define_flags() -> None:
  config_flags.DEFINE_config_file(
      "config", None, "Only for runs without config.json: the training config with the same "
      "overrides.")
  flags.DEFINE_string("workdir", None, "Run directory holding config.json and checkpoints/.")
  flags.DEFINE_list("eval_task", [], "Downstream task(s), comma-separated (default: the config's "
                    "eval_task or task, if that is a downstream task).")
  flags.DEFINE_integer("num_pauses", None,
                       "M_inf: <pause> tokens with the prompt (default: the run's "
                       "pause.num_finetune, 0 for a pretraining run).")
  flags.DEFINE_enum("pause_position", None, list(POSITIONS), "Pauses after the inputs or "
                    "before them (default: the run's pause.position).")
  flags.DEFINE_bool("prefix_lm", None, "Inputs and pauses attend both ways (default: the run's "
                    "prefix_lm).")
  flags.DEFINE_integer("max_examples", 0, "Evaluate the first N examples only (0 = all).")
  flags.DEFINE_integer("max_len", 0, "Positions per row: BOS + prompt + pauses + answer "
                       "(0 = config.seq_len).")
  flags.DEFINE_integer("max_new_tokens", 0, "Generation budget (0 = the longest target).")
  flags.DEFINE_integer("max_backspaces", None, "<backspace> moves allowed per generated answer "
                       "(default: the run's backspace.max_per_sequence; 0 = never).")
  flags.DEFINE_integer("batch_size", 16, "Examples per model call.")
  flags.DEFINE_list("metrics", [], "Metric names to compute instead of the task's "
                    "(see pausejax.eval_metrics.METRICS).")
  flags.DEFINE_bool("json", False, "Print one JSON line per task instead of a table.")


def _task_names(f, config) -> list[str]:
  if f.eval_task:
    return list(f.eval_task)
  for candidate in (config.get("eval_task", ""), config.get("task", "")):
    if candidate and downstream.recipe(candidate):
      return [candidate]
  raise UsageError.setting("--eval_task", "", "a downstream task: one of "
                           + ", ".join(downstream.downstream_task_names()))


def _write_json(path: str, value: dict) -> None:
  """Written whole or not at all (local or gs://)."""
  fs.write_text(path, json.dumps(value, indent=2) + "\n")


def _table(results: list[dict], step: int | None) -> str:
  lines = [f"checkpoint step {step}",
           f"{'task':<24} {'metric':<20} {'value':>8} {'examples':>9} {'pauses':>7}"]
  for r in results:
    for name, value in r["metrics"].items():
      lines.append(f"{r['task']:<24} {name:<20} {value:>8.2f} {r['num_examples']:>9} "
                   f"{r['num_pauses']:>7}")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments {argv[1:]}")
  distributed.initialize()
  logging.set_verbosity(logging.ERROR)  # Orbax and seqio log every detail at INFO/WARNING.
  f = flags.FLAGS
  if not f.workdir:
    raise UsageError.setting("--workdir", f.workdir, "give the run directory")
  checkpoint.run_checkpoint_dir(f.workdir)  # A complete checkpoint, before any data is read.
  config = config_lib.for_reading(f.workdir, f.config)
  vocabulary = specials.load_vocabulary(data_lib.vocab_path(config))
  recipes = [downstream.resolve(name, setting="--eval_task") for name in _task_names(f, config)]
  settings = Settings.from_config(
      config, num_pauses=f.num_pauses, pause_position=f.pause_position, prefix_lm=f.prefix_lm,
      max_len=f.max_len or None, max_new_tokens=f.max_new_tokens, max_examples=f.max_examples,
      max_backspaces=f.max_backspaces,
      batch_size=f.batch_size, metrics=tuple(f.metrics))
  settings.validate()
  for r in recipes:  # Every name checked before any data is read.
    downstream.resolve_metrics(settings.metrics or r.metric_fns, r.kind, setting="--metrics")
  # Data loaded and every example checked against max_len before the (slow) restore.
  evaluations = [TaskEvaluation(r, vocabulary, settings) for r in recipes]
  # The newest checkpoint that can be read, or one line (checkpoint_on_unreadable=refuse).
  with checkpoint.reading_policy(config.checkpoint_on_unreadable):
    model, step = build.restore_model(config, f.workdir,
                                      specials.padded_vocab_size(vocabulary.vocab_size),
                                      vocabulary.pause_id)
  results = []
  for evaluation in evaluations:
    try:
      result = evaluation.run(model)
    finally:
      evaluation.close()
    result["step"] = step
    results.append(result)
    if jax.process_index() == 0:
      _write_json(os.path.join(f.workdir, f"eval_{result['task']}.json"), result)
  if jax.process_index() == 0:
    if f.json:
      for result in results:
        print(json.dumps(result), flush=True)
    else:
      print(_table(results, step), flush=True)


if __name__ == "__main__":
  define_flags()
  run(main)
