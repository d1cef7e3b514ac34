"""Downstream tasks for pause fine-tuning (PauseFT) and evaluation, as SeqIO tasks.

Every downstream task yields `"inputs"` (the prefix) and `"targets"` (the answer), tokenized with
the run's `SpecialsVocabulary`, EOS appended to the targets (not to scored answers at evaluation).
Pauses are not part of the task: the fine-tuning preprocessor adds M_ft of them between prefix and
target, and `pausejax.evaluate` appends M_inf at inference. Three kinds, each with its metrics
(`pausejax.eval_metrics`):

  generative       (inputs, targets); the model generates the answer. exact_match, f1 (SQuAD),
                   gsm8k_accuracy.
  multiple_choice  (inputs, options, label). Fine-tuning: the target is the correct option.
                   Evaluation: every option is scored by its log-likelihood after the prompt (one
                   example per option, with "idx" = [example, option] and "is_correct").
                   mc_accuracy, mc_accuracy_norm.
  last_word        a passage; inputs = all but its last word, targets = the last word (LAMBADA).
                   Evaluation scores whether greedy decoding gives the word. last_word_accuracy.

Registered on import (`seqio.get_mixture_or_task(name)` is the evaluation view; fine-tuning
builds the training view from the recipe, `resolve(name).build(vocabulary, mode="train")`):

  squad_v1                TFDS squad/v1.1:3.0.0            generative  exact_match, f1
  gsm8k                   TFDS gsm8k:1.0.0 (eval: test)    generative  gsm8k_accuracy
  web_questions           TFDS web_questions:1.0.0 (test)  generative  exact_match, f1
  natural_questions_open  TFDS natural_questions_open:1.0.0  generative  exact_match, f1
  piqa                    TFDS piqa:1.0.0                  multiple_choice
  hellaswag               TFDS hellaswag:1.1.0             multiple_choice
  lambada                 TFDS lambada:1.0.0 (eval: test)  last_word
  addition                embedded, synthetic: "123+45=" -> "168"  generative  exact_match
                          (1-3 digit operands, 20,000 train / 500 validation examples, seed 0;
                          `register_addition_task` makes other sizes)
  arith_base7             embedded, synthetic: "152-64=" -> "55" in base 7  generative
                          (add or subtract, 1-3 digit operands, 4,000 train / 300 validation,
                          seed 0; `register_arithmetic_task` makes other bases and sizes)
  reason_add              embedded, synthetic (`reasoning.py`, registered by pausejax.tasks):
  reason_chain            "3471+285 =" -> "3756", "a=7;b=a+5;b=?" -> "12", "sort 52913 =" ->
  reason_sort             "12359"; generative, exact_match (20,000 train / 500 validation problems,
                          held out of the `reasoning` corpus; 3-4 digits, depth 2-4, 4-6 digits)
  reason_chain_long       fine-tune on depth 2-4 / 4-6 digits, validate on depth 6 / 8 digits:
  reason_sort_long        longer than anything in the corpus

TFDS prompts are plain text such as "Question: ...\nAnswer:" (see the `_*_text` functions).

TFDS datasets must be prepared under `tfds_data_dir` first (`tfds build squad/v1.1
--data_dir=...`); an unprepared one stops with a one-line UsageError before anything runs.

Anything else (CommonsenseQA, CoQA, your own data): JSON-lines files, one example per line,

  generative       {"inputs": "Q: ... A:", "targets": "answer"}   targets may be a list of
                   acceptable answers; fine-tuning uses the first
  multiple_choice  {"inputs": "...", "options": ["...", "..."], "label": 0}
  last_word        {"text": "a passage whose last word is predicted"}

registered with `register_downstream_task(name, kind=..., files={"train": ..., "validation": ...})`
in a module your config imports.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from pausejax import corpus
from pausejax import eval_metrics
from pausejax import readers
from pausejax import specials
from pausejax.errors import UsageError

KINDS = tuple(eval_metrics.KIND_METRICS)
MODES = ("train", "eval")
DEFAULT_METRICS = {
    "generative": ("exact_match", "f1"),
    "multiple_choice": ("mc_accuracy", "mc_accuracy_norm"),
    "last_word": ("last_word_accuracy",),
}
# Fields each kind's examples have before tokenization (what JSONL lines and text_fn give).
_FIELDS = {
    "generative": ("inputs", "targets"),
    "multiple_choice": ("inputs", "options", "label"),
    "last_word": ("text",),
}

MetricSpec = str | Callable[..., Mapping[str, float]]


# ----------------------------------------------------------------------------------------------
# Preprocessors (tf.data, checkpointable: no py_function).

def _take(ds: tf.data.Dataset, n: int) -> tf.data.Dataset:
  return ds.take(n)


def _map(ds: tf.data.Dataset, fn: Callable) -> tf.data.Dataset:
  return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


# Answers are tokenized on their own and stripped of surrounding spaces: SentencePiece starts them
# with a word boundary anyway, and a leading space would become an extra piece.

def _generative(ds: tf.data.Dataset, mode: str) -> tf.data.Dataset:
  def fn(ex):
    out = {"inputs": ex["inputs"], "targets": tf.strings.strip(ex["targets"])}
    if mode == "eval":  # All acceptable answers, for the metrics.
      out["answers"] = ex["answers"] if "answers" in ex else tf.reshape(ex["targets"], [1])
    return out
  return _map(ds, fn)


def _last_word(ds: tf.data.Dataset) -> tf.data.Dataset:
  def fn(ex):
    text = tf.strings.strip(ex["text"])
    words = tf.strings.split(text)
    return {"inputs": tf.strings.regex_replace(text, r"\s*\S+$", ""), "targets": words[-1]}
  return _map(ds, fn)


def _choice_train(ds: tf.data.Dataset) -> tf.data.Dataset:
  return _map(ds, lambda ex: {"inputs": ex["inputs"], "targets": tf.strings.strip(
      tf.gather(ex["options"], tf.cast(ex["label"], tf.int32)))})


def _choice_eval(ds: tf.data.Dataset) -> tf.data.Dataset:
  """One example per option: inputs, targets = option, idx = [example, option], is_correct."""
  def expand(index, ex):
    options = tf.strings.strip(ex["options"])
    n = tf.shape(options)[0]
    option = tf.range(n, dtype=tf.int32)
    return tf.data.Dataset.from_tensor_slices({
        "inputs": tf.fill([n], ex["inputs"]),
        "targets": options,
        "idx": tf.stack([tf.fill([n], tf.cast(index, tf.int32)), option], axis=1),
        "is_correct": tf.equal(option, tf.cast(ex["label"], tf.int32)),
    })
  return ds.enumerate().flat_map(expand)


def postprocess(text: str, example: Mapping[str, Any] | None = None, is_target: bool = False,
                *, kind: str) -> Any:
  """The task postprocessor seqio applies to decoded targets and predictions.

  Targets become what the metrics compare against: all acceptable answers (generative) or
  `(example index, is correct)` (multiple choice). Predictions stay text.
  """
  if not is_target or example is None:
    return text
  if kind == "generative" and "answers" in example:
    return [a.decode("utf-8") if isinstance(a, bytes) else str(a) for a in example["answers"]]
  if kind == "multiple_choice":
    return int(example["idx"][0]), bool(example["is_correct"])
  return text


# ----------------------------------------------------------------------------------------------
# Recipes.

@dataclasses.dataclass(frozen=True)
class DownstreamRecipe:
  """What a downstream task is made of, so it can be rebuilt with a run's settings."""
  name: str
  kind: str
  make_source: Callable[[str | None], seqio.DataSource]  # tfds_data_dir -> source
  text_fn: Callable[[Mapping[str, tf.Tensor]], Mapping[str, tf.Tensor]] | None = None
  metric_fns: tuple[MetricSpec, ...] = ()
  train_split: str = "train"
  eval_split: str = "validation"
  tfds_name: str | None = None

  def split(self, mode: str) -> str:
    return self.train_split if mode == "train" else self.eval_split

  def ensure_prepared(self, tfds_data_dir: str | None) -> None:
    """UsageError unless the data can be read offline (TFDS-backed tasks only)."""
    if self.tfds_name:
      corpus.ensure_prepared(self.tfds_name, tfds_data_dir or None)

  def build(self, vocabulary: specials.SpecialsVocabulary, *, mode: str = "train",
            tfds_data_dir: str | None = None, max_examples: int | None = None,
            metric_fns: Sequence[MetricSpec] | None = None,
            extra_preprocessors: Sequence[Callable] = (), name: str | None = None) -> seqio.Task:
    """An unregistered `seqio.Task` with features "inputs" and "targets".

    Args:
      vocabulary: the run's vocabulary (`specials.load_vocabulary(vocab_path)`).
      mode: "train" (fine-tuning view: one (inputs, targets) per example, EOS on targets) or
        "eval" (multiple choice: one example per option, scored without EOS; last word: no EOS).
      tfds_data_dir: where TFDS datasets live (None: the TFDS default).
      max_examples: keep only the first N source examples (before multiple-choice expansion).
      metric_fns: names from `eval_metrics.METRICS` or seqio metric functions (None: the
        recipe's).
      extra_preprocessors: appended after tokenization, e.g. the pause fine-tuning preprocessor.
      name: the Task's name (default: the recipe's).
    """
    if mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    steps: list[Callable] = []
    if max_examples:
      steps.append(functools.partial(_take, n=int(max_examples)))
    if self.text_fn is not None:
      steps.append(functools.partial(_map, fn=self.text_fn))
    if self.kind == "generative":
      steps.append(functools.partial(_generative, mode=mode))
    elif self.kind == "last_word":
      steps.append(_last_word)
    else:
      steps.append(_choice_train if mode == "train" else _choice_eval)
    steps.append(seqio.preprocessors.tokenize)
    if mode == "train" or self.kind == "generative":
      # Scored answers carry no EOS: an option's or a word's likelihood, not "and then stop".
      steps.append(seqio.preprocessors.append_eos)
    steps.extend(extra_preprocessors)
    specs = self.metric_fns if metric_fns is None else tuple(metric_fns)
    return seqio.Task(
        name=name or self.name,
        source=self.make_source(tfds_data_dir or None),
        preprocessors=steps,
        output_features={
            "inputs": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32),
            "targets": seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32),
        },
        postprocess_fn=functools.partial(postprocess, kind=self.kind),
        metric_fns=resolve_metrics(specs, self.kind),
        shuffle_buffer_size=10_000,
    )


