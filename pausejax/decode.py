"""Pause-aware batched decoding with a KV cache.

    out = generate(model, [[0, 17, 4, 99], [0, 8, 9]], max_new_tokens=32, num_pauses=10,
                   pause_id=vocab.pause_id, eos_id=vocab.eos_id, max_len=256)
    out.tokens  # One answer per prompt: token ids, no <pause>, no EOS.

Every prompt starts with the run's start id (`bos_id`; default 0, the BOS that seqio's feature
converters shift in at position 0 of every training sequence; `<sink>` for a run with a learnable
sink, see `pausejax.sinks`): a prompt without it is not what the model was trained on.
`generate` raises a UsageError for such a prompt rather than adding the id itself (the callers in
this package, e.g. `pausejax.generate`, prepend it already); `bos_id=None` checks nothing.

Inference as in Goyal et al. 2023: every prompt gets `num_pauses` `<pause>` ids appended, the model
reads prompt + pauses, and the answer is what it produces after the last pause. Its outputs at the
prompt and pause positions are ignored: they are never sampled.

Pauses the model emits itself: training puts no loss on `<pause>` targets, so a trained model
rarely predicts one. If it does during the answer, the pause is fed back like any other token (the
model gets one more column of computation, which is what a pause is for) but is left out of the
returned answer, and it counts toward `max_new_tokens`. Counting it keeps every row within
prompt + num_pauses + max_new_tokens - 1 positions (the last token sampled is never fed back),
which is exactly what the cache must hold. So a fine-tuning sequence that fills seq_len (inputs
BOS + prompt + pauses + answer; the target at its last position is the answer's EOS) decodes at
max_len = seq_len with max_new_tokens = answer + 1.

Fixed shapes: the prompts are right-padded into one [B, max_len] block, prefilled once, then one
compiled step per token runs inside `jax.lax.while_loop`, which ends when every row has produced
EOS or after `max_new_tokens` steps. A row that hits EOS idles (its later samples are discarded).
One compilation serves every prompt length for a given batch size, max_len, max_new_tokens and
sampler.

Sampling: temperature 0 is greedy (argmax). Otherwise logits / temperature, then top-k (0 = off),
then nucleus top-p (1.0 = off), then a categorical draw with key `fold_in(key(seed), step)`, so one
seed gives the same tokens with and without the cache. Embedding rows at or beyond `vocab_size`
(padding up to a multiple of 128) are never sampled.

Backspaces (`backspace_id`, `max_backspaces`; SequenceMatch, `pausejax.backspace`): emitting
`<backspace>` deletes the last token: the cache drops its slot, and the token now on top is fed
again into its own slot, which gives the logits after the restored prefix (the same the model
computes for that prefix; training's replay rows compute exactly this). `<backspace>` is never
sampled when it would delete the prompt (or its pauses), nor after `max_backspaces` deletions in
a row's answer; with `backspace_id` given and `max_backspaces=0` it is never sampled at all. The
answer is the text after all deletions; `raw_tokens` keeps the edit trace. Each `<backspace>`
counts toward `max_new_tokens`, so the cache bound above still holds.

Streaming (`window` > 0, `pausejax.stream`): the cache keeps the first `num_sinks` tokens and the
`window` most recent ones, with positions inside the cache, so prompt + answer may be any length
at constant memory (`max_len` is then not needed). The prompts are fed token by token, padded
to a multiple of 64 columns (one compilation per such width).

`generate_without_cache` is the reference: the same loop, but every step runs the full model over
the whole [B, max_len] token buffer and reads the logits after each row's last token.
`benchmark` times both.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from pausejax import backspace
from pausejax import model as model_lib
from pausejax import stream
from pausejax.errors import UsageError

_NOT_GENERATED = -1  # Output slots after a row stopped (and ids never produced by the model).


@dataclasses.dataclass(frozen=True)
class Sampler:
  """How a token is drawn from the next-token logits (hashable: it selects the compiled loop)."""
  temperature: float = 0.0  # 0: greedy.
  top_k: int = 0            # Keep the k most likely ids (0: all).
  top_p: float = 1.0        # Keep the smallest set of ids whose probability reaches top_p.

  def __post_init__(self):
    if not _is_number(self.temperature) or self.temperature < 0:
      raise UsageError.setting("temperature", self.temperature, "a number >= 0 (0 = greedy)")
    if not _is_int(self.top_k) or self.top_k < 0:
      raise UsageError.setting("top_k", self.top_k, "an integer >= 0 (0 = off)")
    if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
      raise UsageError.setting("top_p", self.top_p, "a number in (0, 1] (1 = off)")


@dataclasses.dataclass
class Generation:
  """The result for a batch of prompts; lists are per prompt, in order."""
  tokens: list[list[int]]      # The answers: no <pause>, no EOS.
  raw_tokens: list[list[int]]  # Everything sampled after the appended pauses, EOS included.
  stopped_at_eos: list[bool]
  inputs: list[list[int]]      # What the model read before the answer: prompt + pauses.
  num_backspaces: list[int] | None = None  # Deletions per answer (with backspace decoding).


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


# ----------------------------------------------------------------------------------------------
# Sampling.

def sample(logits_BxV: jax.Array, key: jax.Array, sampler: Sampler) -> jax.Array:
  """One token id per row (int32)."""
  if sampler.temperature == 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = logits_BxV.astype(jnp.float32) / sampler.temperature
  if sampler.top_k:
    kth_Bx1 = jax.lax.top_k(logits_BxV, min(sampler.top_k, logits_BxV.shape[-1]))[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV >= kth_Bx1, logits_BxV, -jnp.inf)
  if sampler.top_p < 1:
    sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)  # Descending.
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    # Keep an id while the mass of the ids before it is below top_p: the top id always stays.
    keep_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV < sampler.top_p
    cutoff_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV >= cutoff_Bx1, logits_BxV, -jnp.inf)
  return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# The decoding loops (jit-compiled; the model travels as graphdef + state).

def _decode_loop(advance: Callable, model_state: Any, logits_BxV: jax.Array, key: jax.Array,
                 eos_id: jax.Array, vocab_size: jax.Array, max_new_tokens: int,
                 sampler: Sampler) -> jax.Array:
  """Samples up to max_new_tokens per row: BxN ids, _NOT_GENERATED after a row's EOS.

  `advance(tokens_B, model_state) -> (logits_BxV, model_state)` feeds sampled ids back. The last
  sample is not fed back (nothing reads its logits), so a row of n tokens needs only
  n + max_new_tokens - 1 positions.
  """
  batch, vocab = logits_BxV.shape
  valid_V = jnp.arange(vocab) < vocab_size

  def draw(step, logits_BxV, done_B, out_BxN):
    logits_BxV = jnp.where(valid_V, logits_BxV, -jnp.inf)
    tokens_B = sample(logits_BxV, jax.random.fold_in(key, step), sampler)
    out_BxN = out_BxN.at[:, step].set(jnp.where(done_B, _NOT_GENERATED, tokens_B))
    return tokens_B, done_B | (tokens_B == eos_id), out_BxN

  def cond(carry):
    step, _, _, done_B, _ = carry
    return (step < max_new_tokens) & ~jnp.all(done_B)

  def body(carry):
    step, tokens_B, model_state, done_B, out_BxN = carry
    logits_BxV, model_state = advance(tokens_B, model_state)
    tokens_B, done_B, out_BxN = draw(step, logits_BxV, done_B, out_BxN)
    return step + 1, tokens_B, model_state, done_B, out_BxN

  first = jnp.zeros((), jnp.int32)
  tokens_B, done_B, out_BxN = draw(first, logits_BxV, jnp.zeros((batch,), bool),
                                   jnp.full((batch, max_new_tokens), _NOT_GENERATED, jnp.int32))
  carry = (first + 1, tokens_B, model_state, done_B, out_BxN)
  return jax.lax.while_loop(cond, body, carry)[-1]


_STATIC = ("graphdef", "max_new_tokens", "sampler", "prefix_lm")


def backspace_advance(model: model_lib.Decoder, inputs_BxS: jax.Array, lengths_B: jax.Array,
                      backspace_id: jax.Array, max_backspaces: int):
  """(advance, mask) for `_decode_loop` over the dense cache with `<backspace>` moves.

  The decode state is (cache, tokens held BxS, prompt lengths B, deletions used B).
  `mask(logits_BxV, state)` removes `<backspace>` where it may not be sampled.
  """
  rows_B = jnp.arange(inputs_BxS.shape[0])

  def mask(logits_BxV, st):
    cache, _, prompt_B, used_B = st
    allowed_B = (cache.lengths_B > prompt_B) & (used_B < max_backspaces)
    is_bs_V = jnp.arange(logits_BxV.shape[-1]) == backspace_id
    return jnp.where(is_bs_V[None] & ~allowed_B[:, None], -jnp.inf, logits_BxV)

  def advance(tokens_B, st):
    cache, held_BxS, prompt_B, used_B = st
    is_bs_B = tokens_B == backspace_id
    # A deletion drops the last slot and feeds the new top token again, into its own slot.
    length_B = jnp.where(is_bs_B, cache.lengths_B - 2, cache.lengths_B)
    feed_B = jnp.where(is_bs_B, held_BxS[rows_B, jnp.maximum(length_B, 0)], tokens_B)
    logits_BxV, cache = model.decode_step(feed_B, dataclasses.replace(cache, lengths_B=length_B))
    st = (cache, held_BxS.at[rows_B, length_B].set(feed_B), prompt_B,
          used_B + is_bs_B.astype(jnp.int32))
    return mask(logits_BxV, st), st

  return advance, mask


@functools.partial(jax.jit, static_argnames=(*_STATIC, "max_backspaces"))
def _generate_cached(graphdef, state, inputs_BxS, lengths_B, key, eos_id, vocab_size, *,
                     max_new_tokens: int, sampler: Sampler, prefix_lm: bool,
                     backspace_id=None, max_backspaces: int = 0) -> jax.Array:
  model = nnx.merge(graphdef, state)
  logits_BxV, cache = model.prefill(inputs_BxS, lengths_B, inputs_BxS.shape[1], prefix_lm)
  if backspace_id is None:
    return _decode_loop(model.decode_step, cache, logits_BxV, key, eos_id, vocab_size,
                        max_new_tokens, sampler)
  advance, mask = backspace_advance(model, inputs_BxS, lengths_B, backspace_id, max_backspaces)
  st = (cache, inputs_BxS, lengths_B, jnp.zeros_like(lengths_B))
  return _decode_loop(advance, st, mask(logits_BxV, st), key, eos_id, vocab_size,
                      max_new_tokens, sampler)


@functools.partial(jax.jit, static_argnames=(*_STATIC, "num_sinks", "window"))
def _generate_streaming(graphdef, state, inputs_BxS, lengths_B, key, eos_id, vocab_size, *,
                        max_new_tokens: int, sampler: Sampler, prefix_lm: bool, num_sinks: int,
                        window: int) -> jax.Array:
  del prefix_lm  # Always False here (refused by prepare_inputs).
  model = nnx.merge(graphdef, state)
  logits_BxV, cache = stream.prefill(model, inputs_BxS, lengths_B, num_sinks, window)
  return _decode_loop(functools.partial(stream.step, model), cache, logits_BxV, key, eos_id,
                      vocab_size, max_new_tokens, sampler)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _generate_uncached(graphdef, state, inputs_BxS, lengths_B, key, eos_id, vocab_size, *,
                       max_new_tokens: int, sampler: Sampler, prefix_lm: bool) -> jax.Array:
  model = nnx.merge(graphdef, state)
  rows_B = jnp.arange(inputs_BxS.shape[0])
  # The prompt (prefix) is what each row held before decoding: it keeps its two-way mask.
  prefix_BxS = (jnp.arange(inputs_BxS.shape[1]) < lengths_B[:, None]) if prefix_lm else None

  def logits_after(inputs_BxS, lengths_B):  # The full forward pass, every step.
    return model(inputs_BxS, prefix_BxL=prefix_BxS)[rows_B, lengths_B - 1]

  def advance(tokens_B, prefix):
    inputs_BxS, lengths_B = prefix
    inputs_BxS = inputs_BxS.at[rows_B, lengths_B].set(tokens_B)
    return logits_after(inputs_BxS, lengths_B + 1), (inputs_BxS, lengths_B + 1)

  return _decode_loop(advance, (inputs_BxS, lengths_B), logits_after(inputs_BxS, lengths_B), key,
                      eos_id, vocab_size, max_new_tokens, sampler)


# ----------------------------------------------------------------------------------------------
# Public API.

def with_pauses(prompts: Sequence[Sequence[int]], num_pauses: int,
                pause_id: int) -> list[list[int]]:
  """Each prompt followed by `num_pauses` pause ids: what the model reads before answering."""
  if not _is_int(num_pauses) or num_pauses < 0:
    raise UsageError.setting("num_pauses", num_pauses, "an integer >= 0")
  return [[int(t) for t in p] + [int(pause_id)] * num_pauses for p in prompts]


_STREAM_BLOCK = 64  # Streaming: prompts are padded to a multiple of this (fewer compilations).


def prepare_inputs(cfg: model_lib.ModelConfig, prompts: Sequence[Sequence[int]], *,
                   max_new_tokens: int, num_pauses: int, pause_id: int, max_len: int | None,
                   vocab_size: int | None = None, bos_id: int | None = 0, num_sinks: int = 0,
                   window: int = 0, prefix_lm: bool = False):
  """Validates a request; returns (rows = prompt + pauses, padded inputs BxS, lengths B).

  Raises UsageError for any bad setting, or for a prompt that does not start with `bos_id`
  (None: no check); `generate` calls it, and a CLI can call it early. With `window` > 0
  (streaming) `max_len` is not used and may be None.
  """
  if isinstance(prompts, (str, bytes)) or not prompts:
    raise UsageError.setting("prompts", prompts, "a non-empty list of token-id lists")
  if not _is_int(max_new_tokens) or max_new_tokens < 1:
    raise UsageError.setting("max_new_tokens", max_new_tokens, "an integer >= 1")
  streaming = window != 0
  if streaming:
    stream.check_settings(num_sinks, window, cfg.max_len)
    if prefix_lm:
      raise UsageError.setting("prefix_lm", prefix_lm, "False with a streaming cache (window > 0):"
                               " it feeds the prompt token by token, causally")
  elif num_sinks != 0:
    raise UsageError.setting("num_sinks", num_sinks, "0 with window=0 (the dense cache); give "
                             "window >= 1 to stream")
  elif not _is_int(max_len) or max_len < 1 or (cfg.max_len is not None
                                               and max_len > cfg.max_len):
    limit = "" if cfg.max_len is None else f" and <= model.max_len={cfg.max_len}"
    raise UsageError.setting("max_len", max_len, f"an integer >= 1{limit}")
  if not _is_int(pause_id) or not 0 <= pause_id < cfg.vocab_size:
    raise UsageError.setting("pause_id", pause_id, f"an id in [0, {cfg.vocab_size})")
  if vocab_size is not None and (not _is_int(vocab_size) or not 0 < vocab_size <= cfg.vocab_size):
    raise UsageError.setting("vocab_size", vocab_size, f"an integer in [1, {cfg.vocab_size}]")
  if bos_id is not None and (not _is_int(bos_id) or not 0 <= bos_id < cfg.vocab_size):
    raise UsageError.setting("bos_id", bos_id, f"an id in [0, {cfg.vocab_size}) or None")
  rows = with_pauses(prompts, num_pauses, pause_id)
  for i, (prompt, row) in enumerate(zip(prompts, rows)):
    if not row:
      raise UsageError.setting(f"prompts[{i}]", [], "non-empty when num_pauses=0")
    if min(row) < 0 or max(row) >= cfg.vocab_size:
      raise UsageError.setting(f"prompts[{i}]", list(prompt), f"ids in [0, {cfg.vocab_size})")
    if bos_id is not None and (not prompt or prompt[0] != bos_id):
      first = f"starts with {prompt[0]}" if prompt else "is empty"
      raise UsageError(
          f"prompts[{i}] {first}: every prompt must start with the BOS id {bos_id}, as every "
          f"training sequence does (or pass bos_id=None)")
    # The last new token is never fed back: it needs no position.
    if not streaming and len(row) + max_new_tokens - 1 > max_len:
      raise UsageError(
          f"max_len={max_len} is too small for prompts[{i}]: {len(prompt)} tokens + "
          f"num_pauses={num_pauses} + max_new_tokens={max_new_tokens} - 1 (the last new token is "
          f"never fed back) = {len(row) + max_new_tokens - 1}; raise max_len or shorten the "
          f"request")
  if streaming:
    max_len = -(-max(map(len, rows)) // _STREAM_BLOCK) * _STREAM_BLOCK
  inputs_BxS = np.zeros((len(rows), max_len), np.int32)  # Right padding (never attended to).
  for b, row in enumerate(rows):
    inputs_BxS[b, :len(row)] = row
  lengths_B = np.array([len(row) for row in rows], np.int32)
  return rows, inputs_BxS, lengths_B


def _run(loop, model, prompts, *, max_new_tokens, num_pauses, pause_id, eos_id, temperature,
         top_k, top_p, seed, max_len, vocab_size, prefix_lm, bos_id, num_sinks=0,
         window=0, backspace_id=None, max_backspaces=0) -> Generation:
  sampler = Sampler(temperature, top_k, top_p)
  extra = {}
  if backspace_id is not None:
    if not _is_int(backspace_id) or not 0 <= backspace_id < model.cfg.vocab_size:
      raise UsageError.setting("backspace_id", backspace_id, f"the <backspace> id, in [0, "
                               f"{model.cfg.vocab_size}): this model has no such embedding row")
    if not _is_int(max_backspaces) or max_backspaces < 0:
      raise UsageError.setting("max_backspaces", max_backspaces, "an integer >= 0")
    if window:
      raise UsageError.setting("max_backspaces", max_backspaces, "unset with a streaming cache "
                               "(window > 0): backspace decoding uses the dense cache")
    extra = dict(backspace_id=np.int32(backspace_id), max_backspaces=int(max_backspaces))
  elif max_backspaces:
    raise UsageError.setting("max_backspaces", max_backspaces, "0 without a backspace_id")
  rows, inputs_BxS, lengths_B = prepare_inputs(
      model.cfg, prompts, max_new_tokens=max_new_tokens, num_pauses=num_pauses, pause_id=pause_id,
      max_len=max_len, vocab_size=vocab_size, bos_id=bos_id, num_sinks=num_sinks, window=window,
      prefix_lm=prefix_lm)
  if window:
    loop = functools.partial(_generate_streaming, num_sinks=num_sinks, window=window)
  if eos_id is not None and not _is_int(eos_id):
    raise UsageError.setting("eos_id", eos_id, "an integer id or None (never stop early)")
  eos = _NOT_GENERATED if eos_id is None else int(eos_id)  # Sampled ids are never negative.
  graphdef, state = nnx.split(model)
  out_BxN = loop(graphdef, state, inputs_BxS, lengths_B, jax.random.key(seed),
                 np.int32(eos), np.int32(vocab_size or model.cfg.vocab_size),
                 max_new_tokens=max_new_tokens, sampler=sampler, prefix_lm=bool(prefix_lm),
                 **extra)
  tokens, raw_tokens, stopped, deletions = [], [], [], []
  for row in np.asarray(out_BxN).tolist():
    raw = row[:row.index(_NOT_GENERATED)] if _NOT_GENERATED in row else row
    final = raw if backspace_id is None else backspace.final_tokens(raw, backspace_id)
    deletions.append(raw.count(backspace_id))
    tokens.append([t for t in final if t != pause_id and t != eos])
    raw_tokens.append(raw)
    stopped.append(bool(raw) and raw[-1] == eos)
  return Generation(tokens=tokens, raw_tokens=raw_tokens, stopped_at_eos=stopped, inputs=rows,
                    num_backspaces=None if backspace_id is None else deletions)


def generate(model: model_lib.Decoder, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             num_pauses: int, pause_id: int, eos_id: int | None, max_len: int | None = None,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             vocab_size: int | None = None, prefix_lm: bool = False,
             bos_id: int | None = 0, num_sinks: int = 0, window: int = 0,
             backspace_id: int | None = None, max_backspaces: int = 0) -> Generation:
  """Decodes a batch of prompts (token-id lists) with a KV cache.

  Args:
    model: the decoder (its parameters are read, never changed).
    prompts: one token-id list per row, each starting with `bos_id`; lengths may differ.
    max_new_tokens: sampling steps after the pauses (model-emitted pauses count, see above).
    num_pauses: `<pause>` ids appended to every prompt (M_inf); 0 = plain decoding.
    pause_id, eos_id: special ids; `eos_id=None` never stops early. EOS is not returned.
    max_len: dense cache slots per row; needs len(prompt) + num_pauses + max_new_tokens - 1 <=
      max_len (the last new token is never fed back). Not used when streaming.
    temperature, top_k, top_p, seed: see `Sampler`; temperature 0 is greedy.
    vocab_size: ids >= vocab_size are never sampled (None: every embedding row may be).
    prefix_lm: the prompt and its pauses attend to each other both ways (a model fine-tuned
      with `prefix_lm=True`); generated tokens stay causal.
    bos_id: the id every prompt must start with (the run's start id: 0, seqio's shifted-in pad
      id, unless the run starts with `<sink>`); None: prompts are not checked.
    num_sinks, window: with window > 0, decode with the streaming cache (`pausejax.stream`) of
      num_sinks sink slots and window recent ones (0 <= num_sinks <= window): prompt + answer
      may be any length. window=0 (default): the dense cache of max_len slots.
    backspace_id, max_backspaces: `<backspace>` moves, at most max_backspaces per answer (see
      above); backspace_id=None: the id is an ordinary token.

  Raises:
    UsageError: a bad setting, a prompt without BOS, or a prompt that does not fit in max_len.
  """
  return _run(_generate_cached, model, prompts, max_new_tokens=max_new_tokens,
              num_pauses=num_pauses, pause_id=pause_id, eos_id=eos_id, temperature=temperature,
              top_k=top_k, top_p=top_p, seed=seed, max_len=max_len, vocab_size=vocab_size,
              prefix_lm=prefix_lm, bos_id=bos_id, num_sinks=num_sinks, window=window,
              backspace_id=backspace_id, max_backspaces=max_backspaces)


def generate_without_cache(model: model_lib.Decoder, prompts: Sequence[Sequence[int]], *,
                           max_new_tokens: int, num_pauses: int, pause_id: int,
                           eos_id: int | None, max_len: int, temperature: float = 0.0,
                           top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                           vocab_size: int | None = None, prefix_lm: bool = False,
                           bos_id: int | None = 0) -> Generation:
  """`generate` without a cache: the full model over the [B, max_len] buffer at every step."""
  return _run(_generate_uncached, model, prompts, max_new_tokens=max_new_tokens,
              num_pauses=num_pauses, pause_id=pause_id, eos_id=eos_id, temperature=temperature,
              top_k=top_k, top_p=top_p, seed=seed, max_len=max_len, vocab_size=vocab_size,
              prefix_lm=prefix_lm, bos_id=bos_id)


def model_from_params(model_cfg: model_lib.ModelConfig, params: Any) -> model_lib.Decoder:
  """A Decoder holding `params`, the pure dict of a train state (`state["params"]`)."""
  abstract = nnx.eval_shape(lambda: model_lib.Decoder(model_cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------------------------
# Benchmark.

def benchmark(model_cfg: model_lib.ModelConfig, *, pause_id: int, batch_size: int = 8,
              prompt_len: int = 32, num_pauses: int = 10, max_new_tokens: int = 64,
              repeats: int = 3, seed: int = 0) -> dict[str, float]:
  """Greedy decode speed with the KV cache vs recomputing the prefix; prints and returns it.

  A randomly initialised model of `model_cfg` decodes `batch_size` random prompts of
  `prompt_len` tokens (BOS first) + `num_pauses` pauses for exactly `max_new_tokens` steps (no
  EOS), with max_len = prompt_len + num_pauses + max_new_tokens. Tokens/s = batch_size *
  max_new_tokens / the wall time of one whole `generate` call (prefill included), averaged over
  `repeats` calls after one compiling call.
  """
  model = model_lib.Decoder(model_cfg, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  prompts = [[0] + row for row in rng.integers(0, pause_id, (batch_size, prompt_len - 1)).tolist()]
  max_len = prompt_len + num_pauses + max_new_tokens
  kwargs = dict(max_new_tokens=max_new_tokens, num_pauses=num_pauses, pause_id=pause_id,
                eos_id=None, max_len=max_len)
  results: dict[str, float] = {"decode_batch_size": batch_size, "decode_max_len": max_len}
  for name, fn in (("cache", generate), ("no_cache", generate_without_cache)):
    fn(model, prompts, **kwargs)  # Compile.
    start = time.perf_counter()
    for _ in range(repeats):
      fn(model, prompts, **kwargs)
    seconds = (time.perf_counter() - start) / repeats
    results[f"decode_tokens_per_sec_{name}"] = batch_size * max_new_tokens / seconds
  results["decode_cache_speedup"] = (results["decode_tokens_per_sec_cache"]
                                     / results["decode_tokens_per_sec_no_cache"])
  print(f"decode, KV cache   {results['decode_tokens_per_sec_cache']:,.0f} tokens/s "
        f"(batch {batch_size}, {prompt_len} + {num_pauses} pauses + {max_new_tokens} new)")
  print(f"decode, no cache   {results['decode_tokens_per_sec_no_cache']:,.0f} tokens/s "
        f"({results['decode_cache_speedup']:.1f}x slower)")
  return results
