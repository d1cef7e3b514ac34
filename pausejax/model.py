"""Decoder-only transformer in Flax NNX.

Token embedding -> `num_layers` pre-norm blocks (RMSNorm -> causal self-attention with RoPE ->
residual; RMSNorm -> SwiGLU MLP -> residual) -> final RMSNorm -> output projection (the embedding
table itself when `tied_embeddings`, else a separate unembedding). Logits are float32.

Shape suffixes: B batch, L sequence length, D d_model, H heads, K head_dim, R = K/2 rotary
frequencies, F mlp_dim, V vocab_size (embedding rows).

Precision: parameters are stored in `param_dtype` and cast to the compute `dtype` for every matmul;
RMSNorm statistics, RoPE rotation, attention softmax and the logits are float32.

Packing: with `segment_ids_BxL` a token attends only to earlier-or-same tokens of its own segment;
`positions_BxL` (reset to 0 at each segment start) feed RoPE, so a packed segment computes exactly
what it would alone. Segment id 0 marks padding; padding only sees padding.

Initialisation: every kernel is truncated normal with variance 1/fan_in (fan_in = the contracted
input dims). The two projections that write into the residual stream (attention output, MLP
down) get a further 1/(2 * num_layers) variance factor, so the 2 * num_layers residual updates
add up to O(1) variance whatever the depth (GPT-2 style). The embedding uses fan_in = d_model,
which gives logits of order 1 when it is tied. RMSNorm scales start at 1.

Sharding: every parameter carries logical axis names as the `out_sharding` metadata of its
`nnx.Param` ('vocab', 'embed', 'heads', 'kv', 'mlp', 'norm'; see the shapes below). The params are
created with `eager_sharding=False`, so building a model needs no mesh (flax's default would
demand one). To place a model on a mesh, map the names to mesh axes:

  with nnx.logical_axis_rules(rules):        # e.g. (('embed', 'fsdp'), ('mlp', 'tensor'), ...)
    shardings = nnx.get_named_sharding(abstract_state(cfg), mesh)

and create the state under `jax.jit(..., out_shardings=shardings)`. Without rules,
`nnx.get_partition_spec` returns the logical names themselves. Every logical name must appear in
the rules (map it to None to replicate): an unmapped name is passed through as a mesh axis name.
`nnx.Optimizer` copies the metadata, so optimizer state gets the same names.

KV cache (decoding): `Decoder.prefill(tokens_BxL, lengths_B, max_len)` runs a right-padded batch
of prompts once and returns the next-token logits after each prompt plus a `KVCache` of `max_len`
slots; `Decoder.decode_step(tokens_B, cache)` appends one token per row and returns the logits for
the next one. The cache is an explicit pytree (arrays in, arrays out), so both jit with fixed
shapes: one compiled prefill and one compiled step serve every prompt length up to `max_len`.
Row b's token at position p lives in slot p; a query at position p sees slots <= p, so slots beyond
a row's length (padding, stale values) are never read. Keys are cached after RoPE.

Extension points: `Attention.__call__` takes positions and an explicit boolean mask built from
token indices (not `is_causal`, which assumes square, aligned query/key blocks); the cache path
`Attention.cached` reuses the same projections with a mask over cache slots. Blocks are identical
modules with a (x, positions, mask) -> x interface, ready for `nnx.scan` over stacked layers
(`nnx.PARTITION_NAME: 'layers'` adds the stacked axis to the names) and for `nnx.remat`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections

from pausejax.errors import UsageError

_DTYPES = ('float32', 'bfloat16', 'float16')
_POSITIVE_INTS = ('num_layers', 'd_model', 'num_heads', 'head_dim', 'mlp_dim')


def _to_dtype(name: str, value: Any) -> jnp.dtype:
  try:
    dtype = jnp.dtype(value)
  except (TypeError, ValueError):
    dtype = None
  if dtype is None or dtype.name not in _DTYPES:
    raise UsageError.setting(name, value, f"one of {', '.join(_DTYPES)}")
  return dtype


def _is_positive_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_positive_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Model hyper-parameters. `vocab_size` is the number of embedding rows (already padded)."""
  vocab_size: int
  num_layers: int
  d_model: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  tied_embeddings: bool
  dtype: Any = 'float32'  # Compute dtype; normalised to a jnp.dtype.
  param_dtype: Any = 'float32'
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  max_len: int | None = None  # Longest sequence accepted (None: no limit; RoPE has none).
  attention: str = 'xla'  # jax.nn.dot_product_attention implementation: 'xla' or 'cudnn' (GPU).

  def __post_init__(self):
    if not _is_positive_int(self.vocab_size):
      raise UsageError.setting('vocab_size', self.vocab_size, 'a positive integer')
    for field in _POSITIVE_INTS:
      if not _is_positive_int(getattr(self, field)):
        raise UsageError.setting(f'model.{field}', getattr(self, field), 'a positive integer')
    if self.head_dim % 2:
      raise UsageError.setting('model.head_dim', self.head_dim,
                               'an even integer (RoPE rotates pairs)')
    if not isinstance(self.tied_embeddings, bool):
      raise UsageError.setting('model.tied_embeddings', self.tied_embeddings, 'True or False')
    if not _is_positive_number(self.rope_theta):
      raise UsageError.setting('model.rope_theta', self.rope_theta, 'a positive number')
    if not _is_positive_number(self.norm_eps):
      raise UsageError.setting('model.norm_eps', self.norm_eps, 'a positive number')
    if self.max_len is not None and not _is_positive_int(self.max_len):
      raise UsageError.setting('model.max_len', self.max_len, 'a positive integer or None')
    # Frozen dataclass: normalise dtypes once so every module can use them directly.
    object.__setattr__(self, 'dtype', _to_dtype('model.dtype', self.dtype))
    object.__setattr__(self, 'param_dtype', _to_dtype('model.param_dtype', self.param_dtype))
    if self.attention not in ('xla', 'cudnn'):
      raise UsageError.setting('model.attention', self.attention,
                               "'xla' (any device) or 'cudnn' (NVIDIA GPU flash attention)")
    if self.attention == 'cudnn' and self.dtype == jnp.float32:
      raise UsageError.setting('model.attention', self.attention,
                               "'xla' with model.dtype=float32; cudnn needs bfloat16 or float16")

  @classmethod
  def from_config(cls, cfg_model: ml_collections.ConfigDict, vocab_size: int) -> ModelConfig:
    """Reads the `model.*` section of a run config; optional keys fall back to the defaults."""
    kwargs = {}
    for field in dataclasses.fields(cls):
      if field.name == 'vocab_size':
        continue
      if field.name in cfg_model:
        kwargs[field.name] = cfg_model[field.name]
      elif field.default is dataclasses.MISSING:
        raise UsageError.setting(f'model.{field.name}', None, 'a value is required')
    return cls(vocab_size=vocab_size, **kwargs)


