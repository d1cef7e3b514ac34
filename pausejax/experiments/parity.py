r"""n-bit parity with and without pause tokens, on a 2-layer causal decoder.

    python -m pausejax.experiments.parity --outdir=runs/parity [--quick] [--setup=default] \
        [--num_bits=8,10,12,16] [--pauses=0,n/2,n] [--steps=1500] [--seed=0] [--seeds=1] \
        [--positions=rope] [--hints] [--train_size=0]

London & Kanade 2025 (arXiv 2505.21024) report that a two-layer causally masked transformer learns
parity when pause tokens follow the input and appears unable to without them. This runner trains
`pausejax.model.Decoder` (2 layers) from scratch for every (n, M) pair and measures held-out
accuracy. With --seeds=K every (n, M) trains K models, seeds --seed .. --seed + K - 1, each with
its own initial weights and its own strings; they run as replicas on a leading axis of one vmapped
program, so they share its compilation and its step loop. Writes to --outdir (`parity_report`):

  results.json   settings, and per run: accuracy/loss vs step, final and best accuracy (means
                 over seeds, per seed, and a 95 % confidence interval of the final mean), wall time
  results.md     final held-out accuracy, rows n, columns M (mean ± 95 % CI when K > 1)
  parity.png     accuracy vs step per M (one panel per n), and final accuracy vs n per M

The task. Token ids: bit 0 -> 0, bit 1 -> 1, `SEP_ID` = 2 ends the input, and `PAUSE_ID` = 3 is the
pause, placed right after the base vocabulary as `pausejax.specials` does for real vocabularies (the
embedding table has `VOCAB_ROWS` = 8 rows, not 128: this model is tiny). One example is

  inputs   b1 b2 .. bn SEP P .. P        (n + 1 + M tokens; M pauses)
  targets  b2 b3 .. SEP P  P .. parity   (next tokens; only the last one is scored)

so the answer is read at the last position (the last pause, or SEP when M = 0): the PauseFT layout
of Goyal et al. with prefix = bits + SEP. `decoder_loss_weights` is 1 at that position and 0
everywhere else, so no bit, SEP or pause is ever a prediction target, unless --hints also scores
the M positions before it (make_batch); evaluation always scores the answer alone, while the
training loss and accuracy then average over hints and answer.

Data. By default training strings are drawn uniformly at random every step; --train_size=S fixes
a set of S strings per (n, seed) instead, read in shuffled epochs. Evaluation uses a fixed set of
`num_eval` distinct strings (at most half of all 2^n strings), and training never draws a string
of that set, so accuracy is on held-out strings; for small n the training strings are simply the
other half. The data and the eval set depend on (seed, n) only, and the model initialisation on
seed only, so every M at one n sees the same strings and starts from the same weights (a paired
comparison).

Positions (--positions): RoPE as everywhere in pausejax (`--rope_theta` changes its base), a
learned absolute table added to the token embedding, or none (the causal mask alone).

Their setup (--setup=london_kanade, `LONDON_KANADE`). Known of the paper's experiment: 2 causal
layers learn parity with pauses and appear not to without; an ablation shows the gain is not only
escaping the causal mask (abstract and reviews: arxiv.org/abs/2505.21024,
openreview.net/forum?id=eG5oh8l1WZ); n in {20, 50, 100, 150, 200, 250, 300}, uniform bit strings,
one dataset (train, validation, test) per seed and n, hyper-parameters in the appendix and code in
the supplementary zip (ri.k117.org reproducibility record of the NeurIPS 2025 version); a
GPT-2-style model, 2 layers, 4 heads, answering at once (with and without the causal mask) or
after n pauses, trained with "hint" supervision (threshold values at the pauses), ~100 % up to
n = 300 with pauses, ~50 % at n = 100 without (third-party notes on the arXiv HTML, not the paper
itself). So the preset has M in {0, n}, 4 heads, learned absolute positions (our reading of
GPT-2-style), hints [at least j ones] (our reading of threshold values) and a fixed training set.
Ours, as not known: width, MLP, set size, optimiser, learning rate, batch, steps, the hints'
exact form and place; RMSNorm and SwiGLU stay (GPT-2: LayerNorm, GELU) and there is no run
without the causal mask. On 2 CPU cores a step at n = 300, M = n (601 tokens) takes seconds: the
large n are for an accelerator.

docs/results.md has what the default setup measured. A run stops early once held-out accuracy has
been 100 % at `SOLVED_EVALS` evaluations in a row; with several seeds, once that holds for every
seed (a solved seed trains on meanwhile).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import sys
import time
import types
from typing import Any, Sequence

from absl import flags
import numpy as np

from pausejax.experiments import stats
from pausejax.experiments.parity_report import FILES
from pausejax.experiments.parity_report import Progress
from pausejax.experiments.parity_report import results_table
from pausejax.experiments.parity_report import write_outputs

from pausejax.errors import UsageError
from pausejax.errors import check_writable_dir
from pausejax.errors import run

BIT_IDS = (0, 1)
SEP_ID = 2
BASE_VOCAB_SIZE = 3
PAUSE_ID = BASE_VOCAB_SIZE  # As in pausejax.specials: the pause follows the base vocabulary.
VOCAB_ROWS = 8
SOLVED_EVALS = 3
MAX_SEQ_LEN = 4096  # n + 1 + M; beyond this a CPU run of this size makes no sense.



@dataclasses.dataclass(frozen=True)
class Settings:
  """One sweep: every n in `num_bits` x every pause spec in `pauses`."""
  num_bits: tuple[int, ...]
  pauses: tuple[str, ...]  # "4", or relative to n: "n", "n/2", "2n".
  steps: int
  batch_size: int
  eval_every: int
  num_eval: int
  learning_rate: float
  warmup_steps: int
  weight_decay: float
  d_model: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float
  seed: int
  seeds: int  # Models per (n, M): seeds seed, seed + 1, ..., trained together as replicas.
  positions: str = "rope"  # A key of POSITIONS.
  hints: bool = False  # Threshold targets before the answer (see make_batch).
  train_size: int = 0  # Training strings: 0 draws fresh ones every step, else a fixed set.


# Quick: n + 1 + M takes 3 values over the 4 runs and every eval set has 16 strings, so only 3
# train and 3 eval programs compile (compiling is most of its time).
QUICK = Settings(num_bits=(5, 8), pauses=("0", "3"), steps=160, batch_size=32, eval_every=40,
                 num_eval=16, learning_rate=3e-3, warmup_steps=20, weight_decay=0.01,
                 d_model=32, num_heads=2, head_dim=16, mlp_dim=64, rope_theta=10_000.0, seed=0,
                 seeds=1)
FULL = Settings(num_bits=(8, 10, 12, 16), pauses=("0", "n/2", "n"), steps=1500, batch_size=64,
                eval_every=100, num_eval=1024, learning_rate=1e-3, warmup_steps=200,
                weight_decay=0.01, d_model=64, num_heads=4, head_dim=16, mlp_dim=256,
                rope_theta=10_000.0, seed=0, seeds=1)
# London & Kanade's setup as far as it is known (module docstring): their n, M in {0, n}, 4 heads,
# learned absolute positions, threshold hints, a fixed training set. Width, optimiser and batch
# stay FULL's, so the two presets differ only in what the paper is known to have done; the set
# size and step count are ours too (the paper's are in its appendix and code).
LONDON_KANADE = dataclasses.replace(
    FULL, num_bits=(20, 50, 100, 150, 200, 250, 300), pauses=("0", "n"), steps=3000,
    eval_every=250, positions="learned", hints=True, train_size=10_000)
SETUPS = {"default": FULL, "london_kanade": LONDON_KANADE}
# What --quick takes from a --setup (it keeps its own sizes): how the task is posed.
_SETUP_METHOD = ("positions", "hints")
# Positional information: RoPE (the Decoder's own), a learned table added to the token embedding
# (GPT-2's wpe), or none (the causal mask alone tells positions apart).
POSITIONS = ("rope", "learned", "none")


# ----------------------------------------------------------------------------------------------
# Pause counts: absolute ("4") or relative to the number of bits ("n", "n/2", "2n", "3n/4").

_RELATIVE = re.compile(r"^(\d*)n(?:/(\d+))?$")


def parse_pause_spec(spec: str) -> str:
  """Normalises one --pauses entry; UsageError unless it is >= 0 or of the form [a]n[/b]."""
  text = str(spec).strip().replace(" ", "")
  if re.fullmatch(r"\d+", text):
    return str(int(text))
  m = _RELATIVE.match(text)
  if m and (m.group(1) in ("", None) or int(m.group(1)) > 0) and (
      m.group(2) is None or int(m.group(2)) > 0):
    return text
  raise UsageError.setting("--pauses", spec, "comma-separated pause counts, each a non-negative "
                           "integer or a multiple of n such as n, n/2, 2n")


def resolve_pauses(spec: str, num_bits: int) -> int:
  """The number of pauses M that `spec` means for n = `num_bits` (n/b rounds down)."""
  if re.fullmatch(r"\d+", spec):
    return int(spec)
  m = _RELATIVE.match(spec)
  return int(m.group(1) or 1) * num_bits // int(m.group(2) or 1)


# ----------------------------------------------------------------------------------------------
# Data.

def parity(bits_BxN: np.ndarray) -> np.ndarray:
  """The parity (0 or 1) of each row of 0/1 bits."""
  return (np.sum(bits_BxN, axis=-1) % 2).astype(np.int32)


def make_batch(bits_BxN: np.ndarray, num_pauses: int,
               hints: bool = False) -> dict[str, np.ndarray]:
  """Decoder features for bit strings: see the module docstring for the layout.

  With `hints`, the M positions before the answer (SEP and every pause but the last) are scored
  too: position n + j - 1 predicts hint j = [at least j bits are 1], j = 1 .. M. The inputs are
  unchanged (still pauses), so the hints are outputs only, never read back as in a chain of
  thought; parity is their alternating sum, which one more layer can take.
  """
  batch, n = bits_BxN.shape
  length = n + 1 + num_pauses
  ids = np.asarray(BIT_IDS, np.int32)
  inputs_BxL = np.full((batch, length), PAUSE_ID, np.int32)
  inputs_BxL[:, :n] = ids[bits_BxN]
  inputs_BxL[:, n] = SEP_ID
  targets_BxL = np.empty_like(inputs_BxL)
  targets_BxL[:, :-1] = inputs_BxL[:, 1:]  # Next-token targets, all with weight 0...
  targets_BxL[:, -1] = ids[parity(bits_BxN)]  # ...but the answer.
  weights_BxL = np.zeros((batch, length), np.float32)
  weights_BxL[:, -1] = 1.0
  if hints and num_pauses:
    ones_Bx1 = np.sum(bits_BxN, axis=-1, keepdims=True)
    hint_BxM = (ones_Bx1 >= np.arange(1, num_pauses + 1)).astype(np.int32)
    targets_BxL[:, n:n + num_pauses] = ids[hint_BxM]
    weights_BxL[:, n:n + num_pauses] = 1.0
  return {"decoder_input_tokens": inputs_BxL, "decoder_target_tokens": targets_BxL,
          "decoder_loss_weights": weights_BxL}


def _key(row: np.ndarray) -> bytes:
  return np.packbits(row.astype(np.uint8)).tobytes()


class ParityData:
  """A fixed held-out eval set and a stream of training strings that never hits it.

  With `train_size` > 0 the training strings are a fixed set of that many, drawn once (uniformly,
  outside the eval set, so repeats are possible when 2^n is small) and then read in epochs, each
  in a new random order; with 0, every batch draws fresh strings.
  """

  def __init__(self, num_bits: int, num_eval: int, seed: int, train_size: int = 0):
    self.num_bits, self.seed = num_bits, seed
    rng = np.random.default_rng([seed, num_bits, 0])
    # At most half the 2^n strings go to eval, so training always has some left.
    size = max(1, min(num_eval, 2 ** min(num_bits, 62) // 2))
    rows, self._eval_keys = [], set()
    while len(rows) < size:
      for row in rng.integers(0, 2, (size, num_bits), dtype=np.int8):
        k = _key(row)
        if k not in self._eval_keys and len(rows) < size:
          self._eval_keys.add(k)
          rows.append(row)
    self.eval_bits = np.stack(rows).astype(np.int32)
    self._train_rng = np.random.default_rng([seed, num_bits, 1])
    self.train_set = self._draw(train_size) if train_size else None
    self._order = np.zeros(0, np.int64)  # What is left of the current epoch.

  def is_held_out(self, row: np.ndarray) -> bool:
    return _key(row) in self._eval_keys

  def _draw(self, count: int) -> np.ndarray:
    """`count` uniformly random strings outside the eval set (rejection sampling)."""
    out = self._train_rng.integers(0, 2, (count, self.num_bits), dtype=np.int8)
    for i in range(count):
      while self.is_held_out(out[i]):
        out[i] = self._train_rng.integers(0, 2, self.num_bits, dtype=np.int8)
    return out.astype(np.int32)

  def train_bits(self, count: int) -> np.ndarray:
    """The next `count` training strings: fresh ones, or the next ones of the fixed set."""
    if self.train_set is None:
      return self._draw(count)
    parts = [self.train_set[:0]]
    while count:
      if not len(self._order):
        self._order = self._train_rng.permutation(len(self.train_set))
      take, self._order = self._order[:count], self._order[count:]
      parts.append(self.train_set[take])
      count -= len(take)
    return np.concatenate(parts)


# ----------------------------------------------------------------------------------------------
# Training.

def longest_seq_len(s: Settings) -> int:
  return max(n + 1 + resolve_pauses(p, n) for n in s.num_bits for p in s.pauses)


def model_config(s: Settings, max_len: int | None = None):
  """The 2-layer decoder. No max_len with RoPE or no positions: one config (and one compiled
  init) for every (n, M); a learned table has `max_len` rows, the sweep's longest sequence (so
  its initial rows, unlike the other weights, also depend on the sweep's largest n + M)."""
  from pausejax import model as model_lib
  return model_lib.ModelConfig(
      vocab_size=VOCAB_ROWS, num_layers=2, d_model=s.d_model, num_heads=s.num_heads,
      head_dim=s.head_dim, mlp_dim=s.mlp_dim, tied_embeddings=False, rope_theta=s.rope_theta,
      max_len=max_len if s.positions == "learned" else None)


