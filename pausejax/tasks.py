"""pausejax's SeqIO tasks and mixtures for pretraining, and helpers to register your own.

Registered on import as ordinary seqio Tasks (T5 style, `seqio.get_mixture_or_task(name)`):

  shakespeare            the embedded public-domain corpus (`pausejax_shakespeare` TFDS dataset)
  shakespeare_pause      the same with PausePT insertion at rate 0.1
  shakespeare_sink       the same with a learnable <sink> at position 0 (StreamingLLM; sinks.py)
  c4                     TFDS `c4/en:3.1.0` with T5's 32k vocabulary (prepare it yourself; README)
  c4_pause               the same with PausePT insertion at rate 0.1
  c4_sink                the same with a learnable <sink> at position 0
  addition_lm            the embedded addition data as text ("123+45=168"), for mixing
  shakespeare_addition   Mixture: shakespeare 9 : addition_lm 1
  shakespeare_addition_pause   the same mixture of the tasks' `_pause` variants
  reasoning, reasoning_mix     generated problems (sums, chains, lists; `reasoning.py`), and
                               Mixture shakespeare 1 : reasoning 1; both also as `_pause`

A pretraining task is: text -> tokenize -> [cache point] -> EOS -> concatenate and split into
`seq_len` chunks -> (`_pause` tasks) insert pauses -> (`_sink` tasks) `<sink>` first. The pause rate is part of the task: a task
without a pause step gets one from `--config.pause.rate` (see `pausejax.registry`).

Any seqio Task or Mixture works as `config.task`, these are only pausejax's own. Helpers:
`register_pretraining_task` (a corpus on TFDS or in text/JSON-lines files) and `with_pauses` (the
pause variant of any registered Task or Mixture).
"""

from __future__ import annotations

import functools
from typing import Mapping

import seqio
import tensorflow as tf

from pausejax import corpus
from pausejax import pause
from pausejax import preprocessors
from pausejax import readers
from pausejax import sinks
from pausejax import specials
from pausejax.errors import UsageError

PAUSE_RATE = 0.1  # The paper's PausePT rate: 10 % of the sequence length.
# T5's SentencePiece model for C4 (32,000 pieces, no extra ids needed here). Read only when a C4
# run starts: it lives on GCS, like C4 itself.
C4_VOCAB_PATH = "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"


def pretraining_steps(text_key: str = "text") -> list:
  """The preprocessors of a pretraining stream, up to (not including) pause insertion."""
  return [
      functools.partial(preprocessors.text_to_targets, text_key=text_key),
      seqio.preprocessors.tokenize,
      seqio.CacheDatasetPlaceholder(),
      seqio.preprocessors.append_eos,
      preprocessors.concat_and_split,
  ]


def _vocabulary(vocab_path: str | None) -> specials.SpecialsVocabulary:
  # Not loaded here: a remote model (C4's) is only read when a run uses the task.
  return specials.SpecialsVocabulary(
      seqio.SentencePieceVocabulary(vocab_path or corpus.DEFAULT_VOCAB_PATH))


def _register(task: seqio.Task) -> seqio.Task:
  seqio.TaskRegistry.remove(task.name)
  seqio.TaskRegistry.add_provider(task.name, task)
  return task


def register_pretraining_task(
    name: str,
    *,
    tfds_name: str | None = None,
    files: Mapping[str, str] | None = None,
    text_key: str = "text",
    pause_rate: float = 0.0,
    sink: bool = False,
    tfds_data_dir: str | None = None,
    vocab_path: str | None = None,
    shuffle_buffer_size: int = 10_000,
) -> seqio.Task:
  """Registers a pretraining task on a TFDS dataset or on your own files; returns it.

  Exactly one of `tfds_name` (e.g. "c4/en:3.1.0") or `files` (split -> glob of .jsonl, .jsonl.gz,
  .txt or .txt.gz files, local or gs://; JSON lines give their `text_key` field, text files split
  documents at blank lines) must be given; runs read the "train" and "validation" splits. Files
  are streamed, sharded by file where there are at least as many files as data shards.
  `pause_rate` > 0 appends PausePT insertion (the `_pause` variant); `sink` puts a learnable
  `<sink>` at position 0 of every chunk (the `_sink` variant, `pausejax.sinks`); `vocab_path`
  is a SentencePiece model (default: the embedded one).

  Example (a corpus of your own, in a module your config imports or `--config.task_modules`)::

      from pausejax import tasks
      tasks.register_pretraining_task(
          "my_corpus", files={"train": "/data/my/train-*.jsonl.gz",
                              "validation": "/data/my/val.jsonl"})

  then `--config.task=my_corpus` (no pauses) or `... --config.pause.rate=0.1` (PausePT).
  """
  if (tfds_name is None) == (files is None):
    raise ValueError("give exactly one of tfds_name= or files=")
  if not 0.0 <= pause_rate < 1.0:
    raise UsageError.setting("pause_rate", pause_rate, "a fraction in [0, 1)")
  if tfds_name is not None:
    source = seqio.TfdsDataSource(tfds_name, tfds_data_dir=tfds_data_dir)
  else:
    missing = {"train", "validation"} - set(files)
    if missing:
      raise ValueError(f"files= needs patterns for splits {sorted(missing)}")
    source = readers.file_source(files, text_key)
  steps = pretraining_steps(text_key)
  if pause_rate:
    steps.append(pause.pause_preprocessor(pause_rate))
  if sink:
    steps.append(sinks.sink_preprocessor())
  return _register(seqio.Task(
      name=name, source=source, preprocessors=steps,
      output_features={"targets": seqio.Feature(_vocabulary(vocab_path), add_eos=True,
                                                dtype=tf.int32)},
      shuffle_buffer_size=shuffle_buffer_size))


