"""Tests for MATH answer extraction, equivalence, MathTask and its limits."""

import time

import numpy as np
import pytest

from score_jax.tasks import base
from score_jax.tasks import math as math_task
from score_jax.tasks import rewards

# (prediction, reference, equivalent). Every row is checked both ways round.
EQUIVALENCE_CASES = [
    # Fractions and their spellings.
    (r"\frac{1}{2}", r"\frac12", True),
    (r"1/2", r"\frac{1}{2}", True),
    (r"\dfrac{3}{4}", r"\frac{3}{4}", True),
    (r"\tfrac{3}{4}", "0.75", True),
    (r"\frac{7}{2}", "3.5", True),
    (r"\frac{6}{4}", r"\frac{3}{2}", True),
    (r"-\frac{1}{2}", r"\frac{-1}{2}", True),
    (r"\frac{x}{2}", "x/2", True),
    # Radicals and pi.
    (r"2\sqrt{2}", r"\sqrt{8}", True),
    (r"\sqrt 2", r"\sqrt{2}", True),
    (r"\frac{\sqrt{3}}{3}", r"\frac{1}{\sqrt{3}}", True),
    (r"\frac{\sqrt{3}}{2}", r"\frac{\sqrt3}2", True),
    (r"2\pi", r"2 \pi", True),
    (r"\pi/2", r"\frac{\pi}{2}", True),
    # Percent, degrees, units, currency.
    (r"50\%", "50", True),
    (r"8\%", "0.08", True),
    (r"30^\circ", "30", True),
    (r"30^{\circ}", "30", True),
    (r"5 \text{ cm}", "5", True),
    (r"5\text{ cm}^2", "5", True),
    ("5 cm", "5", True),
    (r"6\mbox{ inches}", "6", True),
    (r"\$5", "5", True),
    (r"\$5.00", "5", True),
    # Thousands separators and scientific notation.
    ("1,000", "1000", True),
    (r"1{,}000", "1000", True),
    ("1,000,000", r"10^6", True),
    (r"1.5 \times 10^3", "1500", True),
    (r"1.5 \cdot 10^{3}", "1500", True),
    ("1.5e3", "1500", True),
    ("10", "10.0", True),
    # Intervals, tuples, sets, lists of solutions.
    ("(1,2)", "(1, 2)", True),
    ("[1,2)", r"[1, 2)", True),
    (r"(-\infty, 3]", r"(-\infty,3]", True),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\pi/2)", True),
    (r"\{1,2\}", r"\{2,1\}", True),
    ("1,2", r"\{1,2\}", True),
    ("2, -2", "-2, 2", True),
    (r"\pm 2", "2,-2", True),
    # Matrices and vectors.
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}",
     r"\begin{pmatrix}1\\2\end{pmatrix}", True),
    (r"\begin{pmatrix} \frac12 & 0 \\ 0 & 1 \end{pmatrix}",
     r"\begin{pmatrix}0.5&0\\0&1\end{pmatrix}", True),
    # Equations, inequalities, `x = ...` forms, polynomials.
    ("x > 3", "x>3", True),
    ("x > 3", r"(3, \infty)", True),
    (r"x \in [2,5)", "[2,5)", True),
    ("x = 5", "5", True),
    ("y = 2x+1", "y=1+2x", True),
    ("f(x)=x+1", "x+1", True),
    ("x^2+2x+1", "(x+1)^2", True),
    ("3+4i", "4i+3", True),
    # Text answers and choices.
    (r"\text{Monday}", "Monday", True),
    (r"\text{ Evelyn }", r"\text{evelyn}", True),
    (r"\text{(B)}", "B", True),
    ("(C)", r"\text{(C)}", True),
    # Near misses that are NOT equal.
    ("1/3", "0.33", False),
    (r"\frac13", "0.333", False),
    ("(1,2)", "[1,2]", False),
    ("(1,2)", "(1,2]", False),
    ("2x", "2", False),
    ("-2", "2", False),
    ("3", "4", False),
    (r"\frac{1}{2}", r"\frac{1}{3}", False),
    (r"\sqrt{2}", "1.414", False),
    (r"-\infty", r"\infty", False),
    (r"\pi", r"180^\circ", False),
    ("10,5", "10.5", False),
    ("x > 3", r"x \geq 3", False),
    (r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}",
     r"\begin{pmatrix}1&2\\3&5\end{pmatrix}", False),
    (r"\text{east}", r"\text{west}", False),
    ("Evelyn", "Evenly", False),  # Anagrams: equal as products of symbols.
    ("A", "B", False),
    ("", "5", False),
]


@pytest.mark.parametrize("prediction,reference,expected", EQUIVALENCE_CASES)
def test_answers_match_both_ways(prediction, reference, expected):
  assert math_task.answers_match(prediction, reference) == expected
  assert math_task.answers_match(reference, prediction) == expected


