r"""Pretrain (or fine-tune) a (pause-token) language model.

    python -m pausejax.train --config=configs/tiny.py --workdir=runs/tiny \
        [--config.task=shakespeare] [--config.num_train_steps=500] ...

Reads top to bottom: config -> data -> mesh, model, optimizer (`build`) -> input -> checkpoint
-> loop.

The first start writes the resolved config to `<workdir>/config.json`. Re-running the same
command resumes from the latest checkpoint in `--workdir`, data position included, and logs
exactly the losses an uninterrupted run would; a setting that would change what the run computes
(model, task, pauses, seed, batch, ...) is refused with one line, while steps, logging, eval and
checkpoint cadence, mesh and remat may change. Re-running a finished run prints its summary and
changes nothing. SIGTERM (preemption) saves a checkpoint at the current step and exits with code
75 (`errors.EXIT_STOPPED_EARLY`: stopped early, re-run to resume; 0 means the run is finished);
with several hosts, all of them stop at the same step. A NaN/Inf loss or gradient norm stops the
run with one line (exit 1) before anything non-finite is saved, or with `nonfinite=skip` leaves
that update out. A checkpoint that cannot be written stops the run at once with one line (exit 1);
one that cannot be restored is moved aside and the newest one that restores is resumed, loudly
(`checkpoint_on_unreadable`; see `pausejax.ckpt_faults`).

Outputs in --workdir (local or gs://): config.json, metrics.jsonl, TensorBoard events,
checkpoints/, loss.png, summary.txt; profile/ with `profile.num_steps` (`pausejax.profiling`: the
trace, and the time split every log line carries). `eval_tasks` are scored on the live
parameters during training (`pausejax.downstream_eval`).
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

from pausejax import build
from pausejax import checkpoint
from pausejax import config as config_lib
from pausejax import data as data_lib
from pausejax import distributed
from pausejax import downstream_eval
from pausejax import fs
from pausejax import metrics
from pausejax import model as model_lib
from pausejax import profiling
from pausejax import registry
from pausejax import sequencematch
from pausejax import specials
from pausejax.errors import EXIT_STOPPED_EARLY
from pausejax.errors import RunError
from pausejax.errors import UsageError
from pausejax.errors import check_writable_dir
from pausejax.errors import run

SUMMARY_FILENAME = "summary.txt"


def evaluate(eval_step, params, eval_batches, batch_sharding) -> dict[str, float]:
  """Loss and accuracy over the held-out batches (`data.EvalBatches`), all processes together.

  Every process must run the same number of eval steps (each is a collective). With several
  processes they agree before each step whether any still has a batch; one that has run out
  feeds zero-weight rows, so shards of different lengths cannot deadlock the run.
  """
  totals = None
  batches = iter(eval_batches)
  while True:
    batch = next(batches, None)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      if not multihost_utils.process_allgather(np.int32(batch is not None)).any():
        break
      batch = eval_batches.zeros() if batch is None else batch
    elif batch is None:
      break
    terms = eval_step(params, _global_batch(batch, batch_sharding))
    totals = terms if totals is None else jax.tree.map(jnp.add, totals, terms)
  totals = jax.device_get(totals) if totals is not None else None
  if totals is None or float(totals["weight_sum"]) == 0:
    raise UsageError.setting("eval_task", "", "its held-out split gave no example to score")
  n = float(totals["weight_sum"])
  return {"eval_loss": float(totals["nll_sum"]) / n, "eval_accuracy": float(totals["correct_sum"]) / n}


def _global_batch(batch, batch_sharding) -> dict[str, jax.Array]:
  """This process's rows of the batch (numpy or tf) -> one global array per feature."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
          for k, v in batch.items()}


class _Preemption:
  """SIGTERM -> finish the current step, save a checkpoint, exit with EXIT_STOPPED_EARLY (75).

  One process: a Python signal handler sets a flag. Several: jax's coordination service owns
  SIGTERM (a Python handler would replace its notifier); the host that receives it tells the
  others, and `reached_preemption_sync_point` is True on every host at the same step.
  """

  def __init__(self):
    self.requested = False
    self._multihost = jax.process_count() > 1
    self._previous = None
    if not self._multihost:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def close(self):
    if not self._multihost:
      signal.signal(signal.SIGTERM, self._previous)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def reached(self, step: int) -> bool:
    if self._multihost:
      from jax.experimental import multihost_utils
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested


class _FiniteGuard:
  """Reads each step's `nonfinite` flag one step late, so the host never waits on the device
  for it; `check(0)` reads them all (before anything is saved)."""

  def __init__(self, policy: str, ckpt: checkpoint.Checkpointer, logger: metrics.MetricsLogger):
    self.policy, self._ckpt, self._logger = policy, ckpt, logger
    self._pending: list[tuple[int, dict]] = []
    self.skipped = 0

  def add(self, step: int, step_metrics: dict) -> None:
    self._pending.append((step, {k: step_metrics[k]
                                 for k in ("nonfinite", "train_loss", "grad_norm")}))

  def check(self, keep: int = 0) -> None:
    while len(self._pending) > keep:
      step, m = self._pending.pop(0)
      if not float(m["nonfinite"]):
        continue
      loss, norm = float(m["train_loss"]), float(m["grad_norm"])
      if self.policy == "skip":
        self.skipped += 1
        self._logger.write(step, {"skipped_update": 1})
        if jax.process_index() == 0:
          print(f"step {step}: non-finite train loss {loss} / gradient norm {norm}; update "
                f"skipped ({self.skipped} so far; nonfinite=skip)", flush=True)
        continue
      last = self._ckpt.latest_step()
      where = (f"the last good checkpoint is step {last} in {self._ckpt.directory}"
               if last is not None else "no checkpoint was saved")
      raise RunError(
          f"step {step}: non-finite train loss {loss} / gradient norm {norm}; stopped without "
          f"saving ({where}). Lower optimizer.learning_rate, or set --config.nonfinite=skip to "
          "leave such updates out")


# ----------------------------------------------------------------------------------------------

def _task_rows(data: data_lib.Data, train_iter) -> dict[str, float]:
  """Examples (rows) of each task of a mixture trained on since the last log, over all hosts."""
  rows = train_iter.take_task_rows()
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    rows = multihost_utils.process_allgather(rows.astype(np.int32)).sum(0)
  return {f"examples/{p.name}": float(n) for p, n in zip(data.train.parts, rows)}


