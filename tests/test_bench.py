"""Tests for pausejax.bench's streaming benchmark (what it scores, never how fast)."""

from __future__ import annotations

import pytest

from pausejax import bench
from pausejax import model as model_lib
from pausejax.errors import UsageError

CFG = model_lib.ModelConfig(vocab_size=128, num_layers=2, d_model=32, num_heads=4, head_dim=8,
                            mlp_dim=64, tied_embeddings=True)
# Small enough to compile and run in seconds; 13 scored tokens: 2 streaming chunks (one padded)
# and 4 recompute batches (one padded) with window=4.
TINY = dict(stream_tokens=14, chunk=8, recompute_batch=3, repeats=1)
KEYS = {"streaming_num_sinks", "streaming_window", "recompute_span", "stream_tokens",
        "streaming_tokens_scored", "streaming_tokens_per_sec", "streaming_nll_mean",
        "recompute_tokens_scored", "recompute_tokens_per_sec", "recompute_nll_mean",
        "streaming_speedup"}


def test_bench_streaming_scores_the_same_stream_both_ways():
  results = bench.bench_streaming(CFG, num_sinks=1, window=4, **TINY)
  assert set(results) == KEYS
  assert results["streaming_tokens_scored"] == results["recompute_tokens_scored"] == 13
  assert results["recompute_span"] == 1 + 4 + 1  # The cache's tokens and the query's own.
  assert results["streaming_tokens_per_sec"] > 0 and results["recompute_tokens_per_sec"] > 0
  assert results["streaming_speedup"] == pytest.approx(
      results["streaming_tokens_per_sec"] / results["recompute_tokens_per_sec"])


def test_bench_streaming_known_answer_when_the_window_covers_the_stream():
  """Nothing is evicted and each recompute pass sees the whole prefix: the same NLL."""
  results = bench.bench_streaming(CFG, num_sinks=1, window=13, **TINY)
  assert results["streaming_nll_mean"] == pytest.approx(results["recompute_nll_mean"],
                                                         rel=1e-5, abs=1e-6)
  # Once the window evicts, the two differ: the check above is not vacuous.
  evicting = bench.bench_streaming(CFG, num_sinks=1, window=2, **TINY)
  assert abs(evicting["streaming_nll_mean"] - evicting["recompute_nll_mean"]) > 1e-4


@pytest.mark.parametrize("settings, message", [
    (dict(num_sinks=5, window=4), "num_sinks=5 is invalid: at most window=4"),
    (dict(window=0), "window=0 is invalid"),
    (dict(stream_tokens=1), "stream_tokens=1 is invalid: an integer >= 2"),
])
def test_bench_streaming_bad_settings_raise_usage_errors(settings, message):
  with pytest.raises(UsageError, match=message):
    bench.bench_streaming(CFG, **settings)
