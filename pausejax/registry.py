"""The run's tasks: any registered seqio Task or Mixture, with what pausejax adds to it.

`config.task` and `config.eval_task` name a seqio Task or Mixture, looked up in seqio's registries
after importing `config.task_modules` (the modules that register yours, T5X's
`MIXTURE_OR_TASK_MODULE`). A task's own source, preprocessors and output features run untouched;
after its last preprocessor pausejax adds only what it owns:

  vocabulary  a plain SentencePiece vocabulary gets the special ids appended (`specials.py`)
  pauses      pretraining ("targets" only): PausePT insertion at the run's pause rate;
              fine-tuning ("inputs" and "targets"): `pause.num_finetune` pauses at the prompt
  start       pretraining with `start_token="sink"`: `<sink>` at position 0 (`sinks.py`)
  backspaces  training split only, "targets": noise + `<backspace>` at `backspace.rate`
              (`backspace.py`; the eval split stays clean, so eval losses compare across runs)

The pause rate is set in exactly one place. A task with a pause step (pausejax's `*_pause` tasks,
`tasks.with_pauses` variants) carries its own rate, and `pause.rate` must then be left unset (or
equal it); a task without one gets `pause.rate` (unset: no pauses). Anything else is an error.
The start token (`sinks.py`) follows the same rule: a task with a sink step carries "sink".

pausejax's downstream tasks (`downstream.py`) are the one exception to "untouched": registered in
their evaluation view, they are rebuilt from their recipe in the fine-tuning view, with the
run's `vocab_path`. Every other task brings its vocabulary; a `vocab_path` that differs from it
is an error. Runs read the "train" split, and "validation" for evaluation.
"""

from __future__ import annotations

import dataclasses
import importlib
import os

import ml_collections
import seqio

from pausejax import backspace
from pausejax import corpus
from pausejax import downstream
from pausejax import fs
from pausejax import pause
from pausejax import readers
from pausejax import sinks
from pausejax import specials
from pausejax import tasks  # noqa: F401  Registers pausejax's own tasks.
from pausejax.errors import UsageError

PRETRAINING, FINETUNING = "pretraining", "finetuning"
TRAIN_SPLIT, EVAL_SPLIT = "train", "validation"
# Where a run's pause rate comes from (RunTask.rate_from; "" when nothing inserts pauses).
RATE_FROM_TASK, RATE_FROM_CONFIG = "the task", "pause.rate"


@dataclasses.dataclass(frozen=True)
class Part:
  """One task of the run (the only one, or one of a mixture's)."""
  name: str          # Its registered name.
  task: seqio.Task   # The run's view of it: the task plus what pausejax adds.
  weight: float      # Mixing rate (1 for a lone task).
  pause_rate: float  # PausePT rate actually inserted (0 for fine-tuning tasks).
  split: str


@dataclasses.dataclass(frozen=True)
class RunTask:
  """What `task` (or `eval_task`) names, as the run reads it."""
  name: str
  kind: str                 # PRETRAINING or FINETUNING.
  parts: tuple[Part, ...]
  vocabulary: specials.SpecialsVocabulary
  rate_from: str            # RATE_FROM_TASK, RATE_FROM_CONFIG or "" (no pauses).
  start: str = sinks.BOS    # What every sequence starts with: sinks.BOS, SINK or NONE.
  backspace_rate: float = 0.0  # Noise + <backspace> insertion (training split only).

  @property
  def start_ids(self) -> list[int]:
    return sinks.start_ids(self.start, self.vocabulary.sink_id)

  @property
  def is_mixture(self) -> bool:
    return len(self.parts) > 1

  def describe(self) -> str:
    """E.g. "shakespeare_pause (pause rate 0.1, set by the task)", or for a mixture
    "m = a 90% + b 10% (pause rate 0.1, set by the task)"."""
    if self.kind == FINETUNING:
      edits = f", backspace rate {self.backspace_rate:g}" if self.backspace_rate else ""
      return f"{self.name} (fine-tuning{edits})"
    name = self.name
    if self.is_mixture:
      total = sum(p.weight for p in self.parts)
      name += " = " + " + ".join(f"{p.name} {100 * p.weight / total:.0f}%" for p in self.parts)
    rates = sorted({p.pause_rate for p in self.parts})
    rate = (f"pause rate {rates[0]:g}" if len(rates) == 1 else
            "pause rates " + ", ".join(f"{p.name} {p.pause_rate:g}" for p in self.parts))
    start = "" if self.start == sinks.BOS else f", start token {self.start}"
    start += f", backspace rate {self.backspace_rate:g}" if self.backspace_rate else ""
    return f"{name} ({rate}{f', set by {self.rate_from}' if self.rate_from else ''}{start})"


