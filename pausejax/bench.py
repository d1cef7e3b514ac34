r"""Benchmark: train-step throughput and MFU next to a minimal decoder's, input pipeline, decoding
(with the KV cache and without; streaming with attention sinks and sliding-window re-computation).

    python -m pausejax.bench --config=configs/tiny.py [--train_steps=10] [--pipeline_batches=50]
    python -m pausejax.bench --config=configs/c4_130m.py --base_vocab_size=32000 --nopipeline \
        --config.global_batch_size=32   # model speed only: no data, no TensorFlow

It first prints the conditions (devices, host cores, load average, versions): figures measured
under other load are not comparable. Train throughput uses random token batches of the config's
shape (model speed alone), best of 3 rounds, next to a minimal JAX decoder of the same shape
timed the same way (model FLOPs by one formula for both, so their GFLOP/s compare); the
pipeline figures run the real SeqIO pipeline of `config.task` as configured and without its pauses
(the task's `*_pause`-less twin, or `pause.rate` unset). Streaming (`bench_streaming`) scores
one random stream of --stream_tokens tokens with the attention-sink cache and with the paper's
sliding window with re-computation at the same window, on the same random model (StreamingLLM's
speed comparison). Speed is measured here, never asserted in tests.
"""

from __future__ import annotations

import json
import os
import platform
import time
from typing import Any

from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import optax

from pausejax import build
from pausejax import config as config_lib
from pausejax import distributed
from pausejax import fs
from pausejax import metrics
from pausejax import model as model_lib
from pausejax import sharding
from pausejax import stream
from pausejax.errors import UsageError
from pausejax.errors import run

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/tiny.py.")
_TRAIN_STEPS = flags.DEFINE_integer(
    "train_steps", 10, "Timed train steps per round (best of 3 rounds, after 2 warm-up steps).")
_PIPELINE_BATCHES = flags.DEFINE_integer("pipeline_batches", 50,
                                         "Timed input batches per pipeline (after 5 warm-up).")
_JSON = flags.DEFINE_string("json", "", "Also write the results to this JSON file.")
_PIPELINE = flags.DEFINE_bool("pipeline", True, "Also time the input pipeline (needs the data).")
_DECODE = flags.DEFINE_bool("decode", True, "Also time decoding, with the KV cache and without.")
_STREAMING = flags.DEFINE_bool(
    "streaming", True, "Also time streaming with the attention-sink cache against sliding window "
    "with re-computation at the same window.")
_STREAM_SINKS = flags.DEFINE_integer("stream_num_sinks", 4, "Sinks of the streaming cache.")
_STREAM_WINDOW = flags.DEFINE_integer(
    "stream_window", None, "Recent tokens of the streaming cache (default: seq_len // 2 - "
    "--stream_num_sinks, the paper's cache of half the pretraining window).")
_STREAM_TOKENS = flags.DEFINE_integer(
    "stream_tokens", 0, "Length of the random stream (default: 4 x the cache).")
_REFERENCE = flags.DEFINE_bool(
    "reference", True, "Also time a minimal JAX decoder of the same shape (fused projections, "
    "no metrics), the figure pausejax's train step is compared with.")
_BASE_VOCAB = flags.DEFINE_integer(
    "base_vocab_size", 0, "Use this base vocabulary size instead of loading config.vocab_path "
    "(e.g. 32000 for T5's cc_all.32000); with --nopipeline no data or TensorFlow is needed.")

NUM_SPECIALS = 3  # <pause>, <sink>, <backspace>: pausejax.specials.


def bench_train(config, padded_vocab: int, pause_id: int, steps: int) -> dict[str, float]:
  run_ = build.build(config, padded_vocab, pause_id)
  state = run_.init()
  step_fn = run_.train_step()
  rng = np.random.default_rng(0)
  shape = (config.global_batch_size, config.seq_len)
  tokens = rng.integers(3, pause_id, size=shape, dtype=np.int32)
  batch = {"decoder_input_tokens": tokens, "decoder_target_tokens": np.roll(tokens, -1, axis=1),
           "decoder_loss_weights": np.ones(shape, np.int32)}
  batch = jax.device_put(batch, run_.batch_sharding)
  holder = [state]  # The step donates its state: each call trains on from the last.

  def one_step():
    holder[0], step_metrics = step_fn(holder[0], batch)
    return step_metrics["train_loss"]

  dt = _time(one_step, steps)
  peak, source = metrics.peak_flops_per_device()
  flops = model_lib.flops_per_token(run_.model_cfg, config.seq_len) * shape[0] * shape[1]
  return {
      "params": model_lib.count_params(run_.model_cfg),
      "step_time_s": dt,
      "train_tokens_per_sec": shape[0] * shape[1] / dt,
      "train_tokens_per_sec_per_device": shape[0] * shape[1] / dt / jax.device_count(),
      "model_flops_per_sec": flops / dt,
      "mfu": metrics.mfu(flops, dt, jax.device_count(), peak),
      "peak_flops_per_device": peak,
      "peak_source": source,
  }


