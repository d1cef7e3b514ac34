r"""The SequenceMatch experiment: does training with `<backspace>` help a small model?

    python -m pausejax.experiments.sequencematch --outdir=runs/sequencematch [--quick] \
        [--steps=N] [--seed=0]

Four models per part (2 layers x 128), trained from the same initialisation (the same seed,
data order and steps); only the training signal differs:

  mle            plain maximum likelihood
  mle_noise      the same data with noise + `<backspace>` inserted (`backspace.rate`), MLE on it
  sequencematch  the noisy data, MLE for the first half of the steps, then (1 - w) MLE +
                 w L_χ² over data rows and the model's own samples (`pausejax.sequencematch`),
                 w = 0.5, with the reported α = 0.01, γ = 0.998
  sequencematch_a1  the same with α = 1: 1/(4α) E[r²] weighs the regulariser 100 times less

Arithmetic (`arith_base7`: add or subtract in base 7, 1-3 digit operands, 4,000 training and 300
held-out problems, embedded): exact match on the held-out problems, greedy and sampled
(temperature 1), with `<backspace>` allowed (up to 4 per answer) for every model; the share of
moves that are `<backspace>`; moves per answer.

Shakespeare (the embedded corpus, pretraining): continuations of held-out prompts (32 tokens) at
temperature 1, `<backspace>` allowed; distinct-n (distinct n-grams / all n-grams, over all
continuations), repetition (the share of a continuation's 4-grams that repeat an earlier one,
averaged), and the perplexity of the continuations (after deletions) under a separately
trained larger model (`configs/tiny.py` shapes, more steps), next to that of the held-out text
itself.

Writes results.json, results.md (the tables) and sequencematch.png into --outdir; the training
runs go to --outdir/runs/<part>/<model>/ (ordinary pausejax workdirs). Re-running reuses finished
runs. --quick shrinks everything to seconds for tests; its numbers mean nothing.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from absl import flags
import numpy as np

from pausejax.errors import UsageError
from pausejax.errors import run


def define_flags() -> None:
  """Flags of the CLI only, so other modules can import this one."""
  flags.DEFINE_string("outdir", None, "Where results and the training runs go.")
  flags.DEFINE_bool("quick", False, "Seconds-long smoke run (numbers mean nothing).")
  flags.DEFINE_integer("steps", 0, "Training steps per model (0: the mode's default).")
  flags.DEFINE_integer("seed", 0, "Seed of every run.")


# (full, quick) defaults.
ARITH_STEPS = (1500, 6)
LM_STEPS = (800, 6)
REFERENCE_STEPS = (1000, 6)
EVAL_PROBLEMS = (300, 6)
NUM_CONTINUATIONS = (64, 4)
PROMPT_TOKENS, CONTINUATION_TOKENS = 32, 48
ARITH_TASK = "arith_base7"
TARGETS_LEN = 16     # Up to 5 answer pieces + EOS, and room for noise + <backspace> pairs.
MAX_BACKSPACES = 4
NOISE_RATE = 0.2
MODELS = {
    "mle": ({}, "plain MLE"),
    "mle_noise": ({"backspace.rate": NOISE_RATE}, f"MLE on data with noise + <backspace> "
                  f"(rate {NOISE_RATE})"),
    "sequencematch": ({"backspace.rate": NOISE_RATE, "sequencematch.weight": 0.5},
                      "the noisy data, MLE then 0.5 MLE + 0.5 chi^2 with model samples"),
    "sequencematch_a1": ({"backspace.rate": NOISE_RATE, "sequencematch.weight": 0.5,
                          "sequencematch.alpha": 1.0}, "the same with alpha = 1 (a weaker "
                         "chi^2 regulariser than the reported 0.01)"),
}


def _sm_overrides(name: str, steps: int, quick: bool) -> dict[str, Any]:
  # The SequenceMatch settings are the same for all (they do nothing while weight is 0).
  return {**MODELS[name][0], "backspace.max_per_sequence": MAX_BACKSPACES,
          "sequencematch.bc_steps": steps // 2,
          "sequencematch.refresh_every_steps": 2 if quick else 50,
          "sequencematch.buffer_size": 4 if quick else 64,
          "sequencematch.model_rows": 2 if quick else 16}


def arith_config(name: str, quick: bool, seed: int, steps: int, tfds_data_dir: str):
  from pausejax.experiments import ablation
  c = ablation.finetune_config(quick, seed, 0, steps, "", tfds_data_dir)
  c.task = ARITH_TASK
  c.targets_len = TARGETS_LEN
  c.seq_len = 16 + TARGETS_LEN
  c.update_from_flattened_dict({**_sm_overrides(name, steps, quick),
                                "sequencematch.sample_tokens": TARGETS_LEN})
  _small(c, quick)
  return c


def _small(c, quick: bool) -> None:
  """2 layers x 128 for the compared models (the scorer keeps configs/tiny.py's 4 x 192)."""
  if not quick:
    c.update_from_flattened_dict({"model.num_layers": 2, "model.d_model": 128,
                                  "model.num_heads": 2, "model.head_dim": 64,
                                  "model.mlp_dim": 384})


def lm_config(name: str, quick: bool, seed: int, steps: int, tfds_data_dir: str):
  from pausejax.experiments import ablation
  c = ablation.pretrain_config(quick, seed, "shakespeare", steps, tfds_data_dir)
  c.seq_len = 32 if quick else 96
  _small(c, quick)
  c.update_from_flattened_dict({**_sm_overrides(name, steps, quick),
                                "sequencematch.prompt_len": PROMPT_TOKENS // (4 if quick else 1),
                                "sequencematch.sample_tokens": 16 if quick else 48})
  return c


def reference_config(quick: bool, seed: int, steps: int, tfds_data_dir: str):
  """The larger scorer: configs/tiny.py's shapes (4 layers, d_model 192), plain MLE."""
  from pausejax.experiments import ablation
  c = ablation.pretrain_config(quick, seed + 1000, "shakespeare", steps, tfds_data_dir)
  c.seq_len = 32 if quick else 128
  return c


# ----------------------------------------------------------------------------------------------
# Scoring.

def _model(workdir: str, config):
  from pausejax.experiments import ablation
  return ablation.trained_model(workdir, config)


def arith_scores(workdir: str, config, problems, temperature: float, seed: int):
  """Exact match (%), <backspace> share of moves and moves per answer on `problems`."""
  from pausejax import decode
  vocabulary, model = _model(workdir, config)
  prompts = [[0] + list(vocabulary.encode(p)) for p, _ in problems]
  out = decode.generate(model, prompts, max_new_tokens=TARGETS_LEN, num_pauses=0,
                        pause_id=vocabulary.pause_id, eos_id=vocabulary.eos_id,
                        max_len=config.seq_len + 8, temperature=temperature, seed=seed,
                        vocab_size=vocabulary.vocab_size, backspace_id=vocabulary.backspace_id,
                        max_backspaces=MAX_BACKSPACES)
  answers = [vocabulary.decode(t).strip() for t in out.tokens]
  moves = sum(len(r) for r in out.raw_tokens)
  return {"exact_match": 100.0 * np.mean([a == want for a, (_, want) in zip(answers, problems)]),
          "backspace_rate": sum(out.num_backspaces) / max(moves, 1),
          "moves_per_answer": moves / len(problems),
          "examples": [{"prompt": p, "target": w, "answer": a}
                       for (p, w), a in list(zip(problems, answers))[:5]]}


def terminal_logits(workdir: str, config, problems) -> dict[str, float]:
  """Teacher-forced on BOS + problem + answer: at the row that should emit EOS, the EOS logit
  (Q(s_T, EOS): the χ² regulariser pulls it towards 0), the largest logit and p(EOS)."""
  import jax
  import jax.numpy as jnp
  vocabulary, model = _model(workdir, config)
  rows = [[0] + list(vocabulary.encode(p)) + list(vocabulary.encode(a)) for p, a in problems]
  length = max(map(len, rows))
  tokens = jnp.asarray([r + [0] * (length - len(r)) for r in rows])
  logits_BxLxV = model(tokens)
  last_B = jnp.asarray([len(r) - 1 for r in rows])
  final_BxV = logits_BxLxV[jnp.arange(len(rows)), last_B][:, :vocabulary.vocab_size]
  eos_B = final_BxV[:, vocabulary.eos_id]
  return {"eos_logit": float(jnp.mean(eos_B)), "max_logit": float(jnp.mean(final_BxV.max(-1))),
          "p_eos": float(jnp.mean(jax.nn.softmax(final_BxV, -1)[:, vocabulary.eos_id]))}


def distinct_n(samples: list[list[int]], n: int) -> float:
  grams = [tuple(s[i:i + n]) for s in samples for i in range(len(s) - n + 1)]
  return len(set(grams)) / max(len(grams), 1)


def repetition(samples: list[list[int]], n: int = 4) -> float:
  """Mean over samples of the share of n-grams that occurred earlier in the same sample."""
  shares = []
  for s in samples:
    grams = [tuple(s[i:i + n]) for i in range(len(s) - n + 1)]
    if grams:
      shares.append(1 - len(set(grams)) / len(grams))
  return float(np.mean(shares)) if shares else 0.0


def perplexity(model, rows: list[tuple[list[int], list[int]]]) -> float:
  """exp(mean NLL) of each row's continuation given its prompt, under `model`."""
  import jax
  import jax.numpy as jnp
  length = max(len(p) + len(c) for p, c in rows)
  nll, count = 0.0, 0
  for prompt, cont in rows:
    seq = prompt + cont
    tokens = jnp.asarray([seq + [0] * (length - len(seq))])
    logp = jax.nn.log_softmax(model(tokens)[0], axis=-1)
    for i, t in enumerate(cont):
      nll -= float(logp[len(prompt) + i - 1, t])
      count += 1
  return float(np.exp(min(nll / max(count, 1), 700.0)))  # 700: no float overflow.


def lm_scores(workdir: str, config, prompts: list[list[int]], held_out: list[list[int]],
              reference, seed: int) -> dict[str, Any]:
  from pausejax import decode
  vocabulary, model = _model(workdir, config)
  out = decode.generate(model, prompts, max_new_tokens=len(held_out[0]), num_pauses=0,
                        pause_id=vocabulary.pause_id, eos_id=None,
                        max_len=len(prompts[0]) + len(held_out[0]), temperature=1.0, seed=seed,
                        vocab_size=vocabulary.vocab_size, backspace_id=vocabulary.backspace_id,
                        max_backspaces=MAX_BACKSPACES)
  moves = sum(len(r) for r in out.raw_tokens)
  samples = out.tokens
  return {"distinct_1": distinct_n(samples, 1), "distinct_2": distinct_n(samples, 2),
          "distinct_3": distinct_n(samples, 3), "repetition_4": repetition(samples),
          "reference_ppl": perplexity(reference, [(p, s) for p, s in zip(prompts, samples)
                                                  if s]),
          "backspace_rate": sum(out.num_backspaces) / max(moves, 1),
          "tokens_per_continuation": float(np.mean([len(s) for s in samples])),
          "example": vocabulary.decode(samples[0])}


# ----------------------------------------------------------------------------------------------
# Report.

def _markdown(results: dict[str, Any]) -> str:
  s = results["settings"]
  lines = [f"Arithmetic ({ARITH_TASK}, {s['eval_problems']} held-out problems, {s['arith_steps']} "
           f"steps per model, seed {s['seed']}); `<backspace>` allowed up to {MAX_BACKSPACES} "
           "times per answer for every model.", "",
           "| model | exact match greedy | exact match T=1 | <backspace> share (T=1) | "
           "moves per answer (T=1) | EOS logit at the end | p(EOS) there |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  for name, r in results["arith"].items():
    g, t, e = r["greedy"], r["sampled"], r["terminal"]
    lines.append(f"| {name} | {g['exact_match']:.1f}% | {t['exact_match']:.1f}% | "
                 f"{100 * t['backspace_rate']:.2f}% | {t['moves_per_answer']:.2f} | "
                 f"{e['eos_logit']:.2f} (max {e['max_logit']:.2f}) | {e['p_eos']:.3f} |")
  lm = results["lm"]
  lines += ["", f"Shakespeare continuations ({s['continuations']} held-out prompts of "
            f"{s['prompt_tokens']} tokens, {s['continuation_tokens']} moves at T=1, "
            f"{s['lm_steps']} steps per model); reference perplexity under a larger model trained for "
            f"{s['reference_steps']} steps (held-out text itself: "
            f"{results['reference_ppl_of_held_out']:.1f}).", "",
            "| model | distinct-1 | distinct-2 | distinct-3 | repetition-4 | reference ppl | "
            "<backspace> share | tokens kept |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for name, r in lm.items():
    lines.append(f"| {name} | {r['distinct_1']:.3f} | {r['distinct_2']:.3f} | "
                 f"{r['distinct_3']:.3f} | {r['repetition_4']:.3f} | {r['reference_ppl']:.1f} | "
                 f"{100 * r['backspace_rate']:.2f}% | {r['tokens_per_continuation']:.1f} |")
  return "\n".join(lines) + "\n"


def _plot(results: dict[str, Any], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = list(results["arith"])
  fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.5))
  x = np.arange(len(names))
  a.bar(x - 0.2, [results["arith"][n]["greedy"]["exact_match"] for n in names], 0.4,
        label="greedy")
  a.bar(x + 0.2, [results["arith"][n]["sampled"]["exact_match"] for n in names], 0.4,
        label="T=1")
  a.set_xticks(x, names, rotation=20, ha="right")
  a.set_ylabel("exact match (%)")
  a.set_title(f"{ARITH_TASK}: held-out exact match")
  a.legend()
  b.bar(x, [results["lm"][n]["reference_ppl"] for n in names])
  b.axhline(results["reference_ppl_of_held_out"], color="k", linestyle=":",
            label="held-out text")
  b.set_xticks(x, names, rotation=20, ha="right")
  b.set_ylabel("perplexity under the reference model")
  b.set_title("Shakespeare continuations (T=1)")
  b.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  if f.steps < 0:
    raise UsageError.setting("--steps", f.steps, "a non-negative integer (0: the mode's default)")
  mode = 1 if f.quick else 0
  from pausejax import config as config_lib
  from pausejax import corpus
  from pausejax import downstream
  from pausejax.experiments import ablation
  from pausejax.experiments import parity
  outdir = parity.check_outdir(f.outdir)
  tfds_dir = os.path.join(outdir, "tensorflow_datasets")
  arith_steps, lm_steps = f.steps or ARITH_STEPS[mode], f.steps or LM_STEPS[mode]
  arith = {n: arith_config(n, f.quick, f.seed, arith_steps, tfds_dir) for n in MODELS}
  lm = {n: lm_config(n, f.quick, f.seed, lm_steps, tfds_dir) for n in MODELS}
  ref_steps = REFERENCE_STEPS[mode]
  reference = reference_config(f.quick, f.seed, ref_steps, tfds_dir)
  for c in [*arith.values(), *lm.values(), reference]:
    config_lib.validate(c)
  corpus.ensure_prepared(corpus.EMBEDDED_TFDS_NAME, tfds_dir)

  t0 = time.time()
  jobs = [("arith", n, c) for n, c in arith.items()] + [("lm", n, c) for n, c in lm.items()]
  jobs.append(("lm", "reference", reference))
  total = len(jobs) + 1

  def progress(done: int, what: str) -> None:
    elapsed = time.time() - t0
    eta = f"{elapsed / done * (total - done):.0f}s" if done else "--"
    print(f"[sequencematch {done}/{total} | {elapsed:.0f}s elapsed | ETA {eta}] {what}",
          flush=True)

  runs = os.path.join(outdir, "runs")
  for i, (part, name, c) in enumerate(jobs):
    progress(i, f"training {part}/{name}")
    ablation.train_or_reuse(c, os.path.join(runs, part, name))
  progress(len(jobs), "scoring")

  problems = downstream.arithmetic_examples(EVAL_PROBLEMS[mode], base=7, max_digits=3, seed=1)
  results: dict[str, Any] = {"arith": {}, "lm": {}}
  for name, c in arith.items():
    workdir = os.path.join(runs, "arith", name)
    results["arith"][name] = {"greedy": arith_scores(workdir, c, problems, 0.0, f.seed),
                              "sampled": arith_scores(workdir, c, problems, 1.0, f.seed),
                              "terminal": terminal_logits(workdir, c, problems)}
  _, ref_model = _model(os.path.join(runs, "lm", "reference"), reference)
  vocabulary, _ = _model(os.path.join(runs, "lm", "mle"), lm["mle"])
  from pausejax import stream_ppl
  count, cont = NUM_CONTINUATIONS[mode], CONTINUATION_TOKENS // (4 if f.quick else 1)
  prompt_len = PROMPT_TOKENS // (4 if f.quick else 1)
  stream = stream_ppl.stream_tokens(lm["mle"], vocabulary, None, 0)[1:]
  stride = prompt_len + cont
  if len(stream) < count * stride:
    raise UsageError(f"the held-out text has {len(stream)} tokens, fewer than {count * stride}")
  chunks = [stream[i * stride:(i + 1) * stride] for i in range(count)]
  prompts = [[0] + ch[:prompt_len] for ch in chunks]
  held_out = [ch[prompt_len:] for ch in chunks]
  for name, c in lm.items():
    results["lm"][name] = lm_scores(os.path.join(runs, "lm", name), c, prompts, held_out,
                                    ref_model, f.seed)
  results["reference_ppl_of_held_out"] = perplexity(ref_model, list(zip(prompts, held_out)))
  results["settings"] = {
      "quick": f.quick, "seed": f.seed, "arith_steps": arith_steps, "lm_steps": lm_steps,
      "reference_steps": ref_steps, "eval_problems": len(problems), "continuations": count,
      "continuation_tokens": cont, "prompt_tokens": prompt_len, "noise_rate": NOISE_RATE,
      "max_backspaces": MAX_BACKSPACES,
      "models": {n: {"overrides": o, "what": w} for n, (o, w) in MODELS.items()}}
  results["wall_time_s"] = time.time() - t0
  with open(os.path.join(outdir, "results.json"), "w") as fh:
    json.dump(results, fh, indent=2)
  with open(os.path.join(outdir, "results.md"), "w") as fh:
    fh.write(_markdown(results))
  _plot(results, os.path.join(outdir, "sequencematch.png"))
  print(_markdown(results), flush=True)


if __name__ == "__main__":
  define_flags()
  run(main)
