r"""Streaming perplexity of a trained run, with and without attention sinks (StreamingLLM).

    python -m pausejax.stream_ppl --workdir=runs/tiny --outdir=runs/tiny/stream_ppl \
        [--text_file=book.txt] [--num_sinks=4 --window=124] [--max_tokens=20000] \
        [--modes=dense,window,sinks,recompute]

The paper's protocol (Xiao et al. 2023, section 4.1): one long stream, batch 1, fed one token at
a time; after each token the NLL of the next one is taken, then the cache evicts. PPL = exp(mean
NLL). The stream is the run's start id(s) (`pausejax.sinks`: BOS, `<sink>` or none, as its
training sequences begin) followed by the text: by default every document of the embedded
corpus's held-out split (`pausejax_shakespeare`, "validation", read through TFDS from
`config.tfds_data_dir`), each tokenized with the run's vocabulary and ended with EOS, as
pretraining reads them; or `--text_file`, one document. `--max_tokens` cuts the stream.

Modes, all at the same cache size C = num_sinks + window (default: half of seq_len, as the
paper's cache is half the pretraining window):

  dense      the ordinary KV cache of seq_len slots, until it is full: `tokens` says how many
             it scored (a dense model cannot read further).
  window     window attention: 0 sinks + C recent tokens (evicts the start token).
  sinks      num_sinks sinks + window recent tokens (`pausejax.stream`).
  recompute  sliding window with re-computation, the oracle: every token's NLL from a fresh
             forward pass over the C + 1 tokens up to it (what a cache query sees).

Prints each mode's progress with an ETA, and writes `<outdir>/results.json` (per mode: ppl,
tokens, tokens_per_sec measured after the first chunk, so without compilation,
peak_cache_bytes, the running-PPL curve; plus the settings) and `<outdir>/stream_ppl.png`
(running perplexity against tokens read, one line per mode). peak_cache_bytes is the K/V memory
that scoring holds for the stream: fixed by the cache shapes, so for the streaming modes the same
however long the stream. `evaluate_stream` is the same in-process (for experiment runners). Bad
settings exit 2 with one line, writing nothing.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Sequence

from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from pausejax import model as model_lib
from pausejax import stream
from pausejax.errors import UsageError
from pausejax.errors import check_writable_dir
from pausejax.errors import run

MODES = ("dense", "window", "sinks", "recompute")
_CURVE_POINTS = 200  # Running-PPL points kept per mode in results.json.


def define_flags() -> None:
  """Flags of the CLI only, so other modules can import this one."""
  config_flags.DEFINE_config_file(
      "config", None, "Only for runs without config.json: the training config with the same "
      "overrides.")
  flags.DEFINE_string("workdir", None, "Training run directory holding checkpoints/.")
  flags.DEFINE_string("outdir", None, "Where results.json and stream_ppl.png go.")
  flags.DEFINE_string("text_file", None, "A UTF-8 text to stream (default: the embedded "
                      "corpus's validation split).")
  flags.DEFINE_integer("num_sinks", 4, "First tokens the sinks cache keeps.")
  flags.DEFINE_integer("window", None, "Recent tokens the sinks cache keeps (default: "
                       "seq_len // 2 - num_sinks).")
  flags.DEFINE_integer("max_tokens", 0, "Stream at most this many tokens (0 = the whole text).")
  flags.DEFINE_list("modes", list(MODES), f"Which of {', '.join(MODES)} to run.")
  flags.DEFINE_integer("chunk", 256, "Tokens per compiled scan (Python runs once per chunk).")
  flags.DEFINE_integer("recompute_batch", 16, "Windows per forward pass in recompute mode.")


# ----------------------------------------------------------------------------------------------
# The evaluation (in-process API).

class _Progress:
  """progress(done, total) callback: prints a line with rate and ETA every few seconds."""

  def __init__(self, mode: str, enabled: bool, every_s: float = 5.0):
    self.mode, self.enabled, self.every_s = mode, enabled, every_s
    self.start = time.perf_counter()
    self.first: tuple[float, int] | None = None  # After the first call: compiled by then.
    self.printed = self.start

  def __call__(self, done: int, total: int) -> None:
    now = time.perf_counter()
    if self.first is None:
      self.first = (now, done)
    rate = self.rate(done, now)
    if self.enabled and (done == total or now - self.printed >= self.every_s):
      eta = (total - done) / rate if rate else 0.0
      print(f"{self.mode:<9s} {done:>9,}/{total:,} tokens | {rate:>9,.0f} tokens/s | "
            f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}", flush=True)
      self.printed = now

  def rate(self, done: int, now: float | None = None) -> float:
    """Tokens per second after the first call (compilation), or overall if that is all."""
    now = time.perf_counter() if now is None else now
    first_time, first_done = self.first or (self.start, 0)
    if done > first_done and now > first_time:
      return (done - first_done) / (now - first_time)
    return done / max(now - self.start, 1e-9)


def _curve(nll_N: np.ndarray) -> dict[str, list]:
  """Running perplexity after 1..N tokens, at up to _CURVE_POINTS points."""
  at = np.unique(np.linspace(1, len(nll_N), _CURVE_POINTS).astype(int))
  running = np.exp(np.cumsum(nll_N, dtype=np.float64)[at - 1] / at)
  return {"tokens": at.tolist(), "ppl": [round(float(p), 4) for p in running]}


def _summary(nll_N: np.ndarray, progress: _Progress, peak_bytes: int, total: int,
             **settings) -> dict[str, Any]:
  mean = float(np.mean(nll_N, dtype=np.float64))
  return {"ppl": math.exp(mean), "nll_mean": mean, "tokens": int(len(nll_N)),
          "complete": len(nll_N) == total, "tokens_per_sec": progress.rate(len(nll_N)),
          "seconds": time.perf_counter() - progress.start, "peak_cache_bytes": int(peak_bytes),
          **settings, "curve": _curve(nll_N)}


def evaluate_stream(model: model_lib.Decoder, tokens: Sequence[int], *,
                    modes: Sequence[str] = MODES, num_sinks: int, window: int, dense_len: int,
                    chunk: int = 256, recompute_batch: int = 16,
                    progress: bool = True) -> dict[str, Any]:
  """Streaming perplexity of `tokens` (one stream, start id(s) included) in each of `modes`.

  Returns {"settings": {...}, "modes": {mode: {"ppl", "nll_mean", "tokens", "complete",
  "tokens_per_sec", "seconds", "peak_cache_bytes", "num_sinks", "window", "curve"}}}: `tokens`
  is how many next tokens were scored (the stream's length - 1; for dense at most dense_len),
  `num_sinks` + `window` the mode's cache (dense: dense_len slots; recompute: the tokens of
  each forward pass). Raises UsageError for bad settings.
  """
  modes = list(dict.fromkeys(modes))
  if not modes or any(m not in MODES for m in modes):
    raise UsageError.setting("modes", ",".join(modes), f"some of {', '.join(MODES)}")
  stream.check_settings(num_sinks, window, model.cfg.max_len)
  if not isinstance(dense_len, int) or dense_len < 1:
    raise UsageError.setting("dense_len", dense_len, "an integer >= 1 (the dense cache's slots)")
  tokens_1xN = np.asarray(tokens, np.int32)[None]
  if tokens_1xN.shape[1] < 2:
    raise UsageError.setting("tokens", tokens_1xN.shape[1], "a stream of at least 2 tokens")
  total, slots = tokens_1xN.shape[1] - 1, num_sinks + window
  results: dict[str, Any] = {"settings": {
      "num_sinks": num_sinks, "window": window, "cache_slots": slots, "dense_len": dense_len,
      "recompute_span": slots + 1, "stream_tokens": total + 1, "chunk": chunk}, "modes": {}}
  for mode in modes:
    tracker = _Progress(mode, progress)
    if mode == "dense":
      cache = model.init_cache(1, dense_len)
      # At least two chunks: the rate is measured after the first one (compilation).
      nll = stream.scan_nll(model, tokens_1xN[:, :dense_len + 1], cache,
                            chunk=max(1, min(chunk, dense_len // 2)), progress=tracker)[0]
      summary = _summary(nll, tracker, stream.cache_bytes(cache), total, num_sinks=0,
                         window=dense_len)
    elif mode == "recompute":
      nll = stream.recompute_nll(model, tokens_1xN, slots + 1, batch_size=recompute_batch,
                                 progress=tracker)[0]
      # Per token, a forward pass over slots + 1 tokens holds their keys and values.
      summary = _summary(nll, tracker, stream.cache_bytes(model.init_cache(1, slots + 1)),
                         total, num_sinks=0, window=slots + 1)
    else:
      sinks = num_sinks if mode == "sinks" else 0
      cache = stream.init(model, 1, sinks, slots - sinks)
      nll = stream.scan_nll(model, tokens_1xN, cache, chunk=chunk, progress=tracker)[0]
      summary = _summary(nll, tracker, stream.cache_bytes(cache), total, num_sinks=sinks,
                         window=slots - sinks)
    results["modes"][mode] = summary
    if progress:
      print(f"{mode:<9s} ppl {summary['ppl']:.3f} over {summary['tokens']:,} tokens "
            f"({summary['tokens_per_sec']:,.0f} tokens/s)", flush=True)
  return results


def plot(results: dict[str, Any], path: str, title: str = "") -> None:
  """Running perplexity against tokens read, one line per mode (PNG)."""
  import matplotlib  # Here: the library API needs no plotting.
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  figure, axes = plt.subplots(figsize=(8, 4.5))
  for mode, summary in results["modes"].items():
    cache = {"dense": f"{summary['window']} slots",
             "recompute": f"{summary['window']}-token windows"}.get(
                 mode, f"{summary['num_sinks']} + {summary['window']}")
    label = f"{mode} ({cache}): ppl {summary['ppl']:.2f} over {summary['tokens']:,} tokens"
    axes.plot(summary["curve"]["tokens"], summary["curve"]["ppl"], label=label)
  axes.set_xlabel("tokens read")
  axes.set_ylabel("running perplexity")
  axes.set_yscale("log")
  axes.set_title(title)
  axes.legend()
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)


# ----------------------------------------------------------------------------------------------
# The command line.

def _validation_documents(config) -> list[str]:
  """The embedded corpus's held-out split, in TFDS order."""
  import tensorflow_datasets as tfds
  from pausejax import corpus
  data_dir = config.get("tfds_data_dir") or None
  corpus.ensure_prepared(corpus.EMBEDDED_TFDS_NAME, data_dir)
  dataset = tfds.load(corpus.EMBEDDED_TFDS_NAME, split="validation", data_dir=data_dir,
                      shuffle_files=False, download=False)
  return [example["text"].decode("utf-8") for example in tfds.as_numpy(dataset)]