def import_task_modules(config: ml_collections.ConfigDict) -> None:
  """Imports `config.task_modules` (comma-separated), which register users' tasks: module
  names, or paths of .py files (e.g. the `tasks.py` a `pausejax.humpback` run writes)."""
  for name in filter(None, (m.strip() for m in config.get("task_modules", "").split(","))):
    try:
      if name.endswith(".py"):
        _import_file(name)
      else:
        importlib.import_module(name)
    except (ImportError, FileNotFoundError) as e:
      raise UsageError.setting("task_modules", config.task_modules,
                               f"importable Python modules or .py files ({name}: {e})") from None


def _import_file(path: str) -> None:
  """Runs a .py file once per process, as module `pausejax_tasks_<hash of its real path>`."""
  import hashlib
  import importlib.util
  import sys
  real = os.path.realpath(path)
  name = "pausejax_tasks_" + hashlib.sha1(real.encode()).hexdigest()[:12]
  if name in sys.modules:
    return
  if not os.path.isfile(real):
    raise FileNotFoundError(f"no such file: {path}")
  spec = importlib.util.spec_from_file_location(name, real)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  try:
    spec.loader.exec_module(module)
  except BaseException:
    del sys.modules[name]
    raise


def lookup(name: str, setting: str = "task") -> seqio.Task | seqio.Mixture:
  """The registered seqio Task or Mixture `name`; UsageError listing the registered ones."""
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError:
    raise UsageError.setting(
        setting, name, f"a registered seqio Task ({', '.join(sorted(seqio.TaskRegistry.names()))})"
        f" or Mixture ({', '.join(sorted(seqio.MixtureRegistry.names()))}); register yours in a "
        "module and name it in --config.task_modules") from None


def _members(provider: seqio.Task | seqio.Mixture) -> list[tuple[seqio.Task, float]]:
  """(task, mixing rate) of a Mixture's tasks, or [(task, 1.0)] for a Task."""
  if isinstance(provider, seqio.Mixture):
    return [(t, provider.get_rate(t)) for t in provider.tasks]
  return [(provider, 1.0)]


def unpaused_twin(name: str) -> str | None:
  """The registered Task or Mixture `name` without its `_pause` suffix, if there is one."""
  base = name.removesuffix("_pause")
  registered = {*seqio.TaskRegistry.names(), *seqio.MixtureRegistry.names()}
  return base if base != name and base in registered else None


def _name(config: ml_collections.ConfigDict, setting: str) -> str:
  return config.task if setting == "task" else (config.eval_task or config.task)


def vocab_path(config: ml_collections.ConfigDict) -> str:
  """The SentencePiece model the run uses: `vocab_path`, else its task's. Reads no data."""
  if config.vocab_path:
    return config.vocab_path
  import_task_modules(config)
  if downstream.recipe(config.task) is not None:
    return corpus.DEFAULT_VOCAB_PATH
  first = _members(lookup(config.task))[0][0]
  feature = first.output_features.get("targets")
  if feature is None:
    raise UsageError.setting("task", config.task, "a task with a 'targets' feature")
  return specials.model_file(
      specials.with_specials(feature.vocabulary, where=f"task {first.name}"))


