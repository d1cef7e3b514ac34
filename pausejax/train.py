r"""Pretrain a (pause-token) language model.

    python -m pausejax.train --config=configs/tiny.py --workdir=runs/tiny \
        [--config.pause.rate=0.0] [--config.num_train_steps=500] ...

Reads top to bottom: config -> mesh -> data -> model -> optimizer -> checkpoint -> loop.
Re-running the same command resumes from the latest checkpoint in `--workdir`, data position
included, and logs exactly the losses an uninterrupted run would. SIGTERM (preemption) saves a
checkpoint at the current step and exits cleanly.

Outputs in --workdir: metrics.jsonl, TensorBoard events, checkpoints/, loss.png, summary.txt.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from pausejax import checkpoint
from pausejax import config as config_lib
from pausejax import data as data_lib
from pausejax import distributed
from pausejax import metrics
from pausejax import model as model_lib
from pausejax import sharding
from pausejax import specials
from pausejax import step as step_lib
from pausejax.errors import UsageError
from pausejax.errors import check_writable_dir
from pausejax.errors import run

PyTree = Any


def evaluate(eval_step, params, eval_ds, batch_sharding) -> dict[str, float]:
  totals = None
  for batch in eval_ds:
    terms = eval_step(params, _global_batch(batch, batch_sharding))
    totals = terms if totals is None else jax.tree.map(jnp.add, totals, terms)
  if totals is None:
    raise UsageError.setting("eval_task", "", "the held-out split gave no full batch; lower "
                             "global_batch_size or seq_len")
  totals = jax.device_get(totals)
  n = max(float(totals["weight_sum"]), 1.0)
  return {"eval_loss": float(totals["nll_sum"]) / n, "eval_accuracy": float(totals["correct_sum"]) / n}


def _global_batch(batch, batch_sharding) -> dict[str, jax.Array]:
  """This process's rows of the batch (numpy or tf) -> one global array per feature."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
          for k, v in batch.items()}


