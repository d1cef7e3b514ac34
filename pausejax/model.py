"""Decoder-only transformer in Flax NNX.

Token embedding -> `num_layers` pre-norm blocks (RMSNorm -> causal self-attention with RoPE ->
residual; RMSNorm -> SwiGLU MLP -> residual) -> final RMSNorm -> output projection (the embedding
table itself when `tied_embeddings`, else a separate unembedding). Logits are float32.

Shape suffixes: B batch, L sequence length, D d_model, H heads, K head_dim, R = K/2 rotary
frequencies, F mlp_dim, V vocab_size (embedding rows).

Precision: parameters are stored in `param_dtype` and cast to the compute `dtype` for every matmul;
RMSNorm statistics, RoPE rotation, attention softmax and the logits are float32.

Packing: with `segment_ids_BxL` a token attends only to earlier-or-same tokens of its segment;
`positions_BxL` (reset to 0 at each segment start) feed RoPE, so a packed segment computes
exactly what it would alone. Segment id 0 marks padding; padding only sees padding. Backspaces
(`lifetimes_BxL`, `pausejax.backspace`): a token may stop being visible after some rows.

Initialisation: kernels are truncated normal with variance 1/fan_in (the contracted input dims);
the attention output and MLP down projections, which write into the residual stream, get a
further 1/(2 * num_layers), so the residual variance stays O(1) whatever the depth (GPT-2 style).
The embedding uses fan_in = d_model (logits of order 1 when tied). RMSNorm scales start at 1.

Sharding: every parameter carries logical axis names as the `out_sharding` metadata of its
`nnx.Param` ('vocab', 'embed', 'heads', 'kv', 'mlp', 'norm'), created with `eager_sharding=False`
so building a model needs no mesh. To place a model on a mesh, map the names to mesh axes:

  with nnx.logical_axis_rules(rules):        # e.g. (('embed', 'fsdp'), ('mlp', 'tensor'), ...)
    shardings = nnx.get_named_sharding(abstract_state(cfg), mesh)

and create the state under `jax.jit(..., out_shardings=shardings)`. Every logical name must
appear in the rules (None replicates): an unmapped name is passed through as a mesh axis name.

Activation sharding: given a `mesh` and `logical_axis_rules` (`ModelConfig.from_config(...,
mesh=, rules=)`), activations are constrained (`with_sharding_constraint`) to ('batch', 'length',
x) with x = 'activation_embed' (residual stream), ('heads', 'kv') (queries/keys/values), 'mlp'
or 'vocab' (logits). 'activation_embed' is its own name because the parameters' 'embed' goes over
fsdp while activations split by batch. No mesh, or a one-device mesh: no constraints.

Scanned layers (`scan_layers`): the blocks' parameters are stacked on a leading 'layers' axis
(from the same per-layer initialisation, so a seed gives the same numbers either way;
`stack_layers`/`unstack_layers` convert parameter dicts) and `jax.lax.scan` runs one compiled
block num_layers times. Rematerialisation (`remat`, a key of `REMAT_POLICIES`): each block runs
under `jax.checkpoint` with that policy, so the backward pass recomputes what was not saved.

Zero sink (`zero_sink`, StreamingLLM's SoftMax1, exp(x_i) / (1 + sum_j exp(x_j))): every
attention row also sees an all-zero key (logit exactly 0) with an all-zero value, so a head can
put mass "nowhere". No parameters; training, the KV cache and `pausejax.stream` all apply it.

KV cache (decoding): `Decoder.prefill(tokens_BxL, lengths_B, max_len)` runs right-padded prompts
once: next-token logits after each, and a `KVCache` of `max_len` slots (an explicit pytree: one
compiled prefill and one compiled `decode_step` per shape serve every prompt length). Row b's
token at position p lives in slot p; a query at position p sees slots <= p, so slots beyond a
row's length are never read. Keys are cached after RoPE (`pausejax.stream` caches them before).

Extension points: `Attention.__call__` takes positions and an explicit boolean mask (not
`is_causal`, which assumes square, aligned query/key blocks); `Attention.qkv` and `.attend` are
the projection and the attention alone, reused by the caches. Blocks have a (x, positions, mask)
-> x interface, run by `Decoder._run_blocks` (around `jax.checkpoint` and `jax.lax.scan`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections

from pausejax import sharding
from pausejax.errors import UsageError

_DTYPES = ('float32', 'bfloat16', 'float16')
# model.remat -> what a block keeps for the backward pass (jax.checkpoint policy; None: no remat).
# 'full' keeps only the block's input; 'minimal' also keeps the outputs of the matmuls with the
# weights (their dot_generals have no batch dimension), recomputing attention scores, softmax and
# elementwise ops; 'dots_saveable' keeps every matmul output, attention scores included.
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'minimal': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
}
_POSITIVE_INTS = ('num_layers', 'd_model', 'num_heads', 'head_dim', 'mlp_dim')
# Logical names of the activation constraints (see ModelConfig.constrain).
_ACTIVATION_AXES = ('batch', 'length', 'activation_embed', 'heads', 'kv', 'mlp', 'vocab')


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
  scan_layers: bool = False  # Blocks stacked on a leading 'layers' axis and run by lax.scan.
  remat: str = 'none'  # A key of REMAT_POLICIES: what each block saves for the backward pass.
  zero_sink: bool = False  # SoftMax1 attention: an all-zero key and value prepended to every row.
  # Activation sharding: with a mesh (of more than one device), the residual stream, queries,
  # keys, values, MLP hidden activations and logits are constrained to these logical axis rules
  # (a tuple of (logical name, mesh axes) pairs, e.g. config.logical_axis_rules). None: no-op.
  mesh: jax.sharding.Mesh | None = None
  logical_axis_rules: tuple | None = None

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
    if not isinstance(self.scan_layers, bool):
      raise UsageError.setting('model.scan_layers', self.scan_layers, 'True or False')
    if not isinstance(self.zero_sink, bool):
      raise UsageError.setting('model.zero_sink', self.zero_sink, 'True or False')
    if self.zero_sink and self.attention != 'xla':  # The sink needs an explicit mask (below).
      raise UsageError.setting('model.zero_sink', self.zero_sink,
                               "False with model.attention='cudnn'; the zero sink needs 'xla'")
    if not isinstance(self.remat, str) or self.remat not in REMAT_POLICIES:
      raise UsageError.setting('model.remat', self.remat,
                               f"one of {', '.join(map(repr, REMAT_POLICIES))}")
    if self.mesh is not None:
      if self.logical_axis_rules is None:
        raise UsageError.setting('logical_axis_rules', None, 'rules are needed with a mesh')
      # Hashable (the config is static in jit): a tuple of (name, target) tuples.
      rules = tuple((name, tuple(t) if isinstance(t, (list, tuple)) else t)
                    for name, t in self.logical_axis_rules)
      # UsageError now, not when tracing, for a bad rule or an activation name without one.
      sharding.logical_to_mesh(_ACTIVATION_AXES, sharding.rules_dict(rules))
      object.__setattr__(self, 'logical_axis_rules', rules)

  def constrain(self, x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """`x` constrained to the mesh axes of its logical `names`; no-op without a mesh."""
    if self.mesh is None or self.mesh.size == 1:
      return x
    spec = sharding.logical_to_mesh(names, sharding.rules_dict(self.logical_axis_rules))
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(self.mesh, spec))

  @classmethod
  def from_config(cls, cfg_model: ml_collections.ConfigDict, vocab_size: int,
                  mesh: jax.sharding.Mesh | None = None, rules=None) -> ModelConfig:
    """Reads the `model.*` section of a run config; optional keys fall back to the defaults.

    `mesh` and `rules` (the config's `logical_axis_rules`) turn on the activation sharding
    constraints; a model built without them runs anywhere, unconstrained.
    """
    kwargs = {'mesh': mesh, 'logical_axis_rules': rules}
    for field in dataclasses.fields(cls):
      if field.name in ('vocab_size', 'mesh', 'logical_axis_rules'):
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


def attention_mask(length: int, segment_ids_BxL: jax.Array | None,
                   prefix_BxL: jax.Array | None = None,
                   lifetimes_BxL: jax.Array | None = None) -> jax.Array:
  """Boolean mask (True = may attend): causal, and within one segment when packed.

  `prefix_BxL` (seqio's `decoder_causal_attention`, nonzero on the prompt of a prefix-LM
  example) makes the prompt bidirectional: its positions also see each other's future.
  `lifetimes_BxL` (`pausejax.backspace`): column j is seen by rows j .. j+k-1 for k > 0, all for 0.
  """
  index_L = jnp.arange(length)
  mask_BxLxL = (index_L[:, None] >= index_L[None, :])[None]
  if prefix_BxL is not None:
    prefix_BxL = prefix_BxL.astype(bool)
    mask_BxLxL = mask_BxLxL | (prefix_BxL[:, :, None] & prefix_BxL[:, None, :])
  if segment_ids_BxL is not None:
    mask_BxLxL = mask_BxLxL & (segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :])
  if lifetimes_BxL is not None:
    life_Bx1xL = lifetimes_BxL[:, None, :]
    age_LxL = index_L[:, None] - index_L[None, :]  # Row minus column.
    mask_BxLxL = mask_BxLxL & ((life_Bx1xL == 0) | (age_LxL[None] < life_Bx1xL))
  return mask_BxLxL[:, None]  # Bx1xLxL: one mask for all heads.


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

  def qkv(self, x_BxLxD):
    """Queries, keys and values, not yet rotated (the streaming cache rotates keys itself)."""
    # One matmul for all three: on small models three separate ones cost measurably more. The
    # kernels are stacked on a new axis, so a tensor-sharded 'heads' axis needs no data movement.
    w_Dx3xHxK = jnp.stack([self.query[...], self.key[...], self.value[...]], axis=1)
    qkv_BxLx3xHxK = jnp.einsum('bld,dthk->blthk', x_BxLxD, w_Dx3xHxK.astype(self.cfg.dtype))
    names = ('batch', 'length', 'heads', 'kv')
    return tuple(self.cfg.constrain(qkv_BxLx3xHxK[:, :, i], names) for i in range(3))

  def _project(self, x_BxLxD, positions_BxL):
    """Queries, keys (both rotated) and values."""
    q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = self.qkv(x_BxLxD)
    q_BxLxHxK = apply_rope(q_BxLxHxK, positions_BxL, self.cfg.rope_theta)
    k_BxLxHxK = apply_rope(k_BxLxHxK, positions_BxL, self.cfg.rope_theta)
    return q_BxLxHxK, k_BxLxHxK, v_BxLxHxK

  def attend(self, q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, mask_Bx1xLxS) -> jax.Array:
    """Attention output, projected to d_model. Scale 1/sqrt(K); mask None = plain causal."""
    if self.cfg.zero_sink:  # SoftMax1: a zero key scores exactly 0, its zero value adds nothing.
      if mask_Bx1xLxS is None:
        mask_Bx1xLxS = attention_mask(q_BxLxHxK.shape[1], None)
      batch, _, heads, dim = k_BxSxHxK.shape
      zero_Bx1xHxK = jnp.zeros((batch, 1, heads, dim), k_BxSxHxK.dtype)
      k_BxSxHxK = jnp.concatenate([zero_Bx1xHxK, k_BxSxHxK], axis=1)
      v_BxSxHxK = jnp.concatenate([zero_Bx1xHxK.astype(v_BxSxHxK.dtype), v_BxSxHxK], axis=1)
      mask_Bx1xLxS = jnp.pad(mask_Bx1xLxS, ((0, 0), (0, 0), (0, 0), (1, 0)), constant_values=True)
    # Fused kernels apply plain causal masking without a mask array.
    impl = None if self.cfg.attention == 'xla' else self.cfg.attention
    o_BxLxHxK = jax.nn.dot_product_attention(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, mask=mask_Bx1xLxS,
                                             is_causal=mask_Bx1xLxS is None, implementation=impl)
    return jnp.einsum('blhk,hkd->bld', o_BxLxHxK, self.out[...].astype(self.cfg.dtype))

  def __call__(self, x_BxLxD, positions_BxL, mask_Bx1xLxL) -> jax.Array:
    q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = self._project(x_BxLxD, positions_BxL)
    return self.attend(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask_Bx1xLxL)

  def cached(self, x_BxLxD, start_B, keys, values, layer: jax.Array | None = None,
             prefix_B: jax.Array | None = None):
    """Attention of L new tokens per row over the cache; returns (output, keys, values).

    Row b's new tokens take positions, and cache slots, start_B[b] + [0, L); each attends to
    every slot up to its own position, and with `prefix_B` (prefix-LM prefill) a position
    below prefix_B[b] also to every slot below prefix_B[b]. The caller keeps start_B + L <= S
    (a write past the end would be clamped onto the last slots). `keys` and `values` are this
    layer's BxSxHxK cache, or with `layer` (an int32 index) the NxBxSxHxK cache of all N layers,
    written in place at `layer` (so a scan over layers carries the cache instead of copying it
    every step).
    """
    length, slots = x_BxLxD.shape[1], keys.shape[-3]
    positions_BxL = start_B[:, None] + jnp.arange(length)
    q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = self._project(x_BxLxD, positions_BxL)
    # Per-row write offset: vmap turns the slice update into a scatter.
    if layer is None:
      write = jax.vmap(lambda cache, new, start: jax.lax.dynamic_update_slice_in_dim(
          cache, new.astype(cache.dtype), start, axis=0))
    else:  # Row b of the NxBxSxHxK cache is NxSxHxK; write at (layer, start).
      write = jax.vmap(lambda cache, new, start: jax.lax.dynamic_update_slice(
          cache, new[None].astype(cache.dtype), (layer, start, 0, 0)), in_axes=(1, 0, 0),
                       out_axes=1)
    keys, values = write(keys, k_BxLxHxK, start_B), write(values, v_BxLxHxK, start_B)
    keys_BxSxHxK, values_BxSxHxK = keys, values
    if layer is not None:
      keys_BxSxHxK = jax.lax.dynamic_index_in_dim(keys, layer, keepdims=False)
      values_BxSxHxK = jax.lax.dynamic_index_in_dim(values, layer, keepdims=False)
    slots_S = jnp.arange(slots)
    mask_BxLxS = slots_S[None, None, :] <= positions_BxL[:, :, None]
    if prefix_B is not None:
      mask_BxLxS |= ((slots_S[None, None, :] < prefix_B[:, None, None])
                     & (positions_BxL[:, :, None] < prefix_B[:, None, None]))
    mask_Bx1xLxS = mask_BxLxS[:, None]
    out_BxLxD = self.attend(q_BxLxHxK, keys_BxSxHxK, values_BxSxHxK, mask_Bx1xLxS)
    return out_BxLxD, keys, values


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
    # Gate and up in one matmul (stacked on a new axis, as in Attention._project).
    w_Dx2xF = jnp.stack([self.gate[...], self.up[...]], axis=1).astype(dtype)
    gate_up_BxLx2xF = jnp.einsum('bld,dtf->bltf', x_BxLxD, w_Dx2xF)
    gate_BxLxF, up_BxLxF = gate_up_BxLx2xF[:, :, 0], gate_up_BxLx2xF[:, :, 1]
    gate_BxLxF = self.cfg.constrain(gate_BxLxF, ('batch', 'length', 'mlp'))
    up_BxLxF = self.cfg.constrain(up_BxLxF, ('batch', 'length', 'mlp'))
    h_BxLxF = jax.nn.silu(gate_BxLxF) * up_BxLxF
    return jnp.einsum('blf,fd->bld', h_BxLxF, self.down[...].astype(dtype))


# The residual stream's logical axes. Its model dimension is 'activation_embed', not 'embed': the
# parameters' embed axis is sharded over fsdp, the activations' is not (they split by batch).
RESIDUAL = ('batch', 'length', 'activation_embed')


class Block(nnx.Module):
  """Pre-norm transformer block."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.attn_norm = RMSNorm(cfg)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg)
    self.mlp = Mlp(cfg, rngs=rngs)

  def __call__(self, x_BxLxD, positions_BxL, mask_Bx1xLxL) -> jax.Array:
    x_BxLxD = self.cfg.constrain(x_BxLxD, RESIDUAL)
    x_BxLxD = x_BxLxD + self.attn(self.attn_norm(x_BxLxD), positions_BxL, mask_Bx1xLxL)
    x_BxLxD = self.cfg.constrain(x_BxLxD, RESIDUAL)
    return x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD))

  def cached(self, x_BxLxD, start_B, keys, values, layer: jax.Array | None = None,
             prefix_B: jax.Array | None = None):
    """`__call__` over new tokens with a KV cache (see `Attention.cached`)."""
    attn_BxLxD, keys, values = self.attn.cached(self.attn_norm(x_BxLxD), start_B, keys, values,
                                                layer, prefix_B)
    x_BxLxD = x_BxLxD + attn_BxLxD
    return x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD)), keys, values


