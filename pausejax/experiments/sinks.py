r"""The sink experiment: StreamingLLM's Table 3 at laptop scale, and whether pauses act as sinks.

    python -m pausejax.experiments.sinks --outdir=runs/sinks [--quick] [--steps=N] \
        [--stream_tokens=N] [--seed=0]

Models, pretrained with identical settings (`configs/tiny.py` shapes, seq_len L, the same seed,
steps and data order) on the embedded Shakespeare corpus; only how a sequence starts and how
attention normalises differ (`pausejax.sinks`, `model.zero_sink`):

  vanilla         start_token=none: no constant first token (the paper's vanilla Pythia)
  zero_sink       the same with SoftMax1 attention (the paper's "zero sink")
  learnable_sink  task shakespeare_sink: a learnable <sink> at position 0 (the paper's)
  bos             task shakespeare: pausejax's default, BOS (id 0) at position 0
  pause           task shakespeare_pause with start_token=none: PausePT (rate 0.1), no start token

Each model then reads the held-out split (the embedded validation plays, concatenated, after the
model's start tokens) token by token, batch 1, with a cache of W = L / 2 slots (the paper: half
the pretraining length): S sinks + (W - S) recent tokens for S in 0, 1, 2, 4; the sliding window
with re-computation over the W + 1 tokens a query of that cache sees (the oracle); and dense attention over the first L tokens
(all the dense cache holds). For the pause model it also reads the stream after one `<pause>`,
kept as the single sink: if pauses act as sinks, that is as good as keeping its first token.

Writes results.json, results.md (the table) and sinks.png into --outdir; the pretraining runs go
to --outdir/runs/<model>/ (ordinary pausejax workdirs). Re-running reuses finished runs.
--quick shrinks everything to seconds for tests; its numbers mean nothing.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from absl import flags

from pausejax.errors import UsageError
from pausejax.errors import run


def define_flags() -> None:
  """Flags of the CLI only, so other modules can import this one."""
  flags.DEFINE_string("outdir", None, "Where results and the pretraining runs go.")
  flags.DEFINE_bool("quick", False, "Seconds-long smoke run (numbers mean nothing).")
  flags.DEFINE_integer("steps", 0, "Pretraining steps per model (0: the mode's default).")
  flags.DEFINE_integer("stream_tokens", 0, "Tokens of held-out text streamed (0: the mode's "
                       "default).")
  flags.DEFINE_integer("seed", 0, "Seed of every pretraining run.")


# (full, quick) defaults.
STEPS = (600, 4)
STREAM_TOKENS = (6000, 200)
SINKS = (0, 1, 2, 4)
# name -> (task, config overrides, what it is).
MODELS: dict[str, tuple[str, dict[str, Any], str]] = {
    "vanilla": ("shakespeare", {"start_token": "none"}, "no start token"),
    "zero_sink": ("shakespeare", {"start_token": "none", "model.zero_sink": True},
                  "no start token, SoftMax1"),
    "learnable_sink": ("shakespeare_sink", {}, "<sink> at position 0"),
    "bos": ("shakespeare", {}, "BOS at position 0 (the default)"),
    "pause": ("shakespeare_pause", {"start_token": "none"}, "PausePT 0.1, no start token"),
}


def pretrain_config(name: str, quick: bool, seed: int, steps: int, tfds_data_dir: str):
  from pausejax.experiments import ablation  # The same tiny shapes as the ablation runner.
  task, overrides, _ = MODELS[name]
  c = ablation.pretrain_config(quick, seed, task, steps, tfds_data_dir)
  c.update_from_flattened_dict(overrides)
  return c


def _cache_label(sinks: int, window: int) -> str:
  return f"{sinks}+{window - sinks}"


def _stream_scores(workdir: str, config, stream_tokens: int, window: int,
                   pause_sink: bool) -> dict[str, Any]:
  """Streaming perplexity of one finished run: {cache label or mode: stream_ppl's summary}."""
  from pausejax import build
  from pausejax import data as data_lib
  from pausejax import specials
  from pausejax import stream_ppl
  vocabulary = specials.load_vocabulary(data_lib.vocab_path(config))
  model, _ = build.restore_model(config, workdir,
                                 specials.padded_vocab_size(vocabulary.vocab_size),
                                 vocabulary.pause_id)
  # The held-out text after the model's own start token(s), as stream_ppl reads it.
  tokens = stream_ppl.stream_tokens(config, vocabulary, None, stream_tokens)

  def scores(tokens, modes, num_sinks, window):
    return stream_ppl.evaluate_stream(model, tokens, modes=modes, num_sinks=num_sinks,
                                      window=window, dense_len=config.seq_len,
                                      progress=False)["modes"]

  out: dict[str, Any] = {}
  for s in SINKS:
    out[_cache_label(s, window)] = scores(tokens, ("sinks",), s, window - s)["sinks"]
  out.update(scores(tokens, ("recompute", "dense"), 0, window))
  if pause_sink:  # One <pause> first, kept as the only sink.
    out[f"pause+{window - 1}"] = scores([vocabulary.pause_id] + tokens, ("sinks",), 1,
                                        window - 1)["sinks"]
  for summary in out.values():
    summary.pop("curve", None)  # The table needs the totals only.
  return out


def _markdown(results: dict[str, Any]) -> str:
  window = results["settings"]["window"]
  labels = [_cache_label(s, window) for s in SINKS] + ["recompute", "dense"]
  lines = [
      f"Streaming perplexity, cache of W = {window} slots (S sinks + W - S recent tokens), "
      f"{results['settings']['stream_tokens']} held-out tokens; recompute = sliding window "
      f"with re-computation over the W + 1 tokens a cache query sees; dense = the first "
      f"{results['settings']['seq_len']} tokens only (all a dense cache of the training length "
      "holds).", "",
      "| model | " + " | ".join(labels) + " |",
      "|---|" + "---:|" * len(labels)]
  for name, scores in results["models"].items():
    cells = [f"{scores[label]['ppl']:.2f}" for label in labels]
    lines.append(f"| {name} ({MODELS[name][2]}) | " + " | ".join(cells) + " |")
  pause = results["models"].get("pause", {})
  label = f"pause+{window - 1}"
  if label in pause:
    lines += ["", f"Pause model with one `<pause>` before the stream, kept as the only sink "
              f"({label}): {pause[label]['ppl']:.2f} (its first token kept instead, "
              f"{_cache_label(1, window)}: {pause[_cache_label(1, window)]['ppl']:.2f}; none "
              f"kept, {_cache_label(0, window)}: {pause[_cache_label(0, window)]['ppl']:.2f})."]
  return "\n".join(lines) + "\n"


def _plot(results: dict[str, Any], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  window = results["settings"]["window"]
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, scores in results["models"].items():
    ppl = [scores[_cache_label(s, window)]["ppl"] for s in SINKS]
    line, = ax.plot(SINKS, ppl, marker="o", label=name)
    ax.axhline(scores["recompute"]["ppl"], color=line.get_color(), linestyle=":", linewidth=1)
  ax.set_xticks(SINKS)
  ax.set_xlabel(f"sinks kept (cache = sinks + recent tokens = {window} slots)")
  ax.set_ylabel("streaming perplexity (log scale)")
  ax.set_yscale("log")
  ax.set_title("Attention sinks: dotted = sliding window with re-computation")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  for name in ("steps", "stream_tokens"):
    if f[name].value < 0:
      raise UsageError.setting(f"--{name}", f[name].value,
                               "a non-negative integer (0: the mode's default)")
  mode = 1 if f.quick else 0
  steps = f.steps or STEPS[mode]
  stream_tokens = f.stream_tokens or STREAM_TOKENS[mode]
  from pausejax.experiments import parity
  outdir = parity.check_outdir(f.outdir)

  from pausejax import config as config_lib
  from pausejax import corpus
  from pausejax.experiments import ablation
  tfds_dir = os.path.join(outdir, "tensorflow_datasets")
  configs = {name: pretrain_config(name, f.quick, f.seed, steps, tfds_dir) for name in MODELS}
  for c in configs.values():
    config_lib.validate(c)
  seq_len = configs["vanilla"].seq_len
  window = seq_len // 2
  if stream_tokens < 2 * seq_len:
    raise UsageError.setting("--stream_tokens", stream_tokens,
                             f"at least {2 * seq_len} (twice the training length)")
  corpus.ensure_prepared(corpus.EMBEDDED_TFDS_NAME, tfds_dir)

  t0 = time.time()
  total = 2 * len(MODELS)

  def progress(done: int, what: str) -> None:
    elapsed = time.time() - t0
    eta = f"{elapsed / done * (total - done):.0f}s" if done else "--"
    print(f"[sinks {done}/{total} | {elapsed:.0f}s elapsed | ETA {eta}] {what}", flush=True)

  runs = os.path.join(outdir, "runs")
  for i, (name, c) in enumerate(configs.items()):
    progress(i, f"pretraining {name} ({MODELS[name][2]})")
    ablation.train_or_reuse(c, os.path.join(runs, name))
  models = {}
  for i, (name, c) in enumerate(configs.items()):
    progress(len(MODELS) + i, f"streaming {stream_tokens} tokens through {name}")
    models[name] = _stream_scores(os.path.join(runs, name), c, stream_tokens, window,
                                  pause_sink=name == "pause")
  results = {
      "settings": {"quick": f.quick, "seed": f.seed, "steps": steps, "seq_len": seq_len,
                   "window": window, "stream_tokens": stream_tokens, "sinks": list(SINKS),
                   "models": {n: {"task": t, "overrides": o, "what": w}
                              for n, (t, o, w) in MODELS.items()}},
      "models": models,
      "wall_time_s": time.time() - t0,
  }
  with open(os.path.join(outdir, "results.json"), "w") as fh:
    json.dump(results, fh, indent=2)
  with open(os.path.join(outdir, "results.md"), "w") as fh:
    fh.write(_markdown(results))
  _plot(results, os.path.join(outdir, "sinks.png"))
  print(_markdown(results), flush=True)


if __name__ == "__main__":
  define_flags()
  run(main)
