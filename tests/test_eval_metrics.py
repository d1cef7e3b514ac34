"""Tests for pausejax.eval_metrics on hand-checked cases."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from pausejax import eval_metrics as em
from pausejax.errors import UsageError


@pytest.mark.parametrize("text, normalised", [
    ("The Cat sat.", "cat sat"),
    ("  an  apple,  a pear; THE plum!  ", "apple pear plum"),
    ("theatre another", "theatre another"),  # Articles only as whole words.
    ("", ""),
])
def test_normalize_answer_follows_squad(text, normalised):
  assert em.normalize_answer(text) == normalised


def test_exact_match_uses_the_best_reference():
  targets = [["Paris", "Paris, France"], "eight", "Hamlet"]
  predictions = ["the paris", "8", "Hamlet."]
  # 1: "paris" == "paris"; 2: "8" != "eight"; 3: punctuation dropped.
  assert em.exact_match(targets, predictions) == {"exact_match": pytest.approx(200 / 3)}


def test_token_f1_by_hand():
  # Prediction tokens (normalised) [cat, sat, on, mat], gold [cat, sat]: P = 1/2, R = 1, F1 = 2/3.
  assert em.answer_f1("The cat sat on a mat", "a cat sat") == pytest.approx(2 / 3)
  # Repeated tokens count with multiplicity: [x, x, y] vs [x, y, y]: common 2, P = R = 2/3.
  assert em.answer_f1("x x y", "x y y") == pytest.approx(2 / 3)
  assert em.answer_f1("the", "") == 1.0  # Both normalise to nothing.
  assert em.answer_f1("cat", "the") == 0.0
  assert em.answer_f1("dog", "cat") == 0.0
  # Mean over examples: 2/3 and 1.
  out = em.f1(["a cat sat", "dog"], ["The cat sat on a mat", "dog"])
  assert out == {"f1": pytest.approx(100 * (2 / 3 + 1) / 2)}


def test_f1_takes_the_maximum_over_references():
  # "cat" vs prediction [cat, sat, on, mat]: P = 1/4, R = 1, F1 = 0.4; "a cat sat": 2/3.
  out = em.f1([["cat", "a cat sat"]], ["The cat sat on a mat"])
  assert out["f1"] == pytest.approx(100 * 2 / 3)


@pytest.mark.parametrize("text, number", [
    ("Natalia sold 48 clips in April and 24 in May. #### 72", 72.0),
    ("so she pays $1,234.50 in total.", 1234.5),
    ("The answer is 72.", 72.0),
    ("It dropped to -3 degrees", -3.0),
    ("half is .5", 0.5),
    ("10,000,000 people", 10_000_000.0),
    ("no digits here", None),
])
def test_final_number(text, number):
  assert em.final_number(text) == number


def test_gsm8k_accuracy_compares_last_numbers_as_numbers():
  targets = ["48 / 2 = 24 clips in May. #### 72", "#### 1,000", "#### 5", "#### 3"]
  predictions = ["48 + 24 = 72", "it costs 1000.0 dollars", "5 apples then 6", "no idea"]
  assert em.gsm8k_accuracy(targets, predictions) == {"gsm8k_accuracy": 50.0}


def _rows(*triples):
  return np.array(triples, dtype=np.float32)


def test_multiple_choice_accuracy_sum_and_per_token():
  # Example 0: options score -1 (correct) and -2. Example 1: sums -3, -2 (correct), -4 over
  # 3, 1, 4 tokens: per token -1, -2, -1, a tie between options 0 and 2 -> the first, wrong.
  targets = [(0, True), (0, False), (1, False), (1, True), (1, False)]
  scores = _rows([-1, 1, 0], [-2, 1, 0], [-3, 3, 0], [-2, 1, 0], [-4, 4, 0])
  assert em.mc_accuracy(targets, scores) == {"mc_accuracy": 100.0}
  assert em.mc_accuracy_norm(targets, scores) == {"mc_accuracy_norm": 50.0}


def test_multiple_choice_groups_by_example_index_not_position():
  # The same options interleaved: grouping must use the example index.
  targets = [(0, True), (1, False), (0, False), (1, True)]
  scores = _rows([-5, 1, 0], [-1, 1, 0], [-1, 1, 0], [-2, 1, 0])
  # Example 0: -5 (correct) vs -1 -> wrong. Example 1: -1 vs -2 (correct) -> wrong.
  assert em.mc_accuracy(targets, scores)["mc_accuracy"] == 0.0


def test_last_word_accuracy_counts_greedy_rows():
  scores = _rows([-0.1, 1, 1], [-3.0, 2, 0], [-0.5, 2, 1], [-0.2, 1, 1])
  assert em.last_word_accuracy(["a", "b", "c", "d"], scores) == {"last_word_accuracy": 75.0}


def test_length_mismatch_is_an_error():
  with pytest.raises(ValueError):
    em.exact_match(["a", "b"], ["a"])
  with pytest.raises(ValueError):
    em.last_word_accuracy(["a"], _rows([0, 1, 1], [0, 1, 1]))


def test_every_metric_has_a_seqio_signature():
  """seqio sorts metric functions by their positional arguments."""
  for name, fn in em.METRICS.items():
    args = tuple(p.name for p in inspect.signature(fn).parameters.values()
                 if p.default is inspect.Parameter.empty)
    wanted = ("targets", "scores") if name in em.KIND_METRICS["multiple_choice"] + \
        em.KIND_METRICS["last_word"] else ("targets", "predictions")
    assert args == wanted, name


def test_unknown_or_misplaced_metric_is_a_usage_error():
  with pytest.raises(UsageError, match="metrics='bleu' is invalid"):
    em.get_metric("bleu")
  with pytest.raises(UsageError, match="a metric for multiple_choice tasks"):
    em.get_metric("exact_match", kind="multiple_choice")
  assert em.get_metric("f1", kind="generative") is em.f1
