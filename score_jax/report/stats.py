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
    """Whether it has an interval and 0 lies outside it."""
    return self.low is not None and (self.low > 0 or self.high < 0)


def wilson_interval(
  successes: int, n: int, z: float = Z_95
) -> tuple[float, float]:
  """The Wilson score interval of a proportion: every p that a score test
  at level z accepts; unlike the normal interval it stays inside [0, 1] and
  is not empty at 0/n.

  Args:
    successes: how many of the trials succeeded.
    n: how many trials, at least 1.
    z: the normal quantile of the level (1.96: 95%).

  Returns:
    (low, high), within [0, 1].
  """
  p = successes / n
  shrink = 1 + z * z / n
  center = (p + z * z / (2 * n)) / shrink
  half = z / shrink * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
  # Clipped only against rounding at p = 0 or 1.
  return max(0.0, center - half), min(1.0, center + half)


def paired_difference(
  r1: np.ndarray, r2: np.ndarray, z: float = Z_95
) -> Estimate:
  """The paired interval of mean(r2 - r1): mean(d) +- z sd(d) / sqrt(n)
  for d = r2 - r1, sd with n - 1 dof.

  Args:
    r1: bool or float [U], a value per problem (attempt 1's reward).
    r2: bool or float [U], another per problem, in the same order
      (attempt 2's).
    z: the normal quantile of the level (1.96: 95%).

  Returns:
    mean(d) with its interval; without one when U < 2.
  """
  d = r2.astype(np.float64) - r1.astype(np.float64)
  mean = float(d.mean())
  if d.size < 2:
    return Estimate(mean)
  half = z * float(d.std(ddof=1)) / math.sqrt(d.size)
  return Estimate(mean, mean - half, mean + half)


def estimates_from_rewards(reward_t1, reward_t2) -> dict[str, Estimate]:
  """Every column of the table with its interval, from per-problem rewards.

  Args:
    reward_t1: [U], attempt 1's reward of each problem (above 0.5: right).
    reward_t2: [U], attempt 2's, in the same order.

  Returns:
    metrics.self_correction's keys, each an Estimate: Wilson intervals for
    the accuracies, delta_i_to_c and delta_c_to_i, the paired interval for
    delta.
  """
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
  """Where metrics.json differs from what its transcripts give.

  Args:
    metrics: an evaluation's metrics.json.
    estimates: what its transcripts give (`estimates_from_rewards`).
    n: how many problems transcripts.jsonl has.
    step: the step of the eval/<step>/ directory they are in.

  Returns:
    One note per disagreement: a metric that is not a number or differs by
    more than 1e-6 (NaN included), num_examples other than `n`, step other
    than `step`; [] if none.
  """
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
