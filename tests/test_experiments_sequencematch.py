"""The SequenceMatch experiment runner: configs, statistics, table, quick mode, and generate's
backspace flags on its runs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from pausejax.experiments import sequencematch as sm

CLI = [sys.executable, "-m", "pausejax.experiments.sequencematch"]


def _flat(d, prefix=()):
  out = {}
  for k, v in d.items():
    out.update(_flat(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,): v})
  return out


@pytest.mark.parametrize("make", [sm.arith_config, sm.lm_config])
def test_the_models_differ_only_in_their_training_signal(make):
  configs = {n: _flat(make(n, False, 0, 100, "/tmp/tfds").to_dict()) for n in sm.MODELS}
  base = configs["mle"]
  diff = lambda n: {k[-1] for k, v in configs[n].items() if base.get(k) != v}
  assert diff("mle_noise") == {"rate"}
  assert diff("sequencematch") == {"rate", "weight"}
  assert diff("sequencematch_a1") == {"rate", "weight", "alpha"}
  assert configs["sequencematch"][("sequencematch", "bc_steps")] == 50


def test_distinct_n_and_repetition_on_known_samples():
  samples = [[1, 2, 3, 1, 2, 3, 1, 2, 3], [4, 5, 6, 7]]
  assert sm.distinct_n(samples, 1) == pytest.approx(7 / 13)
  # Bigrams: (1,2),(2,3),(3,1) x ... in sample 0 (8 bigrams, 3 distinct) + 3 distinct in 1.
  assert sm.distinct_n(samples, 2) == pytest.approx(6 / 11)
  # Sample 0: 6 four-grams, 3 distinct -> 0.5 repeated; sample 1: one four-gram, none.
  assert sm.repetition(samples) == pytest.approx(0.25)
  assert sm.repetition([[1, 2, 3, 4, 5]]) == 0.0


def test_perplexity_of_a_model_that_knows_the_answer_is_one():
  import jax.numpy as jnp

  class Oracle:  # Next token = current token + 1, with certainty.
    def __call__(self, tokens):
      return jnp.where(jnp.arange(16)[None, None] == tokens[..., None] + 1, 0.0, -1e9)
  assert sm.perplexity(Oracle(), [([0, 1, 2], [3, 4, 5])]) == pytest.approx(1.0)
  assert sm.perplexity(Oracle(), [([0, 1, 2], [5])]) > 1e6


def test_markdown_has_a_row_per_model_in_both_tables():
  arith = {"greedy": {"exact_match": 12.5}, "sampled": {"exact_match": 10.0,
           "backspace_rate": 0.01, "moves_per_answer": 4.5},
           "terminal": {"eos_logit": 3.25, "max_logit": 4.5, "p_eos": 0.5}}
  lm = {"distinct_1": 0.5, "distinct_2": 0.8, "distinct_3": 0.9, "repetition_4": 0.01,
        "reference_ppl": 123.4, "backspace_rate": 0.002, "tokens_per_continuation": 47.0}
  results = {"arith": {n: arith for n in sm.MODELS}, "lm": {n: lm for n in sm.MODELS},
             "reference_ppl_of_held_out": 99.0,
             "settings": {"eval_problems": 300, "arith_steps": 1500, "seed": 0,
                          "continuations": 64, "prompt_tokens": 32, "continuation_tokens": 48,
                          "lm_steps": 800, "reference_steps": 1000}}
  md = sm._markdown(results)
  assert md.count("| mle |") == 2 and md.count("| sequencematch |") == 2
  assert "| mle | 12.5% | 10.0% | 1.00% | 4.50 | 3.25 (max 4.50) | 0.500 |" in md and "| 123.4 |" in md and "99.0" in md


@pytest.mark.slow
def test_quick_mode_end_to_end_and_generate_shows_edits(tmp_path):
  out = tmp_path / "sm"
  r = subprocess.run(CLI + [f"--outdir={out}", "--quick"], cwd=REPO, capture_output=True,
                     text=True, timeout=1200, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 0, r.stderr[-3000:]
  results = json.loads((out / "results.json").read_text())
  assert set(results["arith"]) == set(sm.MODELS) == set(results["lm"])
  for scores in results["arith"].values():
    assert scores["greedy"]["moves_per_answer"] > 0
  assert (out / "results.md").exists() and (out / "sequencematch.png").stat().st_size > 1000
  # The SequenceMatch run logged its model samples and the chi^2 share.
  rows = [json.loads(l) for l in open(out / "runs" / "arith" / "sequencematch" / "metrics.jsonl")]
  assert any("sample_backspace_rate" in r for r in rows)
  weights = {r["step"]: r["chi2_weight"] for r in rows if "chi2_weight" in r}
  bc_steps = sm.arith_config("sequencematch", True, 0, 6, "").sequencematch.bc_steps
  assert weights and all(w == (0.0 if s <= bc_steps else 0.5) for s, w in weights.items())
  # generate on that run: up to 3 deletions, sampled, the edit trace shown.
  g = subprocess.run([sys.executable, "-m", "pausejax.generate",
                      f"--workdir={out / 'runs' / 'arith' / 'sequencematch'}",
                      "--prompt=403+24=", "--prompt=1-0=", "--max_backspaces=3",
                      "--temperature=1", "--show_edits", "--max_new_tokens=8",
                      f"--ids_out={tmp_path / 'ids.txt'}"],
                     cwd=REPO, capture_output=True, text=True, timeout=600)
  assert g.returncode == 0, g.stderr[-3000:]
  assert "up to 3 <backspace> per answer" in g.stdout
  assert g.stdout.count("edits:  ") == 2 and g.stdout.count("answer: ") == 2
  # Its samples can be the noise of a later run (backspace.noise_from).
  from pausejax import backspace
  lines = (tmp_path / "ids.txt").read_text().splitlines()
  assert len(lines) == 2 and all(1 <= len(l.split()) <= 8 for l in lines)
  assert backspace.noise_weights(str(tmp_path / "ids.txt"), 8000).sum() >= 1


@pytest.mark.slow
def test_bad_steps_is_one_line_exit_2(tmp_path):
  r = subprocess.run(CLI + [f"--outdir={tmp_path / 'o'}", "--steps=-1"], cwd=REPO,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 2 and "--steps=-1" in r.stderr and "Traceback" not in r.stderr
  assert not (tmp_path / "o").exists()
