"""Streaming KV cache with attention sinks (StreamingLLM, Xiao et al. 2023).

    cache = stream.init(model, batch_size=2, num_sinks=4, window=252)
    logits_BxV, cache = stream.step(model, tokens_B, cache)     # Any number of times.
    nll = stream.stream_nll(model, tokens_BxN, num_sinks=4, window=252)  # Bx(N-1), float32.

The cache keeps the first `num_sinks` tokens of every row's stream (the attention sinks, never
evicted) in fixed slots 0 .. num_sinks - 1, and the `window` most recent tokens in a ring buffer
of slots num_sinks .. num_sinks + window - 1: token t >= num_sinks lives in ring slot
(t - num_sinks) mod window and simply overwrites the oldest one, so eviction moves no data.
Memory is C = num_sinks + window slots per row and layer, however long the stream. Rows are
independent streams (each has its own length), so batches of any size work, and every step has
the same shapes: one compiled step serves a whole stream.

Positions are those inside the cache, not in the text. A step feeds one token per row; it
attends to the row's cached tokens plus itself. The cached tokens, in stream order (sinks, then
the window from oldest to newest), take positions 0, 1, ..., and the new token the next one,
min(tokens fed, C). So a cache holding tokens [0, 1, 2, 3, 6, 7, 8] (num_sinks=4, window=3)
attends with positions 0..6 and token 9 is read at position 7, as in the reference code, whose
cache holds num_sinks + window tokens between steps. Then the new token is written into the
cache, evicting the oldest window token once the cache is full. While the stream fits (at most C
tokens cached) nothing is evicted and a step computes what the dense cache
(`Decoder.prefill`/`decode_step`) and the full forward pass compute, up to float rounding.

RoPE: keys are cached *before* rotation and every step rotates all C cached keys with their
current cache positions (the reference's way; the alternative, rotating the window keys back by
one position after each eviction, would need the same per-step work and accumulate rounding).
The cost is one elementwise rotation of the C x H x K keys per layer and step, about as much
work as the query-key scores themselves (the MLP and projections still dominate for caches of a
few hundred slots). In exchange positions never exceed C, so the rotation is as accurate as in
training however long the stream. Queries and the new key are rotated at the new token's
position.

`model.zero_sink` (SoftMax1) applies here too: `Attention.attend` prepends the zero key/value.

`stream_nll` scores a stream with the paper's protocol (feed one token, take the NLL of the next,
evict) inside a jitted `lax.scan` over chunks of tokens, so Python runs once per chunk;
`scan_nll` does the same with the dense `KVCache`, and `recompute_nll` is the paper's oracle, a
fresh forward pass over the last tokens for every token. `prefill` feeds right-padded prompts
token by token (decoding with this cache: `pausejax.decode.generate(..., window=W)`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from pausejax import model as model_lib
from pausejax.errors import UsageError


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StreamCache:
  """Sink slots plus a ring buffer per row and layer; a pytree with static sizes."""
  # One BxCxHxK array per layer, keys before RoPE; with scan_layers one NxBxCxHxK array.
  keys: tuple[jax.Array, ...] | jax.Array
  values: tuple[jax.Array, ...] | jax.Array
  lengths_B: jax.Array  # int32: tokens fed so far (the stream index of each row's next token).
  num_sinks: int = dataclasses.field(metadata=dict(static=True))
  window: int = dataclasses.field(metadata=dict(static=True))

  @property
  def slots(self) -> int:
    return self.num_sinks + self.window


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_sizes(num_sinks: Any, window: Any, max_len: int | None, prefix: str) -> None:
  if not _is_int(window) or window < 1:
    raise UsageError.setting(f"{prefix}window", window, "an integer >= 1 (recent tokens kept)")
  if not _is_int(num_sinks) or num_sinks < 0:
    raise UsageError.setting(f"{prefix}num_sinks", num_sinks,
                             "an integer >= 0 (first tokens kept)")
  if max_len is not None and num_sinks + window >= max_len:
    raise UsageError.setting(f"{prefix}window", window,
                             f"num_sinks + window < model.max_len={max_len}")


def check_settings(num_sinks: Any, window: Any, max_len: int | None = None,
                   prefix: str = "") -> None:
  """UsageError (one line, naming the setting) unless the sizes make a streaming setting.

  window >= 1, 0 <= num_sinks <= window (a few sinks and a long window, as in the paper; `init`
  itself also takes more sinks, as in the 4 + 3 example above), and with the model's `max_len`
  the query position, up to num_sinks + window, below it. `prefix` goes before the names ("--"
  for flags).
  """
  _check_sizes(num_sinks, window, max_len, prefix)
  if num_sinks > window:
    raise UsageError.setting(f"{prefix}num_sinks", num_sinks,
                             f"at most {prefix}window={window}")


def init(model: model_lib.Decoder, batch_size: int, num_sinks: int,
         window: int) -> StreamCache:
  """An empty streaming cache: `num_sinks` + `window` slots per row and layer."""
  cfg = model.cfg
  _check_sizes(num_sinks, window, cfg.max_len, "")
  shape = (batch_size, num_sinks + window, cfg.num_heads, cfg.head_dim)
  if cfg.scan_layers:
    zeros = lambda: jnp.zeros((cfg.num_layers, *shape), cfg.dtype)
  else:
    zeros = lambda: tuple(jnp.zeros(shape, cfg.dtype) for _ in range(cfg.num_layers))
  return StreamCache(keys=zeros(), values=zeros(),
                     lengths_B=jnp.zeros((batch_size,), jnp.int32),
                     num_sinks=num_sinks, window=window)


def cache_bytes(cache: Any) -> int:
  """Bytes held by a cache (StreamCache or the dense KVCache): fixed by its shapes."""
  return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape))
                 for x in jax.tree.leaves(cache)))


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Where everything is for one step: the same for every layer."""
  positions_BxC: jax.Array  # Cache position of each slot's token (stream order).
  valid_BxC: jax.Array      # Whether the slot holds a token.
  query_B: jax.Array        # The new token's position: the number of cached tokens.
  write_B: jax.Array        # The slot the new token goes to.


