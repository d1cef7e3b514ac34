"""SequenceMatch's data side (Cundy & Ermon 2023): noise tokens undone by `<backspace>`.

Generation as a game whose moves are tokens plus `<backspace>`, which deletes the previous token.
Maximum likelihood only ever shows the model correct prefixes; here the data also shows it a wrong
token followed by the move that repairs it, so a model can learn to back out of its own mistakes.

Data. `backspace_preprocessor(rate)` inserts, after each token of a target sequence but the last,
with probability `rate`, a noise token followed by `<backspace>`:

    the cat sat            ->  the cat dog <bs> sat

Noise is drawn uniformly from the ordinary vocabulary (ids 3 .. V-1: no padding, EOS or unknown),
or from the token frequencies of a file of sampled ids (`noise_from`, e.g. a checkpoint's own
samples). The example is then cut back to its length; a noise token whose `<backspace>` fell past
the cut is dropped with it, so every noise token in the data is deleted again.

The edit structure. Reading such a sequence left to right keeps a stack of live columns: an
ordinary token is pushed, `<backspace>` pops. `edit_structure` turns the decoder's input row into
what the model needs so that deleted tokens are invisible afterwards:

  positions   a pushed token takes position = (stack size after the push) - 1, so the tokens after
              a deletion continue the positions of the clean prefix;
  replay      the row of a `<backspace>` computes the model's output for the restored prefix: its
              input becomes the token now on top of the stack, at that token's position, and it
              attends to exactly what that token attended to. Its output is therefore *equal* to
              the output at the restored prefix, which is what the decoder uses after emitting
              `<backspace>` (it drops the cache slot and never feeds the `<backspace>` itself).
              This differs from letting the `<backspace>` embedding sit at the deleted position
              (another consistent choice): here the state after a deletion is exactly the prefix
              it restores, as in the paper's MDP, and no embedding of `<backspace>` is learned;
  lifetimes   one int per column, the number of rows that see it counting itself: 0 = no limit
              (every token never deleted, padding, and all data without backspaces), k > 0 = rows
              j .. j+k-1 only (a popped token: up to the row of its `<backspace>`), -1 = no row
              (the `<backspace>` column, whose query is the replay and whose key is the restored
              token's own, already visible key).
  no loss     the row whose target is a token that is deleted later gets weight 0: the data never
              teaches the model to produce noise. The row whose target is `<backspace>` keeps its
              weight: that is the move the model should learn.

Row i sees column j iff j <= i (causal), same packed segment, and lifetime_j allows it:
`model.attention_mask` builds this from the lifetimes inside the step, so the pipeline and the
host-to-device transfer carry one int32 per token (8 KiB per example at L = 2048) instead of an
L x L mask (4 MiB per example); the step materialises the same Bx1xLxL boolean mask that packing
already uses. Lifetimes are relative to the column, so packing keeps them valid.

A `<backspace>` with nothing to delete (the stack holds only its segment's first token) never
appears in the data; the decoder masks it. `edit_structure` treats one as an ordinary token.
"""

from __future__ import annotations

import functools
from typing import Mapping

import numpy as np
import seqio
import tensorflow as tf

from pausejax import pause

FIRST_NOISE_ID = 3  # Ids 0, 1, 2: padding, EOS, unknown (pausejax's SentencePiece models).
FOREVER, NOBODY = 0, -1  # Lifetimes: never deleted; seen by no row.


# ----------------------------------------------------------------------------------------------
# The edit structure (NumPy: the data pipeline runs it through tf.numpy_function, and the
# SequenceMatch replay buffer calls it on the model's own samples).