def _check_init_from(config, start: str) -> None:
  """The run `init_from` names must have started its sequences, and attended, the same way: the
  parameters would load either way (same shapes) and quietly compute something else."""
  path = config.init_from.rstrip("/")
  saved = None
  for workdir in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
    saved = config_lib.load_saved(workdir) if workdir else None
    if saved is not None:
      break
  if saved is None:  # A bare checkpoint: nothing to compare.
    return
  source = config_lib.from_saved(saved)
  try:
    source_start = registry.start_token(source)
  except UsageError:  # Its tasks are not registered here; the model settings still compare.
    source_start = start
  if source_start != start:
    raise UsageError.setting(
        "start_token", config.get("start_token"), f"{source_start!r}: init_from "
        f"{config.init_from} was trained with sequences that start with {source_start!r}")
  zero_sink = bool(source.model.get("zero_sink", False))
  if zero_sink != bool(config.model.get("zero_sink", False)):
    raise UsageError.setting("model.zero_sink", config.model.get("zero_sink", False),
                             f"{zero_sink}, as in init_from {config.init_from}")


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  # 1. Config: every bad value fails here, before anything is written. A resumed run must be
  # the saved one (config.json); a finished run is only reported again.
  config_lib.validate(config)
  check_writable_dir(workdir, "workdir")
  lead = jax.process_index() == 0
  ckpt_dir = os.path.join(workdir, "checkpoints")
  saved_step = checkpoint.latest_step(ckpt_dir)
  saved_config = config_lib.load_saved(workdir) if saved_step is not None else None
  changed = (config_lib.check_same_run(saved_config, config, workdir)
             if saved_config is not None else [])
  if saved_step is not None and saved_step >= config.num_train_steps:
    return _report_finished(workdir, saved_step, lead)

  # 2. Data: tasks and vocabulary resolved, the data checked to exist; nothing read yet but
  # the examples of the downstream tasks `eval_tasks` names (None: it names none).
  data = data_lib.prepare(config)
  downstream = downstream_eval.for_training(config, data.vocabulary)

  # 3. Mesh, model, optimizer: shapes and shardings only. Parameters are created directly in
  # their shardings, never whole on one host.
  run_ = build.build(config, specials.padded_vocab_size(data.vocabulary.vocab_size),
                     data.pause_id)

  # 4. Input: this process reads only the data shards whose rows its devices hold.
  shard_plan = data_lib.plan(config, run_.batch_sharding)
  train_iter = data_lib.train_iterator(
      data, config, shard_plan,
      os.path.join(workdir, "input_digests") if config.debug_input_digests else None)
  eval_batches = data_lib.eval_dataset(data, config, shard_plan)

  # 5. Checkpoint: refuse a workdir whose checkpoint holds another model, before writing.
  # Fine-tuning (init_from) starts from another run's parameters with a fresh optimizer; once
  # this workdir has a checkpoint of its own, re-running resumes from that instead: the newest
  # one that restores (an unreadable newer one is moved aside, or refused).
  init_params = None
  if config.init_from and saved_step is None:
    _check_init_from(config, data.train.start)
    init_params = checkpoint.load_params(config.init_from, run_.abstract_params_tree,
                                         on_unreadable=config.checkpoint_on_unreadable)
  ckpt = checkpoint.Checkpointer(
      ckpt_dir, keep=config.keep_checkpoints,
      save_every_steps=config.checkpoint_every_steps or config.num_train_steps or 1,
      async_save=config.async_checkpointing)
  start_step, state = ckpt.restore_newest(run_.abstract_state, train_iter,
                                          on_unreadable=config.checkpoint_on_unreadable)
  if start_step is None:
    state = run_.init()
    if init_params is not None:  # Adam's moments start at zero whatever the parameters.
      state = {**state, "params": init_params}
      if lead:
        print(f"Initialised parameters from {config.init_from}", flush=True)
    start_step = 0
  elif lead:
    print(f"Resumed from step {start_step}" + (
        f" with changed settings: {'; '.join(changed)}" if changed else ""), flush=True)
  if lead:  # What this run is, for resumes and for generate/evaluate to read back.
    fs.makedirs(workdir)
    resolved = config.copy_and_resolve_references()
    with resolved.unlocked():
      resolved.data_shards = shard_plan.num_shards
    config_lib.save(resolved, workdir)

  logger = metrics.MetricsLogger(workdir, total_steps=config.num_train_steps, is_lead_host=lead)
  logger.truncate_after(start_step)
  if start_step == 0:
    logger.write_hparams(config_lib.flatten(config))
  train_step = run_.train_step(skip_nonfinite=config.nonfinite == "skip",
                               eos_id=data.vocabulary.eos_id)
  # SequenceMatch: the model's own samples, renewed in the train state (None: plain MLE).
  refresh_samples = sequencematch.refresher(config, run_, data.vocabulary)
  eval_step = run_.eval_step()

  model_cfg = run_.model_cfg
  num_params = model_lib.count_params(model_cfg)
  tokens_per_step = config.global_batch_size * config.seq_len
  flops_per_step = model_lib.flops_per_token(model_cfg, config.seq_len) * tokens_per_step
  peak, peak_source = metrics.peak_flops_per_device()
  if lead:
    print(f"pausejax: {num_params / 1e6:.2f}M params | task {data.train.describe()} | mesh "
          f"{dict(run_.mesh.shape)} | {jax.device_count()} "
          f"{jax.devices()[0].device_kind} device(s) | workdir {workdir}", flush=True)

  # 6. Loop. Every step and phase is annotated for the profiler and timed (`profiling`).
  preemption = _Preemption()
  guard = _FiniteGuard(config.nonfinite, ckpt, logger)
  prof = profiling.Profiler(workdir, config.get("profile"), first_step=start_step + 1,
                            last_step=config.num_train_steps, is_lead_host=lead)
  first_eval, last_eval, last, last_downstream = None, None, {}, {}
  t_start = time.time()
  t_window, window_steps = time.time(), 0
  step = start_step
  try:
    while step < config.num_train_steps:
      with prof.step(step + 1, sync=guard.check):
        with prof.phase("input"):
          host_batch = next(train_iter)
          if refresh_samples:
            state = refresh_samples(state, host_batch, logger)
          batch = _global_batch(host_batch, run_.batch_sharding)
        with prof.phase("compute"):  # Dispatch, and the wait for the previous step's flag.
          state, step_metrics = train_step(state, batch)
          step += 1
          guard.add(step, step_metrics)
          guard.check(keep=1)  # The previous step's flag: that step has finished by now.
        with prof.phase("checkpoint"):
          ckpt.check_saves()  # A background save that failed stops the run now, not at the next.
        window_steps += 1
        if step % config.log_every_steps == 0 or step == config.num_train_steps:
          with prof.phase("compute"):  # Waits for the device to finish the step.
            guard.check()
            m = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
          dt = (time.time() - t_window) / window_steps
          t_window, window_steps = time.time(), 0
          real, total = m.pop("real_tokens"), m.pop("total_tokens")
          m.update({
              "step_time": dt,
              "tokens_per_sec": total / dt,
              "tokens_per_sec_per_device": total / dt / jax.device_count(),
              "real_tokens_per_sec": real / dt,
              "mfu": metrics.mfu(flops_per_step, dt, jax.device_count(), peak),
              **prof.take(),  # time/<phase>: seconds since the last log line.
          })
          if data.train.is_mixture:
            m.update(_task_rows(data, train_iter))
          logger.write(step, m)
          logger.progress(step, m)
          last = m
        if config.eval_every_steps and step % config.eval_every_steps == 0 or \
            step == config.num_train_steps:
          with prof.phase("eval"):
            guard.check()
            e = evaluate(eval_step, state["params"], eval_batches, run_.batch_sharding)
          logger.write(step, e)
          if lead:
            print(f"step {step}/{config.num_train_steps} | eval loss {e['eval_loss']:.3f} | "
                  f"eval accuracy {100 * e['eval_accuracy']:.1f}%", flush=True)
          first_eval = first_eval or {"step": step, **e}
          last_eval = {"step": step, **e}
          t_window = time.time()  # Eval time is not training time.
        if downstream and downstream.due(step):
          with prof.phase("downstream_eval"):
            guard.check()
            last_downstream = downstream.run(step, state["params"], run_.decode_model_cfg,
                                              logger)
          t_window = time.time()
        stop = preemption.reached(step)
        final = step == config.num_train_steps
        if stop or final or ckpt.should_save(step):
          with prof.phase("checkpoint"):
            guard.check()  # Never save a state past a non-finite step (unless it was skipped).
            ckpt.save(step, state, train_iter, force=True)
        if stop:
          with prof.phase("checkpoint"):
            ckpt.wait_until_finished()
          print(f"Stopped at step {step} on SIGTERM; checkpoint saved. Re-run the same command "
                "to resume.", flush=True)
          return {"step": step, "preempted": True}
    with prof.phase("checkpoint"):
      ckpt.wait_until_finished()
  finally:
    try:
      ckpt.close()  # Finishes a save already under way: it is of a good state.
    finally:
      logger.close()
      preemption.close()
      prof.close()
      if downstream:
        downstream.close()

  wall = time.time() - t_start
  info = {
      "params": num_params, "steps": step, "steps_this_run": step - start_step,
      "tokens_total": step * tokens_per_step,
      "pause_fraction": last.get("pause_fraction"),
      "train_loss": last.get("train_loss"),
      "first_eval": first_eval, "final_eval": last_eval,
      "wall_time": wall, "time_split": prof.summary(),
      "tokens_per_sec": last.get("tokens_per_sec"),
      "real_tokens_per_sec": last.get("real_tokens_per_sec"), "mfu": last.get("mfu"),
      "peak_source": peak_source, "workdir": workdir, **last_downstream,
  }
  if guard.skipped:
    info["skipped_updates"] = guard.skipped
  if lead:
    metrics.plot_losses(os.path.join(workdir, metrics.METRICS_FILENAME),
                        os.path.join(workdir, metrics.PLOT_FILENAME))
    text = metrics.format_summary(info)
    fs.write_text(os.path.join(workdir, SUMMARY_FILENAME), text + "\n")
    print(text, flush=True)
  return info