@functools.lru_cache(maxsize=None)
def decoder_class(positions: str):
  """`pausejax.model.Decoder` for "rope"; for "learned" or "none", a subclass without RoPE."""
  from pausejax import model as model_lib
  if positions == "rope":
    return model_lib.Decoder
  import jax.numpy as jnp

  class Decoder(model_lib.Decoder):
    """RoPE at position 0 everywhere (its rotation is then the identity), plus for "learned" a
    table of position vectors added to the token embedding, drawn like it (GPT-2's wpe)."""

    def __init__(self, cfg, *, rngs):
      super().__init__(cfg, rngs=rngs)  # First: the other weights match a RoPE model's.
      self.pos_embed = None if positions == "none" else model_lib._param(  # (max_len)xD.
          model_lib._kernel(rngs, (cfg.max_len, cfg.d_model), 1, 0, cfg.param_dtype),
          ("length", "embed"))

    def __call__(self, tokens_BxL, segment_ids_BxL=None, positions_BxL=None, prefix_BxL=None,
                 lifetimes_BxL=None):
      return super().__call__(tokens_BxL, segment_ids_BxL, jnp.zeros_like(tokens_BxL),
                              prefix_BxL, lifetimes_BxL)

    def _embed(self, tokens_BxL):
      x_BxLxD = super()._embed(tokens_BxL)
      if self.pos_embed is None:
        return x_BxLxD
      return x_BxLxD + self.pos_embed[...][:tokens_BxL.shape[1]].astype(x_BxLxD.dtype)

  return Decoder