def _layout(lengths_B: jax.Array, num_sinks: int, window: int) -> _Layout:
  slot_C = jnp.arange(num_sinks + window)
  is_sink_C = slot_C < num_sinks
  # The oldest token still in the window; ring slot num_sinks + r holds the token t with
  # t = num_sinks + r (mod window), i.e. oldest + age, age = (slot - oldest) mod window.
  oldest_B = jnp.maximum(num_sinks, lengths_B - window)
  age_BxC = (slot_C[None] - oldest_B[:, None]) % window
  token_BxC = jnp.where(is_sink_C, slot_C, oldest_B[:, None] + age_BxC)
  return _Layout(
      positions_BxC=jnp.where(is_sink_C, slot_C, num_sinks + age_BxC),
      valid_BxC=token_BxC < lengths_B[:, None],
      query_B=jnp.minimum(lengths_B, num_sinks + window),
      write_B=jnp.where(lengths_B < num_sinks, lengths_B,
                        num_sinks + (lengths_B - num_sinks) % window))


def _block_step(block: model_lib.Block, x_Bx1xD, keys_BxCxHxK, values_BxCxHxK, layout: _Layout):
  """One block for one new token per row: (x, the token's unrotated key BxHxK, value BxHxK)."""
  theta = block.cfg.rope_theta
  q_Bx1xHxK, k_Bx1xHxK, v_Bx1xHxK = block.attn.qkv(block.attn_norm(x_Bx1xD))
  query_Bx1 = layout.query_B[:, None]
  cached_BxCxHxK = model_lib.apply_rope(keys_BxCxHxK, layout.positions_BxC, theta)
  k_BxSxHxK = jnp.concatenate(
      [cached_BxCxHxK, model_lib.apply_rope(k_Bx1xHxK, query_Bx1, theta)], axis=1)
  v_BxSxHxK = jnp.concatenate([values_BxCxHxK, v_Bx1xHxK.astype(values_BxCxHxK.dtype)], axis=1)
  batch = x_Bx1xD.shape[0]
  mask_BxS = jnp.concatenate([layout.valid_BxC, jnp.ones((batch, 1), bool)], axis=1)
  x_Bx1xD = x_Bx1xD + block.attn.attend(model_lib.apply_rope(q_Bx1xHxK, query_Bx1, theta),
                                        k_BxSxHxK, v_BxSxHxK, mask_BxS[:, None, None, :])
  x_Bx1xD = x_Bx1xD + block.mlp(block.mlp_norm(x_Bx1xD))
  return x_Bx1xD, k_Bx1xHxK[:, 0], v_Bx1xHxK[:, 0]


