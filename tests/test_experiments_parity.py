"""The parity runner: its data generator, its CLI outputs and its bad-input errors."""

import dataclasses
import functools
import io
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from pausejax.errors import UsageError
from pausejax.experiments import parity
from pausejax.experiments import parity_report
from pausejax.experiments import stats

from conftest import REPO


def _run_cli(*args, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "pausejax.experiments.parity", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=timeout)


def _xor_parity(row) -> int:
  """Parity written independently of the module: a running XOR over the bits."""
  return functools.reduce(lambda a, b: a ^ int(b), row, 0)


# ---------------------------------------------------------------------------------------------
# Data.

@pytest.mark.parametrize("num_bits,num_pauses", [(1, 0), (5, 0), (7, 3), (16, 16), (33, 8)])
def test_batch_layout_labels_and_loss_mask(num_bits, num_pauses):
  rng = np.random.default_rng(num_bits * 100 + num_pauses)
  bits = rng.integers(0, 2, (64, num_bits))
  batch = parity.make_batch(bits, num_pauses)
  inputs = batch["decoder_input_tokens"]
  targets = batch["decoder_target_tokens"]
  weights = batch["decoder_loss_weights"]
  length = num_bits + 1 + num_pauses
  assert inputs.shape == targets.shape == weights.shape == (64, length)
  # Documented layout: bits as ids 0/1, then SEP, then exactly M pauses at the end.
  np.testing.assert_array_equal(inputs[:, :num_bits], bits)
  assert (inputs[:, num_bits] == parity.SEP_ID).all()
  assert (inputs[:, num_bits + 1:] == parity.PAUSE_ID).all()
  assert (inputs == parity.PAUSE_ID).sum(axis=1).tolist() == [num_pauses] * 64
  assert parity.PAUSE_ID == parity.BASE_VOCAB_SIZE
  assert len({parity.BIT_IDS[0], parity.BIT_IDS[1], parity.SEP_ID, parity.PAUSE_ID}) == 4
  assert max(parity.PAUSE_ID, parity.SEP_ID) < parity.VOCAB_ROWS
  # Loss only on the answer, which is the last position; its target is the parity.
  expected_weights = np.zeros((64, length))
  expected_weights[:, -1] = 1
  np.testing.assert_array_equal(weights, expected_weights)
  assert targets[:, -1].tolist() == [_xor_parity(row) for row in bits]
  np.testing.assert_array_equal(targets[:, :-1], inputs[:, 1:])


def test_labels_are_balanced_and_depend_on_every_bit():
  bits = np.random.default_rng(0).integers(0, 2, (4000, 12))
  labels = parity.make_batch(bits, 2)["decoder_target_tokens"][:, -1]
  assert 0.45 < labels.mean() < 0.55
  for i in range(12):  # Flipping any single bit flips the answer.
    flipped = bits.copy()
    flipped[:, i] ^= 1
    np.testing.assert_array_equal(parity.make_batch(flipped, 2)["decoder_target_tokens"][:, -1],
                                  1 - labels)


def test_eval_strings_are_distinct_and_never_trained_on():
  data = parity.ParityData(num_bits=4, num_eval=100, seed=3)  # 16 strings: 8 eval, 8 train.
  eval_set = {tuple(r) for r in data.eval_bits.tolist()}
  assert len(eval_set) == len(data.eval_bits) == 8
  train_set = {tuple(r) for r in data.train_bits(2000).tolist()}
  assert not eval_set & train_set
  assert len(train_set) == 8  # Uniform over what is left: every other string shows up.


def test_data_is_seeded_and_eval_set_is_capped():
  a = parity.ParityData(num_bits=20, num_eval=300, seed=1)
  b = parity.ParityData(num_bits=20, num_eval=300, seed=1)
  c = parity.ParityData(num_bits=20, num_eval=300, seed=2)
  np.testing.assert_array_equal(a.eval_bits, b.eval_bits)
  np.testing.assert_array_equal(a.train_bits(50), b.train_bits(50))
  assert not np.array_equal(a.eval_bits, c.eval_bits)
  assert a.eval_bits.shape == (300, 20)
  assert parity.ParityData(num_bits=1, num_eval=300, seed=0).eval_bits.shape == (1, 1)