def programs(s: Settings) -> types.SimpleNamespace:
  """The compiled programs for `s`, shared by every (n, M) and seed of a sweep."""
  # Seeds are arguments and n, M only change shapes: they stay out of the cache key (but a
  # learned position table's length is a parameter shape).
  max_len = longest_seq_len(s) if s.positions == "learned" else None
  return _programs(dataclasses.replace(s, num_bits=(), pauses=(), seed=0, seeds=1,
                                       hints=False, train_size=0), max_len)


@functools.lru_cache(maxsize=4)
def _programs(s: Settings, max_len: int | None) -> types.SimpleNamespace:
  """Jitted init, train and eval functions, and train and eval vmapped over replicas.

  They recompile only for a new sequence length (or replica count): compiling is most of a
  --quick run's time, and building the model eagerly would compile each of its ops on its own.
  """
  import jax
  import jax.numpy as jnp
  import ml_collections
  from flax import nnx
  from pausejax import model as model_lib
  from pausejax import step as step_lib

  cfg = model_config(s, max_len)
  decoder = decoder_class(s.positions)
  graphdef, abstract_params = nnx.split(
      nnx.eval_shape(lambda: decoder(cfg, rngs=nnx.Rngs(0))), nnx.Param)
  oc = ml_collections.ConfigDict(dict(
      learning_rate=s.learning_rate, warmup_steps=s.warmup_steps, end_lr_ratio=0.1, b1=0.9,
      b2=0.98, eps=1e-8, weight_decay=s.weight_decay, grad_clip_norm=1.0))
  tx, schedule = step_lib.make_optimizer(oc, s.steps, step_lib.param_logical_specs(abstract_params))
  train_step = step_lib.make_train_step(graphdef, abstract_params, tx, schedule, PAUSE_ID)
  evaluate = step_lib.make_eval_step(graphdef, abstract_params)

  def init(seed_u32):
    # The 'rbg' generator: threefry's unrolled rounds double the time to compile this on CPU.
    model = decoder(cfg, rngs=nnx.Rngs(jax.random.key(seed_u32, impl="rbg")))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

  def train_chunk(state, batches):  # One call runs a stack of batches, one step each.
    state, metrics = jax.lax.scan(train_step, state, batches)
    return state, {k: jnp.mean(metrics[k]) for k in ("train_loss", "train_accuracy")}

  # No vmapped init: 'rbg' keys draw other bits under vmap, so replicas are initialised one by
  # one (as a lone run would be) and stacked.
  return types.SimpleNamespace(
      num_params=model_lib.count_params(cfg) + (max_len or 0) * cfg.d_model, init=jax.jit(init),
      train_chunk=jax.jit(train_chunk, donate_argnums=0), evaluate=jax.jit(evaluate),
      train_chunk_replicas=jax.jit(jax.vmap(train_chunk), donate_argnums=0),
      evaluate_replicas=jax.jit(jax.vmap(evaluate)))


