"""Tests of the arithmetic demo task: answers, splits, solutions and rewards."""

import collections
import random
import re
import string
import time
from fractions import Fraction

import pytest
import sympy
from sympy.parsing import sympy_parser

from score_jax.tasks import arithmetic

_PER_LEVEL = 300
_LINE = re.compile(
  r"(?:-?\d+x = |x = )?(-?[\d/]+|\(-[\d/]+\)) ([-+*/]) (-?[\d/]+|\(-[\d/]+\))"
  r" = (-?[\d/]+)"
)
_FINAL = re.compile(
  r"Final Answer: The final answer is \$(.+)\$\. "
  r"I hope it is correct\."
)
# Slips that show a wrong computation computed right (no wrong line).
_STRUCTURAL_SLIPS = {"precedence", "moved_sign", "inverted"}


@pytest.fixture(scope="module")
def examples_by_level():
  return {
    level: arithmetic.ArithmeticTask(
      num_train=_PER_LEVEL, num_validation=0, num_test=0, levels=(level,)
    ).examples("train")
    for level in arithmetic.LEVELS
  }


def _sympy_answer(problem):
  """The answer of `problem`, by sympy, independently of the task's code."""
  if match := re.fullmatch(r"Compute (.+)\.", problem):
    return sympy_parser.parse_expr(match[1])
  match = re.fullmatch(r"Solve (.+) = (.+) for x\.", problem)
  x = sympy.Symbol("x")
  lhs = sympy_parser.parse_expr(re.sub(r"(\d)x", r"\1*x", match[1]))
  (solution,) = sympy.solve(sympy.Eq(lhs, sympy_parser.parse_expr(match[2])), x)
  return solution


def _number(text):
  return Fraction(text.strip("()"))


def _line_results(example):
  """The result of every line of the correct solution of `example`."""
  text, _ = arithmetic.solution_text(example, random.Random(0), error_rate=0.0)
  return [
    _number(_LINE.fullmatch(line).group(4)) for line in text.split("\n")[:-1]
  ]


def _wrong_lines(text):
  """Lines whose arithmetic is wrong, checking each "a op b = r" line."""
  *lines, final = text.split("\n")
  assert _FINAL.fullmatch(final), final
  wrong = 0
  for line in lines:
    match = _LINE.fullmatch(line)
    assert match, line
    left, op, right, result = match.groups()
    left, right = _number(left), _number(right)
    value = {
      "+": left + right,
      "-": left - right,
      "*": left * right,
      "/": left / right if right else None,
    }[op]
    wrong += value != _number(result)
  # The final answer is the last line's result.
  assert _FINAL.fullmatch(final)[1] == _LINE.fullmatch(lines[-1])[4]
  return wrong


@pytest.mark.parametrize("level", arithmetic.LEVELS)
def test_answers_equal_sympy(examples_by_level, level):
  for example in examples_by_level[level][:150]:
    expected = _sympy_answer(example.problem)
    assert sympy.Rational(example.answer_key) == expected, example.problem