def resolve_metrics(specs: Sequence[MetricSpec], kind: str,
                    setting: str = "metrics") -> list[Callable]:
  """Metric names (or seqio metric functions, kept as they are) -> functions; UsageError if bad."""
  if isinstance(specs, str):
    specs = (specs,)
  return [s if callable(s) else eval_metrics.get_metric(s, kind=kind, setting=setting)
          for s in specs]


_RECIPES: dict[str, DownstreamRecipe] = {}


# ----------------------------------------------------------------------------------------------
# Sources: JSON-lines files, in memory.

def _read_jsonl(pattern: str, kind: str) -> dict[str, Any]:
  columns: dict[str, list] = {f: [] for f in _FIELDS[kind]}
  if kind == "generative":
    columns["answers"] = []
  for where, obj in readers.jsonl_records(pattern):
    _append_record(columns, obj, kind, where)
  if not columns[_FIELDS[kind][0]]:
    raise UsageError(f"no examples in {pattern!r}")
  for key in ("answers", "options"):
    if key in columns:
      columns[key] = tf.ragged.constant(columns[key], dtype=tf.string)
  if "label" in columns:
    columns["label"] = np.asarray(columns["label"], np.int32)
  return columns


def _append_record(columns: dict[str, list], obj: Any, kind: str, where: str) -> None:
  fields = _FIELDS[kind]
  if not isinstance(obj, dict) or any(f not in obj for f in fields):
    got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
    raise UsageError(f"{where} needs fields {list(fields)} for a {kind} task (got {got})")
  if kind == "generative":
    answers = obj["targets"] if isinstance(obj["targets"], list) else [obj["targets"]]
    if not answers or not all(isinstance(a, str) for a in answers):
      raise UsageError(f"{where}: \"targets\" must be a string or a non-empty list of strings")
    columns["inputs"].append(str(obj["inputs"]))
    columns["targets"].append(answers[0])
    columns["answers"].append(answers)
  elif kind == "multiple_choice":
    options, label = obj["options"], obj["label"]
    if not isinstance(options, list) or len(options) < 2 or not all(
        isinstance(o, str) and o.strip() for o in options):
      raise UsageError(f"{where}: \"options\" must be a list of at least 2 non-empty strings")
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(options):
      raise UsageError(f"{where}: \"label\" must be an option index in [0, {len(options)})")
    columns["inputs"].append(str(obj["inputs"]))
    columns["options"].append(options)
    columns["label"].append(label)
  else:
    if not isinstance(obj["text"], str) or len(obj["text"].split()) < 2:
      raise UsageError(f"{where}: \"text\" must be a string of at least two words")
    columns["text"].append(obj["text"])


