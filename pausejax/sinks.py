"""Attention sinks (StreamingLLM, Xiao et al. 2023), data side: what every sequence starts with.

Softmax attention must put its mass somewhere, and models learn to park it on the first tokens of
their training sequences ("attention sinks"). A streaming cache that evicts them collapses; one
that keeps them (`pausejax.stream`) reads streams of any length. The paper pretrains with one
dedicated learnable sink token at the start of every sample, so a single kept token is enough.

In pausejax the start of every sequence is a setting, `start_token`:

  "bos"   seqio's feature converters shift the targets right and put id 0 (BOS) at position 0 of
          every sequence (and of every packed segment). The default. Note that a constant first
          token is already a learnable sink in all but name.
  "sink"  `<sink>` at position 0 instead, by `sink_preprocessor`: the chunk stays seq_len long
          (<sink> + seq_len - 1 tokens) and is fed as it is, predicting the next token inside it,
          so the sink is an input only and never a target (the converter also puts no loss on a
          `<sink>` target). The paper's "learnable sink".
  "none"  no start token: the chunk is fed as it is (pretraining only), the first input is
          whatever token the chunk happens to begin with. The paper's "vanilla" Pythia.

With "sink" and "none" the last position of a chunk has no next token inside it, so it carries no
loss (seq_len - 1 targets per chunk instead of seq_len).

The start token is set once, like the pause rate: a task with a sink step (`shakespeare_sink`,
`c4_sink`, `register_pretraining_task(..., sink=True)`) carries "sink", and `start_token` must
then be unset or "sink"; any other task takes `start_token` (unset: "bos"). Fine-tuning tasks
("inputs" + "targets") start with the run's start id through seqio's `bos_id`, so a sink model
is fine-tuned and decoded with its sink ("none" cannot be fine-tuned: the prompt-answer split
needs a start).

The model side is `model.zero_sink` (SoftMax1, the paper's "zero sink"); the cache side is
`pausejax.stream`.
"""

from __future__ import annotations

import functools
from typing import Mapping

import seqio
import tensorflow as tf

BOS, SINK, NONE = "bos", "sink", "none"
BOS_ID = 0  # seqio's shifted-in start id (the pad id).


def _sink_id(output_features: Mapping[str, seqio.Feature], key: str) -> int:
  vocab = output_features[key].vocabulary
  if not hasattr(vocab, "sink_id"):
    raise ValueError(f"feature {key!r} uses {type(vocab).__name__}, which has no <sink> id; "
                     "wrap it in pausejax.specials.SpecialsVocabulary")
  return vocab.sink_id


def add_sink_preprocessor(
    ds: tf.data.Dataset,
    sequence_length: Mapping[str, int] | None,
    output_features: Mapping[str, seqio.Feature],
    *,
    key: str = "targets",
) -> tf.data.Dataset:
  """SeqIO preprocessor: `<sink>` + the first L - 1 tokens of every example (L = seq_len).

  Run it after chunking (and after pause insertion, which keeps a leading sink in place). The
  feature converter then feeds the chunk as it is (`PauseLMFeatureConverter(shift=False)`).
  """
  sink_id = _sink_id(output_features, key)
  length = sequence_length.get(key) if sequence_length else None

  def add(features):
    features = dict(features)
    tokens_N = features[key] if length is None else features[key][:length - 1]
    features[key] = tf.concat([tf.constant([sink_id], tokens_N.dtype), tokens_N], axis=0)
    return features

  return ds.map(add, num_parallel_calls=tf.data.AUTOTUNE)


def sink_preprocessor(key: str = "targets"):
  """`add_sink_preprocessor` ready for a Task's preprocessor list."""
  return functools.partial(add_sink_preprocessor, key=key)


def has_sink(task: seqio.Task) -> bool:
  """Whether `task` puts `<sink>` at the start of its examples itself."""
  return any(isinstance(p, functools.partial) and p.func is add_sink_preprocessor
             for p in task.preprocessors)


def start_ids(start: str, sink_id: int) -> list[int]:
  """The ids every sequence of a run with start token `start` begins with (prompts, streams)."""
  return {BOS: [BOS_ID], SINK: [sink_id], NONE: []}[start]