def with_pauses(name: str, rate: float = PAUSE_RATE, *, new_name: str | None = None
                ) -> seqio.Task | seqio.Mixture:
  """Registers the pause variant of the registered Task or Mixture `name`; returns it.

  A Task gets PausePT insertion at `rate` as its last preprocessing step (and the specials
  vocabulary if it has a plain SentencePiece one); a Mixture is rebuilt from its tasks' variants
  at the same mixing rates. Variants are named `new_name` (default `<name>_pause`); a mixture's
  tasks get `<task>_pause`.
  """
  if not 0.0 < rate < 1.0:
    raise UsageError.setting("rate", rate, "a fraction in (0, 1)")
  new_name = new_name or f"{name}_pause"
  provider = seqio.get_mixture_or_task(name)
  if isinstance(provider, seqio.Mixture):
    parts = [(with_pauses(t.name, rate).name, provider.get_rate(t)) for t in provider.tasks]
    seqio.MixtureRegistry.remove(new_name)
    return seqio.MixtureRegistry.add(new_name, parts)
  if pause.rate_of(provider):
    raise UsageError(f"task {name!r} already inserts pauses (rate {pause.rate_of(provider)})")
  return _register(pause.with_steps(provider, [pause.pause_preprocessor(rate)], name=new_name,
                                    output_features=specials.with_specials_features(provider)))


# ---------------------------------------------------------------------------------------------
# Built-in tasks.

def _addition_as_text(ds: tf.data.Dataset) -> tf.data.Dataset:
  """(inputs "12+34=", targets "46") -> one document "12+34=46"."""
  return ds.map(lambda ex: {"text": tf.strings.join([ex["inputs"], ex["targets"]])},
                num_parallel_calls=tf.data.AUTOTUNE)


def _register_addition_lm() -> None:
  """`addition_lm`: a plain seqio Task with a preprocessor of its own, as a user would write it."""
  from pausejax import downstream  # The addition examples live with the downstream tasks.
  _register(seqio.Task(
      name="addition_lm",
      source=downstream.addition_source(),
      preprocessors=[_addition_as_text, *pretraining_steps("text")],
      output_features={"targets": seqio.Feature(_vocabulary(None), add_eos=True,
                                                dtype=tf.int32)},
      shuffle_buffer_size=10_000))


def _register_defaults() -> None:
  for base, tfds_name, vocab in (("shakespeare", corpus.EMBEDDED_TFDS_NAME, None),
                                 ("c4", "c4/en:3.1.0", C4_VOCAB_PATH)):
    register_pretraining_task(base, tfds_name=tfds_name, vocab_path=vocab)
    register_pretraining_task(f"{base}_pause", tfds_name=tfds_name, vocab_path=vocab,
                              pause_rate=PAUSE_RATE)
    register_pretraining_task(f"{base}_sink", tfds_name=tfds_name, vocab_path=vocab, sink=True)
  _register_addition_lm()
  with_pauses("addition_lm")
  for suffix in ("", "_pause"):
    seqio.MixtureRegistry.remove(f"shakespeare_addition{suffix}")
    seqio.MixtureRegistry.add(f"shakespeare_addition{suffix}",
                              [(f"shakespeare{suffix}", 9.0), (f"addition_lm{suffix}", 1.0)])
  from pausejax import reasoning  # noqa: F401  Its own module; registers on import.


_register_defaults()