def _param(value: jax.Array, names: tuple[str, ...]) -> nnx.Param:
  """A parameter annotated with logical axis names (no mesh needed at creation)."""
  return nnx.Param(value, out_sharding=names, eager_sharding=False)


def _kernel(rngs: nnx.Rngs, shape, in_axis, out_axis, dtype, scale: float = 1.0) -> jax.Array:
  """Truncated normal with variance `scale / fan_in`."""
  init = nnx.initializers.variance_scaling(
      scale, 'fan_in', 'truncated_normal', in_axis=in_axis, out_axis=out_axis)
  return init(rngs.params(), shape, dtype)


def apply_rope(x_BxLxHxK: jax.Array, positions_BxL: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding (rotate-half form), computed in float32."""
  head_dim = x_BxLxHxK.shape[-1]
  inv_freq_R = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angle_BxLx1xR = positions_BxL[:, :, None, None].astype(jnp.float32) * inv_freq_R
  sin, cos = jnp.sin(angle_BxLx1xR), jnp.cos(angle_BxLx1xR)
  x1, x2 = jnp.split(x_BxLxHxK.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxHxK.dtype)


def attention_mask(length: int, segment_ids_BxL: jax.Array | None) -> jax.Array:
  """Boolean mask (True = may attend): causal, and within one segment when packed."""
  index_L = jnp.arange(length)
  causal_LxL = index_L[:, None] >= index_L[None, :]
  if segment_ids_BxL is None:
    return causal_LxL[None, None]
  same_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  return (causal_LxL[None] & same_BxLxL)[:, None]  # Bx1xLxL: one mask for all heads.


class RMSNorm(nnx.Module):
  """RMSNorm with a learned scale; statistics in float32."""

  def __init__(self, cfg: ModelConfig):
    self.cfg = cfg
    self.scale = _param(jnp.ones((cfg.d_model,), cfg.param_dtype), ('norm',))

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    x_BxLxD = x_BxLxD.astype(jnp.float32)
    rms_BxLx1 = jnp.sqrt(jnp.mean(jnp.square(x_BxLxD), axis=-1, keepdims=True) + self.cfg.norm_eps)
    y_BxLxD = x_BxLxD / rms_BxLx1 * self.scale[...].astype(jnp.float32)
    return y_BxLxD.astype(self.cfg.dtype)


class Attention(nnx.Module):
  """Multi-head causal self-attention with RoPE."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, h, k, pd = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.param_dtype
    qkv = lambda: _param(_kernel(rngs, (d, h, k), 0, (1, 2), pd), ('embed', 'heads', 'kv'))
    self.query, self.key, self.value = qkv(), qkv(), qkv()  # Each DxHxK.
    self.out = _param(  # HxKxD, small init: it writes into the residual stream.
        _kernel(rngs, (h, k, d), (0, 1), 2, pd, scale=1 / (2 * cfg.num_layers)),
        ('heads', 'kv', 'embed'))

  def _project(self, x_BxLxD, positions_BxL):
    """Queries, keys (both rotated) and values."""
    dtype = self.cfg.dtype
    q_BxLxHxK = jnp.einsum('bld,dhk->blhk', x_BxLxD, self.query[...].astype(dtype))
    k_BxLxHxK = jnp.einsum('bld,dhk->blhk', x_BxLxD, self.key[...].astype(dtype))
    v_BxLxHxK = jnp.einsum('bld,dhk->blhk', x_BxLxD, self.value[...].astype(dtype))
    q_BxLxHxK = apply_rope(q_BxLxHxK, positions_BxL, self.cfg.rope_theta)
    k_BxLxHxK = apply_rope(k_BxLxHxK, positions_BxL, self.cfg.rope_theta)
    return q_BxLxHxK, k_BxLxHxK, v_BxLxHxK

  def _attend(self, q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, mask_Bx1xLxS) -> jax.Array:
    # Scale 1/sqrt(K). mask None = plain causal, which fused kernels apply without a mask array.
    impl = None if self.cfg.attention == 'xla' else self.cfg.attention
    o_BxLxHxK = jax.nn.dot_product_attention(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, mask=mask_Bx1xLxS,
                                             is_causal=mask_Bx1xLxS is None, implementation=impl)
    return jnp.einsum('blhk,hkd->bld', o_BxLxHxK, self.out[...].astype(self.cfg.dtype))

  def __call__(self, x_BxLxD, positions_BxL, mask_Bx1xLxL) -> jax.Array:
    q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = self._project(x_BxLxD, positions_BxL)
    return self._attend(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask_Bx1xLxL)

  def cached(self, x_BxLxD, start_B, keys_BxSxHxK, values_BxSxHxK):
    """Attention of L new tokens per row over the cache; returns (output, keys, values).

    Row b's new tokens take positions, and cache slots, start_B[b] + [0, L); each attends to
    every slot up to its own position. The caller keeps start_B + L <= S (a write past the end
    would be clamped onto the last slots).
    """
    length, slots = x_BxLxD.shape[1], keys_BxSxHxK.shape[1]
    positions_BxL = start_B[:, None] + jnp.arange(length)
    q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = self._project(x_BxLxD, positions_BxL)
    # Per-row write offset: vmap turns the slice update into a scatter.
    write = jax.vmap(lambda cache, new, start: jax.lax.dynamic_update_slice_in_dim(
        cache, new.astype(cache.dtype), start, axis=0))
    keys_BxSxHxK = write(keys_BxSxHxK, k_BxLxHxK, start_B)
    values_BxSxHxK = write(values_BxSxHxK, v_BxLxHxK, start_B)
    mask_Bx1xLxS = (jnp.arange(slots)[None, None, :] <= positions_BxL[:, :, None])[:, None]
    out_BxLxD = self._attend(q_BxLxHxK, keys_BxSxHxK, values_BxSxHxK, mask_Bx1xLxS)
    return out_BxLxD, keys_BxSxHxK, values_BxSxHxK


class Mlp(nnx.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, f, pd = cfg.d_model, cfg.mlp_dim, cfg.param_dtype
    self.gate = _param(_kernel(rngs, (d, f), 0, 1, pd), ('embed', 'mlp'))
    self.up = _param(_kernel(rngs, (d, f), 0, 1, pd), ('embed', 'mlp'))
    self.down = _param(_kernel(rngs, (f, d), 0, 1, pd, scale=1 / (2 * cfg.num_layers)),
                       ('mlp', 'embed'))

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    dtype = self.cfg.dtype
    gate_BxLxF = jnp.einsum('bld,df->blf', x_BxLxD, self.gate[...].astype(dtype))
    up_BxLxF = jnp.einsum('bld,df->blf', x_BxLxD, self.up[...].astype(dtype))
    h_BxLxF = jax.nn.silu(gate_BxLxF) * up_BxLxF
    return jnp.einsum('blf,fd->bld', h_BxLxF, self.down[...].astype(dtype))


class Block(nnx.Module):
  """Pre-norm transformer block."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg)
    self.mlp = Mlp(cfg, rngs=rngs)

  def __call__(self, x_BxLxD, positions_BxL, mask_Bx1xLxL) -> jax.Array:
    x_BxLxD = x_BxLxD + self.attn(self.attn_norm(x_BxLxD), positions_BxL, mask_Bx1xLxL)
    return x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD))

  def cached(self, x_BxLxD, start_B, keys_BxSxHxK, values_BxSxHxK):
    """`__call__` over new tokens with a KV cache (see `Attention.cached`)."""
    attn_BxLxD, keys_BxSxHxK, values_BxSxHxK = self.attn.cached(
        self.attn_norm(x_BxLxD), start_B, keys_BxSxHxK, values_BxSxHxK)
    x_BxLxD = x_BxLxD + attn_BxLxD
    return x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD)), keys_BxSxHxK, values_BxSxHxK


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Keys and values of every layer in S slots per row; a pytree, so it jits and loops.

  Row b holds lengths_B[b] tokens, at positions (= slots) 0 .. lengths_B[b] - 1.
  """
  keys: tuple[jax.Array, ...]    # One BxSxHxK array per layer, after RoPE.
  values: tuple[jax.Array, ...]  # One BxSxHxK array per layer.
  lengths_B: jax.Array           # int32.


class Decoder(nnx.Module):
  """The language model: tokens -> float32 next-token logits."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, v, pd = cfg.d_model, cfg.vocab_size, cfg.param_dtype
    self.embed = _param(_kernel(rngs, (v, d), 1, 0, pd), ('vocab', 'embed'))  # VxD.
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg)
    self.unembed = None if cfg.tied_embeddings else _param(  # DxV.
        _kernel(rngs, (d, v), 0, 1, pd), ('embed', 'vocab'))

  def __call__(self, tokens_BxL: jax.Array, segment_ids_BxL: jax.Array | None = None,
               positions_BxL: jax.Array | None = None) -> jax.Array:
    cfg = self.cfg
    batch, length = tokens_BxL.shape
    if cfg.max_len is not None and length > cfg.max_len:
      raise ValueError(f'sequence length {length} exceeds max_len {cfg.max_len}')
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(length), (batch, length))
    mask_Bx1xLxL = None if segment_ids_BxL is None else attention_mask(length, segment_ids_BxL)

    x_BxLxD = self._embed(tokens_BxL)
    for block in self.blocks:
      x_BxLxD = block(x_BxLxD, positions_BxL, mask_Bx1xLxL)
    return self._logits(x_BxLxD)

  def _embed(self, tokens_BxL: jax.Array) -> jax.Array:
    return jnp.take(self.embed[...], tokens_BxL, axis=0).astype(self.cfg.dtype)

  def _logits(self, x_BxLxD: jax.Array) -> jax.Array:
    """Final norm and output projection."""
    dtype = self.cfg.dtype
    x_BxLxD = self.final_norm(x_BxLxD)
    # Accumulate logits in float32: they feed the softmax cross-entropy.
    if self.unembed is None:
      return jnp.einsum('bld,vd->blv', x_BxLxD, self.embed[...].astype(dtype),
                        preferred_element_type=jnp.float32)
    return jnp.einsum('bld,dv->blv', x_BxLxD, self.unembed[...].astype(dtype),
                      preferred_element_type=jnp.float32)

  # --- KV-cache decoding ----------------------------------------------------------------------

  def init_cache(self, batch_size: int, max_len: int) -> KVCache:
    """An empty cache of `max_len` slots per row."""
    cfg = self.cfg
    if cfg.max_len is not None and max_len > cfg.max_len:
      raise ValueError(f'cache length {max_len} exceeds max_len {cfg.max_len}')
    shape = (batch_size, max_len, cfg.num_heads, cfg.head_dim)
    zeros = lambda: tuple(jnp.zeros(shape, cfg.dtype) for _ in range(cfg.num_layers))
    return KVCache(keys=zeros(), values=zeros(), lengths_B=jnp.zeros((batch_size,), jnp.int32))

  def _extend(self, tokens_BxL: jax.Array, cache: KVCache):
    """Runs L new tokens per row after each row's cached ones: (hidden BxLxD, filled cache)."""
    x_BxLxD = self._embed(tokens_BxL)
    keys, values = [], []
    for block, k_BxSxHxK, v_BxSxHxK in zip(self.blocks, cache.keys, cache.values):
      x_BxLxD, k_BxSxHxK, v_BxSxHxK = block.cached(x_BxLxD, cache.lengths_B, k_BxSxHxK, v_BxSxHxK)
      keys.append(k_BxSxHxK)
      values.append(v_BxSxHxK)
    return x_BxLxD, KVCache(tuple(keys), tuple(values), cache.lengths_B)

  def prefill(self, tokens_BxL: jax.Array, lengths_B: jax.Array, max_len: int):
    """Runs right-padded prompts: (next-token logits BxV after each prompt, KVCache).

    Row b's prompt is tokens_BxL[b, :lengths_B[b]] (lengths >= 1, L <= max_len); the tokens
    after it are ignored (they land in slots that the row's later tokens overwrite).
    """
    batch = tokens_BxL.shape[0]
    x_BxLxD, cache = self._extend(tokens_BxL, self.init_cache(batch, max_len))
    last_Bx1xD = jnp.take_along_axis(x_BxLxD, (lengths_B - 1)[:, None, None], axis=1)
    cache = dataclasses.replace(cache, lengths_B=lengths_B.astype(jnp.int32))
    return self._logits(last_Bx1xD)[:, 0], cache

  def decode_step(self, tokens_B: jax.Array, cache: KVCache):
    """Appends one token per row: (next-token logits BxV, KVCache). Needs lengths_B < S."""
    x_Bx1xD, cache = self._extend(tokens_B[:, None], cache)
    cache = dataclasses.replace(cache, lengths_B=cache.lengths_B + 1)
    return self._logits(x_Bx1xD)[:, 0], cache


def count_params(cfg: ModelConfig) -> int:
  """Number of parameters, derived from the shapes above."""
  d, h, k, f, v = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
  per_block = 4 * d * h * k + 3 * d * f + 2 * d  # q, k, v, out; gate, up, down; two norms.
  unembed = 0 if cfg.tied_embeddings else d * v
  return v * d + cfg.num_layers * per_block + d + unembed


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward), PaLM appendix B convention.

  6 * N counts a multiply-add as 2 FLOPs, times 3 for forward + backward, over N = the matmul
  parameters: attention and MLP kernels plus the output projection (counted whether tied or not,
  since the matmul happens either way), excluding the embedding lookup and norm scales. The
  attention scores and weighted sum add 12 * num_layers * num_heads * head_dim * seq_len
  (a full, unmasked L x L attention, as in PaLM).
  """
  d, h, k, f = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
  matmul_params = cfg.num_layers * (4 * d * h * k + 3 * d * f) + d * cfg.vocab_size
  attention = 12 * cfg.num_layers * h * k * seq_len
  return float(6 * matmul_params + attention)


def abstract_state(cfg: ModelConfig) -> nnx.State:
  """Parameter state as ShapeDtypeStructs, with the sharding metadata; allocates nothing."""
  return nnx.state(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