def seed_u32(seed: int) -> np.uint32:
  """The init program's seed argument: the key that jax.random.key(seed) makes without x64."""
  return np.uint32(seed % 2 ** 32)


def _features(bits_xN: np.ndarray, num_pauses: int, lead: tuple[int, ...],
              hints: bool = False) -> dict:
  """make_batch of all rows at once (it is row-wise), each feature reshaped to lead + (L,)."""
  batch = make_batch(bits_xN, num_pauses, hints)
  return {k: v.reshape(*lead, v.shape[-1]) for k, v in batch.items()}


def train_replicas(s: Settings, datas: Sequence[ParityData], num_pauses: int,
                   progress=None) -> dict[str, Any]:
  """Trains one model per entry of `datas` (all of one n) with `num_pauses` pauses; their record.

  Model i starts from the weights of seed datas[i].seed and trains on datas[i]'s strings. One
  model runs the plain programs; several run as replicas of one vmapped program, in the same
  steps, until the last of them is solved or `s.steps` have run. Accuracies and losses in the
  record are means over the models, with the per-model values beside them.
  """
  import jax
  import jax.numpy as jnp

  n, k = datas[0].num_bits, len(datas)
  seeds = [d.seed for d in datas]
  p = programs(s)
  states = [p.init(seed_u32(seed)) for seed in seeds]
  if k == 1:  # The plain programs: vmap may fuse ops differently, and K = 1 stays as it was.
    state, train_chunk, evaluate, lead = states[0], p.train_chunk, p.evaluate, ()
  else:
    state = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
    train_chunk, evaluate, lead = p.train_chunk_replicas, p.evaluate_replicas, (k,)
  del states  # Only the stacked copy (or, for one seed, the donated state) is used from here.
  num_eval = len(datas[0].eval_bits)
  eval_batch = _features(np.concatenate([d.eval_bits for d in datas]), num_pauses,
                         lead + (num_eval,))
  solved_K = np.zeros(k, np.int64)  # Evaluations in a row at 100 %, per seed.
  solved_step = [None] * k
  curve, done, start = [], 0, time.perf_counter()
  while done < s.steps:
    chunk = min(s.eval_every, s.steps - done)
    bits = np.concatenate([d.train_bits(chunk * s.batch_size) for d in datas])
    state, train_metrics = train_chunk(  # Evaluation scores the answer alone, hints or not.
        state, _features(bits, num_pauses, lead + (chunk, s.batch_size), s.hints))
    done += chunk
    terms = jax.device_get(evaluate(state["params"], eval_batch))
    train_metrics = jax.device_get(train_metrics)
    acc_K = [float(a) for a in np.atleast_1d(terms["correct_sum"] / terms["weight_sum"])]
    loss_K = [float(a) for a in np.atleast_1d(terms["nll_sum"] / terms["weight_sum"])]
    point = {"step": done, "eval_accuracy": stats.mean(acc_K), "eval_loss": stats.mean(loss_K),
             "train_loss": stats.mean([float(a) for a in np.atleast_1d(train_metrics["train_loss"])]),
             "train_accuracy": stats.mean(
                 [float(a) for a in np.atleast_1d(train_metrics["train_accuracy"])]),
             "eval_accuracy_per_seed": acc_K, "eval_loss_per_seed": loss_K}
    curve.append(point)
    solved_K = np.where(np.asarray(acc_K) == 1.0, solved_K + 1, 0)
    for i in np.flatnonzero(solved_K == SOLVED_EVALS):
      if solved_step[i] is None:
        solved_step[i] = done
    if progress:
      progress(done, point)
    if (solved_K >= SOLVED_EVALS).all():
      break
  final_K = curve[-1]["eval_accuracy_per_seed"]
  best_K = [max(q["eval_accuracy_per_seed"][i] for q in curve) for i in range(k)]
  return {"num_bits": n, "num_pauses": num_pauses, "seq_len": n + 1 + num_pauses,
          "num_params": p.num_params, "steps_run": done,
          "stopped_early": done < s.steps, "final_accuracy": stats.mean(final_K),
          "best_accuracy": stats.mean(best_K), "num_eval": num_eval,
          "wall_s": round(time.perf_counter() - start, 2), "seeds": seeds,
          "final_accuracy_per_seed": final_K, "final_accuracy_ci95": stats.ci95(final_K),
          "best_accuracy_per_seed": best_K,
          # Where a lone run of that seed would have stopped (None: never solved).
          "solved_step_per_seed": solved_step, "curve": curve}


