"""Generic SeqIO preprocessors for language-model pretraining streams."""

from __future__ import annotations

from typing import Mapping

import tensorflow as tf


def concat_and_split(
    ds: tf.data.Dataset,
    sequence_length: Mapping[str, int],
    *,
    key: str = "targets",
    docs_per_step: int = 64,
) -> tf.data.Dataset:
  """Concatenates documents into one token stream and cuts it into chunks of exactly L tokens.

  The C4/T5 pretraining layout: documents (each ending in EOS) run on across chunk boundaries and
  the final partial chunk is dropped. Works a batch of documents at a time and carries the leftover
  tokens in a `scan` state, so it is fast and its position is part of the tf.data iterator state
  (checkpointable, for exact resume). Other features are dropped.
  """
  length = sequence_length[key]
  dtype = ds.element_spec[key].dtype

  flat = ds.map(lambda x: x[key]).ragged_batch(docs_per_step).map(lambda r: r.flat_values)

  def step(carry, tokens):
    tokens = tf.concat([carry, tokens], axis=0)
    usable = tf.shape(tokens)[0] // length * length
    return tokens[usable:], tf.reshape(tokens[:usable], [-1, length])

  chunks = flat.scan(tf.zeros([0], dtype), step)
  return chunks.unbatch().map(lambda t: {key: t})


def text_to_targets(ds: tf.data.Dataset, *, text_key: str = "text") -> tf.data.Dataset:
  """Keeps only the text field, renamed to seqio's `targets`."""
  return ds.map(lambda x: {"targets": x[text_key]}, num_parallel_calls=tf.data.AUTOTUNE)