@pytest.mark.parametrize("num_bits,num_pauses", [(5, 0), (5, 3), (6, 6), (4, 9)])
def test_hints_are_thresholds_before_the_answer(num_bits, num_pauses):
  bits = np.random.default_rng(num_bits).integers(0, 2, (64, num_bits))
  plain = parity.make_batch(bits, num_pauses)
  batch = parity.make_batch(bits, num_pauses, hints=True)
  n, m = num_bits, num_pauses
  # Same inputs and answer: hints are outputs only.
  np.testing.assert_array_equal(batch["decoder_input_tokens"], plain["decoder_input_tokens"])
  assert batch["decoder_target_tokens"][:, -1].tolist() == [_xor_parity(r) for r in bits]
  weights = batch["decoder_loss_weights"]
  assert (weights[:, :n] == 0).all() and (weights[:, n:] == 1).all()
  ones = bits.sum(axis=1)
  for j in range(1, m + 1):  # Position n + j - 1 (SEP, then the pauses) answers "ones >= j".
    np.testing.assert_array_equal(batch["decoder_target_tokens"][:, n + j - 1],
                                  [parity.BIT_IDS[int(c >= j)] for c in ones])
  np.testing.assert_array_equal(batch["decoder_target_tokens"][:, :n],
                                plain["decoder_target_tokens"][:, :n])


def test_alternating_sum_of_n_hints_is_the_parity():
  """With M = n the hints hold what a second layer needs: parity = sum_j (-1)^(j+1) hint_j."""
  bits = np.random.default_rng(1).integers(0, 2, (500, 9))
  targets = parity.make_batch(bits, 9, hints=True)["decoder_target_tokens"]
  signs = (-1) ** np.arange(9)
  np.testing.assert_array_equal(targets[:, 9:18] @ signs, targets[:, -1])


def test_fixed_training_set_is_read_in_shuffled_epochs():
  data = parity.ParityData(num_bits=12, num_eval=100, seed=5, train_size=40)
  assert data.train_set.shape == (40, 12)
  eval_set = {tuple(r) for r in data.eval_bits.tolist()}
  assert not eval_set & {tuple(r) for r in data.train_set.tolist()}
  key = lambda rows: sorted(map(tuple, rows.tolist()))
  first, second = data.train_bits(25), data.train_bits(55)  # 80 strings: exactly two epochs.
  epochs = np.concatenate([first, second])
  assert key(epochs[:40]) == key(epochs[40:]) == key(data.train_set)
  assert not np.array_equal(epochs[:40], epochs[40:])  # Each epoch in a new order.
  again = parity.ParityData(num_bits=12, num_eval=100, seed=5, train_size=40)
  np.testing.assert_array_equal(again.train_set, data.train_set)
  np.testing.assert_array_equal(again.train_bits(80), epochs)
  assert parity.ParityData(num_bits=12, num_eval=100, seed=5).train_set is None


@pytest.mark.parametrize("spec,n,expected", [
    ("0", 16, 0), ("8", 16, 8), ("n", 16, 16), ("n/2", 16, 8), ("n/2", 5, 2), ("2n", 7, 14),
    ("3n/4", 16, 12)])
def test_pause_specs(spec, n, expected):
  assert parity.resolve_pauses(parity.parse_pause_spec(spec), n) == expected


@pytest.mark.parametrize("spec", ["-1", "x", "n/0", "0n", "1.5", "n-1", ""])
def test_bad_pause_specs(spec):
  with pytest.raises(UsageError, match="--pauses"):
    parity.parse_pause_spec(spec)


# ---------------------------------------------------------------------------------------------
# Training: known answers. Labels replaced by a rule the model learns in a few steps: 0 for every
# training string, and 0 (same rule) or 1 (the opposite) for every held-out string.