# ---------------------------------------------------------------------------------------------
# A minimal decoder of the same shape, timed in the same run: the figure pausejax's own step is
# held to. Plain jax arrays and functions, no framework: fused QKV and gate/up projections,
# RoPE tables built once, plain causal attention, loss without metrics, AdamW with the same
# clipping. Model FLOPs use the same formula (`model.flops_per_token`), so GFLOP/s compare.

def _reference_params(cfg: model_lib.ModelConfig, seed: int = 0) -> dict:
  d, h, k, f, v = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
  keys = iter(jax.random.split(jax.random.key(seed), 1 + 4 * cfg.num_layers))
  normal = lambda shape, fan_in: jax.random.normal(next(keys), shape) / np.sqrt(fan_in)
  layer = lambda: {"qkv": normal((d, 3 * h * k), d), "out": normal((h * k, d), h * k),
                   "gate_up": normal((d, 2 * f), d), "down": normal((f, d), f),
                   "norm1": jnp.ones(d), "norm2": jnp.ones(d)}
  return {"embed": normal((v, d), d), "layers": [layer() for _ in range(cfg.num_layers)],
          "norm": jnp.ones(d)}


def _reference_loss(params: dict, tokens_BxL, targets_BxL, cfg: model_lib.ModelConfig):
  h, k = cfg.num_heads, cfg.head_dim
  batch, length = tokens_BxL.shape
  inv_R = cfg.rope_theta ** (-jnp.arange(0, k, 2) / k)
  angle_Lx1xR = (jnp.arange(length)[:, None] * inv_R)[:, None]
  sin, cos = jnp.sin(angle_Lx1xR), jnp.cos(angle_Lx1xR)

  def rope(x_BxLxHxK):
    x1, x2 = jnp.split(x_BxLxHxK, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

  def norm(x, scale):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + cfg.norm_eps) * scale

  x_BxLxD = params["embed"][tokens_BxL]
  for p in params["layers"]:
    qkv = (norm(x_BxLxD, p["norm1"]) @ p["qkv"]).reshape(batch, length, 3, h, k)
    q, kk, v = rope(qkv[:, :, 0]), rope(qkv[:, :, 1]), qkv[:, :, 2]
    o_BxLxHxK = jax.nn.dot_product_attention(q, kk, v, is_causal=True)
    x_BxLxD = x_BxLxD + o_BxLxHxK.reshape(batch, length, h * k) @ p["out"]
    gate, up = jnp.split(norm(x_BxLxD, p["norm2"]) @ p["gate_up"], 2, axis=-1)
    x_BxLxD = x_BxLxD + (jax.nn.silu(gate) * up) @ p["down"]
  logits_BxLxV = norm(x_BxLxD, params["norm"]) @ params["embed"].T
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL).mean()


def bench_reference(config, padded_vocab: int, steps: int) -> dict[str, float]:
  """Train-step time of the minimal decoder at the config's shape, on one device."""
  cfg = model_lib.ModelConfig.from_config(config.model, padded_vocab)
  params = _reference_params(cfg)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.1))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, tokens_BxL, targets_BxL):
    loss, grads = jax.value_and_grad(_reference_loss)(params, tokens_BxL, targets_BxL, cfg)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  shape = (config.global_batch_size, config.seq_len)
  tokens = np.random.default_rng(0).integers(3, padded_vocab - 128, size=shape, dtype=np.int32)
  targets = np.roll(tokens, -1, axis=1)
  holder = [params, opt_state]

  def one_step():
    holder[0], holder[1], loss = step(holder[0], holder[1], tokens, targets)
    return loss

  dt = _time(one_step, steps)
  flops = model_lib.flops_per_token(cfg, config.seq_len) * shape[0] * shape[1]
  return {"reference_step_time_s": dt, "reference_model_flops_per_sec": flops / dt}


def _time(run, steps: int) -> float:
  """Seconds per call of `run` (which returns a jax value): best of 3 rounds of `steps` calls,
  after two warm-up calls; the best round is the least disturbed by other load."""
  for _ in range(2):
    jax.block_until_ready(run())
  best = float("inf")
  for _ in range(3):
    t0 = time.perf_counter()
    for _ in range(steps):
      out = run()
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - t0) / steps)
  return best