def resolve(config: ml_collections.ConfigDict, setting: str = "task") -> RunTask:
  """The run's view of `config.task` (setting "task") or of its eval task ("eval_task").

  Raises UsageError, one line, for an unknown name, a mixture of pretraining and fine-tuning
  tasks, a vocabulary pausejax cannot extend or that contradicts `vocab_path`, a pause rate set
  twice, a missing split or unprepared data. Reads no data and writes nothing.
  """
  import_task_modules(config)
  name = _name(config, setting)
  data_dir = config.tfds_data_dir or None
  recipe = downstream.recipe(name)
  bs_steps, bs_rate = _backspaces(config, setting)
  if recipe is not None:
    if config.pause.rate:
      raise _rate_for_finetuning(config, name)
    start = _finetune_start(config.get("start_token"), name)
    recipe.ensure_prepared(data_dir)
    vocabulary = specials.load_vocabulary(config.vocab_path or corpus.DEFAULT_VOCAB_PATH)
    view = recipe.build(vocabulary, mode="train", tfds_data_dir=data_dir,
                        extra_preprocessors=[_finetune_pauses(config), *bs_steps])
    split = recipe.train_split if setting == "task" else recipe.eval_split
    return RunTask(name, FINETUNING, (Part(name, view, 1.0, 0.0, split),), vocabulary, "", start,
                   bs_rate)

  members = _members(lookup(name, setting))
  kinds = {t.name: FINETUNING if "inputs" in t.output_features else PRETRAINING
           for t, _ in members}
  if len(set(kinds.values())) > 1:
    raise UsageError.setting(setting, name, "a mixture of pretraining tasks ('targets' only) or "
                             f"of fine-tuning tasks ('inputs' and 'targets'), not both: {kinds}")
  kind = kinds[members[0][0].name]
  split = TRAIN_SPLIT if setting == "task" else EVAL_SPLIT
  vocabulary, parts, rate_from, starts = None, [], "", set()
  # The eval split is read the way training reads its own: with the training task's start.
  wanted = config.get("start_token")
  if setting != "task" and wanted is None:
    wanted = start_token(config)
  for task, weight in members:
    if "targets" not in task.output_features:
      raise UsageError(f"task {task.name} has no 'targets' feature (has "
                       f"{sorted(task.output_features)}); pausejax trains on 'targets'")
    features = specials.with_specials_features(task)
    vocab = features["targets"].vocabulary
    _check_vocabulary(config, task.name, vocab, vocabulary)
    vocabulary = vocabulary or vocab
    _check_readable(task, split, data_dir)
    if kind == FINETUNING:
      if config.pause.rate:
        raise _rate_for_finetuning(config, task.name)
      steps, rate = [_finetune_pauses(config)], 0.0
      if sinks.has_sink(task):
        raise UsageError(f"task {task.name} is a fine-tuning task with a sink step; fine-tuning "
                         "tasks start with the run's start_token through the feature converter")
      starts.add(_finetune_start(wanted, task.name))
    else:
      steps, rate, by = _pretraining_pauses(config, task, name)
      rate_from = rate_from or by
      sink_steps, start = _pretraining_start(wanted, task, name)
      steps += sink_steps
      starts.add(start)
    view = pause.with_steps(task, [*steps, *bs_steps], output_features=features)
    parts.append(Part(task.name, view, float(weight), rate, split))
  if kind == PRETRAINING:
    _check_room(config, max(p.pause_rate for p in parts))
  if len(starts) > 1:
    raise UsageError.setting(setting, name, "a mixture whose tasks all start the same way; "
                             "some put <sink> at position 0 and some do not")
  path = specials.model_file(vocabulary)
  if not fs.exists(path):
    raise UsageError(f"the vocabulary of task {name}, {path}, cannot be read (no such file)")
  return RunTask(name, kind, tuple(parts), vocabulary, rate_from, starts.pop(), bs_rate)


def _backspaces(config, setting: str):
  """(steps to add, rate) for SequenceMatch's noise + <backspace>: the training split only."""
  bs = config.get("backspace")
  if setting != "task" or not bs or not bs.rate:
    return [], 0.0
  return [backspace.backspace_preprocessor(bs.rate, bs.noise_from)], float(bs.rate)


def _pretraining_start(wanted: str | None, task: seqio.Task, name: str):
  """(steps to add, start token) for a pretraining task: set once, by the task or `wanted`
  (`start_token`)."""
  if sinks.has_sink(task):
    if wanted not in (None, sinks.SINK):
      of = "" if task.name == name else f" (of {name})"
      raise UsageError.setting(
          "start_token", wanted, f"unset or 'sink': task {task.name}{of} puts <sink> at "
          f"position 0 itself; for start_token={wanted} use a task without a sink step")
    return [], sinks.SINK
  if wanted == sinks.SINK:
    return [sinks.sink_preprocessor()], sinks.SINK
  return [], wanted or sinks.BOS


