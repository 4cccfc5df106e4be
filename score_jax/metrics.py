"""The paper's self-correction metrics (its Section 3; docs/design.md), shared
by training logs and evaluation.

Accuracy@t1, Accuracy@t2, Delta(t1, t2) = Acc@t2 - Acc@t1, Delta i->c and
Delta c->i as fractions of ALL problems (so Acc@t2 = Acc@t1 + i->c - c->i), and
the edit-distance ratio between attempts.
"""

from typing import Sequence

import numpy as np


def self_correction(reward_t1, reward_t2) -> dict[str, float]:
  """The paper's metrics of one attempt 1 and one attempt 2 per problem.

  Args:
    reward_t1: [U], the binary rewards of attempt 1, one per problem
      (above 0.5: right).
    reward_t2: [U], those of attempt 2, in the same order.

  Returns:
    accuracy_t1, accuracy_t2, delta (Acc@t2 - Acc@t1), delta_i_to_c and
    delta_c_to_i, each a fraction of all U problems.
  """
  r1 = np.asarray(reward_t1, np.float64) > 0.5
  r2 = np.asarray(reward_t2, np.float64) > 0.5
  if r1.shape != r2.shape or r1.ndim != 1 or not r1.size:
    raise ValueError(
      f"need two equal, non-empty vectors of rewards; got "
      f"shapes {r1.shape} and {r2.shape}."
    )
  return {
    "accuracy_t1": float(r1.mean()),
    "accuracy_t2": float(r2.mean()),
    "delta": float(r2.mean() - r1.mean()),
    "delta_i_to_c": float((~r1 & r2).mean()),
    "delta_c_to_i": float((r1 & ~r2).mean()),
  }


def edit_distance(a: Sequence, b: Sequence) -> int:
  """The Levenshtein distance between two sequences, one DP row at a time
  vectorised over `b`.

  Args:
    a: a sequence of comparable items (characters of a string, tokens).
    b: another.

  Returns:
    The fewest insertions, deletions and substitutions that turn `a` into
    `b`.
  """
  a, b = np.asarray(list(a)), np.asarray(list(b))
  if not len(a) or not len(b):
    return max(len(a), len(b))
  previous = np.arange(len(b) + 1)
  for i, item in enumerate(a, start=1):
    substitute = previous[:-1] + (b != item)
    delete = previous[1:] + 1
    best = np.minimum(substitute, delete)
    # Insertions chain along the row: row[j] = min(best[j], row[j-1] + 1),
    # i.e. a running minimum of (best[k] - k) shifted back by j.
    row = np.empty_like(previous)
    row[0] = i
    offsets = np.arange(1, len(b) + 1)
    row[1:] = (
      np.minimum.accumulate(np.concatenate([[i], best - offsets]))[1:] + offsets
    )
    previous = row
  return int(previous[-1])


def edit_distance_ratio(first: Sequence, second: Sequence) -> float:
  """How much an attempt changed: edit distance / (len(first) +
  len(second)), in [0, 1]; 0 for two empty attempts.

  Args:
    first: an attempt (a string, or a sequence of tokens).
    second: the attempt after it.

  Returns:
    The ratio.
  """
  total = len(first) + len(second)
  return edit_distance(first, second) / total if total else 0.0