def train_one(s: Settings, data: ParityData, num_pauses: int, progress=None) -> dict[str, Any]:
  """Trains one model (seed data.seed) on n-bit parity with `num_pauses` pauses; its record."""
  return train_replicas(s, [data], num_pauses, progress)


# ----------------------------------------------------------------------------------------------
# Sweep.

def sweep(s: Settings, stream=None) -> dict[str, Any]:
  """Trains every (n, M) of `s`; returns the results.json content."""
  start = time.perf_counter()
  plan = [(n, spec, resolve_pauses(spec, n)) for n in s.num_bits for spec in s.pauses]
  progress = Progress(sum(s.steps * (n + 1 + m) for n, _, m in plan), stream)
  runs, finished = [], 0.0
  acc = "held-out acc" if s.seeds == 1 else f"mean held-out acc of {s.seeds} seeds"
  for i, (n, spec, m) in enumerate(plan):
    datas = [ParityData(n, s.num_eval, s.seed + j, s.train_size) for j in range(s.seeds)]
    label = f"run {i + 1}/{len(plan)} n={n} M={m}"

    def report(step, point, n=n, m=m, label=label):
      progress.update(f"{label} step {step}/{s.steps} {acc} {point['eval_accuracy']:.3f}",
                      finished + step * (n + 1 + m))

    record = train_replicas(s, datas, m, report)
    record["pauses"] = spec
    runs.append(record)
    progress.total -= (s.steps - record["steps_run"]) * (n + 1 + m)
    finished += record["steps_run"] * (n + 1 + m)
    progress.update(f"{label} done: final {acc} {record['final_accuracy']:.3f}", finished,
                    force=True)
  progress.close()
  return {"experiment": "parity", "settings": dataclasses.asdict(s),
          "tokens": {"bit0": BIT_IDS[0], "bit1": BIT_IDS[1], "sep": SEP_ID, "pause": PAUSE_ID},
          "num_layers": 2, "runs": runs, "wall_s": round(time.perf_counter() - start, 1)}