def _stack_blocks(blocks: list[Block]) -> Block:
  """One Block holding the parameters of `blocks` stacked on a leading 'layers' axis.

  Built from the same per-layer initialisation as the unrolled model, so a seed gives the same
  parameters whether or not the layers are scanned.
  """
  graphdef, _ = nnx.split(blocks[0])
  state = jax.tree.map(lambda *layers: jnp.stack(layers), *(nnx.state(b) for b in blocks))
  for _, param in nnx.to_flat_state(state):
    param.set_metadata(out_sharding=('layers', *param.get_metadata()['out_sharding']))
  return nnx.merge(graphdef, state)


def _block_apply(graphdef, remat: str, in_scan: bool):
  """(block state, x, positions, mask) -> x, under the `remat` checkpoint policy."""
  def apply(state, x_BxLxD, positions_BxL, mask_Bx1xLxL):
    return nnx.merge(graphdef, state)(x_BxLxD, positions_BxL, mask_Bx1xLxL)
  if remat == 'none':
    return apply
  # Unrolled, the recomputation needs guarding against XLA merging it with the forward pass; in a
  # scan the loop boundary already prevents that, and the guard would only cost speed.
  return jax.checkpoint(apply, policy=REMAT_POLICIES[remat], prevent_cse=not in_scan)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Keys and values of every layer in S slots per row; a pytree, so it jits and loops.

  Row b holds lengths_B[b] tokens, at positions (= slots) 0 .. lengths_B[b] - 1.
  """
  # One BxSxHxK array per layer (keys after RoPE); with scan_layers one NxBxSxHxK array.
  keys: tuple[jax.Array, ...] | jax.Array
  values: tuple[jax.Array, ...] | jax.Array
  lengths_B: jax.Array           # int32.


class Decoder(nnx.Module):
  """The language model: tokens -> float32 next-token logits."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, v, pd = cfg.d_model, cfg.vocab_size, cfg.param_dtype
    self.embed = _param(_kernel(rngs, (v, d), 1, 0, pd), ('vocab', 'embed'))  # VxD.
    blocks = [Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)]
    self.blocks = _stack_blocks(blocks) if cfg.scan_layers else nnx.List(blocks)
    self.final_norm = RMSNorm(cfg)
    self.unembed = None if cfg.tied_embeddings else _param(  # DxV.
        _kernel(rngs, (d, v), 0, 1, pd), ('embed', 'vocab'))

  def __call__(self, tokens_BxL: jax.Array, segment_ids_BxL: jax.Array | None = None,
               positions_BxL: jax.Array | None = None,
               prefix_BxL: jax.Array | None = None,
               lifetimes_BxL: jax.Array | None = None) -> jax.Array:
    cfg = self.cfg
    batch, length = tokens_BxL.shape
    if cfg.max_len is not None and length > cfg.max_len:
      raise ValueError(f'sequence length {length} exceeds max_len {cfg.max_len}')
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(length), (batch, length))
    mask_Bx1xLxL = None  # Plain causal: fused attention kernels need no mask array.
    if segment_ids_BxL is not None or prefix_BxL is not None or lifetimes_BxL is not None:
      mask_Bx1xLxL = attention_mask(length, segment_ids_BxL, prefix_BxL, lifetimes_BxL)

    x_BxLxD = self._embed(tokens_BxL)
    x_BxLxD = self._run_blocks(x_BxLxD, positions_BxL, mask_Bx1xLxL)
    return self._logits(x_BxLxD)

  def _run_blocks(self, x_BxLxD, positions_BxL, mask_Bx1xLxL) -> jax.Array:
    """The blocks in order: unrolled, or one lax.scan step per layer; each under cfg.remat."""
    if self.cfg.scan_layers:
      graphdef, state = nnx.split(self.blocks)
      apply = _block_apply(graphdef, self.cfg.remat, in_scan=True)
      body = lambda x_BxLxD, layer: (apply(layer, x_BxLxD, positions_BxL, mask_Bx1xLxL), None)
      return jax.lax.scan(body, x_BxLxD, state)[0]
    for block in self.blocks:
      if self.cfg.remat == 'none':
        x_BxLxD = block(x_BxLxD, positions_BxL, mask_Bx1xLxL)
      else:
        graphdef, state = nnx.split(block)
        apply = _block_apply(graphdef, self.cfg.remat, in_scan=False)
        x_BxLxD = apply(state, x_BxLxD, positions_BxL, mask_Bx1xLxL)
    return x_BxLxD

  def _embed(self, tokens_BxL: jax.Array) -> jax.Array:
    return jnp.take(self.embed[...], tokens_BxL, axis=0).astype(self.cfg.dtype)

  def _logits(self, x_BxLxD: jax.Array) -> jax.Array:
    """Final norm and output projection."""
    dtype = self.cfg.dtype
    x_BxLxD = self.final_norm(self.cfg.constrain(x_BxLxD, RESIDUAL))
    # Accumulate logits in float32: they feed the softmax cross-entropy.
    if self.unembed is None:
      logits_BxLxV = jnp.einsum('bld,vd->blv', x_BxLxD, self.embed[...].astype(dtype),
                                preferred_element_type=jnp.float32)
    else:
      logits_BxLxV = jnp.einsum('bld,dv->blv', x_BxLxD, self.unembed[...].astype(dtype),
                                preferred_element_type=jnp.float32)
    return self.cfg.constrain(logits_BxLxV, ('batch', 'length', 'vocab'))

  # --- KV-cache decoding ----------------------------------------------------------------------

  def init_cache(self, batch_size: int, max_len: int) -> KVCache:
    """An empty cache of `max_len` slots per row."""
    cfg = self.cfg
    if cfg.max_len is not None and max_len > cfg.max_len:
      raise ValueError(f'cache length {max_len} exceeds max_len {cfg.max_len}')
    shape = (batch_size, max_len, cfg.num_heads, cfg.head_dim)
    if cfg.scan_layers:
      zeros = lambda: jnp.zeros((cfg.num_layers, *shape), cfg.dtype)
    else:
      zeros = lambda: tuple(jnp.zeros(shape, cfg.dtype) for _ in range(cfg.num_layers))
    return KVCache(keys=zeros(), values=zeros(), lengths_B=jnp.zeros((batch_size,), jnp.int32))

  def _extend(self, tokens_BxL: jax.Array, cache: KVCache, prefix_B: jax.Array | None = None):
    """Runs L new tokens per row after each row's cached ones: (hidden BxLxD, filled cache)."""
    x_BxLxD = self._embed(tokens_BxL)
    if self.cfg.scan_layers:  # The whole cache is carried and written in place, layer by layer.
      graphdef, state = nnx.split(self.blocks)

      def body(carry, layer):
        x_BxLxD, keys, values = carry
        block = nnx.merge(graphdef, layer[0])
        return block.cached(x_BxLxD, cache.lengths_B, keys, values, layer[1], prefix_B), None

      (x_BxLxD, keys, values), _ = jax.lax.scan(
          body, (x_BxLxD, cache.keys, cache.values), (state, jnp.arange(self.cfg.num_layers)))
      return x_BxLxD, KVCache(keys, values, cache.lengths_B)
    keys, values = [], []
    for block, k_BxSxHxK, v_BxSxHxK in zip(self.blocks, cache.keys, cache.values):
      x_BxLxD, k_BxSxHxK, v_BxSxHxK = block.cached(x_BxLxD, cache.lengths_B, k_BxSxHxK, v_BxSxHxK,
                                                   prefix_B=prefix_B)
      keys.append(k_BxSxHxK)
      values.append(v_BxSxHxK)
    return x_BxLxD, KVCache(tuple(keys), tuple(values), cache.lengths_B)

  def prefill(self, tokens_BxL: jax.Array, lengths_B: jax.Array, max_len: int,
              prefix_lm: bool = False):
    """Runs right-padded prompts: (next-token logits BxV after each prompt, KVCache).

    Row b's prompt is tokens_BxL[b, :lengths_B[b]] (lengths >= 1, L <= max_len); the tokens
    after it are ignored (they land in slots that the row's later tokens overwrite). With
    `prefix_lm` the prompt attends to itself both ways, as seqio's `decoder_causal_attention`
    does in prefix-LM training; the tokens decoded after it stay causal.
    """
    batch = tokens_BxL.shape[0]
    x_BxLxD, cache = self._extend(tokens_BxL, self.init_cache(batch, max_len),
                                  lengths_B.astype(jnp.int32) if prefix_lm else None)
    last_Bx1xD = jnp.take_along_axis(x_BxLxD, (lengths_B - 1)[:, None, None], axis=1)
    cache = dataclasses.replace(cache, lengths_B=lengths_B.astype(jnp.int32))
    return self._logits(last_Bx1xD)[:, 0], cache

  def decode_step(self, tokens_B: jax.Array, cache: KVCache):
    """Appends one token per row: (next-token logits BxV, KVCache). Needs lengths_B < S."""
    x_Bx1xD, cache = self._extend(tokens_B[:, None], cache)
    cache = dataclasses.replace(cache, lengths_B=cache.lengths_B + 1)
    return self._logits(x_Bx1xD)[:, 0], cache


