r"""Benchmark: train-step throughput and MFU, input pipeline with/without pauses, and decoding.

    python -m pausejax.bench --config=configs/tiny.py [--train_steps=10] [--pipeline_batches=50]
    python -m pausejax.bench --config=configs/c4_130m.py --base_vocab_size=32000 --nopipeline \
        --config.global_batch_size=32   # model speed only: no data, no TensorFlow

Train throughput uses random token batches of the config's shape (model speed alone); the
pipeline figures run the real SeqIO pipeline of `config.task` as configured and without its pauses
(the task's `*_pause`-less twin, or `pause.rate` unset). Speed is measured here, never asserted
in tests.
"""

from __future__ import annotations

import json
import time

from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from pausejax import build
from pausejax import config as config_lib
from pausejax import distributed
from pausejax import fs
from pausejax import metrics
from pausejax import model as model_lib
from pausejax import sharding
from pausejax.errors import UsageError
from pausejax.errors import run

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/tiny.py.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 10, "Timed train steps (after 2 warm-up).")
_PIPELINE_BATCHES = flags.DEFINE_integer("pipeline_batches", 50,
                                         "Timed input batches per pipeline (after 5 warm-up).")
_JSON = flags.DEFINE_string("json", "", "Also write the results to this JSON file.")
_PIPELINE = flags.DEFINE_bool("pipeline", True, "Also time the input pipeline (needs the data).")
_DECODE = flags.DEFINE_bool("decode", True, "Also time decoding, with the KV cache and without.")
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
  for _ in range(2):  # Compile and warm up.
    state, m = step_fn(state, batch)
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, m = step_fn(state, batch)
  jax.block_until_ready(m)
  dt = (time.perf_counter() - t0) / steps
  peak, source = metrics.peak_flops_per_device()
  flops = model_lib.flops_per_token(run_.model_cfg, config.seq_len) * shape[0] * shape[1]
  return {
      "params": model_lib.count_params(run_.model_cfg),
      "step_time_s": dt,
      "train_tokens_per_sec": shape[0] * shape[1] / dt,
      "train_tokens_per_sec_per_device": shape[0] * shape[1] / dt / jax.device_count(),
      "mfu": metrics.mfu(flops, dt, jax.device_count(), peak),
      "peak_flops_per_device": peak,
      "peak_source": source,
  }


def bench_pipeline(config, batches: int) -> float:
  """Tokens/s of the batched model features (all positions, pauses included), read as training
  reads them: this process's data shards, joined into its rows of each global batch."""
  from pausejax import data as data_lib  # Only here: it loads TensorFlow and SeqIO.
  data = data_lib.prepare(config)
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
  import seqio  # Only with the pipeline: it loads TensorFlow.
  config = config.copy_and_resolve_references()
  with config.unlocked():
    if rate_from == "pause.rate":
      config.pause.rate = None
    elif rate_from == "the task":
      base = config.task.removesuffix("_pause")
      if base == config.task or base not in {*seqio.TaskRegistry.names(),
                                             *seqio.MixtureRegistry.names()}:
        return None
      config.task, config.eval_task = base, ""
  return config


def main(argv):
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments {argv[1:]}")
  distributed.initialize()
  config = _CONFIG.value
  if config is None:
    raise UsageError.setting("--config", None, "give a config file, e.g. --config=configs/tiny.py")
  config_lib.validate(config)
  data = None
  if _BASE_VOCAB.value:
    vocab_size, pause_id = _BASE_VOCAB.value + NUM_SPECIALS, _BASE_VOCAB.value
  else:
    from pausejax import data as data_lib
    data = data_lib.prepare(config)
    vocab_size, pause_id = data.vocabulary.vocab_size, data.pause_id
  results = {"device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
             "config": {"seq_len": config.seq_len, "global_batch_size": config.global_batch_size,
                        "task": data.train.describe() if data else config.task}}
  padded = -(-vocab_size // 128) * 128  # As specials.padded_vocab_size, without importing TF.
  results.update(bench_train(config, padded, pause_id, _TRAIN_STEPS.value))
  if _DECODE.value:
    from pausejax import decode
    results.update(decode.benchmark(model_lib.ModelConfig.from_config(config.model, padded),
                                    pause_id=pause_id))
  if _PIPELINE.value:
    from pausejax import data as data_lib
    data = data or data_lib.prepare(config)
    results["pipeline_tokens_per_sec"] = bench_pipeline(config, _PIPELINE_BATCHES.value)
    plain = without_pauses(config, data.train.rate_from)
    if plain is not None:
      results["pipeline_tokens_per_sec_no_pauses"] = bench_pipeline(plain, _PIPELINE_BATCHES.value)
  print(f"device             {results['device']}")
  print(f"model              {results['params'] / 1e6:.2f}M params, batch "
        f"{config.global_batch_size} x {config.seq_len}")
  print(f"train              {results['train_tokens_per_sec']:,.0f} tokens/s "
        f"({results['step_time_s'] * 1e3:.0f} ms/step)")
  print(f"MFU                {100 * results['mfu']:.1f}% (peak {results['peak_flops_per_device']:.3g}"
        f" FLOP/s per device, {results['peak_source']})")
  if _PIPELINE.value:
    print(f"pipeline           {results['pipeline_tokens_per_sec']:,.0f} tokens/s "
          f"({results['config']['task']})")
    if "pipeline_tokens_per_sec_no_pauses" in results:
      print(f"pipeline, no pause {results['pipeline_tokens_per_sec_no_pauses']:,.0f} tokens/s")
  if _JSON.value:
    fs.write_text(_JSON.value, json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
  run(main)
