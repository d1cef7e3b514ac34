"""The pause-token method (Goyal et al. 2023, "Think before you speak"), all in one place.

Pause-pretraining (PausePT): take the standard packed chunk of L tokens, insert
`num_pauses(rate, L)` `<pause>` tokens at uniformly random positions, then trim back to L (an
example shorter than L, from a task that does not pack, gets `num_pauses(rate, n)`). The
model therefore sees about `rate` fewer real tokens for the same compute, and the real tokens of a
paused chunk are exactly a prefix of the unpaused chunk.

Loss: ordinary next-token cross-entropy, but never where the *target* is `<pause>` — pauses are
inputs, not predictions. That rule lives in exactly one place: `PauseLMFeatureConverter` writes it
into `decoder_loss_weights`, which the loss and every metric use.
"""

from __future__ import annotations

import functools
import math
from typing import Mapping

import seqio
import tensorflow as tf


def num_pauses(rate: float, length: int) -> int:
  """round(rate * length), rounding halves up (Python's round() would round half to even)."""
  return int(math.floor(rate * length + 0.5))


def insert_pauses(tokens_L: tf.Tensor, *, count: int | tf.Tensor, pause_id: int,
                  seed: tf.Tensor, trim: bool = True) -> tf.Tensor:
  """Inserts `count` pause ids at uniformly random positions of `tokens_L`, then trims to L.

  Every placement of the pauses among the L + count slots is equally likely: the pause slots are the
  `count` largest of L + count i.i.d. uniform scores. Pure TF ops and stateless randomness, so the
  result depends only on `seed`.

  Args:
    tokens_L: int32 [L] token ids.
    count: number of pauses to insert (before trimming); a Python int or an int32 scalar.
    pause_id: the `<pause>` id.
    seed: int [2] stateless seed.
    trim: False returns all L + count tokens (for inspection and tests).
  Returns:
    The first L tokens of the sequence with pauses inserted (all L + count if not `trim`). Pauses
    that land past position L are trimmed away with the tail, so a chunk keeps count * L / (L +
    count) pauses on average, as in the paper's insert-then-trim recipe.
  """
  if isinstance(count, int) and count == 0:
    return tokens_L
  length = tf.shape(tokens_L)[0]
  total = length + count
  scores = tf.random.stateless_uniform([total], seed=seed)
  _, pause_slots = tf.math.top_k(scores, k=count)
  is_pause = tf.scatter_nd(pause_slots[:, None], tf.ones([count], tf.int32), [total]) > 0
  # The i-th non-pause slot receives token i: real tokens keep their order.
  source_index = tf.cumsum(tf.cast(~is_pause, tf.int32), exclusive=True)
  real = tf.gather(tokens_L, tf.minimum(source_index, length - 1))
  out = tf.where(is_pause, tf.cast(pause_id, tokens_L.dtype), real)
  return out[:length] if trim else out


def example_seed(seed, tokens_N: tf.Tensor) -> tf.Tensor:
  """An example's stateless seed (int64 [2]) from seqio's per-example seed and its tokens.

  seqio's seed stream depends on the example's index only, and every data shard uses the same
  task seed (data.py); mixing in the content gives the i-th examples of different shards
  different draws, and is still a pure function of the data and seed.
  """
  seed = tf.cast(tf.stack(seed) if isinstance(seed, (tuple, list)) else seed, tf.int64)
  tokens = tf.cast(tokens_N, tf.int64)
  weights = tf.range(1, tf.size(tokens, out_type=tf.int64) + 1) * 2654435761
  return tf.stack([seed[0], tf.bitwise.bitwise_xor(seed[1], tf.reduce_sum(tokens * weights))])


def _pause_id(output_features: Mapping[str, seqio.Feature], key: str) -> int:
  vocab = output_features[key].vocabulary
  if not hasattr(vocab, "pause_id"):
    raise ValueError(
        f"feature {key!r} uses {type(vocab).__name__}, which has no <pause> id; "
        "wrap it in pausejax.specials.SpecialsVocabulary")
  return vocab.pause_id