def bench_streaming(model_cfg: model_lib.ModelConfig, *, num_sinks: int = 4, window: int = 124,
                    stream_tokens: int = 512, chunk: int = 256, recompute_batch: int = 16,
                    repeats: int = 2, seed: int = 0) -> dict[str, Any]:
  """Tokens/s of streaming with attention sinks vs sliding window with re-computation.

  One randomly initialised model of `model_cfg` scores one random stream of `stream_tokens`
  tokens (id 0 first, as a run's streams start) both ways, each token's NLL read after the ones
  before it: `stream.stream_nll` through num_sinks + window cache slots, and
  `stream.recompute_nll` with a fresh forward pass over the num_sinks + window + 1 tokens up to
  each token (what a cache query sees: the cached tokens and itself). Each rate is the tokens
  scored / the wall time of one whole call, the best of `repeats` calls after one compiling call
  on the same stream. recompute_nll gets its first span predictions from one causal pass, so on
  short streams its rate is above its per-token rate and the speedup understates the steady one.
  The NLL means come back too: equal while the window covers the stream.
  """
  stream.check_settings(num_sinks, window, model_cfg.max_len)
  if not isinstance(stream_tokens, int) or stream_tokens < 2:
    raise UsageError.setting("stream_tokens", stream_tokens, "an integer >= 2")
  model = model_lib.Decoder(model_cfg, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  tokens_1xN = np.concatenate([[0], rng.integers(1, model_cfg.vocab_size, stream_tokens - 1)])
  tokens_1xN = tokens_1xN.astype(np.int32)[None]
  slots = num_sinks + window
  runs = {"streaming": lambda: stream.stream_nll(model, tokens_1xN, num_sinks, window,
                                                 chunk=chunk),
          "recompute": lambda: stream.recompute_nll(model, tokens_1xN, slots + 1,
                                                    batch_size=recompute_batch)}
  results: dict[str, Any] = {"streaming_num_sinks": num_sinks, "streaming_window": window,
                             "recompute_span": slots + 1, "stream_tokens": stream_tokens}
  for name, fn in runs.items():
    fn()  # Compile, on the very shapes that are timed.
    best = float("inf")
    for _ in range(repeats):
      start = time.perf_counter()
      nll_1xM = fn()  # Numpy: the call has finished.
      best = min(best, time.perf_counter() - start)
    results[f"{name}_tokens_scored"] = int(nll_1xM.size)
    results[f"{name}_tokens_per_sec"] = nll_1xM.size / best
    results[f"{name}_nll_mean"] = float(np.mean(nll_1xM, dtype=np.float64))
  results["streaming_speedup"] = (results["streaming_tokens_per_sec"]
                                  / results["recompute_tokens_per_sec"])
  return results


def conditions() -> dict[str, Any]:
  """What the figures were measured under: machine, load and versions."""
  load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
  return {"device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
          "host_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
          else os.cpu_count(),
          "load_average_1m_5m_15m": [round(x, 2) for x in load],
          "jax": jax.__version__, "python": platform.python_version()}


def bench_pipeline(config, batches: int, data=None) -> float:
  """Tokens/s of the batched model features (all positions, pauses included), read as training
  reads them: this process's data shards, joined into its rows of each global batch. `data` is
  `data.prepare(config)` when the caller has it already."""
  from pausejax import data as data_lib  # Only here: it loads TensorFlow and SeqIO.
  data = data or data_lib.prepare(config)
  batch_sharding = sharding.batch_sharding(sharding.make_mesh(config.mesh),
                                           sharding.rules_dict(config.logical_axis_rules))
  it = data_lib.train_iterator(data, config, data_lib.plan(config, batch_sharding))
  for _ in range(5):
    next(it)
  t0 = time.perf_counter()
  rows = 0
  for _ in range(batches):
    rows += len(next(it)["decoder_target_tokens"])
  dt = time.perf_counter() - t0
  return rows * config.seq_len / dt


def without_pauses(config, rate_from: str):
  """The config with the same data and no pause insertion, or None if there is no such task."""
  from pausejax import registry  # Only with the pipeline: it loads TensorFlow.
  config = config.copy_and_resolve_references()
  with config.unlocked():
    if rate_from == registry.RATE_FROM_CONFIG:
      config.pause.rate = None
    elif rate_from == registry.RATE_FROM_TASK:
      base = registry.unpaused_twin(config.task)
      if base is None:
        return None
      config.task, config.eval_task = base, ""
  return config


def _stream_settings(config) -> dict[str, int]:
  """bench_streaming's sizes from the flags, checked (UsageError naming the flag)."""
  num_sinks = _STREAM_SINKS.value
  window = (config.seq_len // 2 - num_sinks if _STREAM_WINDOW.value is None
            else _STREAM_WINDOW.value)
  stream.check_settings(num_sinks, window, config.model.get("max_len"), prefix="--stream_")
  tokens = _STREAM_TOKENS.value or 4 * (num_sinks + window)
  if tokens < 2:
    raise UsageError.setting("--stream_tokens", tokens, "an integer >= 2 (0: 4 x the cache)")
  return {"num_sinks": num_sinks, "window": window, "stream_tokens": tokens}


def main(argv):
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments {argv[1:]}")
  distributed.initialize()
  config = _CONFIG.value
  if config is None:
    raise UsageError.setting("--config", None, "give a config file, e.g. --config=configs/tiny.py")
  config_lib.validate(config)
  stream_settings = _stream_settings(config) if _STREAMING.value else None  # Fail before timing.
  data = None
  if _BASE_VOCAB.value:
    vocab_size, pause_id = _BASE_VOCAB.value + NUM_SPECIALS, _BASE_VOCAB.value
  else:
    from pausejax import data as data_lib
    data = data_lib.prepare(config)
    vocab_size, pause_id = data.vocabulary.vocab_size, data.pause_id
  results = {"conditions": conditions(),
             "config": {"seq_len": config.seq_len, "global_batch_size": config.global_batch_size,
                        "task": data.train.describe() if data else config.task}}
  c = results["conditions"]
  load = ", ".join(f"{x:g}" for x in c["load_average_1m_5m_15m"])
  print(f"conditions         {c['device']} | {c['host_cores']} host cores | load average {load} | "
        f"jax {c['jax']} | python {c['python']}")
  padded = -(-vocab_size // 128) * 128  # As specials.padded_vocab_size, without importing TF.
  results.update(bench_train(config, padded, pause_id, _TRAIN_STEPS.value))
  print(f"model              {results['params'] / 1e6:.2f}M params, batch "
        f"{config.global_batch_size} x {config.seq_len}")
  print(f"train              {results['train_tokens_per_sec']:,.0f} tokens/s "
        f"({results['step_time_s'] * 1e3:.0f} ms/step), "
        f"{results['model_flops_per_sec'] / 1e9:.1f} model GFLOP/s")
  if _REFERENCE.value:
    results.update(bench_reference(config, padded, _TRAIN_STEPS.value))
    results["vs_reference"] = (results["model_flops_per_sec"]
                               / results["reference_model_flops_per_sec"])
    print(f"minimal decoder    {results['reference_model_flops_per_sec'] / 1e9:.1f} model GFLOP/s "
          f"({results['reference_step_time_s'] * 1e3:.0f} ms/step, same shape): pausejax at "
          f"{results['vs_reference']:.2f}x")
  print(f"MFU                {100 * results['mfu']:.1f}% (peak {results['peak_flops_per_device']:.3g}"
        f" FLOP/s per device, {results['peak_source']})")
  if _DECODE.value:
    from pausejax import decode
    results.update(decode.benchmark(model_lib.ModelConfig.from_config(config.model, padded),
                                    pause_id=pause_id))
  if stream_settings is not None:
    results.update(bench_streaming(model_lib.ModelConfig.from_config(config.model, padded),
                                   **stream_settings))
    print(f"streaming, {results['streaming_num_sinks']} sinks + {results['streaming_window']} "
          f"window  {results['streaming_tokens_per_sec']:,.0f} tokens/s vs recompute "
          f"{results['recompute_tokens_per_sec']:,.0f} tokens/s "
          f"({results['streaming_speedup']:.1f}x faster; {results['stream_tokens']}-token "
          f"stream, {results['streaming_tokens_scored']} scored each way)")
  if _PIPELINE.value:
    from pausejax import data as data_lib
    data = data or data_lib.prepare(config)
    results["pipeline_tokens_per_sec"] = bench_pipeline(config, _PIPELINE_BATCHES.value, data)
    print(f"pipeline           {results['pipeline_tokens_per_sec']:,.0f} tokens/s "
          f"({results['config']['task']})")
    plain = without_pauses(config, data.train.rate_from)
    if plain is not None:
      results["pipeline_tokens_per_sec_no_pauses"] = bench_pipeline(plain, _PIPELINE_BATCHES.value)
      print(f"pipeline, no pause {results['pipeline_tokens_per_sec_no_pauses']:,.0f} tokens/s")
  if _JSON.value:
    fs.write_text(_JSON.value, json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
  run(main)
