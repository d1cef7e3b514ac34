"""Tests for pausejax.stream, the streaming KV cache with attention sinks."""

from __future__ import annotations

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pausejax import decode
from pausejax import model as model_lib
from pausejax import stream
from pausejax.errors import UsageError

V = 128
CFG = model_lib.ModelConfig(vocab_size=V, num_layers=2, d_model=32, num_heads=4, head_dim=8,
                            mlp_dim=64, tied_embeddings=True)
_step = nnx.jit(stream.step)
_forward = nnx.jit(lambda m, t: m(t))


def _model(**overrides) -> model_lib.Decoder:
  """One set of parameters (seed 0) for every layout: scanned layers are the stacked ones."""
  base = model_lib.Decoder(dataclasses.replace(CFG, num_layers=overrides.get("num_layers", 2)),
                           rngs=nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(base, nnx.Param))
  cfg = dataclasses.replace(base.cfg, **overrides)
  return decode.model_from_params(cfg, model_lib.stack_layers(params) if cfg.scan_layers
                                  else params)


MODELS = {f"scan={scan},zero_sink={sink}": dict(scan_layers=scan, zero_sink=sink)
          for scan in (False, True) for sink in (False, True)}


@pytest.fixture(scope="module", params=list(MODELS))
def any_model(request):
  """Every layout: unrolled or scanned layers, with or without the zero sink."""
  return _model(**MODELS[request.param])


@pytest.fixture(scope="module", params=["scan=False,zero_sink=False", "scan=True,zero_sink=True"])
def model(request):
  """The two ends of MODELS, for the slower tests."""
  return _model(**MODELS[request.param])


def _tokens(seed: int, shape) -> np.ndarray:
  return np.asarray(jax.random.randint(jax.random.key(seed), shape, 0, V))


def _feed(model, tokens_BxN, cache):
  """Every step's logits, BxNxV, and the final cache."""
  out = []
  for column_B in tokens_BxN.T:
    logits_BxV, cache = _step(model, jnp.asarray(column_B), cache)
    out.append(logits_BxV)
  return jnp.stack(out, axis=1), cache


