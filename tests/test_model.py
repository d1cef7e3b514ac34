"""Tests for pausejax.model: shapes, masking, packing, sharding names, parameter and FLOP counts."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
import textwrap

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from pausejax import model as model_lib
from pausejax.errors import UsageError

from conftest import REPO

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


# ----------------------------------------------------------------------------------------------
# Scanned layers, rematerialisation, activation sharding.

def _params(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _with_params(cfg, params):
  """A Decoder of `cfg` holding `params` (a pure dict)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: model_lib.Decoder(cfg, rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


def test_scanned_layers_compute_what_the_unrolled_layers_do():
  unrolled = make_model(tied_embeddings=False)
  scanned_cfg = tiny_config(tied_embeddings=False, scan_layers=True)
  # Stacked from another seed's unrolled parameters, so the test does not rest on the init.
  other = model_lib.Decoder(tiny_config(tied_embeddings=False), rngs=nnx.Rngs(7))
  stacked = model_lib.stack_layers(_params(other))
  assert stacked['blocks']['mlp']['down'].shape == (2, 64, 32)
  scanned = _with_params(scanned_cfg, stacked)
  tokens, segment_ids, positions = _packed_row()
  for args in ((random_tokens(8),), (tokens, segment_ids, positions)):
    np.testing.assert_allclose(scanned(*args), other(*args), atol=1e-5, rtol=1e-5)
  assert np.abs(scanned(random_tokens(8)) - unrolled(random_tokens(8))).max() > 1e-3
  # The same seed gives the same parameters in either layout, and the layouts convert back.
  same_seed = _params(model_lib.Decoder(scanned_cfg, rngs=nnx.Rngs(0)))
  jax.tree.map(np.testing.assert_array_equal, same_seed, model_lib.stack_layers(_params(unrolled)))
  jax.tree.map(np.testing.assert_array_equal, model_lib.unstack_layers(stacked), _params(other))


def test_scanned_parameters_have_a_layers_axis():
  cfg = tiny_config(scan_layers=True)
  specs = dict(nnx.to_flat_state(nnx.get_partition_spec(model_lib.abstract_state(cfg))))
  assert tuple(specs[('blocks', 'attn', 'query')].get_value()) == ('layers', 'embed', 'heads', 'kv')
  assert tuple(specs[('blocks', 'mlp_norm', 'scale')].get_value()) == ('layers', 'norm')
  assert tuple(specs[('embed',)].get_value()) == ('vocab', 'embed')  # Outside the blocks.
  assert model_lib.count_params(cfg) == sum(
      np.prod(p.shape) for _, p in nnx.to_flat_state(model_lib.abstract_state(cfg)))
  # The default rules replicate the layers axis: each device holds every layer's shard.
  from pausejax import config as config_lib
  from pausejax import sharding
  rules = sharding.rules_dict(config_lib.DEFAULT_LOGICAL_AXIS_RULES)
  assert sharding.logical_to_mesh(('layers', 'embed', 'mlp'), rules) == jax.P(None, 'fsdp',
                                                                              'tensor')


def _grads(cfg, params, tokens_BxL):
  """Gradients of a loss that depends on every logit, for the model `cfg` holding `params`."""
  graphdef, state = nnx.split(_with_params(cfg, params))

  def loss(state):
    logits_BxLxV = nnx.merge(graphdef, state)(tokens_BxL)
    return jnp.mean(jax.nn.logsumexp(logits_BxLxV, axis=-1) - logits_BxLxV[..., 0])

  return nnx.to_pure_dict(jax.jit(jax.grad(loss))(state))


@pytest.mark.parametrize('scan, remats', [(False, ('full', 'dots_saveable')),
                                           (True, ('minimal',))])
def test_remat_gives_the_same_gradients(scan, remats):
  params = _params(make_model())
  if scan:
    params = model_lib.stack_layers(params)
  tokens_BxL = random_tokens(9)
  reference = _grads(tiny_config(scan_layers=scan), params, tokens_BxL)
  assert max(np.abs(g).max() for g in jax.tree.leaves(reference)) > 1e-3
  for remat in remats:
    grads = _grads(tiny_config(scan_layers=scan, remat=remat), params, tokens_BxL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6),
                 grads, reference)