def _write(cache, new_BxHxK, slot_B, active_B, layer=()):
  """`new` into each active row's slot (of layer `layer` of an NxBxCxHxK cache, if given);
  inactive rows keep what they had. A scatter of B slots: nothing else is copied."""
  index = (*layer, jnp.arange(new_BxHxK.shape[0]), slot_B)
  new_BxHxK = jnp.where(active_B[:, None, None], new_BxHxK.astype(cache.dtype), cache[index])
  return cache.at[index].set(new_BxHxK)


def step(model: model_lib.Decoder, tokens_B: jax.Array, cache: StreamCache,
         active_B: jax.Array | None = None):
  """Feeds one token per row: (next-token logits BxV, StreamCache).

  Rows where `active_B` is False (None: all rows active) neither write nor advance; their
  logits are meaningless. Traceable: jit it, or run it inside a loop.
  """
  if active_B is None:
    active_B = jnp.ones(tokens_B.shape, bool)
  layout = _layout(cache.lengths_B, cache.num_sinks, cache.window)
  x_Bx1xD = model._embed(tokens_B[:, None])  # pylint: disable=protected-access
  write = functools.partial(_write, slot_B=layout.write_B, active_B=active_B)
  if model.cfg.scan_layers:  # The whole cache is carried, read and written layer by layer.
    graphdef, state = nnx.split(model.blocks)

    def body(carry, layer):
      x_Bx1xD, keys, values = carry
      block_state, index = layer
      x_Bx1xD, k_BxHxK, v_BxHxK = _block_step(
          nnx.merge(graphdef, block_state), x_Bx1xD, keys[index], values[index], layout)
      keys, values = write(keys, k_BxHxK, layer=(index,)), write(values, v_BxHxK, layer=(index,))
      return (x_Bx1xD, keys, values), None

    (x_Bx1xD, keys, values), _ = jax.lax.scan(
        body, (x_Bx1xD, cache.keys, cache.values), (state, jnp.arange(model.cfg.num_layers)))
  else:
    keys, values = [], []
    for block, k_BxCxHxK, v_BxCxHxK in zip(model.blocks, cache.keys, cache.values):
      x_Bx1xD, k_BxHxK, v_BxHxK = _block_step(block, x_Bx1xD, k_BxCxHxK, v_BxCxHxK, layout)
      keys.append(write(k_BxCxHxK, k_BxHxK))
      values.append(write(v_BxCxHxK, v_BxHxK))
    keys, values = tuple(keys), tuple(values)
  cache = dataclasses.replace(cache, keys=keys, values=values,
                              lengths_B=cache.lengths_B + active_B.astype(jnp.int32))
  return model._logits(x_Bx1xD)[:, 0], cache  # pylint: disable=protected-access


