"""The MATH reward and math-verify alone against the grader tests' labels.

  python -m scripts.math_grader_agreement     # from the repository root

Grades every labelled case of tests/test_math_grader.py twice: with the
reward (`answers_match` for answer pairs, both ways round; `MathTask.reward`
for whole responses) and with math-verify alone,
`math_verify.verify(parse("$reference$"), parse(answer))` with its default
extraction (answer pairs are wrapped in "$...$" as well). Prints how many
each gets right and every case where the two differ.
"""

import importlib.util
import logging
import os

import math_verify

from score_jax.tasks import math as math_task

_TESTS = os.path.join(
  os.path.dirname(os.path.dirname(__file__)), "tests", "test_math_grader.py"
)


def _load_tests():
  spec = importlib.util.spec_from_file_location("test_math_grader", _TESTS)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _math_verify(answer: str, reference: str) -> bool:
  return math_verify.verify(
    math_verify.parse(f"${reference}$"), math_verify.parse(answer)
  )


def main():
  logging.disable(logging.WARNING)  # math-verify's per-case timeout notes.
  tests = _load_tests()
  rows = []  # (kind, answer, reference, label, reward's, math-verify's)
  for prediction, reference, label in tests.EQUIVALENCE_CASES:
    for answer, gold in ((prediction, reference), (reference, prediction)):
      rows.append(
        (
          "pair",
          answer,
          gold,
          label,
          math_task.answers_match(answer, gold),
          _math_verify(f"${answer}$", gold),
        )
      )
  for response, reference, label in tests.REWARD_CASES:
    rows.append(
      (
        "response",
        response,
        reference,
        bool(label),
        tests.MATH_TASK.reward(response, reference) == 1.0,
        _math_verify(response, reference),
      )
    )
  for kind in ("pair", "response"):
    of_kind = [row for row in rows if row[0] == kind]
    print(
      f"{kind} cases: {len(of_kind)}; reward right on "
      f"{sum(row[3] == row[4] for row in of_kind)}, math-verify right on "
      f"{sum(row[3] == row[5] for row in of_kind)}"
    )
  print("\nwhere they differ (label / reward / math-verify):")
  for kind, answer, reference, label, reward, verified in rows:
    if reward != verified:
      print(
        f"  {label:d} / {reward:d} / {verified:d}  {kind}: {answer!r} "
        f"against {reference!r}"
      )


if __name__ == "__main__":
  main()