# ----------------------------------------------------------------------------------------------
# Command line.

def check_outdir(outdir: str | None) -> str:
  """The absolute outdir; UsageError (and nothing created) if it cannot be written."""
  if not outdir:
    raise UsageError.setting("--outdir", outdir, "give a directory for the results")
  return check_writable_dir(outdir, "--outdir")


def _int_list(name: str, text: str, minimum: int) -> tuple[int, ...]:
  try:
    values = tuple(int(v) for v in str(text).split(",") if v.strip())
  except ValueError:
    values = ()
  if not values or min(values) < minimum:
    raise UsageError.setting(name, text, f"comma-separated integers >= {minimum}")
  return tuple(dict.fromkeys(values))  # Drop repeats, keep order.


def settings_from_flags(f) -> Settings:
  """The preset (--setup, or --quick with the setup's method) with the flags that were given;
  UsageError for bad ones."""
  setup = "default" if f.setup is None else f.setup
  if setup not in SETUPS:
    raise UsageError.setting("--setup", f.setup, "one of " + ", ".join(SETUPS))
  s = SETUPS[setup]
  if f.quick:
    s = dataclasses.replace(QUICK, **{k: getattr(s, k) for k in _SETUP_METHOD})
  changes: dict[str, Any] = {}
  if f.positions is not None:
    if f.positions not in POSITIONS:
      raise UsageError.setting("--positions", f.positions, "one of " + ", ".join(POSITIONS))
    changes["positions"] = f.positions
  if f.hints is not None:
    changes["hints"] = bool(f.hints)
  if f.train_size is not None:
    if f.train_size < 0:
      raise UsageError.setting("--train_size", f.train_size,
                               "a non-negative integer (0: fresh strings every step)")
    changes["train_size"] = f.train_size
  if f.num_bits is not None:
    changes["num_bits"] = _int_list("--num_bits", f.num_bits, 1)
  if f.pauses is not None:
    specs = tuple(parse_pause_spec(p) for p in str(f.pauses).split(",") if p.strip())
    if not specs:
      raise UsageError.setting("--pauses", f.pauses, "at least one pause count, e.g. 0,n/2,n")
    changes["pauses"] = tuple(dict.fromkeys(specs))
  for name in ("steps", "batch_size", "eval_every", "num_eval", "d_model", "num_heads",
               "head_dim", "mlp_dim"):
    value = getattr(f, name)
    if value is not None:
      if value < 1:
        raise UsageError.setting(f"--{name}", value, "a positive integer")
      changes[name] = value
  if f.learning_rate is not None:
    if not f.learning_rate > 0:
      raise UsageError.setting("--learning_rate", f.learning_rate, "a positive number")
    changes["learning_rate"] = f.learning_rate
  if f.rope_theta is not None:
    if not f.rope_theta > 0:
      raise UsageError.setting("--rope_theta", f.rope_theta, "a positive number")
    changes["rope_theta"] = f.rope_theta
  if f.seed is not None:
    if f.seed < 0:
      raise UsageError.setting("--seed", f.seed, "a non-negative integer")
    changes["seed"] = f.seed
  if f.seeds is not None:
    if f.seeds < 1:
      raise UsageError.setting("--seeds", f.seeds, "a positive integer (models per (n, M))")
    changes["seeds"] = f.seeds
  s = dataclasses.replace(s, **changes)
  if s.head_dim % 2:
    raise UsageError.setting("--head_dim", s.head_dim, "an even integer (RoPE rotates pairs)")
  longest = longest_seq_len(s)
  if longest > MAX_SEQ_LEN:
    raise UsageError.setting("--num_bits/--pauses", f"{s.num_bits}/{s.pauses}",
                             f"sequences of n + 1 + M <= {MAX_SEQ_LEN} tokens (got {longest})")
  return s


