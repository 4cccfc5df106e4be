"""The task interface: what the trainer needs to know about a problem family.

A task supplies examples (a problem and its answer key), the text of the
first turn, the fixed instruction shown between attempts, a binary reward,
and answer extraction for logs. Rewards run on the host (see
`tasks/rewards.py`), never inside jit, so `reward` may use any Python
(sympy, subprocesses).

For task authors: `Example.answer_key` and the second argument of
`Task.reward` were called `reference` before; "reference" now means only
the frozen reference model of the KL penalty. Rename the field and the
argument in a task of your own (its behaviour does not change).
"""

import abc
import dataclasses
from typing import Any, Optional, Sequence


class Rejected(Exception):
  """Raised by `Task.reward` for a response it cannot or will not grade (an
  answer too long or too deeply nested to parse safely, a grader that ran out
  of time): it scores 0 and is counted apart from wrong answers."""


@dataclasses.dataclass(frozen=True)
class Example:
  """One problem.

  Attributes:
    problem: the problem's text.
    answer_key: whatever `Task.reward` grades a response against (an answer
      string, unit tests, ...); evaluation's transcripts show its str().
    meta: anything else about the problem (its level, a canonical solution).
  """

  problem: str
  answer_key: Any
  meta: dict = dataclasses.field(default_factory=dict)


class Task(abc.ABC):
  """A family of problems with a binary reward."""

  name: str
  # Text that precedes the problem in the first user turn (may be empty).
  first_turn_prompt: str
  # The fixed self-correction instruction shown between attempts.
  instruction: str

  @abc.abstractmethod
  def examples(self, split: str) -> Sequence[Example]:
    """The examples of `split` ("train", "validation", "test"), in a fixed
    order."""

  def format_problem(self, example: Example) -> str:
    """The first user turn's text for `example` (no turn markers)."""
    if not self.first_turn_prompt:
      return example.problem
    return f"{self.first_turn_prompt}\n\n{example.problem}"

  @abc.abstractmethod
  def reward(self, response: str, answer_key: Any) -> float:
    """Grades one attempt.

    Args:
      response: the attempt's text.
      answer_key: its problem's `Example.answer_key`.

    Returns:
      1.0 if `response` solves the problem, else 0.0.

    Raises:
      Rejected: for a response it cannot or will not grade (nothing else).
    """

  def demonstration(self, example: Example, rng) -> list[str]:
    """A supervised warm-start episode for `example`.

    Args:
      example: the problem.
      rng: a random.Random, for demonstrations that vary.

    Returns:
      The text of each attempt.
    """
    raise ValueError(
      f"task {self.name!r} has no demonstrations for a "
      "supervised phase; set config.sft.steps=0."
    )

  @abc.abstractmethod
  def extract_answer(self, response: str) -> Optional[str]:
    """The final answer in `response` for logs, or None if there is none."""
