"""Downstream evaluation metrics, written as SeqIO metric functions.

SeqIO sorts a task's `metric_fns` by their positional arguments (`seqio.Task.predict_metric_fns`,
`seqio.Task.score_metric_fns`):

  (targets, predictions)  generated text, after the task's postprocessor; `seqio.Evaluator` calls
                          the `predict_fn` for these.
  (targets, scores)       one score row per example from the `score_fn`.

Every function returns `{name: value}` with values in percent (0-100), as T5's metrics do.

Generative (targets are strings, or lists of acceptable strings; the best one counts):
  exact_match     SQuAD's exact match after SQuAD's answer normalisation (`normalize_answer`).
  f1              SQuAD's bag-of-tokens F1 after the same normalisation.
  gsm8k_accuracy  the last number in the prediction equals the last number in the target
                  (commas dropped, compared as numbers: "1,000.0" == "1000").

Scored: a score row is `[log-likelihood of the target tokens, number of target tokens,
1.0 if every target token is the model's greedy choice else 0.0]` (`SCORE_FIELDS`).
  mc_accuracy       multiple choice: the option with the highest summed log-likelihood is
                    correct. Targets are `(example index, is correct)` pairs, one per option.
  mc_accuracy_norm  the same with the log-likelihood divided by the option's token count.
  last_word_accuracy  LAMBADA-style: greedy decoding after the context would produce exactly
                    the last word (every target token is the argmax).
"""

from __future__ import annotations

import collections
import math
import re
import string
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from pausejax.errors import UsageError

SCORE_FIELDS = ("log_likelihood", "num_tokens", "greedy")

# ----------------------------------------------------------------------------------------------
# Text normalisation and per-example scores.

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# Optional sign, digits with thousands commas, optional decimals; ".5" counts, a trailing "." not.
_NUMBER = re.compile(r"-?(?:\d[\d,]*)?\.?\d+")


def normalize_answer(text: str) -> str:
  """SQuAD's normalisation: lower case, no punctuation, no articles a/an/the, single spaces."""
  text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", text).split())


def answer_f1(prediction: str, target: str) -> float:
  """Token F1 of two answers after `normalize_answer` (both empty: 1; one empty: 0)."""
  pred, gold = normalize_answer(prediction).split(), normalize_answer(target).split()
  if not pred or not gold:  # SQuAD 2.0's rule for empty answers.
    return float(pred == gold)
  same = sum((collections.Counter(pred) & collections.Counter(gold)).values())
  if same == 0:
    return 0.0
  precision, recall = same / len(pred), same / len(gold)
  return 2 * precision * recall / (precision + recall)


def final_number(text: str) -> float | None:
  """The last number in `text` ("... #### 1,234" -> 1234.0), or None if there is none."""
  matches = _NUMBER.findall(text)
  if not matches:
    return None
  try:
    return float(matches[-1].replace(",", ""))
  except ValueError:
    return None


# ----------------------------------------------------------------------------------------------
# SeqIO metric functions.

def _references(target: Any) -> list[str]:
  if isinstance(target, (list, tuple)):
    refs = [str(t) for t in target]
    return refs or [""]
  return [str(target)]


def _percent(values: Sequence[float]) -> float:
  return 100.0 * float(np.mean(values)) if len(values) else 0.0


def _check_lengths(targets, outputs, what: str) -> None:
  if len(targets) != len(outputs):
    raise ValueError(f"{len(targets)} targets but {len(outputs)} {what}")


def exact_match(targets: Sequence[Any], predictions: Sequence[str]) -> dict[str, float]:
  """Percent of predictions equal to one of their targets after `normalize_answer`."""
  _check_lengths(targets, predictions, "predictions")
  hits = [max(float(normalize_answer(p) == normalize_answer(r)) for r in _references(t))
          for t, p in zip(targets, predictions)]
  return {"exact_match": _percent(hits)}


def f1(targets: Sequence[Any], predictions: Sequence[str]) -> dict[str, float]:
  """Mean over examples of the best `answer_f1` against the example's targets, in percent."""
  _check_lengths(targets, predictions, "predictions")
  scores = [max(answer_f1(p, r) for r in _references(t)) for t, p in zip(targets, predictions)]
  return {"f1": _percent(scores)}


