"""Summaries over seeds for the experiment runners: the mean and its 95 % confidence interval."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

# Student t quantiles t(0.975, df) for df = 1..30; beyond that the normal quantile 1.96.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def mean(values: Sequence[float]) -> float:
  return math.fsum(values) / len(values)  # Exactly the value itself for one seed.


def ci95(values: Sequence[float]) -> float | None:
  """Half-width of the 95 % confidence interval of the mean of `values` (Student t with k - 1
  degrees of freedom times sd / sqrt(k), sd with ddof 1); None for fewer than two values."""
  k = len(values)
  if k < 2:
    return None
  t = T975[k - 2] if k - 1 <= len(T975) else 1.96
  return float(t * np.std(np.asarray(values, np.float64), ddof=1) / math.sqrt(k))