class _Preemption:
  """SIGTERM -> finish the current step, save a checkpoint, exit cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def close(self):
    signal.signal(signal.SIGTERM, self._previous)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # All hosts agree on the step to stop at.
      return self.requested or multihost_utils.reached_preemption_sync_point(step)
    return self.requested


# ----------------------------------------------------------------------------------------------

def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  # 1. Config: every bad value fails here, before anything is written.
  config_lib.validate(config)
  check_writable_dir(workdir, "workdir")

  # 2. Mesh.
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_dict(config.logical_axis_rules)
  sharding.check_batch_divisible(config.global_batch_size, mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh, rules)

  # 3. Data: this process reads only the shards whose rows its devices hold.
  data = data_lib.prepare(config)
  shard_plan = data_lib.plan(config, batch_sharding)

  # 4. Model: parameters are created directly with their shardings, never whole on one host.
  # With the mesh and rules the model constrains its activations (split by batch, not by fsdp).
  model_cfg = model_lib.ModelConfig.from_config(
      config.model, specials.padded_vocab_size(data.vocabulary.vocab_size), mesh=mesh,
      rules=config.logical_axis_rules)
  graphdef, abstract_params = step_lib.abstract_model(model_cfg)
  param_specs = step_lib.param_logical_specs(abstract_params)
  param_shardings = sharding.named_shardings(param_specs, mesh, rules)

  # 5. Optimizer.
  tx, schedule = step_lib.make_optimizer(config.optimizer, config.num_train_steps, param_specs)

  init_state, abstract_state, state_shardings = step_lib.make_state(model_cfg, tx, config.seed,
                                                           param_shardings, mesh)
  replicated = state_shardings["step"]

  # 6. Checkpoint: refuse a workdir whose checkpoint holds another model, before writing.
  # Fine-tuning (init_from) starts from another run's parameters with a fresh optimizer; once
  # this workdir has a checkpoint of its own, re-running resumes from that instead.
  ckpt_dir = os.path.join(workdir, "checkpoints")
  init_params = None
  if config.init_from and not checkpoint.has_checkpoint(ckpt_dir):
    init_params = checkpoint.load_params(config.init_from, abstract_state["params"])
  ckpt = checkpoint.Checkpointer(
      ckpt_dir, keep=config.keep_checkpoints,
      save_every_steps=config.checkpoint_every_steps or config.num_train_steps or 1,
      async_save=config.async_checkpointing)
  ckpt.check_compatible(abstract_state)

  train_iter = data_lib.train_iterator(
      data, config, shard_plan,
      os.path.join(workdir, "input_digests") if config.debug_input_digests else None)
  eval_ds = data_lib.eval_dataset(data, config, shard_plan)
  start_step = ckpt.latest_step()
  if start_step is None:
    state = jax.jit(init_state, out_shardings=state_shardings)()
    if init_params is not None:  # Adam's moments start at zero whatever the parameters.
      state = {**state, "params": init_params}
      if jax.process_index() == 0:
        print(f"Initialised parameters from {config.init_from}", flush=True)
    start_step = 0
  else:
    state = ckpt.restore(start_step, abstract_state, train_iter)
    if jax.process_index() == 0:
      print(f"Resumed from step {start_step}", flush=True)

  lead = jax.process_index() == 0
  logger = metrics.MetricsLogger(workdir, total_steps=config.num_train_steps, is_lead_host=lead)
  logger.truncate_after(start_step)
  train_step = jax.jit(step_lib.make_train_step(graphdef, abstract_params, tx, schedule, data.pause_id,
                                       config.microbatches),
                       in_shardings=(state_shardings, batch_sharding),
                       out_shardings=(state_shardings, replicated), donate_argnums=0)
  eval_step = jax.jit(step_lib.make_eval_step(graphdef, abstract_params),
                      in_shardings=(param_shardings, batch_sharding), out_shardings=replicated)

  num_params = model_lib.count_params(model_cfg)
  tokens_per_step = config.global_batch_size * config.seq_len
  flops_per_step = model_lib.flops_per_token(model_cfg, config.seq_len) * tokens_per_step
  peak, peak_source = metrics.peak_flops_per_device()
  if lead:
    print(f"pausejax: {num_params / 1e6:.2f}M params | task {config.task} | pause.rate "
          f"{config.pause.rate} | mesh {dict(mesh.shape)} | {jax.device_count()} "
          f"{jax.devices()[0].device_kind} device(s) | workdir {workdir}", flush=True)

  # 7. Loop.
  preemption = _Preemption()
  first_eval, last_eval, last = None, None, {}
  totals = {"real_tokens": 0.0, "total_tokens": 0.0}
  t_start = time.time()
  t_window, window_steps = time.time(), 0
  step = start_step
  while step < config.num_train_steps:
    batch = _global_batch(next(train_iter), batch_sharding)
    state, step_metrics = train_step(state, batch)
    step += 1
    window_steps += 1
    if step % config.log_every_steps == 0 or step == config.num_train_steps:
      m = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
      dt = (time.time() - t_window) / window_steps
      t_window, window_steps = time.time(), 0
      real, total = m.pop("real_tokens"), m.pop("total_tokens")
      totals["real_tokens"] += real  # Sampled at log steps; exact totals come from step counts.
      m.update({
          "step_time": dt,
          "tokens_per_sec": total / dt,
          "tokens_per_sec_per_device": total / dt / jax.device_count(),
          "real_tokens_per_sec": real / dt,
          "mfu": metrics.mfu(flops_per_step, dt, jax.device_count(), peak),
      })
      logger.write(step, m)
      logger.progress(step, m)
      last = m
    if config.eval_every_steps and step % config.eval_every_steps == 0 or \
        step == config.num_train_steps:
      e = evaluate(eval_step, state["params"], eval_ds, batch_sharding)
      logger.write(step, e)
      if lead:
        print(f"step {step}/{config.num_train_steps} | eval loss {e['eval_loss']:.3f} | "
              f"eval accuracy {100 * e['eval_accuracy']:.1f}%", flush=True)
      first_eval = first_eval or {"step": step, **e}
      last_eval = {"step": step, **e}
      t_window = time.time()  # Eval time is not training time.
    ckpt.save(step, state, train_iter, force=step == config.num_train_steps)
    if preemption.reached(step):
      ckpt.save(step, state, train_iter, force=True)
      ckpt.wait_until_finished()
      ckpt.close()
      logger.close()
      preemption.close()
      print(f"Stopped at step {step} on SIGTERM; checkpoint saved. Re-run the same command to "
            "resume.", flush=True)
      return {"step": step, "preempted": True}

  ckpt.wait_until_finished()
  ckpt.close()
  logger.close()
  preemption.close()
  wall = time.time() - t_start
  steps_run = step - start_step
  info = {
      "params": num_params, "steps": step, "steps_this_run": steps_run,
      "tokens_total": step * tokens_per_step,
      "pause_fraction": last.get("pause_fraction"),
      "train_loss": last.get("train_loss"),
      "first_eval": first_eval, "final_eval": last_eval,
      "wall_time": wall, "tokens_per_sec": last.get("tokens_per_sec"),
      "real_tokens_per_sec": last.get("real_tokens_per_sec"), "mfu": last.get("mfu"),
      "peak_source": peak_source, "workdir": workdir,
  }
  if lead:
    metrics.plot_losses(os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "loss.png"))
    text = metrics.format_summary(info)
    with open(os.path.join(workdir, "summary.txt"), "w") as f:
      f.write(text + "\n")
    print(text, flush=True)
  return info


def main(argv):
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments {argv[1:]}; settings go in --config.key=value")
  distributed.initialize()
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  if config is None:
    raise UsageError.setting("--config", None, "give a config file, e.g. --config=configs/tiny.py")
  if not workdir:
    raise UsageError.setting("--workdir", workdir, "give a run directory, e.g. runs/tiny")
  train_and_evaluate(config, workdir)


def define_flags() -> None:
  """Flags of the CLI only, so other modules can import this one and define their own."""
  config_flags.DEFINE_config_file(
      "config", None, "Path to a config file in configs/ (e.g. configs/tiny.py). Override any "
      "key with --config.key=value, e.g. --config.pause.rate=0.0 for the no-pause baseline.")
  flags.DEFINE_string(
      "workdir", None, "Run directory (local path or gs://): metrics, TensorBoard, checkpoints. "
      "Re-running with the same workdir resumes.")


if __name__ == "__main__":
  define_flags()
  run(main)