def prefill(model: model_lib.Decoder, tokens_BxL: jax.Array, lengths_B: jax.Array,
            num_sinks: int, window: int):
  """Feeds right-padded prompts token by token: (logits BxV after each prompt, StreamCache).

  Row b's prompt is tokens_BxL[b, :lengths_B[b]] (lengths >= 1), of any length: a prompt longer
  than the cache streams through it. Traceable (a lax.scan over the L columns).
  """
  batch, _ = tokens_BxL.shape
  cache = init(model, batch, num_sinks, window)

  def body(carry, column):
    logits_BxV, cache = carry
    index, tokens_B = column
    active_B = index < lengths_B
    new_BxV, cache = step(model, tokens_B, cache, active_B)
    return (jnp.where((index == lengths_B - 1)[:, None], new_BxV, logits_BxV), cache), None

  logits_BxV = jnp.zeros((batch, model.cfg.vocab_size), jnp.float32)
  columns = (jnp.arange(tokens_BxL.shape[1]), jnp.asarray(tokens_BxL).T)
  return jax.lax.scan(body, (logits_BxV, cache), columns)[0]


# ----------------------------------------------------------------------------------------------
# Scoring a stream: the NLL of every next token, one token at a time.

def _next_token_nll(logits_BxV: jax.Array, targets_B: jax.Array) -> jax.Array:
  logits_BxV = logits_BxV.astype(jnp.float32)
  target_B = jnp.take_along_axis(logits_BxV, targets_B[:, None], axis=-1)[:, 0]
  return jax.nn.logsumexp(logits_BxV, axis=-1) - target_B


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _nll_chunk(graphdef, state, cache, tokens_BxT, targets_BxT):
  """Feeds T tokens per row through `cache`: (cache, NLL of each next token BxT)."""
  model = nnx.merge(graphdef, state)
  if isinstance(cache, StreamCache):
    advance = functools.partial(step, model)
  else:  # The dense KVCache.
    advance = model.decode_step

  def body(cache, column):
    tokens_B, targets_B = column
    logits_BxV, cache = advance(tokens_B, cache)
    return cache, _next_token_nll(logits_BxV, targets_B)

  cache, nll_TxB = jax.lax.scan(body, cache, (tokens_BxT.T, targets_BxT.T))
  return cache, nll_TxB.T


def scan_nll(model: model_lib.Decoder, tokens_BxN, cache, *, chunk: int = 256,
             progress: Callable[[int, int], None] | None = None) -> np.ndarray:
  """NLL of tokens 1..N-1 of every row, each read after the ones before it: float32 Bx(N-1).

  `cache` is an empty `StreamCache` or dense `KVCache` (which must hold N - 1 tokens). Tokens go
  in `chunk` at a time through one compiled scan; `progress(done, total)` is called after each
  chunk with the tokens scored so far per row.
  """
  tokens_BxN = np.asarray(tokens_BxN, np.int32)
  if tokens_BxN.ndim != 2 or tokens_BxN.shape[1] < 2:
    raise UsageError.setting("tokens", tokens_BxN.shape, "a B x N array with N >= 2")
  if not _is_int(chunk) or chunk < 1:
    raise UsageError.setting("chunk", chunk, "an integer >= 1")
  total = tokens_BxN.shape[1] - 1
  chunk = min(chunk, total)
  padded = -(-total // chunk) * chunk  # Fixed shapes: the last chunk is padded, then dropped.
  inputs_BxP = np.zeros((tokens_BxN.shape[0], padded), np.int32)
  targets_BxP = np.zeros_like(inputs_BxP)
  inputs_BxP[:, :total], targets_BxP[:, :total] = tokens_BxN[:, :-1], tokens_BxN[:, 1:]
  graphdef, state = nnx.split(model)
  pieces = []
  for start in range(0, padded, chunk):
    cache, nll_BxT = _nll_chunk(graphdef, state, cache, inputs_BxP[:, start:start + chunk],
                                targets_BxP[:, start:start + chunk])
    pieces.append(np.asarray(nll_BxT))  # Waits for the chunk: progress is real progress.
    if progress is not None:
      progress(min(start + chunk, total), total)
  return np.concatenate(pieces, axis=1)[:, :total]


def stream_nll(model: model_lib.Decoder, tokens_BxN, num_sinks: int, window: int, *,
               chunk: int = 256,
               progress: Callable[[int, int], None] | None = None) -> np.ndarray:
  """`scan_nll` through a streaming cache of num_sinks + window slots (any N)."""
  batch = np.shape(tokens_BxN)[0]
  return scan_nll(model, tokens_BxN, init(model, batch, num_sinks, window), chunk=chunk,
                  progress=progress)


# ----------------------------------------------------------------------------------------------
# The oracle: sliding window with re-computation (no cache).

@functools.partial(jax.jit, static_argnames=("graphdef",))
def _prefix_nll(graphdef, state, tokens_BxT, targets_BxT):
  logits_BxTxV = nnx.merge(graphdef, state)(tokens_BxT).astype(jnp.float32)
  target_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits_BxTxV, axis=-1) - target_BxT


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _last_position_nll(graphdef, state, windows_BxT, targets_B):
  """A fresh forward pass over each window; the NLL of the token after its last one."""
  model = nnx.merge(graphdef, state)
  batch, length = windows_BxT.shape
  positions_BxT = jnp.broadcast_to(jnp.arange(length), (batch, length))
  # pylint: disable=protected-access
  x_BxTxD = model._run_blocks(model._embed(windows_BxT), positions_BxT, None)
  return _next_token_nll(model._logits(x_BxTxD[:, -1:])[:, 0], targets_B)  # Only the last one.