def stack_layers(params: dict) -> dict:
  """Pure-dict parameters of an unrolled model -> those of the same model with scan_layers.

  `params['blocks']` maps layer index -> block parameters; the result holds one block whose
  arrays have a leading layer axis. Converts a checkpoint's `params` between the two layouts.
  """
  blocks = params['blocks']
  layers = [blocks[i] for i in sorted(blocks)]
  return {**params, 'blocks': jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


def unstack_layers(params: dict) -> dict:
  """The inverse of `stack_layers`: scan_layers parameters -> unrolled ones."""
  blocks = params['blocks']
  num_layers = jax.tree.leaves(blocks)[0].shape[0]
  return {**params,
          'blocks': {i: jax.tree.map(lambda x, i=i: x[i], blocks) for i in range(num_layers)}}


def count_params(cfg: ModelConfig) -> int:
  """Number of parameters, derived from the shapes above."""
  d, h, k, f, v = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
  per_block = 4 * d * h * k + 3 * d * f + 2 * d  # q, k, v, out; gate, up, down; two norms.
  unembed = 0 if cfg.tied_embeddings else d * v
  return v * d + cfg.num_layers * per_block + d + unembed


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward), PaLM appendix B convention.

  6 * N (a multiply-add is 2 FLOPs, times 3 for forward + backward) over N = the matmul
  parameters: attention and MLP kernels plus the output projection (tied or not), not the
  embedding lookup or norm scales; plus 12 * num_layers * num_heads * head_dim * seq_len for a
  full, unmasked L x L attention, as in PaLM.
  """
  d, h, k, f = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
  matmul_params = cfg.num_layers * (4 * d * h * k + 3 * d * f) + d * cfg.vocab_size
  attention = 12 * cfg.num_layers * h * k * seq_len
  return float(6 * matmul_params + attention)


def abstract_state(cfg: ModelConfig) -> nnx.State:
  """Parameter state as ShapeDtypeStructs, with the sharding metadata; allocates nothing."""
  return nnx.state(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