def test_levels_have_the_described_shapes(examples_by_level):
  for example in examples_by_level[1]:
    a, op, b = re.fullmatch(
      r"Compute (\d+) ([-+*]) (\d+)\.", example.problem
    ).groups()
    a, b = int(a), int(b)
    if op == "*":
      assert 10 <= a <= 99 and 2 <= b <= 9
    else:
      assert 10 <= b <= a <= 999
      places = [10**k for k in range(1, 4)]
      if op == "+":
        assert any(a % p + b % p >= p for p in places), example.problem
      else:
        assert any(a % p < b % p for p in places), example.problem
  for level in (0, 2, 3):
    has = collections.Counter()
    largest_operand = 9 if level == 0 else 20
    for example in examples_by_level[level]:
      expression = re.fullmatch(r"Compute (.+)\.", example.problem)[1]
      numbers = re.findall(r"\d+", expression)
      assert len(numbers) in (3, 4) and all(
        1 <= int(n) <= largest_operand for n in numbers
      )
      if level == 0:
        assert all(0 <= v < 100 for v in _line_results(example))
      negative = bool(re.search(r"(^|\()-", expression))
      assert negative == (level == 3), expression
      has["parentheses"] += "(" in expression.replace("(-", "")
      has["product"] += "*" in expression
      # One line per operator.
      lines = arithmetic.solution_text(example, random.Random(0))[0]
      assert len(lines.split("\n")) == len(numbers)
    assert has["parentheses"] > _PER_LEVEL / 10
    assert has["product"] > _PER_LEVEL / 3
  fractional = 0
  for example in examples_by_level[4]:
    a, _, b, _ = re.fullmatch(
      r"Solve (-?\d+)x ([-+]) (\d+) = (-?\d+) for x\.", example.problem
    ).groups()
    assert 2 <= abs(int(a)) <= 12 and int(b) >= 1
    fractional += "/" in example.answer_key
  assert _PER_LEVEL / 5 < fractional < _PER_LEVEL * 4 / 5


def test_splits_are_disjoint_and_deterministic():
  sizes = dict(num_train=1500, num_validation=200, num_test=200)
  task = arithmetic.ArithmeticTask(**sizes)
  problems = {}
  for split in ("train", "validation", "test"):
    examples = task.examples(split)
    assert len(examples) == sizes[f"num_{split}"]
    problems[split] = [e.problem for e in examples]
    assert len(set(problems[split])) == len(problems[split])
    assert all(arithmetic.split_of(p) == split for p in problems[split])
  assert not set(problems["train"]) & set(problems["validation"])
  assert not set(problems["train"]) & set(problems["test"])
  assert not set(problems["validation"]) & set(problems["test"])

  again = arithmetic.ArithmeticTask(**sizes)
  for split in problems:
    assert [e.problem for e in again.examples(split)] == problems[split]
  # The test split does not depend on the size of the training split.
  larger = arithmetic.ArithmeticTask(num_train=3000, num_test=200)
  assert [e.problem for e in larger.examples("test")] == problems["test"]
  # Another seed draws other problems, still never a test problem in train.
  other = arithmetic.ArithmeticTask(seed=1, num_train=1500, num_test=200)
  other_train = {e.problem for e in other.examples("train")}
  assert [e.problem for e in other.examples("test")] != problems["test"]
  assert not other_train & set(problems["test"])


@pytest.mark.parametrize("level", arithmetic.LEVELS)
def test_solutions_and_rewards(examples_by_level, level):
  task = arithmetic.ArithmeticTask()
  rng = random.Random(level)
  kinds = collections.Counter()
  for example in examples_by_level[level]:
    text, correct = arithmetic.solution_text(example, rng, error_rate=0.0)
    assert correct and task.reward(text, example.answer_key) == 1.0
    assert _wrong_lines(text) == 0
    assert len(text) < 160, text
    for _ in range(3):
      flawed, kind = arithmetic.flawed_solution(example, rng)
      kinds[kind] += 1
      assert task.reward(flawed, example.answer_key) == 0.0, (text, flawed)
      assert flawed != text
      assert _wrong_lines(flawed) == (0 if kind in _STRUCTURAL_SLIPS else 1)
  expected_kinds = {
    0: {"precedence", "digit", "times_table", "wrong_operation"},
    1: {"dropped_carry", "borrow", "digit", "times_table", "wrong_operation"},
    2: {"precedence", "digit", "times_table", "wrong_operation"},
    3: {"precedence", "sign", "digit", "wrong_operation"},
    4: {"moved_sign", "inverted", "sign", "numerator", "digit"},
  }[level]
  assert expected_kinds <= set(kinds), kinds
  # No kind dominates.
  assert max(kinds.values()) < 0.6 * sum(kinds.values()), kinds


