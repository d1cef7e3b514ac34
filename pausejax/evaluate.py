r"""Evaluate a trained (pause-token) model on downstream tasks, through SeqIO evaluation.

    python -m pausejax.evaluate --workdir=runs/ft_addition \
        [--eval_task=addition] [--num_pauses=10] [--max_examples=200] [--json]

Reads the run's settings from `<workdir>/config.json` (model, vocabulary, task, and how it was
fine-tuned: `pause.num_finetune`, `pause.position`, `prefix_lm`, `backspace.max_per_sequence`;
each can be overridden by its flag) and the parameters of its latest checkpoint, read-only (not
the optimizer state). `--config` is needed only for runs without config.json, and must otherwise
agree with it. The tasks are `--eval_task`, else the run's `eval_tasks`, else its `eval_task` or
`task` if that is a downstream task. Each is scored by `pausejax.downstream_eval` (the library
that training's `eval_tasks` use too):

  generative tasks       greedy pause-aware decoding (`pausejax.decode.generate`): the prompt is
                         BOS + inputs + M_inf `<pause>`s, the answer is what follows the last
                         pause, up to EOS or `--max_new_tokens` (with the config's
                         `prefix_lm`, BOS + inputs + pauses attend to each other both ways;
                         with `--max_backspaces`, default the run's
                         `backspace.max_per_sequence`, it may delete its own tokens, and the
                         answer is the text after the deletions);
  multiple choice        each option scored by its log-likelihood after BOS + inputs + pauses;
  last word (LAMBADA)    whether every token of the last word is the greedy choice.

BOS is the id 0 that seqio's feature converters put in front of every training sequence.
M_inf = `--num_pauses`, by default the run's `pause.num_finetune` (0 when it has none); with
`pause.position="prepend"` the pauses go before the inputs instead (BOS + pauses + inputs), as in
fine-tuning. While a task runs, one line on stderr shows examples done / total, the rate and the
ETA, rewritten in place (on a terminal, without `--json`; `--progress` / `--noprogress` force
it). Prints a table (or, with `--json`, one JSON line per task) and writes
`<workdir>/eval_<task>.json`.

In Python, `downstream_eval.evaluate(model, "addition", vocabulary, num_pauses=10)` does the same
for a model in memory (e.g. M_inf sweeps without checkpoints); its names are importable from
here too.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import TextIO

from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from pausejax import build
from pausejax import checkpoint
from pausejax import config as config_lib
from pausejax import data as data_lib  # Also keeps TensorFlow off the accelerators.
from pausejax import distributed
from pausejax import downstream
from pausejax import fs
from pausejax import metrics
from pausejax import specials
# The library part, re-exported for code that imported it from here.
from pausejax.downstream_eval import POSITIONS  # noqa: F401
from pausejax.downstream_eval import Settings
from pausejax.downstream_eval import TaskEvaluation
from pausejax.downstream_eval import evaluate  # noqa: F401
from pausejax.errors import UsageError
from pausejax.errors import run

# ----------------------------------------------------------------------------------------------
# Command line.

def define_flags() -> None:
  config_flags.DEFINE_config_file(
      "config", None, "Only for runs without config.json: the training config with the same "
      "overrides.")
  flags.DEFINE_string("workdir", None, "Run directory holding config.json and checkpoints/.")
  flags.DEFINE_list("eval_task", [], "Downstream task(s), comma-separated (default: the config's "
                    "eval_tasks, else its eval_task or task if that is a downstream task).")
  flags.DEFINE_integer("num_pauses", None,
                       "M_inf: <pause> tokens with the prompt (default: the run's "
                       "pause.num_finetune, 0 for a pretraining run).")
  flags.DEFINE_enum("pause_position", None, ["append", "prepend"], "Pauses after the inputs or "
                    "before them (default: the run's pause.position).")
  flags.DEFINE_bool("prefix_lm", None, "Inputs and pauses attend both ways (default: the run's "
                    "prefix_lm).")
  flags.DEFINE_integer("max_examples", 0, "Evaluate the first N examples only (0 = all).")
  flags.DEFINE_integer("max_len", 0, "Positions per row: BOS + prompt + pauses + answer "
                       "(0 = config.seq_len).")
  flags.DEFINE_integer("max_new_tokens", 0, "Generation budget (0 = the longest target).")
  flags.DEFINE_integer("max_backspaces", None, "<backspace> moves allowed per generated answer "
                       "(default: the run's backspace.max_per_sequence; 0 = never).")
  flags.DEFINE_integer("batch_size", 16, "Examples per model call.")
  flags.DEFINE_list("metrics", [], "Metric names to compute instead of the task's "
                    "(see pausejax.eval_metrics.METRICS).")
  flags.DEFINE_bool("json", False, "Print one JSON line per task instead of a table.")
  flags.DEFINE_bool("progress", None, "Show examples done / total, rate and ETA on stderr "
                    "(default: when stderr is a terminal and without --json).")


def _task_names(f, config) -> list[str]:
  if f.eval_task:
    return list(f.eval_task)
  named = [n.strip() for n in config.get("eval_tasks", "").split(",") if n.strip()]
  if named:
    return named
  for candidate in (config.get("eval_task", ""), config.get("task", "")):
    if candidate and downstream.recipe(candidate):
      return [candidate]
  raise UsageError.setting("--eval_task", "", "a downstream task: one of "
                           + ", ".join(downstream.downstream_task_names()))


def _write_json(path: str, value: dict) -> None:
  """Written whole or not at all (local or gs://)."""
  fs.write_text(path, json.dumps(value, indent=2) + "\n")


class _ProgressLine:
  """`addition 48/500 examples | 12.3 examples/s | ETA 37s` for one task (`metrics.Progress`):
  rewritten in place on a terminal, else a new line at most every 10 s and at the end."""

  def __init__(self, task: str, unit: str, stream: TextIO):
    self._task, self._unit, self._stream = task, unit, stream
    self._tty = stream.isatty()
    self._progress: metrics.Progress | None = None
    self._shown = -float("inf")

  def __call__(self, done: int, total: int) -> None:
    if self._progress is None:
      self._progress = metrics.Progress(total)
    line = self._progress.line(done, self._task, self._unit)
    end = done >= total
    if self._tty:
      self._stream.write("\r" + line + "\x1b[K" + ("\n" if end else ""))
    elif end or time.monotonic() - self._shown >= 10:
      self._stream.write(line + "\n")
      self._shown = time.monotonic()
    self._stream.flush()


def _table(results: list[dict], step: int | None) -> str:
  lines = [f"checkpoint step {step}",
           f"{'task':<24} {'metric':<20} {'value':>8} {'examples':>9} {'pauses':>7}"]
  for r in results:
    for name, value in r["metrics"].items():
      lines.append(f"{r['task']:<24} {name:<20} {value:>8.2f} {r['num_examples']:>9} "
                   f"{r['num_pauses']:>7}")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments {argv[1:]}")
  distributed.initialize()
  logging.set_verbosity(logging.ERROR)  # Orbax and seqio log every detail at INFO/WARNING.
  f = flags.FLAGS
  if not f.workdir:
    raise UsageError.setting("--workdir", f.workdir, "give the run directory")
  checkpoint.run_checkpoint_dir(f.workdir)  # A complete checkpoint, before any data is read.
  config = config_lib.for_reading(f.workdir, f.config)
  vocabulary = specials.load_vocabulary(data_lib.vocab_path(config))
  recipes = [downstream.resolve(name, setting="--eval_task") for name in _task_names(f, config)]
  settings = Settings.from_config(
      config, num_pauses=f.num_pauses, pause_position=f.pause_position, prefix_lm=f.prefix_lm,
      max_len=f.max_len or None, max_new_tokens=f.max_new_tokens, max_examples=f.max_examples,
      max_backspaces=f.max_backspaces,
      batch_size=f.batch_size, metrics=tuple(f.metrics))
  settings.validate()
  for r in recipes:  # Every name checked before any data is read.
    downstream.resolve_metrics(settings.metrics or r.metric_fns, r.kind, setting="--metrics")
  # Data loaded and every example checked against max_len before the (slow) restore.
  evaluations = [TaskEvaluation(r, vocabulary, settings) for r in recipes]
  # The newest checkpoint that can be read, or one line (checkpoint_on_unreadable=refuse).
  with checkpoint.reading_policy(config.checkpoint_on_unreadable):
    model, step = build.restore_model(config, f.workdir,
                                      specials.padded_vocab_size(vocabulary.vocab_size),
                                      vocabulary.pause_id)
  results = []
  show = (sys.stderr.isatty() and not f.json) if f.progress is None else f.progress
  for evaluation in evaluations:
    try:
      progress = (_ProgressLine(evaluation.recipe.name, evaluation.unit, sys.stderr)
                  if show and jax.process_index() == 0 else None)
      result = evaluation.run(model, progress=progress)
    finally:
      evaluation.close()
    result["step"] = step
    results.append(result)
    if jax.process_index() == 0:
      _write_json(os.path.join(f.workdir, f"eval_{result['task']}.json"), result)
  if jax.process_index() == 0:
    if f.json:
      for result in results:
        print(json.dumps(result), flush=True)
    else:
      print(_table(results, step), flush=True)


if __name__ == "__main__":
  define_flags()
  run(main)