def recompute_nll(model: model_lib.Decoder, tokens_BxN, span: int, *, batch_size: int = 16,
                  progress: Callable[[int, int], None] | None = None) -> np.ndarray:
  """NLL of tokens 1..N-1 of every row, each from a fresh forward pass over the `span` tokens
  up to the one before it (positions 0 .. span - 1): float32 Bx(N-1).

  StreamingLLM's "sliding window with re-computation" baseline, the oracle that a cache of
  span - 1 slots approximates (its query sees span - 1 cached tokens and itself). `batch_size`
  windows go through the model per call; `progress(done, total)` as in `scan_nll`.
  """
  tokens_BxN = np.asarray(tokens_BxN, np.int32)
  if tokens_BxN.ndim != 2 or tokens_BxN.shape[1] < 2:
    raise UsageError.setting("tokens", tokens_BxN.shape, "a B x N array with N >= 2")
  if not _is_int(span) or span < 1:
    raise UsageError.setting("span", span, "an integer >= 1")
  rows, total = tokens_BxN.shape[0], tokens_BxN.shape[1] - 1
  span = min(span, total)
  graphdef, state = nnx.split(model)
  # The first `span` predictions see the whole prefix: one causal pass gives them all.
  nll_BxM = np.zeros((rows, total), np.float32)
  nll_BxM[:, :span] = _prefix_nll(graphdef, state, tokens_BxN[:, :span],
                                  tokens_BxN[:, 1:span + 1])
  if progress is not None:
    progress(span, total)
  # Every later one, t, reads tokens t - span + 1 .. t; `batch_size` windows per call.
  row_P, last_P = np.divmod(np.arange(rows * (total - span)), max(total - span, 1))
  last_P += span
  offsets_T = np.arange(-span + 1, 1)
  for start in range(0, len(row_P), batch_size):
    index = np.arange(start, start + batch_size).clip(max=len(row_P) - 1)  # Fixed shapes.
    r_B, t_B = row_P[index], last_P[index]
    nll_B = _last_position_nll(graphdef, state, tokens_BxN[r_B[:, None], t_B[:, None] + offsets_T],
                               tokens_BxN[r_B, t_B + 1])
    done = min(start + batch_size, len(row_P))
    nll_BxM[r_B[:done - start], t_B[:done - start]] = np.asarray(nll_B)[:done - start]
    if progress is not None:
      progress(span + done // rows, total)
  return nll_BxM