def _report_finished(workdir: str, step: int, lead: bool) -> dict[str, Any]:
  """A finished run re-run: its saved summary again, and nothing in the workdir changed."""
  path = os.path.join(workdir, SUMMARY_FILENAME)
  if lead:
    print(f"The run in {workdir} is finished (step {step}); nothing to do. Raise "
          "--config.num_train_steps to train on.", flush=True)
    if fs.exists(path):
      print(fs.read_text(path), end="", flush=True)
  return {"steps": step, "steps_this_run": 0, "finished_before": True, "workdir": workdir}


def main(argv):
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments {argv[1:]}; settings go in --config.key=value")
  distributed.initialize()
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  if config is None:
    raise UsageError.setting("--config", None, "give a config file, e.g. --config=configs/tiny.py")
  if not workdir:
    raise UsageError.setting("--workdir", workdir, "give a run directory, e.g. runs/tiny")
  info = train_and_evaluate(config, workdir)
  if info.get("preempted"):  # Stopped before num_train_steps: a launcher must resume, not stop.
    return EXIT_STOPPED_EARLY
  return 0


def define_flags() -> None:
  """Flags of the CLI only, so other modules can import this one and define their own."""
  config_flags.DEFINE_config_file(
      "config", None, "Path to a config file in configs/ (e.g. configs/tiny.py). Override any "
      "key with --config.key=value, e.g. --config.task=shakespeare for the no-pause baseline.")
  flags.DEFINE_string(
      "workdir", None, "Run directory (local path or gs://): metrics, TensorBoard, checkpoints. "
      "Re-running with the same workdir resumes.")


if __name__ == "__main__":
  define_flags()
  run(main)