def test_error_rate(examples_by_level):
  task = arithmetic.ArithmeticTask()
  rng = random.Random(0)
  examples = [
    e for level in arithmetic.LEVELS for e in examples_by_level[level][:100]
  ]
  for error_rate in (0.0, 1.0):
    correct = [
      arithmetic.solution_text(e, rng, error_rate)[1] for e in examples
    ]
    assert all(correct) if error_rate == 0 else not any(correct)
  outcomes = []
  for example in examples:
    text, correct = arithmetic.solution_text(example, rng, error_rate=0.3)
    assert task.reward(text, example.answer_key) == float(correct)
    outcomes.append(correct)
  assert 0.6 < sum(outcomes) / len(outcomes) < 0.8


def test_demonstrations(examples_by_level):
  """Warm-start episodes: two attempts drawn independently unless the second
  repeats the first; worked solutions by default; answer first, the stated
  answer and the working each with its own independent slip, when the task
  states answers first."""
  examples = examples_by_level[0][:300]
  rng = random.Random(0)
  worked = arithmetic.ArithmeticTask(demonstration_error_rate=0.0)
  for example in examples[:20]:
    attempts = worked.demonstration(example, rng)
    assert (
      attempts[0] == attempts[1] == arithmetic.solution_text(example, rng)[0]
    )
  exact = arithmetic.ArithmeticTask(
    demonstration_error_rate=0.0, answer_first=True
  )
  for example in examples[:20]:
    lines, final = arithmetic.solution_text(example, rng)[0].rsplit("\n", 1)
    assert exact.demonstration(example, rng) == [f"{final}\n{lines}"] * 2
  task = arithmetic.ArithmeticTask(
    demonstration_error_rate=0.5, answer_first=True
  )
  stated_right, working_right = [], []
  for example in examples:
    for attempt in task.demonstration(example, rng):
      final, *lines = attempt.split("\n")
      assert final.startswith("Final Answer:") and lines
      assert all(_LINE.fullmatch(line) for line in lines)
      stated_right.append(task.reward(attempt, example.answer_key) == 1.0)
      working_right.append(
        lines[-1].rsplit(" = ", 1)[1] == str(example.answer_key)
      )
  n = len(stated_right)
  both = sum(s and w for s, w in zip(stated_right, working_right)) / n
  # 600 draws at p = 0.5 each, independent: both right at p = 0.25.
  assert 0.43 < sum(stated_right) / n < 0.57
  assert 0.43 < sum(working_right) / n < 0.57
  assert 0.19 < both < 0.31
  repeat = arithmetic.ArithmeticTask(
    demonstration_error_rate=0.5,
    demonstration_repeat_rate=1.0,
    answer_first=True,
  )
  assert all(
    a == b for a, b in (repeat.demonstration(e, rng) for e in examples)
  )
  identical = sum(
    a == b for a, b in (task.demonstration(e, rng) for e in examples)
  ) / len(examples)
  assert identical < 0.6  # drawn independently: both right is 0.25 of them
  for name in ("error", "repeat"):
    with pytest.raises(ValueError, match=f"{name}_rate"):
      arithmetic.ArithmeticTask(**{f"demonstration_{name}_rate": 1.5})


def test_answer_first_grades_the_first_answer():
  """Stating answers first, a response is held to the first answer it
  states: a later one after the working does not replace it."""
  two = (
    "Final Answer: The final answer is $5$. I hope it is correct.\n"
    "2 + 4 = 6\nFinal Answer: The final answer is $6$."
  )
  first = arithmetic.ArithmeticTask(answer_first=True)
  last = arithmetic.ArithmeticTask()
  assert first.extract_answer(two) == "5"
  assert last.extract_answer(two) == "6"
  assert first.reward(two, "5") == 1.0 and first.reward(two, "6") == 0.0
  assert last.reward(two, "6") == 1.0
  assert first.extract_answer("\\boxed{3} and \\boxed{4}") == "3"
  assert first.extract_answer("no answer") is None