def _files_source(files: Mapping[str, str], kind: str) -> seqio.DataSource:
  cache: dict[str, dict[str, Any]] = {}

  def dataset_fn(split, shuffle_files, seed=None):
    del shuffle_files, seed  # seqio shuffles examples after preprocessing.
    if split not in cache:
      cache[split] = _read_jsonl(files[split], kind)
    return tf.data.Dataset.from_tensor_slices(cache[split])

  return seqio.FunctionDataSource(dataset_fn, splits=list(files))


# ----------------------------------------------------------------------------------------------
# Registration.

def register_downstream_task(
    name: str,
    *,
    kind: str,
    tfds_name: str | None = None,
    files: Mapping[str, str] | None = None,
    source: seqio.DataSource | None = None,
    text_fn: Callable[[Mapping[str, tf.Tensor]], Mapping[str, tf.Tensor]] | None = None,
    metric_fns: Sequence[MetricSpec] | None = None,
    train_split: str = "train",
    eval_split: str = "validation",
    vocab_path: str | None = None,
) -> DownstreamRecipe:
  """Registers a downstream task for fine-tuning and evaluation; returns its recipe.

  Exactly one of:
    tfds_name: a TFDS dataset ("squad/v1.1:3.0.0"); `text_fn` (tf ops, one example at a time)
      maps its features to the kind's fields (see the module docstring).
    files: split -> pattern of JSON-lines files (optionally .gz) in the documented format.
    source: any `seqio.DataSource`; `text_fn` as for TFDS, if its fields differ.

  Args:
    name: the task name (`--eval_task=name`, `--config.task=name` for fine-tuning).
    kind: "generative", "multiple_choice" or "last_word".
    metric_fns: names from `eval_metrics.KIND_METRICS[kind]` or seqio metric functions
      `(targets, predictions)` / `(targets, scores)` (None: `DEFAULT_METRICS[kind]`).
    train_split, eval_split: the splits fine-tuning and evaluation read.
    vocab_path: vocabulary of the registered seqio task (default: the embedded one); runs
      rebuild the task with their own vocabulary.

  Example::

      from pausejax import downstream
      downstream.register_downstream_task(
          "commonsense_qa", kind="multiple_choice",
          files={"train": "/data/csqa/train.jsonl", "validation": "/data/csqa/dev.jsonl"})
  """
  if kind not in KINDS:
    raise UsageError.setting("kind", kind, f"one of {', '.join(KINDS)}")
  if sum(x is not None for x in (tfds_name, files, source)) != 1:
    raise ValueError("give exactly one of tfds_name=, files= or source=")
  if name in seqio.TaskRegistry.names() and name not in _RECIPES:
    raise ValueError(f"{name!r} is already a registered seqio task")
  specs = tuple(DEFAULT_METRICS[kind] if metric_fns is None else metric_fns)
  resolve_metrics(specs, kind)  # Unknown names fail here, at registration.
  if tfds_name is not None:
    splits = [train_split, eval_split]

    def make_source(data_dir):
      return seqio.TfdsDataSource(tfds_name, tfds_data_dir=data_dir, splits=splits)
  elif files is not None:
    if text_fn is not None:
      raise ValueError("files= must already be in the kind's JSON-lines format; no text_fn")
    missing = {train_split, eval_split} - set(files)
    if missing:
      raise ValueError(f"files= needs patterns for splits {sorted(missing)}")

    def make_source(data_dir):
      del data_dir
      return _files_source(files, kind)
  else:
    def make_source(data_dir):
      del data_dir
      return source

  recipe = DownstreamRecipe(name=name, kind=kind, make_source=make_source, text_fn=text_fn,
                            metric_fns=specs, train_split=train_split, eval_split=eval_split,
                            tfds_name=tfds_name)
  vocabulary = specials.load_vocabulary(vocab_path or corpus.DEFAULT_VOCAB_PATH)
  seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add_provider(name, recipe.build(vocabulary, mode="eval"))
  _RECIPES[name] = recipe
  return recipe