def insert_pauses_preprocessor(
    ds: tf.data.Dataset,
    sequence_length: Mapping[str, int],
    output_features: Mapping[str, seqio.Feature],
    *,
    rate: float,
    key: str = "targets",
) -> tf.data.Dataset:
  """SeqIO preprocessor: PausePT insertion, `num_pauses(rate, n)` pauses per example of n tokens.

  An example is first cut to L = `sequence_length[key]` tokens (the feature converter would cut
  it there anyway), so n <= L. pausejax's tasks give chunks of exactly L tokens, so every chunk
  gets the same count (about 205 for L = 2048 at rate 0.1); a task of shorter examples (e.g.
  unpacked lines) gets the same rate, not the same count. Each example gets its own seed from
  seqio's per-preprocessor seed stream (`map_over_dataset(num_seeds=1)`), so results are
  deterministic given the seed passed to `Task.get_dataset` and independent across examples.
  With rate 0 the dataset is returned untouched.
  """
  length = sequence_length[key] if sequence_length else None
  if rate == 0 or (length and num_pauses(rate, length) == 0):  # No example gets a pause.
    return ds
  pause_id = _pause_id(output_features, key)
  sink_id = getattr(output_features[key].vocabulary, "sink_id", None)

  @seqio.map_over_dataset(num_seeds=1)
  def insert(features, seed):
    features = dict(features)
    tokens_N = features[key] if length is None else features[key][:length]
    size = tf.size(tokens_N)
    # num_pauses(rate, n) in TF: the same float64 product and rounding as the Python function.
    count = tf.cast(tf.floor(rate * tf.cast(size, tf.float64) + 0.5), tf.int32)
    seed = example_seed(seed, tokens_N)
    # A leading <sink> (pausejax.sinks) stays at position 0: pauses go into the rest.
    keep = 0
    if sink_id is not None:
      first = tf.concat([tokens_N[:1], tf.constant([-1], tokens_N.dtype)], axis=0)[0]
      keep = tf.cast(tf.equal(first, tf.cast(sink_id, tokens_N.dtype)), tf.int32)
    features[key] = tf.concat([tokens_N[:keep], insert_pauses(
        tokens_N[keep:], count=count, pause_id=pause_id, seed=seed)], axis=0)
    return features

  return insert(ds)


def pause_preprocessor(rate: float, key: str = "targets"):
  """`insert_pauses_preprocessor` with its rate bound, ready for a Task's preprocessor list."""
  return functools.partial(insert_pauses_preprocessor, rate=rate, key=key)


def rate_of(task: seqio.Task) -> float:
  """The PausePT rate of `task`'s pause step (`pause_preprocessor`), or 0.0 if it has none."""
  rates = [p.keywords["rate"] for p in task.preprocessors
           if isinstance(p, functools.partial) and p.func is insert_pauses_preprocessor]
  if len(rates) > 1:
    raise ValueError(f"task {task.name!r} inserts pauses {len(rates)} times")
  return float(rates[0]) if rates else 0.0


def with_steps(task: seqio.Task, steps, *, name: str | None = None,
               output_features: Mapping[str, seqio.Feature] | None = None) -> seqio.Task:
  """An unregistered copy of `task` for training and eval loss, with `steps` appended to its
  preprocessors (so after its own, just before the feature converter), optionally with other
  output features. Its metrics are not copied: they belong to `pausejax.evaluate`."""
  return seqio.Task(
      name=name or task.name,
      source=task.source,
      preprocessors=[*task.preprocessors, *steps],
      output_features=dict(output_features or task.output_features),
      postprocess_fn=task.postprocessor,
      shuffle_buffer_size=task.shuffle_buffer_size,
  )


