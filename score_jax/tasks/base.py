"""The task interface: what the trainer needs to know about a problem family.

A task supplies examples (a problem and its reference), the text of the first
turn, the fixed instruction shown between attempts, a binary reward, and answer
extraction for logs. Rewards run on the host (see `tasks/rewards.py`), never
inside jit, so `reward` may use any Python (sympy, subprocesses).
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
  """One problem. `reference` is whatever `Task.reward` compares against."""
  problem: str
  reference: Any
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
    """The examples of a split ("train", "validation", "test")."""

  def format_problem(self, example: Example) -> str:
    """The first user turn's text for `example` (no turn markers)."""
    if not self.first_turn_prompt:
      return example.problem
    return f"{self.first_turn_prompt}\n\n{example.problem}"

  @abc.abstractmethod
  def reward(self, response: str, reference: Any) -> float:
    """1.0 if `response` solves the problem, else 0.0. Raises nothing but
    `Rejected`."""

  def demonstration(self, example: Example, rng) -> list[str]:
    """Attempt texts of a supervised warm-start episode for `example`."""
    raise ValueError(f"task {self.name!r} has no demonstrations for a "
                     "supervised phase; set config.sft.steps=0.")

  @abc.abstractmethod
  def extract_answer(self, response: str) -> Optional[str]:
    """The final answer in `response` for logs, or None if there is none."""