def edit_structure(inputs_L: np.ndarray, segments_L: np.ndarray | None, *, backspace_id: int):
  """(inputs, positions, lifetimes, keep) of one decoder input row; see the module docstring.

  Args:
    inputs_L: int [L] decoder input tokens (BOS/sink/first token, then the sequence).
    segments_L: int [L] packed segment ids, or None for one sequence per row.
    backspace_id: the `<backspace>` id.
  Returns:
    inputs_L with each `<backspace>` replaced by the replayed token, int32 positions_L, int32
    lifetimes_L, and keep_L (int32, 0 where the row's target is a token deleted later).
  """
  inputs_L = np.array(inputs_L, dtype=np.int32)
  length = inputs_L.shape[0]
  segments_L = np.zeros(length, np.int32) if segments_L is None else np.asarray(segments_L)
  positions_L = np.zeros(length, np.int32)
  lifetimes_L = np.zeros(length, np.int32)
  keep_L = np.ones(length, np.int32)
  stack: list[int] = []
  for i in range(length):
    if i == 0 or segments_L[i] != segments_L[i - 1]:
      stack = []
    if inputs_L[i] == backspace_id and len(stack) > 1:
      popped = stack.pop()
      lifetimes_L[popped] = i - popped
      keep_L[popped - 1] = 0  # Row popped - 1 predicted the deleted token.
      top = stack[-1]
      inputs_L[i], positions_L[i], lifetimes_L[i] = inputs_L[top], positions_L[top], NOBODY
    else:
      stack.append(i)
      positions_L[i] = len(stack) - 1
  return inputs_L, positions_L, lifetimes_L, keep_L


def final_tokens(tokens: list[int], backspace_id: int, *, protected: int = 0) -> list[int]:
  """The text after applying every `<backspace>` in `tokens` (never deleting the first
  `protected`, e.g. the prompt): what the reader sees at the end."""
  out = list(tokens[:protected])
  for t in tokens[protected:]:
    if t == backspace_id:
      if len(out) > protected:
        out.pop()
    else:
      out.append(t)
  return out


def add_edit_structure(ds: tf.data.Dataset, backspace_id: int) -> tf.data.Dataset:
  """Applies `edit_structure` to converted decoder features (after seqio's feature converter):
  writes decoder_input_tokens, decoder_positions, decoder_lifetimes and zeroes the loss weight
  of targets that are deleted later."""
  def add(d):
    d = dict(d)
    segments = d.get("decoder_segment_ids")
    args = [d["decoder_input_tokens"],
            tf.zeros_like(d["decoder_input_tokens"]) if segments is None else segments]
    fn = lambda inputs, seg: edit_structure(inputs, seg, backspace_id=backspace_id)
    inputs, positions, lifetimes, keep = tf.numpy_function(fn, args, [tf.int32] * 4,
                                                           stateful=False)
    shape = d["decoder_input_tokens"].shape
    for t in (inputs, positions, lifetimes, keep):
      t.set_shape(shape)
    d["decoder_input_tokens"] = tf.cast(inputs, d["decoder_input_tokens"].dtype)
    d["decoder_positions"] = positions
    d["decoder_lifetimes"] = lifetimes
    d["decoder_loss_weights"] = d["decoder_loss_weights"] * tf.cast(
        keep, d["decoder_loss_weights"].dtype)
    return d

  return ds.map(add, num_parallel_calls=tf.data.AUTOTUNE)


# ----------------------------------------------------------------------------------------------
# Noise insertion (TF: a seqio preprocessor).

def noise_weights(path: str, vocab_size: int) -> np.ndarray:
  """Token frequencies [vocab_size] of the ids in `path` (a .npy array or whitespace-separated
  ids), restricted to the ordinary ids that noise may take."""
  if path.endswith(".npy"):
    ids = np.load(path).reshape(-1)
  else:
    with tf.io.gfile.GFile(path) as f:
      ids = np.array(f.read().split(), dtype=np.int64)
  ids = ids[(ids >= FIRST_NOISE_ID) & (ids < vocab_size)]
  if ids.size == 0:
    raise ValueError(f"{path} holds no ordinary token ids in [{FIRST_NOISE_ID}, {vocab_size})")
  return np.bincount(ids, minlength=vocab_size).astype(np.float64)


