"""The statistics of the comparison table.

Intervals come from the per-problem rewards in transcripts.jsonl, not from
metrics.json (whose numbers are checked against them; a disagreement is
flagged): Wilson score intervals for the proportions, and for Delta a paired
interval mean(d) +- 1.96 sd(d) / sqrt(n) with d = r2 - r1 per problem. Pairing
matters: both attempts answer the same problems, so Delta varies far less than
two independent accuracies would suggest.
"""

import dataclasses
import math
from typing import Optional

import numpy as np

from score_jax import metrics as metrics_lib

Z_95 = 1.96


@dataclasses.dataclass(frozen=True)
class Estimate:
  value: float
  low: Optional[float] = None  # None: no interval (no transcripts, or n < 2)
  high: Optional[float] = None

  def excludes_zero(self) -> bool:
    return self.low is not None and (self.low > 0 or self.high < 0)


def wilson_interval(
  successes: int, n: int, z: float = Z_95
) -> tuple[float, float]:
  """The Wilson score interval: every p that a score test at level z accepts;
  unlike the normal interval it stays inside [0, 1] and is not empty at 0/n."""
  p = successes / n
  shrink = 1 + z * z / n
  center = (p + z * z / (2 * n)) / shrink
  half = z / shrink * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
  # Clipped only against rounding at p = 0 or 1.
  return max(0.0, center - half), min(1.0, center + half)


def paired_difference(
  r1: np.ndarray, r2: np.ndarray, z: float = Z_95
) -> Estimate:
  """mean(d) +- z sd(d) / sqrt(n) for d = r2 - r1, sd with n - 1 dof."""
  d = r2.astype(np.float64) - r1.astype(np.float64)
  mean = float(d.mean())
  if d.size < 2:
    return Estimate(mean)
  half = z * float(d.std(ddof=1)) / math.sqrt(d.size)
  return Estimate(mean, mean - half, mean + half)


def estimates_from_rewards(reward_t1, reward_t2) -> dict[str, Estimate]:
  """Every column of the table with its interval, from per-problem rewards."""
  r1 = np.asarray(reward_t1, np.float64) > 0.5
  r2 = np.asarray(reward_t2, np.float64) > 0.5
  points = metrics_lib.self_correction(r1, r2)
  counts = {
    "accuracy_t1": r1.sum(),
    "accuracy_t2": r2.sum(),
    "delta_i_to_c": (~r1 & r2).sum(),
    "delta_c_to_i": (r1 & ~r2).sum(),
  }
  result = {
    key: Estimate(points[key], *wilson_interval(int(c), r1.size))
    for key, c in counts.items()
  }
  result["delta"] = paired_difference(r1, r2)
  return result


def disagreements(
  metrics: dict, estimates: dict[str, Estimate], n: int, step: int
) -> list[str]:
  """Where metrics.json differs from what its transcripts give."""
  notes = []
  for key, estimate in estimates.items():
    if key not in metrics:
      continue
    value = metrics[key]
    if not isinstance(value, (int, float)):
      notes.append(f"metrics.json {key} is {value!r}, not a number")
    elif not abs(value - estimate.value) <= 1e-6:  # NaN disagrees too
      notes.append(
        f"metrics.json {key} = {value:.4f} but the transcripts "
        f"give {estimate.value:.4f}"
      )
  if "num_examples" in metrics and metrics["num_examples"] != n:
    notes.append(
      f"metrics.json num_examples = {metrics['num_examples']!r} "
      f"but transcripts.jsonl has {n} problems"
    )
  if "step" in metrics and metrics["step"] != step:
    notes.append(f"metrics.json step = {metrics['step']!r} in eval/{step}/")
  return notes