def gsm8k_accuracy(targets: Sequence[Any], predictions: Sequence[str]) -> dict[str, float]:
  """Percent of predictions whose last number equals the target's last number."""
  _check_lengths(targets, predictions, "predictions")
  hits = []
  for target, prediction in zip(targets, predictions):
    want, got = final_number(_references(target)[0]), final_number(prediction)
    hits.append(float(want is not None and got is not None
                      and math.isclose(want, got, rel_tol=1e-9, abs_tol=1e-6)))
  return {"gsm8k_accuracy": _percent(hits)}


def _score_rows(scores: Any, n: int) -> np.ndarray:
  rows = np.asarray(scores, dtype=np.float64).reshape(n, -1) if n else np.zeros((0, 3))
  if rows.shape[1] != len(SCORE_FIELDS):
    raise ValueError(f"score rows must be {SCORE_FIELDS}, got {rows.shape[1]} values per row")
  return rows


def _choice_accuracy(targets, scores, normalise: bool) -> float:
  _check_lengths(targets, scores, "score rows")
  rows = _score_rows(scores, len(targets))
  value = rows[:, 0] / np.maximum(rows[:, 1], 1.0) if normalise else rows[:, 0]
  options = collections.defaultdict(list)  # Example index -> [(score, is_correct)], in order.
  for (index, is_correct), v in zip(targets, value):
    options[int(index)].append((float(v), bool(is_correct)))
  hits = []
  for choices in options.values():
    best = int(np.argmax([v for v, _ in choices]))  # Ties: the first option.
    hits.append(float(choices[best][1]))
  return _percent(hits)


def mc_accuracy(targets: Sequence[tuple[int, bool]], scores: Any) -> dict[str, float]:
  """Multiple choice by summed option log-likelihood; targets: (example index, is correct)."""
  return {"mc_accuracy": _choice_accuracy(targets, scores, normalise=False)}


def mc_accuracy_norm(targets: Sequence[tuple[int, bool]], scores: Any) -> dict[str, float]:
  """Multiple choice by per-token option log-likelihood (favours no option length)."""
  return {"mc_accuracy_norm": _choice_accuracy(targets, scores, normalise=True)}


def last_word_accuracy(targets: Sequence[Any], scores: Any) -> dict[str, float]:
  """Percent of examples whose whole target (the last word) is the greedy continuation."""
  _check_lengths(targets, scores, "score rows")
  rows = _score_rows(scores, len(targets))
  return {"last_word_accuracy": _percent((rows[:, 2] > 0.5).astype(float).tolist())}


# ----------------------------------------------------------------------------------------------
# Registry by name: what `--metrics=` and `downstream.register_downstream_task` accept.

MetricFn = Callable[..., Mapping[str, float]]

METRICS: dict[str, MetricFn] = {
    "exact_match": exact_match,
    "f1": f1,
    "gsm8k_accuracy": gsm8k_accuracy,
    "mc_accuracy": mc_accuracy,
    "mc_accuracy_norm": mc_accuracy_norm,
    "last_word_accuracy": last_word_accuracy,
}

# Which metrics make sense for each kind of downstream task (see pausejax.downstream).
KIND_METRICS: dict[str, tuple[str, ...]] = {
    "generative": ("exact_match", "f1", "gsm8k_accuracy"),
    "multiple_choice": ("mc_accuracy", "mc_accuracy_norm"),
    "last_word": ("last_word_accuracy",),
}


def get_metric(name: str, *, kind: str | None = None, setting: str = "metrics") -> MetricFn:
  """The metric function called `name`; UsageError if unknown or not for tasks of `kind`."""
  valid = KIND_METRICS[kind] if kind is not None else tuple(METRICS)
  if name not in valid:
    what = f"a metric for {kind} tasks" if kind else "a known metric"
    raise UsageError.setting(setting, name, f"{what}: one of {', '.join(valid)}")
  return METRICS[name]
