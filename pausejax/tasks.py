"""The SeqIO task registry: pretraining streams with and without pauses.

Registered on import (T5X style, `seqio.get_mixture_or_task(name)`):

  shakespeare         the embedded public-domain corpus (`pausejax_shakespeare` TFDS dataset)
  shakespeare_pause   the same with PausePT insertion at rate 0.1
  c4                  TFDS `c4/en:3.1.0` (prepare it yourself; see README)
  c4_pause            the same with PausePT insertion at rate 0.1

Each is: text -> tokenize -> EOS -> [cache point] -> concatenate and split into `seq_len` chunks ->
insert pauses. Register your own corpus with `register_pretraining_task`.

`train.py` does not use the registered objects directly: it rebuilds the task from its recipe with
the run's vocabulary (`vocab_path`), pause rate (`pause.rate`) and `tfds_data_dir`, so those three
are config values rather than part of the task name.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Mapping

import seqio
import tensorflow as tf

from pausejax import corpus
from pausejax import pause
from pausejax import preprocessors
from pausejax import readers
from pausejax import specials
from pausejax.errors import UsageError

PAUSE_RATE = 0.1  # The paper's PausePT rate: 10 % of the sequence length.


@dataclasses.dataclass(frozen=True)
class Recipe:
  """What a pretraining task is made of, so it can be rebuilt with other run settings."""
  name: str
  make_source: Callable[[str | None], seqio.DataSource]  # tfds_data_dir -> source
  pause_rate: float
  tfds_name: str | None = None  # Set for TFDS-backed tasks, which must be prepared before use.
  text_key: str = "text"
  train_split: str = "train"
  eval_split: str = "validation"
  shuffle_buffer_size: int = 10_000

  def build(self, vocabulary: specials.SpecialsVocabulary, *, pause_rate: float | None = None,
            tfds_data_dir: str | None = None) -> seqio.Task:
    """An unregistered `seqio.Task` for this recipe with the given run settings."""
    rate = self.pause_rate if pause_rate is None else pause_rate
    return seqio.Task(
        name=self.name,
        source=self.make_source(tfds_data_dir),
        preprocessors=[
            functools.partial(preprocessors.text_to_targets, text_key=self.text_key),
            seqio.preprocessors.tokenize,
            seqio.CacheDatasetPlaceholder(),
            seqio.preprocessors.append_eos,
            preprocessors.concat_and_split,
            pause.pause_preprocessor(rate),
        ],
        output_features={"targets": seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32)},
        shuffle_buffer_size=self.shuffle_buffer_size,
    )


_RECIPES: dict[str, Recipe] = {}


def _files_source(files: Mapping[str, str], text_key: str) -> seqio.DataSource:
  """A seqio source over local/GCS text or JSONL files, held in memory (fine up to a few GB)."""
  cache: dict[str, list[str]] = {}

  def dataset_fn(split, shuffle_files, seed=None):
    del shuffle_files, seed  # seqio shuffles examples after preprocessing.
    if split not in cache:
      cache[split] = readers.documents(files[split], text_key)
      if not cache[split]:
        raise UsageError(f"no documents found in {files[split]!r} for split {split!r}")
    return tf.data.Dataset.from_tensor_slices({text_key: cache[split]})

  return seqio.FunctionDataSource(dataset_fn, splits=list(files))


def register_pretraining_task(
    name: str,
    *,
    tfds_name: str | None = None,
    files: Mapping[str, str] | None = None,
    text_key: str = "text",
    pause_rate: float = 0.0,
    tfds_data_dir: str | None = None,
    vocab_path: str | None = None,
    train_split: str = "train",
    eval_split: str = "validation",
    shuffle_buffer_size: int = 10_000,
) -> seqio.Task:
  """Registers a pretraining task on a TFDS dataset or on your own files.

  Exactly one of `tfds_name` (e.g. "c4/en:3.1.0") or `files` (split -> file pattern of .jsonl,
  .jsonl.gz, .txt or .txt.gz files; JSONL reads `text_key`, text files split documents at blank
  lines) must be given. `pause_rate` > 0 gives the PausePT variant.

  Example (a corpus of your own)::

      from pausejax import tasks
      tasks.register_pretraining_task(
          "my_corpus_pause",
          files={"train": "/data/my/train-*.jsonl", "validation": "/data/my/val.jsonl"},
          pause_rate=0.1)

  then train with `--config.task=my_corpus_pause` (from a module your config file imports).

  Returns:
    The registered `seqio.Task` (built with the embedded vocabulary unless `vocab_path` is given).
  """
  if (tfds_name is None) == (files is None):
    raise ValueError("give exactly one of tfds_name= or files=")
  if not 0.0 <= pause_rate < 1.0:
    raise UsageError.setting("pause_rate", pause_rate, "a fraction in [0, 1)")
  if tfds_name is not None:
    def make_source(data_dir):
      return seqio.TfdsDataSource(tfds_name, tfds_data_dir=data_dir or tfds_data_dir)
  else:
    missing = {train_split, eval_split} - set(files)
    if missing:
      raise ValueError(f"files= needs patterns for splits {sorted(missing)}")

    def make_source(data_dir):
      del data_dir
      return _files_source(files, text_key)

  recipe = Recipe(name=name, make_source=make_source, pause_rate=pause_rate, tfds_name=tfds_name,
                  text_key=text_key, train_split=train_split, eval_split=eval_split,
                  shuffle_buffer_size=shuffle_buffer_size)
  vocabulary = specials.load_vocabulary(vocab_path or corpus.DEFAULT_VOCAB_PATH)
  task = recipe.build(vocabulary)
  seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add_provider(name, task)
  _RECIPES[name] = recipe
  return task


def recipe(name: str) -> Recipe | None:
  """The recipe of a task registered with `register_pretraining_task`, or None."""
  return _RECIPES.get(name)


def pretraining_task_names() -> list[str]:
  return sorted(_RECIPES)


def resolve(name: str, *, setting: str = "task") -> Recipe:
  """The recipe for `name`, or a UsageError listing the valid names."""
  if name in _RECIPES:
    return _RECIPES[name]
  raise UsageError.setting(
      setting, name, f"unknown pretraining task; registered: {', '.join(pretraining_task_names())} "
      "(register more with pausejax.tasks.register_pretraining_task)")


def _register_defaults() -> None:
  for base, tfds_name in (("shakespeare", corpus.EMBEDDED_TFDS_NAME), ("c4", "c4/en:3.1.0")):
    register_pretraining_task(base, tfds_name=tfds_name, pause_rate=0.0)
    register_pretraining_task(f"{base}_pause", tfds_name=tfds_name, pause_rate=PAUSE_RATE)


_register_defaults()
