"""Self-correction metrics and the edit distance against plain references."""

import itertools

import numpy as np
import pytest

from score_jax import metrics


def _levenshtein(a, b):
  """The textbook O(len(a) * len(b)) dynamic programme."""
  d = [
    [i + j if i * j == 0 else 0 for j in range(len(b) + 1)]
    for i in range(len(a) + 1)
  ]
  for i, j in itertools.product(range(1, len(a) + 1), range(1, len(b) + 1)):
    d[i][j] = min(
      d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1])
    )
  return d[-1][-1]


def test_edit_distance_matches_textbook_dp():
  rng = np.random.default_rng(0)
  cases = [
    ("", ""),
    ("abc", ""),
    ("", "xy"),
    ("kitten", "sitting"),
    ("flaw", "lawn"),
  ]
  cases += [
    (
      "".join(rng.choice(list("abc"), rng.integers(0, 12))),
      "".join(rng.choice(list("abc"), rng.integers(0, 12))),
    )
    for _ in range(300)
  ]
  for a, b in cases:
    assert metrics.edit_distance(a, b) == _levenshtein(a, b), (a, b)
  assert metrics.edit_distance_ratio("kitten", "sitting") == 3 / 13
  assert metrics.edit_distance_ratio("", "") == 0.0


def test_self_correction_metrics_and_identity():
  rng = np.random.default_rng(1)
  r1 = rng.random(1000) < 0.4
  r2 = rng.random(1000) < 0.5
  m = metrics.self_correction(r1, r2)
  assert m["accuracy_t1"] == pytest.approx(r1.mean())
  assert m["accuracy_t2"] == pytest.approx(r2.mean())
  assert m["delta_i_to_c"] == pytest.approx(np.mean(~r1 & r2))
  assert m["delta_c_to_i"] == pytest.approx(np.mean(r1 & ~r2))
  assert m["delta"] == pytest.approx(r2.mean() - r1.mean())
  with pytest.raises(ValueError, match="equal, non-empty"):
    metrics.self_correction([1, 0], [1])