def insert_backspaces(tokens_N: tf.Tensor, *, rate: float, backspace_id: int, vocab_size: int,
                      seed: tf.Tensor, length: int | None = None,
                      weights_V: np.ndarray | None = None) -> tf.Tensor:
  """`tokens_N` with (noise, `<backspace>`) after each token but the last, with probability
  `rate` each; cut to `length` (None: no cut), dropping a noise token that loses its
  `<backspace>` at the cut. Stateless: the result depends only on `seed` (int [2])."""
  size = tf.shape(tokens_N)[0]
  seeds = tf.random.experimental.stateless_split(seed, 2)
  after_N = tf.random.stateless_uniform([size], seed=seeds[0]) < rate
  after_N &= tf.range(size) < size - 1
  if weights_V is None:
    noise_N = tf.random.stateless_uniform([size], seed=seeds[1], minval=FIRST_NOISE_ID,
                                          maxval=vocab_size, dtype=tf.int32)
  else:
    logits_1xV = tf.math.log(tf.constant(weights_V[None], tf.float32))
    noise_N = tf.random.stateless_categorical(logits_1xV, size, seed=seeds[1],
                                              dtype=tf.int32)[0]
  noise_N = tf.cast(noise_N, tokens_N.dtype)
  rows_Nx3 = tf.stack([tokens_N, noise_N, tf.fill([size], tf.cast(backspace_id, tokens_N.dtype))],
                      axis=1)
  kinds_Nx3 = tf.broadcast_to(tf.constant([[0, 1, 2]]), [size, 3])
  keep_Nx3 = tf.stack([tf.ones([size], bool), after_N, after_N], axis=1)
  out = tf.boolean_mask(rows_Nx3, keep_Nx3)
  if length is None:
    return out
  kinds = tf.boolean_mask(kinds_Nx3, keep_Nx3)[:length]
  out = out[:length]
  dangling = tf.equal(tf.concat([[0], kinds], axis=0)[-1], 1)  # Its <backspace> was cut.
  return out[:tf.size(out) - tf.cast(dangling, tf.int32)]


def _backspace_id(output_features: Mapping[str, seqio.Feature], key: str) -> int:
  vocab = output_features[key].vocabulary
  if not hasattr(vocab, "backspace_id"):
    raise ValueError(f"feature {key!r} uses {type(vocab).__name__}, which has no <backspace> "
                     "id; wrap it in pausejax.specials.SpecialsVocabulary")
  return vocab.backspace_id


def insert_backspaces_preprocessor(
    ds: tf.data.Dataset,
    sequence_length: Mapping[str, int] | None,
    output_features: Mapping[str, seqio.Feature],
    *,
    rate: float,
    noise_from: str = "",
    key: str = "targets",
) -> tf.data.Dataset:
  """SeqIO preprocessor: `insert_backspaces` on `key` of every example (own seed per example)."""
  if rate == 0:
    return ds
  backspace_id = _backspace_id(output_features, key)
  vocab_size = output_features[key].vocabulary.base_vocab_size
  weights_V = noise_weights(noise_from, vocab_size) if noise_from else None
  length = sequence_length.get(key) if sequence_length else None

  @seqio.map_over_dataset(num_seeds=1)
  def insert(features, seed):
    features = dict(features)
    tokens = features[key]
    features[key] = insert_backspaces(tokens, rate=rate, backspace_id=backspace_id,
                                      vocab_size=vocab_size,
                                      seed=pause.example_seed(seed, tokens), length=length,
                                      weights_V=weights_V)
    return features

  return insert(ds)


def backspace_preprocessor(rate: float, noise_from: str = "", key: str = "targets"):
  """`insert_backspaces_preprocessor` with its settings bound, for a Task's preprocessor list."""
  return functools.partial(insert_backspaces_preprocessor, rate=rate, noise_from=noise_from,
                           key=key)