def define_flags() -> None:
  flags.DEFINE_string("outdir", None, "Directory for results.json, results.md and parity.png.")
  flags.DEFINE_bool("quick", False, "Tiny sweep for CI (seconds) instead of the full one.")
  flags.DEFINE_string("setup", None,
                      "Preset: default, or london_kanade (their n, M, positions and hints; "
                      "see the module docstring). Other flags override it; with --quick only "
                      "its positions and hints apply.")
  flags.DEFINE_string("positions", None, "Positions: rope, learned (absolute) or none.")
  flags.DEFINE_bool("hints", None, "Also score threshold hints before the answer (make_batch).")
  flags.DEFINE_integer("train_size", None,
                       "Fixed training set of this many strings per n and seed (0: fresh "
                       "strings every step).")
  flags.DEFINE_string("num_bits", None, "Comma-separated n values (default: the preset's).")
  flags.DEFINE_string("pauses", None,
                      "Comma-separated pause counts M: integers, or n, n/2, 2n... (relative to n).")
  flags.DEFINE_integer("steps", None, "Training steps per (n, M) run.")
  flags.DEFINE_integer("batch_size", None, "Training strings per step.")
  flags.DEFINE_integer("eval_every", None, "Steps between held-out evaluations.")
  flags.DEFINE_integer("num_eval", None, "Held-out strings per n.")
  flags.DEFINE_float("learning_rate", None, "Peak AdamW learning rate.")
  flags.DEFINE_integer("d_model", None, "Model width.")
  flags.DEFINE_integer("num_heads", None, "Attention heads.")
  flags.DEFINE_integer("head_dim", None, "Width of one head (even).")
  flags.DEFINE_integer("mlp_dim", None, "SwiGLU hidden width.")
  flags.DEFINE_float("rope_theta", None, "RoPE base.")
  flags.DEFINE_integer("seed", None, "Seed of the data and of the initial weights.")
  flags.DEFINE_integer("seeds", None,
                       "Models per (n, M), seeds --seed, --seed + 1, ..., trained together as "
                       "vmapped replicas; results are their means with 95 % confidence intervals.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments {list(argv[1:])}; all settings are --flags")
  f = flags.FLAGS
  outdir = check_outdir(f.outdir)
  s = settings_from_flags(f)
  if f.quick and "jax" not in sys.modules:
    # Compiling dominates a quick run; LLVM optimisations cost more than they save there.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_backend_optimization_level=0").strip()
  command = "python -m pausejax.experiments.parity " + " ".join(sys.argv[1:])
  results = sweep(s)
  write_outputs(results, outdir, command)
  print(results_table(results))
  print(f"wrote {', '.join(FILES)} to {outdir} ({results['wall_s']:.0f} s)")


if __name__ == "__main__":
  define_flags()
  run(main)
