"""Tests for pausejax.model: shapes, masking, packing, sharding names, parameter and FLOP counts."""

from __future__ import annotations

import dataclasses
import functools

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from pausejax import model as model_lib
from pausejax.errors import UsageError

B, L, V = 2, 16, 128


def tiny_config(**overrides) -> model_lib.ModelConfig:
  kwargs = dict(vocab_size=V, num_layers=2, d_model=32, num_heads=4, head_dim=8, mlp_dim=64,
                tied_embeddings=True)
  kwargs.update(overrides)
  return model_lib.ModelConfig(**kwargs)


@functools.lru_cache(maxsize=None)
def _cached_model(cfg: model_lib.ModelConfig) -> model_lib.Decoder:
  return model_lib.Decoder(cfg, rngs=nnx.Rngs(0))


def make_model(**overrides) -> model_lib.Decoder:
  """Built once per config (tests never modify a model): init dominates the run time on CPU."""
  return _cached_model(tiny_config(**overrides))


def random_tokens(seed: int, shape=(B, L)) -> jax.Array:
  return jax.random.randint(jax.random.key(seed), shape, 0, V)


def params_with_paths(model):
  return list(nnx.to_flat_state(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize('tied', [True, False])
def test_logits_shape_and_dtype(tied):
  logits_BxLxV = make_model(tied_embeddings=tied)(random_tokens(0))
  assert logits_BxLxV.shape == (B, L, V)
  assert logits_BxLxV.dtype == jnp.float32
  assert np.all(np.isfinite(logits_BxLxV))


def test_causality():
  model = make_model()
  tokens_BxL = random_tokens(1)
  base_BxLxV = model(tokens_BxL)
  for t in (0, 5, L - 1):
    changed_BxL = tokens_BxL.at[:, t].set((tokens_BxL[:, t] + 1) % V)
    new_BxLxV = model(changed_BxL)
    np.testing.assert_allclose(new_BxLxV[:, :t], base_BxLxV[:, :t], atol=1e-6)
    assert np.abs(new_BxLxV[:, t:] - base_BxLxV[:, t:]).max() > 1e-3


def _packed_row():
  """One row: segment 1 (6 tokens), segment 2 (7 tokens), 3 padding tokens."""
  lengths = (6, 7)
  tokens = np.asarray(random_tokens(2, (1, L)))
  segment_ids = np.zeros((1, L), np.int32)
  positions = np.zeros((1, L), np.int32)
  start = 0
  for seg, n in enumerate(lengths, start=1):
    segment_ids[0, start:start + n] = seg
    positions[0, start:start + n] = np.arange(n)
    start += n
  return tokens, segment_ids, positions


def test_packed_segment_matches_segment_alone():
  model = make_model()
  tokens, segment_ids, positions = _packed_row()
  packed_1xLxV = model(tokens, segment_ids, positions)
  seg2 = segment_ids[0] == 2
  alone_1xNxV = model(tokens[:, seg2])  # Default positions start at 0.
  np.testing.assert_allclose(packed_1xLxV[:, seg2], alone_1xNxV, atol=1e-5)
  # Without the segment ids, segment 2 would see segment 1: the check above is not vacuous.
  unpacked_1xLxV = model(tokens, None, positions)
  assert np.abs(unpacked_1xLxV[:, seg2] - alone_1xNxV).max() > 1e-3


def test_other_segment_tokens_do_not_leak():
  model = make_model()
  tokens, segment_ids, positions = _packed_row()
  seg1, seg2 = segment_ids[0] == 1, segment_ids[0] == 2
  changed = tokens.copy()
  changed[0, seg1] = (changed[0, seg1] + 7) % V
  base_1xLxV = model(tokens, segment_ids, positions)
  new_1xLxV = model(changed, segment_ids, positions)
  np.testing.assert_allclose(new_1xLxV[:, seg2], base_1xLxV[:, seg2], atol=1e-6)
  assert np.abs(new_1xLxV[:, seg1] - base_1xLxV[:, seg1]).max() > 1e-3


def test_positions_reach_attention_and_rope_is_relative():
  model = make_model()
  tokens_BxL = random_tokens(3)
  base_BxLxV = model(tokens_BxL)
  shifted_BxL = jnp.broadcast_to(jnp.arange(L) + 11, (B, L))
  np.testing.assert_allclose(model(tokens_BxL, positions_BxL=shifted_BxL), base_BxLxV, atol=1e-4)
  zeros_BxL = jnp.zeros((B, L), jnp.int32)
  assert np.abs(model(tokens_BxL, positions_BxL=zeros_BxL) - base_BxLxV).max() > 1e-3


EXPECTED_NAMES = {
    'embed': ('vocab', 'embed'),
    'query': ('embed', 'heads', 'kv'),
    'key': ('embed', 'heads', 'kv'),
    'value': ('embed', 'heads', 'kv'),
    'out': ('heads', 'kv', 'embed'),
    'gate': ('embed', 'mlp'),
    'up': ('embed', 'mlp'),
    'down': ('mlp', 'embed'),
    'unembed': ('embed', 'vocab'),
    'scale': ('norm',),
}
ALLOWED_NAMES = {'vocab', 'embed', 'heads', 'kv', 'mlp', 'norm'}


@pytest.mark.parametrize('tied', [True, False])
def test_every_param_has_logical_axis_names(tied):
  model = make_model(tied_embeddings=tied)
  pspecs = dict(nnx.to_flat_state(nnx.get_partition_spec(nnx.state(model, nnx.Param))))
  params = params_with_paths(model)
  assert len(params) == 3 + 9 * model.cfg.num_layers - tied  # embed, final norm, unembed; 9/block.
  for path, param in params:
    names = param.get_metadata()['out_sharding']
    assert len(names) == param.ndim, path
    assert set(names) <= ALLOWED_NAMES, path
    assert tuple(names) == EXPECTED_NAMES[path[-1]], path
    assert tuple(pspecs[path].get_value()) == tuple(names), path


def test_logical_names_become_mesh_shardings():
  cfg = tiny_config(num_layers=1)
  mesh = jax.make_mesh((1, 1), ('fsdp', 'tensor'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = (('vocab', 'tensor'), ('embed', 'fsdp'), ('heads', 'tensor'), ('kv', None),
           ('mlp', 'tensor'), ('norm', None))
  with nnx.logical_axis_rules(rules):
    shardings = nnx.get_named_sharding(model_lib.abstract_state(cfg), mesh)
  flat = dict(nnx.to_flat_state(shardings))
  assert flat[('embed',)].get_value().spec == jax.P('tensor', 'fsdp')
  assert flat[('blocks', 0, 'attn', 'out')].get_value().spec == jax.P('tensor', None, 'fsdp')
  assert flat[('final_norm', 'scale')].get_value().spec == jax.P(None)
  create = jax.jit(lambda: nnx.state(model_lib.Decoder(cfg, rngs=nnx.Rngs(0))),
                   out_shardings=shardings)
  state = create()
  down = dict(nnx.to_flat_state(state))[('blocks', 0, 'mlp', 'down')].get_value()
  assert down.sharding.spec == jax.P('tensor', 'fsdp')


@pytest.mark.parametrize('overrides', [
    {},
    {'tied_embeddings': False},
    {'num_layers': 3, 'd_model': 48, 'num_heads': 3, 'head_dim': 12, 'mlp_dim': 96},
    {'num_layers': 1, 'vocab_size': 256, 'tied_embeddings': False},
])
def test_count_params_matches_model(overrides):
  cfg = tiny_config(**overrides)
  if overrides in ({}, {'tied_embeddings': False}):
    state = nnx.state(make_model(**overrides), nnx.Param)
  else:  # Same shapes as the real model (checked below), without compiling a new init.
    state = model_lib.abstract_state(cfg)
  actual = sum(np.prod(param.shape) for _, param in nnx.to_flat_state(state))
  assert model_lib.count_params(cfg) == actual


def test_tied_vs_untied_param_count():
  tied, untied = make_model(tied_embeddings=True), make_model(tied_embeddings=False)
  count = lambda m: sum(p.size for _, p in params_with_paths(m))
  assert count(untied) - count(tied) == tied.cfg.d_model * tied.cfg.vocab_size
  assert (model_lib.count_params(untied.cfg) - model_lib.count_params(tied.cfg)
          == count(untied) - count(tied))


def test_bfloat16_compute_close_to_float32():
  tokens_BxL = random_tokens(4)
  fp32_BxLxV = make_model()(tokens_BxL)
  bf16_model = make_model(dtype='bfloat16')  # Same seed and param dtype: identical params.
  bf16_BxLxV = bf16_model(tokens_BxL)
  assert bf16_BxLxV.dtype == jnp.float32
  diff = np.abs(bf16_BxLxV - fp32_BxLxV)
  assert diff.max() < 0.05 * np.abs(fp32_BxLxV).max()
  assert diff.mean() < 0.02 * np.abs(fp32_BxLxV).mean()
  assert diff.max() > 0  # The bf16 path really ran in lower precision.


def test_bfloat16_params():
  model = make_model(param_dtype='bfloat16', num_layers=1)
  assert all(p.dtype == jnp.bfloat16 for _, p in params_with_paths(model))
  assert model(random_tokens(5)).dtype == jnp.float32


@pytest.mark.parametrize('tied', [True, False])
def test_flops_per_token(tied):
  cfg = tiny_config(tied_embeddings=tied)
  norm_params = (2 * cfg.num_layers + 1) * cfg.d_model
  # Matmul parameters: everything but norms and the embedding lookup; the output projection
  # counts once, whether it is the tied embedding or a separate unembedding.
  matmul_params = model_lib.count_params(cfg) - norm_params
  if not tied:
    matmul_params -= cfg.vocab_size * cfg.d_model
  per_position = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim
  for seq_len in (16, 64, 2048):
    flops = model_lib.flops_per_token(cfg, seq_len)
    assert flops > 0
    assert flops == 6 * matmul_params + per_position * seq_len
  growth = model_lib.flops_per_token(cfg, 200) - model_lib.flops_per_token(cfg, 100)
  assert growth == 100 * per_position


def test_abstract_state_matches_real_state():
  cfg = tiny_config(tied_embeddings=False)
  abstract = dict(nnx.to_flat_state(model_lib.abstract_state(cfg)))
  real = dict(nnx.to_flat_state(nnx.state(model_lib.Decoder(cfg, rngs=nnx.Rngs(0)))))
  assert abstract.keys() == real.keys()
  for path, var in abstract.items():
    assert isinstance(var.get_value(), jax.ShapeDtypeStruct), path
    assert var.shape == real[path].shape and var.dtype == real[path].dtype, path
    assert var.get_metadata()['out_sharding'] == real[path].get_metadata()['out_sharding']


def test_from_config():
  cfg_model = ml_collections.ConfigDict(dict(
      num_layers=2, d_model=32, num_heads=4, head_dim=8, mlp_dim=64, tied_embeddings=False,
      dtype='bfloat16', param_dtype='float32', rope_theta=500.0))
  cfg = model_lib.ModelConfig.from_config(cfg_model, vocab_size=256)
  assert cfg.vocab_size == 256 and cfg.rope_theta == 500.0 and cfg.norm_eps == 1e-6
  assert cfg.dtype == jnp.bfloat16 and cfg.param_dtype == jnp.float32
  del cfg_model['mlp_dim']
  with pytest.raises(UsageError, match='model.mlp_dim'):
    model_lib.ModelConfig.from_config(cfg_model, vocab_size=256)


@pytest.mark.parametrize('overrides, setting', [
    ({'head_dim': 7}, 'model.head_dim'),
    ({'num_layers': 0}, 'model.num_layers'),
    ({'dtype': 'int8'}, 'model.dtype'),
    ({'param_dtype': 'float64x'}, 'model.param_dtype'),
    ({'vocab_size': -1}, 'vocab_size'),
    ({'tied_embeddings': 'yes'}, 'model.tied_embeddings'),
])
def test_bad_config_raises_usage_error(overrides, setting):
  with pytest.raises(UsageError, match=setting):
    tiny_config(**overrides)


def test_max_len_is_enforced():
  model = make_model(max_len=L)
  model(random_tokens(6))
  with pytest.raises(ValueError, match='max_len'):
    model(random_tokens(6, (1, L + 1)))


def test_config_is_hashable_and_frozen():
  cfg = tiny_config()
  assert hash(cfg) == hash(dataclasses.replace(cfg))
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.d_model = 64  # type: ignore[misc]