def recipe(name: str) -> DownstreamRecipe | None:
  """The recipe of a registered downstream task, or None."""
  return _RECIPES.get(name)


def downstream_task_names() -> list[str]:
  return sorted(_RECIPES)


def resolve(name: str, *, setting: str = "eval_task") -> DownstreamRecipe:
  """The recipe for `name`, or a UsageError listing the registered downstream tasks."""
  if name in _RECIPES:
    return _RECIPES[name]
  raise UsageError.setting(
      setting, name, f"unknown downstream task; registered: {', '.join(downstream_task_names())} "
      "(register more with pausejax.downstream.register_downstream_task)")


# ----------------------------------------------------------------------------------------------
# The embedded synthetic task: multi-digit addition.

def addition_examples(num_examples: int, *, max_digits: int, seed: int,
                      exclude: frozenset[tuple[int, int]] = frozenset()) -> list[tuple[int, int]]:
  """Distinct (a, b) pairs, not in `exclude`; each operand has 1..max_digits digits (uniform)."""
  if not isinstance(max_digits, int) or not 1 <= max_digits <= 18:
    raise ValueError(f"max_digits must be an integer in [1, 18], got {max_digits!r}")
  capacity = (10 ** max_digits) ** 2 - len(exclude)
  if num_examples > capacity // 2:  # Keeps rejection sampling fast.
    raise ValueError(f"{num_examples} examples is too many for max_digits={max_digits}")
  rng = np.random.default_rng(seed)
  seen, pairs = set(exclude), []
  while len(pairs) < num_examples:  # Drawn in bulk; duplicates rejected in order.
    digits_Nx2 = rng.integers(1, max_digits + 1, size=(2 * (num_examples - len(pairs)) + 16, 2))
    low_Nx2 = np.where(digits_Nx2 == 1, 0, 10 ** (digits_Nx2 - 1))
    for a, b in rng.integers(low_Nx2, 10 ** digits_Nx2).tolist():
      if (a, b) not in seen and len(pairs) < num_examples:
        seen.add((a, b))
        pairs.append((a, b))
  return pairs