EXTRACTION_CASES = [
    ("So x = 2.\nFinal Answer: The final answer is $\\frac{1}{2}$. "
     "I hope it is correct.", r"\frac{1}{2}"),
    ("Final Answer: The final answer is $\\$5$. I hope it is correct.", r"\$5"),
    ("Final Answer: The final answer is $(1,2)$.", "(1,2)"),
    ("The final answer is 42.", "42"),
    ("The final answer is: $7$", "7"),
    ("Final Answer: The final answer is \\(3\\). I hope it is correct.", "3"),
    ("We get $\\boxed{\\frac{a}{b}}$.", r"\frac{a}{b}"),
    ("First \\boxed{1}, then \\boxed{\\{1, \\{2\\}\\}}", r"\{1, \{2\}\}"),
    ("Final Answer: The final answer is $\\boxed{9}$. I hope it is correct.",
     "9"),
    ("Final Answer: The final answer is $3$. I hope it is correct.\n"
     "Wait, actually \\boxed{4}.", "4"),
    ("\\boxed{3}\nFinal Answer: The final answer is $5$. I hope it is correct.",
     "5"),
    ("So the answer is \\boxed 7$.", "7"),
    ("The answer is \\boxed{\\frac{1}{2}", None),  # Truncated.
    ("I think it is 5.", None),
    ("", None),
]


@pytest.mark.parametrize("response,expected", EXTRACTION_CASES)
def test_extract_final_answer(response, expected):
  assert math_task.extract_final_answer(response) == expected


def test_extraction_looks_only_at_the_tail_of_long_responses():
  answer = "Final Answer: The final answer is $12$. I hope it is correct."
  assert math_task.extract_final_answer("x" * 10_000_000 + answer) == "12"
  # A box pushed out of the scanned tail does not count.
  long_tail = "\\boxed{1}" + "y" * (math_task.MAX_RESPONSE_CHARS + 1)
  assert math_task.extract_final_answer(long_tail) is None


def _response(answer):
  return (f"Some steps.\nFinal Answer: The final answer is ${answer}$. "
          "I hope it is correct.")


def test_math_task_prompts_and_reward():
  task = math_task.MathTask()
  assert task.first_turn_prompt.startswith("You are a math expert.")
  assert task.first_turn_prompt.endswith(
      '"Final Answer: The final answer is $answer$. I hope it is correct."')
  assert task.instruction.startswith("There might be an error in the solution")
  assert "Only output the final solution!" in task.instruction
  example = base.Example(problem="What is $1+1$?", reference="2")
  assert task.format_problem(example).endswith("Problem:\nWhat is $1+1$?")
  assert task.format_problem(example).startswith(task.first_turn_prompt)
  assert task.reward(_response("2"), "2") == 1.0
  assert task.reward(_response("2.0"), "2") == 1.0
  assert task.reward(_response("3"), "2") == 0.0
  assert task.reward("no answer here", "2") == 0.0
  assert task.reward(_response("2"), None) == 0.0
  assert task.extract_answer(_response(r"\frac{1}{2}")) == r"\frac{1}{2}"
  with pytest.raises(ValueError, match="data_dir"):
    task.examples("train")


PATHOLOGICAL_ANSWERS = [
    r"10^{10^{10^{10}}}",
    r"2^{2^{2^{2^{2^{2}}}}}",
    "9!!!!!!",
    "1" * 1_000_000,
    "{" * 10_000 + "1" + "}" * 10_000,
    "(" * 300 + "1" + ")" * 300,
]


def test_pathological_answers_score_zero_within_the_limit():
  task = math_task.MathTask()
  responses = [_response(answer) for answer in PATHOLOGICAL_ANSWERS]
  responses += [_response("7"), _response(r"\frac{14}{2}")]
  timeout_s = 0.5
  with rewards.RewardPool(task.reward, num_workers=2,
                          timeout_s=timeout_s) as pool:
    start = time.monotonic()
    result = pool.score(responses, ["7"] * len(responses))
    elapsed = time.monotonic() - start
  np.testing.assert_array_equal(
      result.rewards, [0.0] * len(PATHOLOGICAL_ANSWERS) + [1.0, 1.0])
  # Each is counted: the power towers and factorials outlive the pool's limit
  # (or the grader's own) and the oversized answers are rejected unparsed.
  assert result.num_rejected >= 3  # The last three at least.
  assert result.num_failed == len(PATHOLOGICAL_ANSWERS)
  assert elapsed < len(PATHOLOGICAL_ANSWERS) * (timeout_s + 1)


def test_cheap_guards_reject_oversized_answers_quickly():
  start = time.monotonic()
  for answer in PATHOLOGICAL_ANSWERS[3:]:
    assert not math_task.answers_match(answer, "1")
  assert time.monotonic() - start < 1.0