@pytest.mark.parametrize(
  "response, answer",
  [
    ("Final Answer: The final answer is $4$. I hope it is correct.", "4"),
    ("The final answer is $ -7/2 $.", "-7/2"),
    ("so \\boxed{ 3/4 }", "3/4"),
    ("\\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),
    ("The final answer is $1$. Oh no: \\boxed{2}", "2"),
    ("\\boxed{2} then final answer is $-5$", "-5"),
    ("final answer is $\\boxed{12}$", "12"),
    ("final answer is\n$7$", "7"),
    ("final answer is $   $", None),
    ("no answer here: 42", None),
    ("", None),
    ("\\boxed{5", None),
  ],
)
def test_extract_answer(response, answer):
  assert arithmetic.ArithmeticTask().extract_answer(response) == answer


@pytest.mark.parametrize(
  "answer, reference, reward",
  [
    ("4", "4", 1.0),
    ("4", "5", 0.0),
    ("-4", "4", 0.0),
    ("3/4", "3/4", 1.0),
    ("6/8", "3/4", 1.0),
    ("0.75", "3/4", 1.0),
    ("\\frac{3}{4}", "3/4", 1.0),
    ("-\\frac{7}{2}", "-7/2", 1.0),
    ("-3.5", "-7/2", 1.0),
    ("x = -7/2", "-7/2", 1.0),
    ("+12", "12", 1.0),
    ("3/0", "3/0", 0.0),
    ("1e3", "1000", 0.0),
    ("four", "4", 0.0),
    ("4", 4, 1.0),
    ("-7/2", Fraction(-7, 2), 1.0),
    ("4", None, 0.0),
  ],
)
def test_reward_compares_values(answer, reference, reward):
  task = arithmetic.ArithmeticTask()
  response = f"1 + 3 = 4\n{arithmetic.FINAL_ANSWER.format(answer)}"
  assert task.reward(response, reference) == reward


def test_reward_of_garbage_is_zero_and_fast():
  task = arithmetic.ArithmeticTask()
  rng = random.Random(0)
  garbage = [
    "",
    "$$$$",
    "\\boxed{}" * 10_000,
    "\\boxed{" * 100_000,
    "{" * 1_000_000,
    "final answer is $" * 100_000,
    "Final Answer: The final answer is $" + "9" * 1_000_000 + "$.",
    "Final Answer: The final answer is $1e999999999$.",
    "\\boxed{" + "9" * 5000 + "/1}",
    "\\boxed{\\frac{1}{0}}",
    "".join(rng.choice(string.printable) for _ in range(200_000)),
    "x" * 10_000_000 + " final answer is $4",
  ]
  for response in garbage:
    start = time.perf_counter()
    assert task.reward(response, "4") == 0.0
    assert time.perf_counter() - start < 0.5, response[:50]
  assert task.reward(None, "4") == 0.0
  assert task.extract_answer(None) is None
  # An answer after a flood of garbage still counts.
  flood = "\\boxed{" * 100_000 + " Final Answer: The final answer is $4$."
  assert task.reward(flood, "4") == 1.0


def test_corpus_text():
  texts = list(arithmetic.corpus_text(400, seed=3))
  assert len(texts) == 400
  assert texts == list(arithmetic.corpus_text(400, seed=3))
  assert arithmetic.INSTRUCTION in texts
  problems = [t for t in texts if t.startswith(("Compute", "Solve"))]
  assert len(problems) == 100
  assert all(arithmetic.split_of(p) == "train" for p in problems)
  assert sum("Final Answer: The final answer is $" in t for t in texts) == 200


def test_task_interface_and_errors():
  task = arithmetic.ArithmeticTask(num_train=3, num_validation=0, num_test=0)
  assert task.name == "arithmetic"
  assert task.instruction == arithmetic.INSTRUCTION
  (example, *_) = task.examples("train")
  assert task.format_problem(example) == example.problem
  assert task.examples("validation") == ()
  with pytest.raises(ValueError, match="split"):
    task.examples("dev")
  with pytest.raises(ValueError, match="levels"):
    arithmetic.ArithmeticTask(levels=(5,))
  with pytest.raises(ValueError, match="num_train"):
    arithmetic.ArithmeticTask(num_train=-1)