def addition_source(*, max_digits: int = 3, num_train: int = 20_000, num_validation: int = 500,
                    seed: int = 0) -> seqio.DataSource:
  """"a+b=" -> "a+b" examples, the same for a given seed; validation pairs never in train."""
  pairs: dict[str, list[tuple[int, int]]] = {}
  data_seed = seed

  def dataset_fn(split, shuffle_files, seed=None):
    del shuffle_files, seed  # The data is fixed by data_seed; seqio shuffles after.
    if "validation" not in pairs:  # Needed by both splits: train excludes it.
      pairs["validation"] = addition_examples(num_validation, max_digits=max_digits,
                                              seed=data_seed * 2 + 1)
    if split not in pairs:
      pairs[split] = addition_examples(num_train, max_digits=max_digits, seed=data_seed * 2,
                                       exclude=frozenset(pairs["validation"]))
    return tf.data.Dataset.from_tensor_slices({
        "inputs": [f"{a}+{b}=" for a, b in pairs[split]],
        "targets": [str(a + b) for a, b in pairs[split]]})

  return seqio.FunctionDataSource(
      dataset_fn, splits=["train", "validation"],
      num_input_examples={"train": num_train, "validation": num_validation})


def register_addition_task(name: str = "addition", **source_kwargs) -> DownstreamRecipe:
  """Registers a synthetic addition task (`addition_source` settings, e.g. max_digits=5)."""
  return register_downstream_task(name, kind="generative", source=addition_source(**source_kwargs),
                                  metric_fns=("exact_match",))


def to_base(n: int, base: int) -> str:
  digits = ""
  while True:
    n, d = divmod(n, base)
    digits = "0123456789"[d] + digits
    if n == 0:
      return digits


def arithmetic_examples(num_examples: int, *, base: int, max_digits: int, seed: int,
                        exclude: frozenset = frozenset()) -> list[tuple[str, str]]:
  """Distinct ("a+b=" or "a-b=", answer) problems in base `base` (2..10), operands of
  1..max_digits digits, a >= b for subtraction (answers are never negative), not in `exclude`."""
  if not isinstance(base, int) or not 2 <= base <= 10:
    raise ValueError(f"base must be an integer in [2, 10], got {base!r}")
  if num_examples > base ** (2 * max_digits):  # Two ops, halved by a >= b: keeps this quick.
    raise ValueError(f"{num_examples} problems is too many for base {base}, {max_digits} digits")
  rng = np.random.default_rng(seed)
  seen, out = set(exclude), []
  while len(out) < num_examples:
    digits = rng.integers(1, max_digits + 1, size=2)
    a, b = (int(rng.integers(0 if d == 1 else base ** (d - 1), base ** d)) for d in digits)
    op = "+-"[int(rng.integers(2))]
    if op == "-" and a < b:
      a, b = b, a
    prompt = f"{to_base(a, base)}{op}{to_base(b, base)}="
    if prompt not in seen:
      seen.add(prompt)
      out.append((prompt, to_base(a + b if op == "+" else a - b, base)))
  return out


