"""Downstream evaluation of a model in memory, through SeqIO evaluation (the library part).

    result = downstream_eval.evaluate(model, "addition", vocabulary, num_pauses=10)
    evaluation = TaskEvaluation(downstream.resolve("addition"), vocabulary, Settings(...))
    result = evaluation.run(model, progress=lambda done, total: ...)

`TaskEvaluation` builds a task's evaluation view (`pausejax.downstream`) and runs
`seqio.Evaluator` with:

  generative tasks       greedy pause-aware decoding (`pausejax.decode.generate`): the prompt is
                         the start token + inputs + M_inf `<pause>`s, the answer is what follows
                         the last pause, up to EOS or `max_new_tokens` (with `prefix_lm`, start +
                         inputs + pauses attend to each other both ways; with `max_backspaces`
                         it may delete its own tokens, and the answer is the text after them);
  multiple choice        each option scored by its log-likelihood after start + inputs + pauses;
  last word (LAMBADA)    whether every token of the last word is the greedy choice.

With `pause_position="prepend"` the pauses go before the inputs instead, as in fine-tuning.
`Settings.from_config(config)` gives what a run was fine-tuned with (M_inf = its
`pause.num_finetune`, `pause.position`, `prefix_lm`, `backspace.max_per_sequence`).

Two users: the `pausejax.evaluate` command (the latest checkpoint of a workdir) and training
(`DuringTraining`: the `eval_tasks` of a run, scored on its live parameters every
`downstream_eval_every_steps`, T5X-style). Both score the same examples the same way, so a
number logged during training is the number `pausejax.evaluate` gives for that step's
checkpoint with the same `--max_examples` and `--batch_size`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import seqio
import tensorflow as tf

from pausejax import decode
from pausejax import downstream
from pausejax import model as model_lib
from pausejax import registry
from pausejax import sinks
from pausejax import specials
from pausejax.errors import UsageError

POSITIONS = ("append", "prepend")
_NUM_SAMPLES = 5  # Generative predictions shown in the JSON output and in TensorBoard.
# progress(done, total): rows of the task scored or decoded so far, called after every batch.
ProgressFn = Callable[[int, int], None]


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
    self._progress: ProgressFn | None = None

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
    examples, out = _examples(dataset), []
    for batch in _batches(examples, s.batch_size):
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
      self._report(len(out), len(examples))
    return out

  def _score_fn(self, model, dataset, model_feature_shapes=None):
    del model_feature_shapes
    s = self.settings
    graphdef, state = nnx.split(model)
    pauses = [self.vocabulary.pause_id] * s.num_pauses
    examples, out = _examples(dataset), []
    for batch in _batches(examples, s.batch_size):
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
      self._report(len(out), len(examples))
    return out

  def _report(self, done: int, total: int) -> None:
    if self._progress is not None:
      self._progress(done, total)

  @property
  def unit(self) -> str:
    """What `progress` counts: a multiple-choice example is scored once per option."""
    return "options" if self.recipe.kind == "multiple_choice" else "examples"

  def run(self, model: model_lib.Decoder, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Runs the model on every example; returns metrics and settings as a JSON-able dict.

    `progress(done, total)` is called after every batch (`unit` says what it counts)."""
    self._predictions.clear()
    self._progress = progress
    try:
      metrics, _ = self._evaluator.evaluate(
          compute_metrics=True,
          predict_fn=functools.partial(self._predict_fn, model),
          score_fn=functools.partial(self._score_fn, model))
    finally:
      self._progress = None
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
# During training.

_TRAINING_BATCH = 16  # Rows per decode call during training (fewer when fewer examples).


class DuringTraining:
  """The downstream tasks a training run names in `eval_tasks`, scored on its live parameters.

  `for_training` builds it before anything is written: names resolved, data loaded, every
  example checked against `seq_len`. At every `downstream_eval_every_steps`-th step and at the
  last one (0: the last one only), `run` decodes or scores the first
  `downstream_eval_max_examples` examples of each task's evaluation split with the run's own
  settings (`Settings.from_config`) on the train state's parameters, no checkpoint round trip.
  It writes `downstream/<task>/<metric>` scalars and, for generative tasks, a table of sample
  predictions (TensorBoard's Text tab, `downstream/<task>/samples`).
  """

  def __init__(self, evaluations: list[TaskEvaluation], every_steps: int, total_steps: int):
    self._evaluations = evaluations
    self.every_steps, self.total_steps = every_steps, total_steps

  def due(self, step: int) -> bool:
    return step == self.total_steps or bool(self.every_steps) and step % self.every_steps == 0

  def run(self, step: int, params: Any, model_cfg: model_lib.ModelConfig,
          logger) -> dict[str, float]:
    """Scores every task at `step`; writes and returns the `downstream/...` scalars.

    `params` are the train state's (`state["params"]`), read and never kept: the next train
    step donates them. `logger` is the run's `metrics.MetricsLogger`."""
    model = decode.model_from_params(model_cfg, params)
    scalars, texts, shown = {}, {}, []
    for evaluation in self._evaluations:
      result = evaluation.run(model)
      name = result["task"]
      scalars.update({f"downstream/{name}/{k}": v for k, v in result["metrics"].items()})
      if result.get("samples"):
        texts[f"downstream/{name}/samples"] = samples_markdown(result["samples"])
      shown.append(f"{name} " + ", ".join(f"{k} {v:.2f}" for k, v in result["metrics"].items())
                   + f" ({result['num_examples']} examples)")
    logger.write(step, scalars)
    if texts:
      logger.write_texts(step, texts)
    if jax.process_index() == 0:
      print(f"step {step}/{self.total_steps} | downstream {'; '.join(shown)}", flush=True)
    return scalars

  def close(self) -> None:
    for evaluation in self._evaluations:
      evaluation.close()


def for_training(config, vocabulary: specials.SpecialsVocabulary) -> DuringTraining | None:
  """The run's `eval_tasks` prepared, or None when it names none. UsageError (one line) for an
  unknown task, more than one process, or an example that does not fit; writes nothing."""
  names = list(dict.fromkeys(n.strip() for n in config.get("eval_tasks", "").split(",")
                             if n.strip()))
  if not names:
    return None
  recipes = [downstream.resolve(name, setting="eval_tasks") for name in names]
  if jax.process_count() > 1:  # Every process would have to run the same decode calls.
    raise UsageError.setting(
        "eval_tasks", config.eval_tasks, "'' on more than one process (downstream evaluation "
        "during training decodes on one host); score the checkpoints with pausejax.evaluate")
  limit = config.downstream_eval_max_examples
  settings = Settings.from_config(config, max_examples=limit,
                                  batch_size=min(limit or _TRAINING_BATCH, _TRAINING_BATCH))
  evaluations: list[TaskEvaluation] = []
  try:
    for recipe in recipes:
      evaluations.append(TaskEvaluation(recipe, vocabulary, settings))
  except BaseException:
    for evaluation in evaluations:
      evaluation.close()
    raise
  return DuringTraining(evaluations, config.downstream_eval_every_steps, config.num_train_steps)


def samples_markdown(samples: Sequence[dict[str, str]], max_chars: int = 300) -> str:
  """Sample predictions as a Markdown table (what TensorBoard's Text tab renders)."""
  def cell(text: str) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= max_chars else "…" + text[-max_chars:]  # A prompt's end asks.
  rows = [f"| {cell(s['inputs'])} | {cell(s['targets'])} | {cell(s['prediction'])} |"
          for s in samples]
  return "\n".join(["| input | target | prediction |", "| --- | --- | --- |", *rows])