def test_while_the_stream_fits_it_is_the_dense_cache_and_the_forward_pass(any_model):
  """2 sinks + 8 window slots: the 11th token still sees all 10 cached ones, nothing evicted."""
  model = any_model
  tokens_BxN = _tokens(0, (2, 11))  # Rows differ.
  streamed_BxNxV, cache = _feed(model, tokens_BxN, stream.init(model, 2, 2, 8))
  np.testing.assert_allclose(streamed_BxNxV, _forward(model, tokens_BxN), atol=1e-5, rtol=1e-5)
  dense_step = nnx.jit(lambda m, t, c: m.decode_step(t, c))
  dense = model.init_cache(2, 11)
  for i in range(11):
    logits_BxV, dense = dense_step(model, jnp.asarray(tokens_BxN[:, i]), dense)
    np.testing.assert_allclose(streamed_BxNxV[:, i], logits_BxV, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(cache.lengths_B, [11, 11])


@pytest.mark.parametrize("overrides", [dict(), dict(zero_sink=True, scan_layers=True)])
def test_positions_are_those_inside_the_cache(overrides):
  """After tokens 0..8 with 4 sinks + 3 window slots the cache holds [0,1,2,3,6,7,8] at positions
  0..6 and token 9 is read at position 7: its logits are the forward pass over [0,1,2,3,6,7,8,9].
  One layer: deeper layers' cached keys also depend on what each token saw when it was fed, so
  only there is the comparison exact."""
  model = _model(num_layers=1, **overrides)
  tokens_1xN = _tokens(1, (1, 10))
  logits_1xNxV, cache = _feed(model, tokens_1xN, stream.init(model, 1, 4, 3))
  expected_1xV = _forward(model, tokens_1xN[:, [0, 1, 2, 3, 6, 7, 8, 9]])[:, -1]
  np.testing.assert_allclose(logits_1xNxV[:, -1], expected_1xV, atol=1e-5, rtol=1e-5)
  # Without the sinks' positions the answer differs (the test can fail).
  shifted_1xV = _forward(model, tokens_1xN[:, 6:])[:, -1]
  assert np.abs(logits_1xNxV[:, -1] - shifted_1xV).max() > 1e-3
  # The layout after token 8 (ring slots 4, 5, 6 hold tokens 7, 8, 6; token 9 goes to slot 6).
  layout = stream._layout(jnp.array([9]), 4, 3)
  np.testing.assert_array_equal(layout.positions_BxC, [[0, 1, 2, 3, 5, 6, 4]])
  assert bool(layout.valid_BxC.all()) and int(layout.query_B[0]) == 7
  assert int(layout.write_B[0]) == 6
  np.testing.assert_array_equal(cache.lengths_B, [10])


def test_sinks_are_never_evicted_and_memory_is_constant(model):
  tokens_BxN = _tokens(2, (2, 40))
  cache = stream.init(model, 2, 2, 5)
  size = stream.cache_bytes(cache)
  layers, slots = CFG.num_layers, 2 + 5
  assert size == 2 * layers * 2 * slots * CFG.num_heads * CFG.head_dim * 4 + 2 * 4
  _, early = _feed(model, tokens_BxN[:, :3], cache)
  _, late = _feed(model, tokens_BxN[:, 3:], early)

  def keys(cache):  # NxBxCxHxK either way.
    return np.asarray(cache.keys) if model.cfg.scan_layers else np.stack(cache.keys)

  np.testing.assert_array_equal(keys(late)[:, :, :2], keys(early)[:, :, :2])  # Sink slots.
  assert not np.array_equal(keys(late)[:, :, 2:], keys(early)[:, :, 2:])      # Window slots.
  assert stream.cache_bytes(late) == size
  assert bool(stream._layout(late.lengths_B, 2, 5).valid_BxC.all())


def test_batch_rows_are_independent_streams(model):
  """Rows of different tokens (and, through prefill, lengths) equal one stream each."""
  tokens_BxN = _tokens(3, (3, 30))
  nll_BxM = stream.stream_nll(model, tokens_BxN, 2, 6, chunk=8)
  assert nll_BxM.shape == (3, 29) and nll_BxM.dtype == np.float32
  for b in range(3):
    np.testing.assert_allclose(nll_BxM[b:b + 1], stream.stream_nll(model, tokens_BxN[b:b + 1],
                                                                   2, 6, chunk=8),
                               atol=1e-5, rtol=1e-5)
  lengths_B = np.array([30, 4, 17])
  prefill = nnx.jit(stream.prefill, static_argnums=(3, 4))
  logits_BxV, cache = prefill(model, tokens_BxN, lengths_B, 2, 6)
  np.testing.assert_array_equal(cache.lengths_B, lengths_B)
  for b, n in enumerate(lengths_B):
    alone_1xNxV, _ = _feed(model, tokens_BxN[b:b + 1, :n], stream.init(model, 1, 2, 6))
    np.testing.assert_allclose(logits_BxV[b], alone_1xNxV[0, -1], atol=1e-5, rtol=1e-5)


def test_stream_nll_known_answers(model):
  """Without eviction the streamed NLL is the forward pass's; the chunking changes nothing."""
  tokens_BxN = _tokens(4, (2, 21))
  logits_BxNxV = _forward(model, tokens_BxN)[:, :-1]
  expected_BxM = (jax.nn.logsumexp(logits_BxNxV, -1)
                  - jnp.take_along_axis(logits_BxNxV, tokens_BxN[:, 1:, None], -1)[..., 0])
  streamed_BxM = stream.stream_nll(model, tokens_BxN, 1, 19, chunk=6)  # 4 chunks, one padded.
  np.testing.assert_allclose(streamed_BxM, expected_BxM, atol=1e-5, rtol=1e-5)
  dense_BxM = stream.scan_nll(model, tokens_BxN, model.init_cache(2, 20), chunk=7)
  np.testing.assert_allclose(dense_BxM, expected_BxM, atol=1e-5, rtol=1e-5)
  calls = []
  evicting_BxM = stream.stream_nll(model, tokens_BxN, 1, 4, chunk=8,
                                   progress=lambda done, total: calls.append((done, total)))
  assert calls == [(8, 20), (16, 20), (20, 20)]
  np.testing.assert_allclose(evicting_BxM[:, :6], expected_BxM[:, :6], atol=1e-5, rtol=1e-5)
  assert np.abs(evicting_BxM[:, 6:] - expected_BxM[:, 6:]).max() > 1e-3


@pytest.mark.parametrize("num_sinks, window, message", [
    (0, 0, "window=0 is invalid: an integer >= 1"),
    (-1, 4, "num_sinks=-1 is invalid: an integer >= 0"),
    (5, 4, "num_sinks=5 is invalid: at most window=4"),
    (2, 2.5, "window=2.5 is invalid"),
    (4, 60, r"window=60 is invalid: num_sinks \+ window < model.max_len=64"),
])
def test_bad_settings_raise_one_line_usage_errors(num_sinks, window, message):
  with pytest.raises(UsageError, match=message) as e:
    stream.check_settings(num_sinks, window, max_len=64)
  assert "\n" not in str(e.value)


def test_init_checks_sizes_and_flags_get_their_prefix():
  with pytest.raises(UsageError, match="^--window=0 is invalid"):
    stream.check_settings(1, 0, prefix="--")
  with pytest.raises(UsageError, match="^window=0 is invalid"):
    stream.init(_model(), 1, 0, 0)