@pytest.mark.parametrize("held_out_label, accuracy", [(0, 1.0), (1, 0.0)])
def test_held_out_accuracy_of_a_learnt_constant_answer(monkeypatch, held_out_label, accuracy):
  """A model that learnt "always 0" scores exactly 1 on held-out strings that answer 0 (and
  stops early once solved) and exactly 0 on held-out strings that answer 1."""
  data = parity.ParityData(num_bits=4, num_eval=100, seed=0)  # 8 held-out strings.

  def labels(bits_BxN):
    return np.array([held_out_label if data.is_held_out(row) else 0 for row in bits_BxN],
                    np.int32)

  monkeypatch.setattr(parity, "parity", labels)
  s = dataclasses.replace(parity.QUICK, num_bits=(4,), pauses=("2",), steps=120, eval_every=20)
  record = parity.train_one(s, data, num_pauses=2)
  assert record["num_eval"] == 8
  assert record["curve"][-1]["train_accuracy"] == 1.0
  assert record["final_accuracy"] == accuracy
  if accuracy == 1.0:  # Solved from the first evaluation on: stopped after SOLVED_EVALS of them.
    assert record["stopped_early"] and record["steps_run"] == parity.SOLVED_EVALS * s.eval_every
    assert [p["eval_accuracy"] for p in record["curve"]] == [1.0] * parity.SOLVED_EVALS
  else:
    assert not record["stopped_early"] and record["steps_run"] == s.steps
    assert record["best_accuracy"] < 1.0
  assert record["seeds"] == [0] and record["final_accuracy_per_seed"] == [accuracy]
  assert record["final_accuracy_ci95"] is None


def test_replicas_stop_once_every_seed_is_solved(monkeypatch):
  """Every string answers 0: both replicas are solved from the first evaluation on."""
  monkeypatch.setattr(parity, "parity", lambda bits_BxN: np.zeros(len(bits_BxN), np.int32))
  s = dataclasses.replace(parity.QUICK, num_bits=(4,), pauses=("2",), steps=120, eval_every=20)
  datas = [parity.ParityData(num_bits=4, num_eval=100, seed=seed) for seed in (0, 1)]
  record = parity.train_replicas(s, datas, num_pauses=2)
  stop = parity.SOLVED_EVALS * s.eval_every
  assert record["stopped_early"] and record["steps_run"] == stop
  assert record["seeds"] == [0, 1] and record["solved_step_per_seed"] == [stop, stop]
  assert record["final_accuracy_per_seed"] == [1.0, 1.0] and record["final_accuracy"] == 1.0
  assert record["final_accuracy_ci95"] == 0.0
  assert [p["eval_accuracy_per_seed"] for p in record["curve"]] == [[1.0, 1.0]] * 3


# ---------------------------------------------------------------------------------------------
# Positions and the London & Kanade options.