def arithmetic_source(*, base: int = 7, max_digits: int = 3, num_train: int = 4000,
                      num_validation: int = 300, seed: int = 0) -> seqio.DataSource:
  """Add-or-subtract in base `base`: "a-b=" -> "a-b", validation problems never in train."""
  cache: dict[str, list[tuple[str, str]]] = {}
  data_seed = seed

  def dataset_fn(split, shuffle_files, seed=None):
    del shuffle_files, seed  # The data is fixed by data_seed; seqio shuffles after.
    if "validation" not in cache:
      cache["validation"] = arithmetic_examples(num_validation, base=base,
                                                max_digits=max_digits, seed=data_seed * 2 + 1)
    if split not in cache:
      cache[split] = arithmetic_examples(
          num_train, base=base, max_digits=max_digits, seed=data_seed * 2,
          exclude=frozenset(p for p, _ in cache["validation"]))
    return tf.data.Dataset.from_tensor_slices({"inputs": [p for p, _ in cache[split]],
                                               "targets": [a for _, a in cache[split]]})

  return seqio.FunctionDataSource(
      dataset_fn, splits=["train", "validation"],
      num_input_examples={"train": num_train, "validation": num_validation})


def register_arithmetic_task(name: str = "arith_base7", **source_kwargs) -> DownstreamRecipe:
  """Registers an add-or-subtract task (`arithmetic_source` settings, e.g. base=5)."""
  return register_downstream_task(name, kind="generative",
                                  source=arithmetic_source(**source_kwargs),
                                  metric_fns=("exact_match",))


# ----------------------------------------------------------------------------------------------
# TFDS tasks (text_fn: tf ops on one TFDS example).

def _question(q: tf.Tensor) -> tf.Tensor:
  return tf.strings.join(["Question: ", q, "\nAnswer:"])


def _squad_text(ex):
  answers = ex["answers"]["text"]
  return {"inputs": tf.strings.join(["Context: ", ex["context"], "\n", _question(ex["question"])]),
          "targets": answers[0], "answers": answers}


def _gsm8k_text(ex):
  # The whole worked answer ("... #### 72"): its last number is the final answer.
  return {"inputs": _question(ex["question"]), "targets": ex["answer"]}


def _answers_text(key):
  def fn(ex):
    return {"inputs": _question(ex["question"]), "targets": ex[key][0], "answers": ex[key]}
  return fn


def _piqa_text(ex):
  return {"inputs": tf.strings.join(["Goal: ", ex["goal"], "\nSolution:"]),
          "options": tf.stack([ex["sol1"], ex["sol2"]]), "label": ex["label"]}


def _hellaswag_text(ex):
  return {"inputs": tf.strings.join([ex["activity_label"], ": ", ex["context"]]),
          "options": ex["endings"], "label": ex["label"]}


def _lambada_text(ex):
  return {"text": ex["passage"]}


TFDS_TASKS = {
    # name: (tfds name, kind, text_fn, metrics, eval split)
    "squad_v1": ("squad/v1.1:3.0.0", "generative", _squad_text, ("exact_match", "f1"),
                 "validation"),
    "gsm8k": ("gsm8k:1.0.0", "generative", _gsm8k_text, ("gsm8k_accuracy",), "test"),
    "web_questions": ("web_questions:1.0.0", "generative", _answers_text("answers"),
                      ("exact_match", "f1"), "test"),
    "natural_questions_open": ("natural_questions_open:1.0.0", "generative",
                               _answers_text("answer"), ("exact_match", "f1"), "validation"),
    "piqa": ("piqa:1.0.0", "multiple_choice", _piqa_text, None, "validation"),
    "hellaswag": ("hellaswag:1.1.0", "multiple_choice", _hellaswag_text, None, "validation"),
    "lambada": ("lambada:1.0.0", "last_word", _lambada_text, None, "test"),
}


def _register_defaults() -> None:
  for name, (tfds_name, kind, text_fn, metrics, eval_split) in TFDS_TASKS.items():
    register_downstream_task(name, kind=kind, tfds_name=tfds_name, text_fn=text_fn,
                             metric_fns=metrics, eval_split=eval_split)
  register_addition_task()
  register_arithmetic_task()


_register_defaults()