class PauseLMFeatureConverter(seqio.LMFeatureConverter):
  """seqio's decoder-only converter, plus: no loss where the target is `<pause>` (or `<sink>`).

  This is the single place where pause targets are masked out; `decoder_loss_weights` is then
  1 exactly on real (non-padding, non-pause) targets.

  `shift=False` feeds each sequence (each packed segment) as it is instead of shifting BOS in:
  position i predicts token i + 1 of the same sequence, and the last has no target. That is how
  a chunk that starts with `<sink>`, or with no start token at all, is read (`pausejax.sinks`).
  """

  def __init__(self, pause_id: int, *, sink_id: int | None = None, shift: bool = True,
               **kwargs):
    super().__init__(**kwargs)
    self._pause_id = pause_id
    self._sink_id = sink_id
    self._shift = shift

  @property
  def pause_id(self) -> int:
    return self._pause_id

  def _convert_example(self, features):
    d = dict(super()._convert_example(features))
    if not self._shift:
      tokens_L = features["targets"]
      next_L = tf.concat([tokens_L[1:], tf.zeros([1], tokens_L.dtype)], axis=0)
      segments_L = features.get("targets_segment_ids")
      if segments_L is not None:  # The next token of another packed segment is no target.
        same_L = tf.concat([tf.equal(segments_L[1:], segments_L[:-1]), [False]], axis=0)
        next_L = tf.where(same_L, next_L, tf.zeros_like(next_L))
      d["decoder_input_tokens"] = tokens_L
      d["decoder_target_tokens"] = next_L
      d["decoder_loss_weights"] = tf.cast(tf.not_equal(next_L, 0), tf.int32)
    targets_L = d["decoder_target_tokens"]
    keep_L = tf.not_equal(targets_L, self._pause_id)
    if self._sink_id is not None:
      keep_L &= tf.not_equal(targets_L, self._sink_id)
    d["decoder_loss_weights"] = d["decoder_loss_weights"] * tf.cast(keep_L, tf.int32)
    return d


# ---------------------------------------------------------------------------------------------
# PauseFT: fine-tuning on (inputs, targets) examples as `prompt + M_ft x <pause> + answer`.

POSITIONS = ("append", "prepend")  # Pauses after the prompt (the paper's), or before it.


def finetune_pauses_preprocessor(
    ds: tf.data.Dataset,
    sequence_length: Mapping[str, int] | None,
    output_features: Mapping[str, seqio.Feature],
    *,
    num_pauses: int,
    position: str = "append",
    key: str = "inputs",
) -> tf.data.Dataset:
  """SeqIO preprocessor: `num_pauses` `<pause>` ids after (append) or before (prepend) `key`.

  A prompt longer than `sequence_length[key] - num_pauses` keeps its *last* tokens: seqio's trim
  would otherwise cut the pauses (append) or the end of the prompt, where the question usually
  sits. Run it after tokenization; `PauseFTFeatureConverter` then puts the answer after it.
  """
  if position not in POSITIONS:
    raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
  pause_id = _pause_id(output_features, key)
  room = None if not sequence_length or sequence_length.get(key) is None else (
      sequence_length[key] - num_pauses)
  if room is not None and room < 1:
    raise ValueError(f"{num_pauses} pauses leave no room for the prompt in "
                     f"{sequence_length[key]} {key} tokens")

  def add(features):
    features = dict(features)
    prompt_P = features[key]
    if room is not None:
      prompt_P = prompt_P[-room:]
    pauses_M = tf.fill([num_pauses], tf.cast(pause_id, prompt_P.dtype))
    parts = [prompt_P, pauses_M] if position == "append" else [pauses_M, prompt_P]
    features[key] = tf.concat(parts, axis=0)
    return features

  return ds.map(add, num_parallel_calls=tf.data.AUTOTUNE)


def finetune_pause_preprocessor(num_pauses: int, position: str = "append", key: str = "inputs"):
  """`finetune_pauses_preprocessor` with its settings bound, for a Task's preprocessor list."""
  return functools.partial(finetune_pauses_preprocessor, num_pauses=num_pauses,
                           position=position, key=key)


class PauseFTFeatureConverter(seqio.PrefixLMFeatureConverter):
  """seqio's prefix-LM converter: `inputs` (pauses included) then `targets` in one sequence.

  Loss only on the target tokens (`loss_on_targets_only`), so neither the prompt nor its pauses
  are ever predicted. `decoder_causal_attention` (1 on the prompt) is kept only for
  `prefix_lm=True`, where the model lets the prompt attend bidirectionally; otherwise the model
  stays causal, as in pretraining.
  """

  def __init__(self, pause_id: int, *, prefix_lm: bool = False, **kwargs):
    super().__init__(loss_on_targets_only=True, **kwargs)
    self._pause_id = pause_id
    self._prefix_lm = prefix_lm

  @property
  def pause_id(self) -> int:
    return self._pause_id

  def __call__(self, ds, task_feature_lengths):
    ds = super().__call__(ds, task_feature_lengths)
    if self._prefix_lm:
      return ds
    return ds.map(lambda d: {k: v for k, v in d.items() if k != "decoder_causal_attention"},
                  num_parallel_calls=tf.data.AUTOTUNE)