def _temp_bytes(cfg) -> int:
  """Temporaries of the compiled gradient of a sum of the logits, for a longer sequence."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: model_lib.Decoder(cfg, rngs=nnx.Rngs(0))))
  tokens_BxL = jax.ShapeDtypeStruct((4, 128), jnp.int32)
  grad = jax.grad(lambda state, t: jnp.sum(nnx.merge(graphdef, state)(t)))
  return jax.jit(grad).lower(state, tokens_BxL).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize('scan', [False, True])
def test_remat_keeps_less_for_the_backward_pass(scan):
  """The residuals that jax.vjp's backward function holds: what the forward pass saved."""
  cfg = tiny_config(num_layers=4, scan_layers=scan)
  tokens_BxL = random_tokens(12, (4, 128))

  def saved_bytes(remat):
    model = model_lib.Decoder(dataclasses.replace(cfg, remat=remat), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    _, backward = jax.vjp(lambda s: nnx.merge(graphdef, s)(tokens_BxL), state)
    return sum(x.nbytes for x in jax.tree.leaves(backward))

  saved = {remat: saved_bytes(remat) for remat in model_lib.REMAT_POLICIES}
  # 'full' keeps block inputs (4 x 128 x 32 floats per layer) where 'none' keeps every
  # intermediate, attention probabilities included (4 x 4 x 128^2 floats per layer).
  assert saved['full'] < 0.1 * saved['none']
  assert saved['full'] < saved['minimal'] < saved['dots_saveable'] < saved['none']


def test_remat_lowers_the_compiled_temporary_memory():
  """Scanned layers: XLA's CPU scheduler runs an unrolled block's recomputation early (its
  temporaries barely change; a TPU compile's do), so on CPU the scan shows the saving."""
  cfg = tiny_config(num_layers=4, scan_layers=True)
  none = _temp_bytes(cfg)
  full = _temp_bytes(dataclasses.replace(cfg, remat='full'))
  minimal = _temp_bytes(dataclasses.replace(cfg, remat='minimal'))
  # Without remat every layer's attention probabilities (4 x 4 x 128^2 floats = 1 MiB per layer)
  # stay live until the backward pass; with it, one layer's at a time.
  assert full < 0.5 * none
  assert full <= minimal < none


def test_scan_and_remat_keep_bfloat16_compute_and_float32_params():
  params = _params(make_model())
  tokens_BxL = random_tokens(10)
  unrolled = _with_params(tiny_config(dtype='bfloat16'), params)
  scanned_cfg = tiny_config(dtype='bfloat16', scan_layers=True, remat='full')
  scanned = _with_params(scanned_cfg, model_lib.stack_layers(params))
  logits_BxLxV = scanned(tokens_BxL)
  assert logits_BxLxV.dtype == jnp.float32
  # Same bfloat16 computation: equal up to the rounding of a different fusion.
  reference_BxLxV = unrolled(tokens_BxL)
  assert np.abs(logits_BxLxV - reference_BxLxV).max() < 0.02 * np.abs(reference_BxLxV).max()
  fp32_BxLxV = make_model()(tokens_BxL)
  assert np.abs(logits_BxLxV - fp32_BxLxV).max() > 0  # Really bfloat16.
  grads = _grads(scanned_cfg, model_lib.stack_layers(params), tokens_BxL)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


def test_activation_constraints_are_a_no_op_on_one_device():
  from pausejax import config as config_lib
  from pausejax import sharding
  mesh = sharding.make_mesh(config_lib.defaults().mesh, jax.devices()[:1])
  cfg = tiny_config(mesh=mesh, logical_axis_rules=config_lib.DEFAULT_LOGICAL_AXIS_RULES)
  model = _with_params(cfg, _params(make_model()))
  tokens_BxL = random_tokens(11)
  np.testing.assert_array_equal(model(tokens_BxL), make_model()(tokens_BxL))
  graphdef, state = nnx.split(model)
  jaxpr = jax.make_jaxpr(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens_BxL)
  assert 'sharding_constraint' not in str(jaxpr)


def test_rules_must_cover_the_activation_axes():
  from pausejax import config as config_lib
  from pausejax import sharding
  mesh = sharding.make_mesh(config_lib.defaults().mesh, jax.devices()[:1])
  rules = [r for r in config_lib.DEFAULT_LOGICAL_AXIS_RULES if r[0] != 'activation_embed']
  with pytest.raises(UsageError, match="logical_axis_rules.*'activation_embed'"):
    tiny_config(mesh=mesh, logical_axis_rules=tuple(rules))


def test_scan_and_remat_settings_from_config():
  from pausejax import config as config_lib
  assert set(config_lib.REMAT_CHOICES) == set(model_lib.REMAT_POLICIES)
  c = config_lib.defaults()
  assert c.model.scan_layers is False and c.model.remat == 'none'
  c.model.scan_layers, c.model.remat = True, 'minimal'
  config_lib.validate(c)
  cfg = model_lib.ModelConfig.from_config(c.model, vocab_size=256)
  assert cfg.scan_layers and cfg.remat == 'minimal' and cfg.mesh is None


@pytest.mark.parametrize('overrides, setting', [
    ({'remat': 'everything'}, 'model.remat'),
    ({'remat': True}, 'model.remat'),
    ({'remat': None}, 'model.remat'),
    ({'scan_layers': 'yes'}, 'model.scan_layers'),
    ({'scan_layers': 1}, 'model.scan_layers'),
])
def test_bad_scan_or_remat_raises_usage_error(overrides, setting):
  with pytest.raises(UsageError, match=setting) as e:
    tiny_config(**overrides)
  assert '\n' not in str(e.value)
  from pausejax import config as config_lib
  c = config_lib.defaults()
  # ConfigDict fields keep their type: a config file can still build a section with any value.
  c.model = ml_collections.ConfigDict({**c.model.to_dict(), **overrides})
  with pytest.raises(UsageError, match=setting):
    config_lib.validate(c)



# ----------------------------------------------------------------------------------------------
# Zero sink (SoftMax1).

def _attention_by_hand(attn, x_BxLxD, zero_sink: bool) -> np.ndarray:
  """Causal attention in numpy, with an all-zero key and value prepended when `zero_sink`."""
  positions_BxL = jnp.broadcast_to(jnp.arange(x_BxLxD.shape[1]), x_BxLxD.shape[:2])
  q, k, v = (np.asarray(a, np.float64) for a in attn._project(x_BxLxD, positions_BxL))
  batch, length, heads, dim = k.shape
  scores_BxHxLxS = np.einsum('blhk,bshk->bhls', q, k) / np.sqrt(dim)
  scores_BxHxLxS = np.where(np.tril(np.ones((length, length), bool)), scores_BxHxLxS, -np.inf)
  if zero_sink:  # The zero key's score is q . 0 = 0; its value adds nothing.
    scores_BxHxLxS = np.concatenate([np.zeros((batch, heads, length, 1)), scores_BxHxLxS], -1)
    v = np.concatenate([np.zeros((batch, 1, heads, dim)), v], axis=1)
  probs = np.exp(scores_BxHxLxS - scores_BxHxLxS.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  o_BxLxHxK = np.einsum('bhls,bshk->blhk', probs, v)
  return np.einsum('blhk,hkd->bld', o_BxLxHxK, np.asarray(attn.out[...], np.float64))


@pytest.mark.parametrize('zero_sink', [False, True])
def test_zero_sink_is_attention_with_a_prepended_zero_key_and_value(zero_sink):
  attn = make_model(zero_sink=zero_sink).blocks[0].attn
  x_BxLxD = jax.random.normal(jax.random.key(3), (B, L, 32))
  got_BxLxD = attn(x_BxLxD, jnp.broadcast_to(jnp.arange(L), (B, L)), None)
  np.testing.assert_allclose(got_BxLxD, _attention_by_hand(attn, x_BxLxD, zero_sink),
                             atol=1e-5, rtol=1e-5)
  # SoftMax1 = softmax scaled by Z / (1 + Z): it changes the output (no parameters involved).
  plain = make_model(zero_sink=not zero_sink).blocks[0].attn
  assert np.abs(got_BxLxD - plain(x_BxLxD, jnp.broadcast_to(jnp.arange(L), (B, L)), None)
                ).max() > 1e-3


def test_zero_sink_has_no_parameters_and_keeps_packing_exact():
  plain, sink = make_model(), make_model(zero_sink=True)
  assert (jax.tree.map(jnp.shape, nnx.state(plain, nnx.Param))
          == jax.tree.map(jnp.shape, nnx.state(sink, nnx.Param)))
  tokens_BxL = random_tokens(4)
  alone_1x7xV = sink(tokens_BxL[:1, :7])
  segments_BxL = jnp.array([[1] * 7 + [2] * (L - 7)] * B)
  positions_BxL = jnp.concatenate([jnp.arange(7), jnp.arange(L - 7)])[None].repeat(B, 0)
  packed_BxLxV = sink(tokens_BxL, segments_BxL, positions_BxL)
  np.testing.assert_allclose(packed_BxLxV[:1, :7], alone_1x7xV, atol=1e-5, rtol=1e-5)


def test_zero_sink_settings():
  from pausejax import config as config_lib
  c = config_lib.defaults()
  assert model_lib.ModelConfig.from_config(c.model, vocab_size=256).zero_sink is False
  c.model.zero_sink = True
  assert model_lib.ModelConfig.from_config(c.model, vocab_size=256).zero_sink is True
  with pytest.raises(UsageError, match='model.zero_sink') as e:
    tiny_config(zero_sink='yes')
  assert '\n' not in str(e.value)
  with pytest.raises(UsageError, match="model.zero_sink=True is invalid: .*'xla'"):
    tiny_config(zero_sink=True, attention='cudnn', dtype='bfloat16')


_FSDP_ACTIVATIONS = textwrap.dedent("""
    import json, re, sys
    sys.path.insert(0, "tests")
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from conftest import tiny_config
    from pausejax import model as model_lib, sharding, step as step_lib
    out = {}
    for mesh_shape in ((1, 8, 1), (2, 2, 2)):
      c = tiny_config("unused", **dict(zip(("mesh.data", "mesh.fsdp", "mesh.tensor"), mesh_shape)))
      mesh = sharding.make_mesh(c.mesh)
      rules = sharding.rules_dict(c.logical_axis_rules)
      batch = {k: jax.device_put(np.random.default_rng(0).integers(1, 256, (8, 64), np.int32),
                                 sharding.batch_sharding(mesh, rules))
               for k in ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights")}
      for constrained in (False, True):
        kwargs = dict(mesh=mesh, rules=c.logical_axis_rules) if constrained else {}
        cfg = model_lib.ModelConfig.from_config(c.model, 256, **kwargs)
        graphdef, abstract = step_lib.abstract_model(cfg)
        shardings = sharding.named_shardings(step_lib.param_logical_specs(abstract), mesh, rules)
        init = lambda: nnx.to_pure_dict(nnx.state(model_lib.Decoder(cfg, rngs=nnx.Rngs(0))))
        params = jax.jit(init, out_shardings=shardings)()
        loss = lambda p, b: step_lib.loss_terms(
            step_lib.apply_model(graphdef, abstract, p, b), b)["nll_sum"]
        grad = jax.jit(jax.value_and_grad(loss))
        compiled = grad.lower(params, batch).compile()
        value, grads = grad(params, batch)
        # Whole-batch activations: [8 sequences, 64 positions, ...] on one device.
        whole = sorted(set(re.findall(r"[fb]f?\\d+\\[8,64,\\d+(?:,\\d+)?\\]", compiled.as_text())))
        out[f"{mesh_shape}/{constrained}"] = dict(
            loss=float(value), grad_norm=float(jnp.sqrt(sum(jnp.sum(g * g) for g in
                                                          jax.tree.leaves(grads)))),
            temp=compiled.memory_analysis().temp_size_in_bytes, whole_batch=whole)
    print(json.dumps(out))
    """)


@pytest.mark.slow
def test_activation_constraints_split_activations_by_batch_on_eight_devices():
  """An fsdp=8 mesh of simulated CPU devices (a subprocess): without the constraints XLA keeps
  some activations whole-batch on every device; with them none is, and the numbers agree."""
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8',
         'JAX_PLATFORMS': 'cpu'}
  r = subprocess.run([sys.executable, '-c', _FSDP_ACTIVATIONS], cwd=REPO, env=env,
                     capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  fsdp, constrained = out['(1, 8, 1)/False'], out['(1, 8, 1)/True']
  assert fsdp['whole_batch'], fsdp  # The problem the constraints solve is there without them.
  assert constrained['whole_batch'] == []
  assert constrained['temp'] < fsdp['temp']
  for mesh_shape in ('(1, 8, 1)', '(2, 2, 2)'):
    plain, constrained = out[f'{mesh_shape}/False'], out[f'{mesh_shape}/True']
    assert constrained['loss'] == pytest.approx(plain['loss'], rel=1e-5)
    assert constrained['grad_norm'] == pytest.approx(plain['grad_norm'], rel=1e-4)
  assert out['(2, 2, 2)/True']['whole_batch'] == []