def _finetune_start(wanted: str | None, name: str) -> str:
  wanted = wanted or sinks.BOS
  if wanted == sinks.NONE:
    raise UsageError.setting(
        "start_token", wanted, f"'bos' or 'sink': {name} is a fine-tuning task, whose prompt "
        "and answer follow a start token (pretrain with 'none', then fine-tune with 'bos')")
  return wanted


def start_token(config: ml_collections.ConfigDict) -> str:
  """The run's start token ("bos", "sink" or "none") without reading any data: what generation
  and streaming put first. Raises UsageError like `resolve` for a clash."""
  import_task_modules(config)
  wanted = config.get("start_token")
  if downstream.recipe(config.task) is not None:
    return _finetune_start(wanted, config.task)
  task = _members(lookup(config.task))[0][0]
  if "inputs" in task.output_features:
    return _finetune_start(wanted, task.name)
  return _pretraining_start(wanted, task, config.task)[1]


def _pretraining_pauses(config, task: seqio.Task, name: str):
  """(steps to add, rate used, where the rate is set) for a pretraining task."""
  own, wanted = pause.rate_of(task), config.pause.rate
  if own:
    if wanted is not None and wanted != own:
      base = unpaused_twin(task.name)
      if base:
        instead = f"--config.task={base}" + (f" --config.pause.rate={wanted}" if wanted else "")
      else:
        instead = "a task without a pause step, with --config.pause.rate"
      of = "" if task.name == name else f" (of {name})"
      raise UsageError.setting(
          "pause.rate", wanted, f"leave it unset, as task {task.name}{of} inserts pauses at rate "
          f"{own:g} itself (the rate is set once, by the task); for rate {wanted:g} use {instead}")
    return [], own, RATE_FROM_TASK
  if wanted:
    return [pause.pause_preprocessor(wanted)], float(wanted), RATE_FROM_CONFIG
  return [], 0.0, ""


def _finetune_pauses(config):
  return pause.finetune_pause_preprocessor(config.pause.num_finetune, config.pause.position)


def _rate_for_finetuning(config, name: str) -> UsageError:
  return UsageError.setting(
      "pause.rate", config.pause.rate, f"unset: {name} is a fine-tuning task (inputs and "
      "targets), whose pauses are pause.num_finetune")


def _check_vocabulary(config, task_name: str, vocab, first) -> None:
  path = specials.model_file(vocab)
  if first is not None and path != specials.model_file(first):
    raise UsageError(f"task {task_name} uses vocabulary {path}, but the run's other tasks use "
                     f"{specials.model_file(first)}: a run has one vocabulary")
  if config.vocab_path and _same_file(config.vocab_path) != _same_file(path):
    raise UsageError.setting(
        "vocab_path", config.vocab_path, f"unset, or {path}: the vocabulary is part of the "
        f"seqio task, and task {task_name} uses {path} (register the task with the vocabulary "
        "you want)")


def _same_file(path: str) -> str:
  return path if "://" in path else os.path.realpath(path)


def _check_readable(task: seqio.Task, split: str, data_dir: str | None) -> None:
  """UsageError unless `split` of `task` can be read offline; reads no examples."""
  source = task.source
  if isinstance(source, seqio.TfdsDataSource):
    # `tfds_data_dir` overrides where every TFDS source of the run reads, as seqio's own
    # set_tfds_data_dir_override does; unset, each reads where it was registered.
    source.tfds_dataset.override_data_dir(data_dir)
    corpus.ensure_prepared(source.tfds_dataset.name, source.tfds_dataset.data_dir)
    return
  splits = list(source.splits or [])
  if splits and split not in splits:
    raise UsageError(f"task {task.name} has no {split!r} split (it has {', '.join(splits)}); "
                     f"runs read 'train', and 'validation' to evaluate")
  if isinstance(source, readers.FileSplits):
    readers.paths(source.patterns[split])
  elif isinstance(source, seqio.FileDataSource) and not source.list_shards(split):
    raise UsageError(f"task {task.name}: no files for split {split!r}")


def _check_room(config, rate: float) -> None:
  """At least one real token per chunk after pause insertion."""
  if pause.num_pauses(rate, config.seq_len) >= config.seq_len:
    raise UsageError.setting("seq_len", config.seq_len,
                             f"too short to keep any real token at pause rate {rate:g}")