def test_positions_learned_and_none_turn_rope_off():
  import jax
  from flax import nnx
  from pausejax import model as model_lib
  assert parity.decoder_class("rope") is model_lib.Decoder
  tokens = np.random.default_rng(0).integers(0, 4, (3, 9))
  tokens[-1] = 3  # One id repeated: only positions tell its tokens apart.
  stretched = 2 * np.arange(9)[None].repeat(3, axis=0)  # RoPE positions 0, 2, 4, ...
  for positions in parity.POSITIONS:
    s = dataclasses.replace(parity.QUICK, positions=positions, d_model=16, num_heads=2,
                            head_dim=8, mlp_dim=32)
    model = parity.decoder_class(positions)(parity.model_config(s, max_len=9),
                                            rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
    logits = np.asarray(model(tokens))
    # Positions given for RoPE change a RoPE model's logits and nothing else's.
    assert np.array_equal(np.asarray(model(tokens, None, stretched)), logits) == (
        positions != "rope")
    # Identical tokens have identical values, so RoPE's weights cannot tell them apart either;
    # only a learned table gives each position its own logits.
    assert np.allclose(logits[-1], logits[-1, :1], atol=1e-5) == (positions != "learned")


def test_quick_sweep_with_the_london_kanade_options():
  """Learned positions, hints and a fixed training set: a sweep runs and records them."""
  s = dataclasses.replace(parity.QUICK, num_bits=(5,), pauses=("0", "n"), steps=40, eval_every=20,
                          positions="learned", hints=True, train_size=48)
  results = parity.sweep(s, stream=io.StringIO())
  assert results["settings"]["positions"] == "learned" and results["settings"]["hints"]
  assert results["settings"]["train_size"] == 48
  rope = parity.programs(dataclasses.replace(s, positions="rope")).num_params
  for r in results["runs"]:  # One table of 11 rows (n + 1 + n) serves both sequence lengths.
    assert r["num_params"] == rope + 11 * s.d_model
    assert [p["step"] for p in r["curve"]] == [20, 40]
    # Held-out accuracy is on the answer alone: a count of right answers out of 16.
    assert all(p["eval_accuracy"] * 16 == round(p["eval_accuracy"] * 16) for p in r["curve"])
  assert "positions learned" in parity_report.results_markdown(results, "c")
  assert "fixed set of 48" in parity_report.results_markdown(results, "c")


# ---------------------------------------------------------------------------------------------
# Seeds: K replicas in one vmapped program compute what K lone runs compute.

# Real parity at n = 5 for 40 steps: no run can stop before the end (that needs 3 evaluations),
# so every run has the same evaluations. vmap sums in another order, and training amplifies that
# rounding: eval losses agree to ~1e-6 relative after 10 steps, ~1e-5 after 40, 3e-5 after 60.
_REPLICA_SETTINGS = dataclasses.replace(parity.QUICK, num_bits=(5,), pauses=("2",), steps=40,
                                        eval_every=10, seed=3)


@pytest.fixture(scope="module")
def replica_sweeps():
  """(one --seeds=2 sweep from seed 3, [--seeds=1 sweeps from seeds 3 and 4])."""
  quiet = dict(stream=io.StringIO())
  pair = parity.sweep(dataclasses.replace(_REPLICA_SETTINGS, seeds=2), **quiet)
  singles = [parity.sweep(dataclasses.replace(_REPLICA_SETTINGS, seed=seed), **quiet)
             for seed in (3, 4)]
  return pair, singles


def test_vmapped_replicas_match_separate_runs(replica_sweeps):
  pair, singles = replica_sweeps
  (cell,), lone = pair["runs"], [r["runs"][0] for r in singles]
  s = _REPLICA_SETTINGS
  assert cell["seeds"] == [3, 4] and [r["seeds"] for r in lone] == [[3], [4]]
  assert cell["steps_run"] == s.steps and all(r["steps_run"] == s.steps for r in lone)
  steps = list(range(s.eval_every, s.steps + 1, s.eval_every))
  assert [p["step"] for p in cell["curve"]] == steps
  for i, r in enumerate(lone):
    assert [p["step"] for p in r["curve"]] == steps
    # Same initial weights and strings; vmap may only fuse ops differently.
    np.testing.assert_allclose([p["eval_loss_per_seed"][i] for p in cell["curve"]],
                               [p["eval_loss"] for p in r["curve"]], rtol=1e-4)
    assert [p["eval_accuracy_per_seed"][i] for p in cell["curve"]] == [
        p["eval_accuracy"] for p in r["curve"]]
    assert cell["best_accuracy_per_seed"][i] == r["best_accuracy"]
  assert cell["final_accuracy_per_seed"] == [r["final_accuracy"] for r in lone]
  # Records hold means over the seeds, and the interval of the final mean.
  finals = cell["final_accuracy_per_seed"]
  assert cell["final_accuracy"] == pytest.approx(np.mean(finals))
  assert cell["best_accuracy"] == pytest.approx(np.mean(cell["best_accuracy_per_seed"]))
  assert cell["final_accuracy_ci95"] == pytest.approx(stats.ci95(finals))
  for p in cell["curve"]:
    assert p["eval_accuracy"] == pytest.approx(np.mean(p["eval_accuracy_per_seed"]))
    assert p["eval_loss"] == pytest.approx(np.mean(p["eval_loss_per_seed"]))
  assert pair["settings"]["seeds"] == 2


def test_outputs_show_the_seeds(replica_sweeps, tmp_path):
  pair, singles = replica_sweeps
  parity_report.write_outputs(pair, str(tmp_path), "python -m pausejax.experiments.parity --seeds=2")
  cell = pair["runs"][0]
  markdown = (tmp_path / "results.md").read_text()
  row = next(line for line in markdown.splitlines() if line.startswith("| 5 |"))
  assert f"{cell['final_accuracy']:.3f} ± {cell['final_accuracy_ci95']:.3f}" in row
  assert "2 seeds (3 to 4" in markdown and "95 %" in markdown
  with open(tmp_path / "results.json") as f:
    assert json.load(f)["runs"][0]["final_accuracy_per_seed"] == cell["final_accuracy_per_seed"]
  with open(tmp_path / "parity.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  table = parity_report.results_table(singles[0])  # One seed: no interval.
  assert "±" not in table and "seed 3." in parity_report.results_markdown(singles[0], "c")


@pytest.mark.parametrize("values,mean,ci", [
    ([0.5, 0.7, 0.9], 0.7, 4.303 * 0.2 / np.sqrt(3)),  # sd 0.2, t(0.975, 2) = 4.303.
    ([0.0, 1.0], 0.5, 12.706 * np.sqrt(0.5) / np.sqrt(2)),
    ([0.25] * 5, 0.25, 0.0),
    ([0.0, 1.0] * 20, 0.5, 1.96 * np.std([0.0, 1.0] * 20, ddof=1) / np.sqrt(40)),  # df 39.
    ([0.9], 0.9, None)])
def test_confidence_interval_of_the_mean(values, mean, ci):
  assert np.mean(values) == pytest.approx(mean)
  if ci is None:
    assert stats.ci95(values) is None
  else:
    assert stats.ci95(values) == pytest.approx(ci, rel=1e-12)


def test_confidence_interval_table():
  assert stats.ci95([0.5, 0.7, 0.9]) == pytest.approx(0.49687, abs=1e-5)
  assert stats.T975[0] == 12.706 and stats.T975[29] == 2.042 and len(stats.T975) == 30
  assert list(stats.T975) == sorted(stats.T975, reverse=True)


# ---------------------------------------------------------------------------------------------
# Settings from flags (a fake flags object: a namespace with every flag unset).

def _fake_flags(**given):
  names = ("num_bits", "pauses", "steps", "batch_size", "eval_every", "num_eval",
           "learning_rate", "d_model", "num_heads", "head_dim", "mlp_dim", "rope_theta", "seed",
           "seeds", "setup", "positions", "hints", "train_size")
  values = dict.fromkeys(names, None)
  values["quick"] = False
  values.update(given)
  return types.SimpleNamespace(**values)


def test_flags_override_the_preset():
  s = parity.settings_from_flags(_fake_flags(quick=True, num_bits="3,5,3", pauses="0, n/2,4",
                                             steps=7, seed=9, seeds=4))
  assert s.num_bits == (3, 5) and s.pauses == ("0", "n/2", "4")
  assert (s.steps, s.seed, s.seeds, s.d_model) == (7, 9, 4, parity.QUICK.d_model)
  assert parity.QUICK.seeds == parity.FULL.seeds == 1
  assert parity.settings_from_flags(_fake_flags()) == parity.FULL


def test_london_kanade_setup_and_its_overrides():
  lk = parity.settings_from_flags(_fake_flags(setup="london_kanade"))
  assert lk == parity.LONDON_KANADE
  assert lk.num_bits == (20, 50, 100, 150, 200, 250, 300) and lk.pauses == ("0", "n")
  assert (lk.positions, lk.hints, lk.num_heads) == ("learned", True, 4) and lk.train_size > 0
  assert parity.settings_from_flags(_fake_flags(setup="default")) == parity.FULL
  s = parity.settings_from_flags(_fake_flags(setup="london_kanade", num_bits="12,16",
                                             positions="none", hints=False, train_size=0))
  assert (s.num_bits, s.positions, s.hints, s.train_size) == ((12, 16), "none", False, 0)
  assert s.d_model == lk.d_model
  quick = parity.settings_from_flags(_fake_flags(setup="london_kanade", quick=True))
  assert quick == dataclasses.replace(parity.QUICK, positions="learned", hints=True)
  assert parity.FULL.positions == "rope" and not parity.FULL.hints and not parity.FULL.train_size


@pytest.mark.parametrize("given,name", [
    (dict(num_bits="0"), "--num_bits"), (dict(num_bits="4,-2"), "--num_bits"),
    (dict(num_bits="a"), "--num_bits"), (dict(num_bits=""), "--num_bits"),
    (dict(pauses="0,-3"), "--pauses"), (dict(pauses=","), "--pauses"),
    (dict(steps=0), "--steps"), (dict(batch_size=-1), "--batch_size"),
    (dict(learning_rate=0.0), "--learning_rate"), (dict(head_dim=15), "--head_dim"),
    (dict(rope_theta=-1.0), "--rope_theta"), (dict(seed=-1), "--seed"),
    (dict(seeds=0), "--seeds"), (dict(seeds=-2), "--seeds"),
    (dict(num_bits="3000", pauses="n"), "--num_bits/--pauses"),
    (dict(setup="paper"), "--setup"), (dict(positions="sinusoidal"), "--positions"),
    (dict(train_size=-1), "--train_size")])
def test_bad_settings(given, name):
  with pytest.raises(UsageError) as e:
    parity.settings_from_flags(_fake_flags(**given))
  assert str(e.value).startswith(name + "=") and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# The command line.

@pytest.mark.parametrize("args,name", [
    (["--pauses=0,-1"], "--pauses"),
    (["--num_bits=0"], "--num_bits"),
    (["--num_bits=-4"], "--num_bits"),
    (["--steps=0"], "--steps"),
    (["--seeds=0"], "--seeds"),
    (["--seeds=-3"], "--seeds"),
    (["--setup=paper"], "--setup"),
    (["--positions=sinusoidal"], "--positions"),
    (["--train_size=-1"], "--train_size"),
])
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, args, name):
  outdir = tmp_path / "out"
  result = _run_cli(f"--outdir={outdir}", "--quick", *args)
  assert result.returncode == 2, result.stderr
  assert result.stderr.startswith(f"error: {name}="), result.stderr
  assert not outdir.exists() and os.listdir(tmp_path) == []


@pytest.mark.parametrize("arg,valid", [
    ("--positions=sinusoidal", "one of rope, learned, none"),
    ("--setup=paper", "one of default, london_kanade")])
def test_cli_names_the_valid_values(tmp_path, arg, valid):
  result = _run_cli(f"--outdir={tmp_path / 'out'}", arg)
  assert result.returncode == 2
  flag, value = arg.split("=")
  assert result.stderr == f"error: {flag}='{value}' is invalid: {valid}\n"


def test_cli_unwritable_outdir(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  for outdir, words in ((blocker / "sub", "is a file"), (blocker, "not a directory")):
    result = _run_cli(f"--outdir={outdir}", "--quick")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: --outdir=") and words in result.stderr
  assert sorted(os.listdir(tmp_path)) == ["a_file"] and blocker.read_text() == "x"


def test_cli_needs_outdir(tmp_path):
  result = _run_cli("--quick")
  assert result.returncode == 2 and result.stderr.startswith("error: --outdir=")


@pytest.mark.slow
def test_quick_run_writes_results(tmp_path):
  outdir = tmp_path / "nested" / "out"
  result = _run_cli(f"--outdir={outdir}", "--quick")
  assert result.returncode == 0, result.stderr
  assert "ETA" in result.stderr  # The progress line.
  assert sorted(os.listdir(outdir)) == sorted(parity.FILES)  # No temporary files left.

  with open(outdir / "results.json") as f:
    results = json.load(f)
  s = parity.QUICK
  assert results["settings"]["num_bits"] == list(s.num_bits)
  assert results["settings"]["pauses"] == list(s.pauses)
  assert results["tokens"]["pause"] == parity.PAUSE_ID
  assert results["command"].startswith("python -m pausejax.experiments.parity")
  runs = results["runs"]
  assert sorted((r["num_bits"], r["pauses"]) for r in runs) == sorted(
      (n, p) for n in s.num_bits for p in s.pauses)
  for r in runs:
    assert r["num_pauses"] == parity.resolve_pauses(r["pauses"], r["num_bits"])
    assert r["seq_len"] == r["num_bits"] + 1 + r["num_pauses"]
    # One evaluation every eval_every steps (a divisor of steps), until the end or the early stop.
    assert s.steps % s.eval_every == 0
    steps = [p["step"] for p in r["curve"]]
    assert steps == list(range(s.eval_every, r["steps_run"] + 1, s.eval_every))
    accuracies = [p["eval_accuracy"] for p in r["curve"]]
    solved = accuracies[-parity.SOLVED_EVALS:] == [1.0] * parity.SOLVED_EVALS
    assert r["stopped_early"] == (r["steps_run"] < s.steps)
    if r["stopped_early"]:
      assert solved
    # Held-out accuracy is right answers / 16 held-out strings (QUICK's num_eval; for n = 5 that
    # is half of the 32 strings).
    assert r["num_eval"] == s.num_eval == 16
    for p in r["curve"]:
      assert p["eval_accuracy"] * 16 == round(p["eval_accuracy"] * 16)
      assert np.isfinite(p["eval_loss"])
    assert r["final_accuracy"] == accuracies[-1]
    assert r["best_accuracy"] == max(accuracies)

  table = (outdir / "results.md").read_text()
  header = next(line for line in table.splitlines() if line.startswith("| n |"))
  assert header.count("M = ") == len(s.pauses)
  for r in runs:  # Row n holds every M's final accuracy.
    row = next(line for line in table.splitlines() if line.startswith(f"| {r['num_bits']} |"))
    assert f"{r['final_accuracy']:.3f}" in row
  with open(outdir / "parity.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