def stream_tokens(config, vocabulary, text_file: str | None, max_tokens: int) -> list[int]:
  """The run's start id(s), then the text (`text_file`, else the validation documents, each
  with EOS) in the run's vocabulary; at most `max_tokens` (0: all)."""
  from pausejax import registry
  from pausejax import sinks
  tokens = sinks.start_ids(registry.start_token(config), vocabulary.sink_id)
  if text_file:
    with open(text_file, encoding="utf-8") as f:
      tokens += list(vocabulary.encode(f.read()))
  else:
    for document in _validation_documents(config):
      tokens += list(vocabulary.encode(document)) + [vocabulary.eos_id]
      if max_tokens and len(tokens) >= max_tokens:
        break
  return tokens[:max_tokens] if max_tokens else tokens


def main(argv):
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  # Cheap checks first: a bad flag costs a second, not a model restore.
  if not f.workdir:
    raise UsageError.setting("--workdir", f.workdir, "give the training run directory")
  if not f.outdir:
    raise UsageError.setting("--outdir", f.outdir, "give a directory for the results")
  if f.text_file and not os.path.isfile(f.text_file):
    raise UsageError.setting("--text_file", f.text_file, "no such file")
  if f.max_tokens < 0:
    raise UsageError.setting("--max_tokens", f.max_tokens, "an integer >= 0 (0 = all)")
  for name in ("chunk", "recompute_batch"):
    if f[name].value < 1:
      raise UsageError.setting(f"--{name}", f[name].value, "an integer >= 1")
  if not f.modes or any(m not in MODES for m in f.modes):
    raise UsageError.setting("--modes", ",".join(f.modes), f"some of {', '.join(MODES)}")
  if f.window is not None:
    stream.check_settings(f.num_sinks, f.window, prefix="--")
  outdir = check_writable_dir(f.outdir, "--outdir")

  from pausejax import build  # Heavy imports (TensorFlow, Orbax) after the cheap checks.
  from pausejax import checkpoint
  from pausejax import config as config_lib
  from pausejax import data as data_lib
  from pausejax import distributed
  from pausejax import specials
  distributed.initialize()
  checkpoint.run_checkpoint_dir(f.workdir)  # Train first: said before anything else.
  config = config_lib.for_reading(f.workdir, f.config)
  window = config.seq_len // 2 - f.num_sinks if f.window is None else f.window
  stream.check_settings(f.num_sinks, window, prefix="--")
  vocabulary = specials.load_vocabulary(data_lib.vocab_path(config))
  tokens = stream_tokens(config, vocabulary, f.text_file, f.max_tokens)
  slots = f.num_sinks + window
  if len(tokens) <= slots:
    name, value = (("--max_tokens", f.max_tokens) if f.max_tokens and f.max_tokens <= slots
                   else ("--text_file", f.text_file or "(the validation split)"))
    raise UsageError.setting(name, value, f"the stream has {len(tokens)} tokens; it must be "
                             f"longer than the cache (--num_sinks + --window = {slots})")

  rows = specials.padded_vocab_size(vocabulary.vocab_size)
  model, step = build.restore_model(config, f.workdir, rows, vocabulary.pause_id)
  print(f"checkpoint step {step} | stream of {len(tokens):,} tokens | cache {f.num_sinks} + "
        f"{window} | dense {config.seq_len}", flush=True)
  results = evaluate_stream(model, tokens, modes=f.modes, num_sinks=f.num_sinks, window=window,
                            dense_len=config.seq_len, chunk=f.chunk,
                            recompute_batch=f.recompute_batch)
  results["settings"].update(workdir=os.path.abspath(f.workdir), step=int(step),
                             text=f.text_file or "pausejax_shakespeare validation")
  if jax.process_index() == 0:
    os.makedirs(outdir, exist_ok=True)
    with open(os.path.join(outdir, "results.json"), "w") as out:
      json.dump(results, out, indent=1)
    plot(results, os.path.join(outdir, "stream_ppl.png"),
         title=f"{os.path.basename(os.path.abspath(f.workdir))} step {step}: streaming "
         f"perplexity, cache {f.num_sinks} + {window}")
    print(f"wrote {os.path.join(outdir, 'results.json')} and stream_ppl.png", flush=True)


if __name__ == "__main__":
  define_flags()
  run(main)
