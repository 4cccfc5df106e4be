"""Arithmetic and linear equations: the task of the CPU demo.

A tiny model learns this task on a CPU in minutes, and its first attempt can be
wrong in ways a second attempt can notice: a solution shows one small
computation a line, so one slip (a dropped carry, a sign error, a misread
precedence) propagates to a wrong final answer, and re-doing the steps fixes it.

Levels:
  0. Three or four one-digit operands, precedence and parentheses, results
     below 100:
     "Compute 7 + 3 * 4." (the CPU demo's level: a tiny model learns it).
  1. Two operands with a carry or borrow, place by place: "Compute 347 + 285."
  2. Three or four non-negative operands, precedence and parentheses.
  3. As level 2, with negative numbers.
  4. Linear equations with integer or fractional solutions: "Solve 3x - 5 = 7
     for x."

A solution (here of level 2) reads:
  12 + 7 = 19
  19 * 3 = 57
  57 - 5 = 52
  Final Answer: The final answer is $52$. I hope it is correct.

With `answer_first` (the CPU demo) a response states its final answer first,
then the working, and the first answer stated is the one graded:
  Final Answer: The final answer is $52$. I hope it is correct.
  12 + 7 = 19
  ...
A first attempt is then held to an answer given before working, while its
working can show that answer wrong to a second attempt, which reads it.

Answers are exact: "52", "-7/2". The splits are disjoint by construction: the
split of a problem is a function of a hash of its text, whatever the seed.
"""

import dataclasses
import functools
import hashlib
import itertools
import random
import re
from fractions import Fraction
from typing import (
  Any,
  Callable,
  Iterator,
  NamedTuple,
  Optional,
  Sequence,
  Union,
)

from score_jax.tasks import base

LEVELS = (0, 1, 2, 3, 4)
INSTRUCTION = (
  "There might be an error in the solution above. Please correct "
  "the error, if any, and rewrite the solution."
)
FINAL_ANSWER = "Final Answer: The final answer is ${}$. I hope it is correct."

# Hash buckets (of 100) per split; a problem's bucket never changes.
_SPLIT_BUCKETS = {
  "test": range(0, 10),
  "validation": range(10, 20),
  "train": range(20, 100),
}
# Draws in a row that may fail to give a new problem before giving up.
_MAX_DRAWS = 10_000
# Bound on |intermediate results| of levels 2 and 3, to keep lines short.
_MAX_VALUE = 999
# Share of flawed level 2-3 solutions that misread the precedence (when that
# changes the answer); the rest get a slip in one step.
_MISREAD_SHARE = 0.5
# How often each kind of slip is chosen where a step allows it: the typical
# slips of each operation (carries, borrows, signs) come first.
_SLIP_WEIGHTS = {
  "dropped_carry": 4.0,
  "borrow": 4.0,
  "sign": 2.0,
  "moved_sign": 2.0,
  "inverted": 1.0,
  "times_table": 1.5,
  "wrong_operation": 1.0,
  "digit": 1.0,
  "numerator": 1.0,
  "transposed": 0.5,
}
# Parsing caps: an answer longer than this is garbage, and only the end of a
# response is searched (answers come last; the start, when they come first):
# this bounds the work on garbage.
_MAX_ANSWER_CHARS = 64
_MAX_RESPONSE_CHARS = 20_000
_PRECEDENCE = {"+": 1, "-": 1, "*": 2}


@dataclasses.dataclass(frozen=True)
class _Ref:
  """The result of an earlier step of the same solution."""

  step: int


_Operand = Union[Fraction, _Ref]


@dataclasses.dataclass(frozen=True)
class _Step:
  """One line of a solution: `{prefix}{left} {op} {right} = {result}`.

  `role` decides which slips are realistic: "compute" (plain arithmetic),
  "move" (a term moved across "=") or "divide" (by the coefficient of x).
  """

  op: str
  left: _Operand
  right: _Operand
  role: str = "compute"
  prefix: str = ""


class _Slip(NamedTuple):
  """What a flawed step shows instead of the right computation."""

  kind: str
  op: str
  left: Fraction
  right: Fraction
  result: Fraction


class _Problem(NamedTuple):
  """A generated problem and the steps of its solution."""

  text: str
  steps: tuple[_Step, ...]
  # The steps of the same problem read without operator precedence, when that
  # gives another answer (levels 2 and 3), else None.
  misread: Optional[tuple[_Step, ...]]


# Expression trees: a Fraction leaf or (op, left, right).
_Tree = Union[Fraction, tuple]


def split_of(problem: str) -> str:
  """The split ("train", "validation" or "test") that `problem` belongs to."""
  digest = hashlib.sha256(problem.encode()).digest()
  bucket = int.from_bytes(digest[:8], "big") % 100
  return next(s for s, buckets in _SPLIT_BUCKETS.items() if bucket in buckets)


class ArithmeticTask(base.Task):
  """Generated arithmetic and algebra problems with exact answers."""

  name = "arithmetic"
  first_turn_prompt = ""
  instruction = INSTRUCTION

  def __init__(
    self,
    num_train: int = 20_000,
    num_validation: int = 500,
    num_test: int = 1_000,
    levels: Sequence[int] = LEVELS,
    seed: int = 0,
    demonstration_error_rate: float = 0.3,
    demonstration_repeat_rate: float = 0.0,
    answer_first: bool = False,
  ):
    """Sizes of the splits, the levels to mix (in equal shares) and the seed.

    A split depends only on its size, the levels and the seed: asking for more
    training examples leaves the test split as it was.
    `demonstration_error_rate` is the chance of a slip in each worked attempt
    of the supervised warm-start episodes, `demonstration_repeat_rate` the
    chance that an episode's second attempt repeats its first (see
    `demonstration`).
    `answer_first`: a response states its final answer before the working,
    and the first final answer stated is the one graded (see
    `answer_first_text`).
    """
    for name, rate in (
      ("error", demonstration_error_rate),
      ("repeat", demonstration_repeat_rate),
    ):
      if not 0 <= rate <= 1:
        raise ValueError(
          f"ArithmeticTask demonstration_{name}_rate must be "
          f"in [0, 1], got {rate}."
        )
    self._demonstration_error_rate = demonstration_error_rate
    self._demonstration_repeat_rate = demonstration_repeat_rate
    self._answer_first = bool(answer_first)
    levels = tuple(levels)
    if not levels or not set(levels) <= set(LEVELS):
      raise ValueError(
        f"ArithmeticTask levels must be a non-empty subset of "
        f"{LEVELS}, got {levels}."
      )
    self._sizes = {
      "train": num_train,
      "validation": num_validation,
      "test": num_test,
    }
    for split, size in self._sizes.items():
      if not isinstance(size, int) or size < 0:
        raise ValueError(
          f"ArithmeticTask num_{split} must be an int >= 0, got {size!r}."
        )
    self._levels = levels
    self._seed = seed

  def demonstration(
    self, example: base.Example, rng: random.Random
  ) -> list[str]:
    """A two-attempt episode for supervised warm starts, each attempt with a
    slip at `demonstration_error_rate`: the second attempt repeats the first
    with probability `demonstration_repeat_rate`, else is drawn
    independently. Either way, like the paper's base models, the second
    attempt is no better than the first on average.

    Repeating matters when answers come first: a second attempt drawn
    independently states an answer that is right as often as the first
    attempt's working, so a model warm-started on such pairs learns to take
    its second answer from the first attempt's working, which a base model
    does not do unprompted.

    Args:
      example: one of this task's examples (its meta holds the steps).
      rng: the random.Random the slips and the repeat are drawn from.

    Returns:
      The texts of the two attempts, answer first with `answer_first`.
    """
    write = answer_first_text if self._answer_first else solution_text
    first = write(example, rng, self._demonstration_error_rate)[0]
    if rng.random() < self._demonstration_repeat_rate:
      return [first, first]
    return [first, write(example, rng, self._demonstration_error_rate)[0]]

  def examples(self, split: str) -> Sequence[base.Example]:
    """The first num_{split} examples of `split`, the levels in turn (see
    `base.Task.examples`); raises ValueError for an unknown split."""
    if split not in self._sizes:
      raise ValueError(
        f"Unknown split {split!r}; use one of {tuple(self._sizes)}."
      )
    return _first_examples(split, self._levels, self._seed, self._sizes[split])

  def reward(self, response: str, answer_key: Any) -> float:
    """Grades one attempt by its exact value (see `base.Task.reward`).

    Args:
      response: the attempt's text; graded is its last final answer line or
        \\boxed{} (its first with `answer_first`).
      answer_key: the answer: an int, a Fraction or its text ("-7/2").

    Returns:
      1.0 if the graded answer equals `answer_key` exactly, else 0.0 (also
      for a response with no answer or that is not a str).
    """
    if not isinstance(response, str):
      return 0.0
    answer = parse_answer(_extract_answer(response, self._answer_first))
    expected = (
      Fraction(answer_key)
      if isinstance(answer_key, (int, Fraction))
      else parse_answer(answer_key)
    )
    return float(answer is not None and answer == expected)

  def extract_answer(self, response: str) -> Optional[str]:
    """The answer `reward` grades: the last "final answer is $X$" or
    \\boxed{X} in `response` (the first with `answer_first`), or None."""
    if not isinstance(response, str):
      return None
    return _extract_answer(response, self._answer_first)


def solution_text(
  example: base.Example, rng: random.Random, error_rate: float = 0.0
) -> tuple[str, bool]:
  """A worked solution of `example`, and whether it is correct.

  With probability `error_rate` the solution has one realistic slip (see
  `flawed_solution`) and a wrong final answer; otherwise it is correct.

  Args:
    example: an `ArithmeticTask` example (its meta holds the steps).
    rng: the random.Random the slip is drawn from.
    error_rate: the chance of a slip, in [0, 1].

  Returns:
    The solution's text, ending in its final answer line, and whether that
    answer is correct.
  """
  lines, answer, correct = _worked(example, rng, error_rate)
  return _solution(lines, answer), correct


def answer_first_text(
  example: base.Example, rng: random.Random, error_rate: float = 0.0
) -> tuple[str, bool]:
  """The final answer stated first, then the working, and whether the stated
  answer is correct.

  The answer is a guess made before working: wrong (a slip's result) with
  probability `error_rate`. The working that follows does not look at it and
  has a slip of its own at the same rate, independently. So the working can
  show that the answer stated above it is wrong, which a second attempt can
  read but the first, already committed, cannot act on.

  Args:
    example: an `ArithmeticTask` example (its meta holds the steps).
    rng: the random.Random the slips are drawn from.
    error_rate: the chance of a wrong stated answer, and, independently, of
      a slip in the working, in [0, 1].

  Returns:
    The text, its final answer line first, and whether the stated answer is
    correct (whatever the working shows).
  """
  _, stated, correct = _worked(example, rng, error_rate)
  lines, _, _ = _worked(example, rng, error_rate)
  return "\n".join([FINAL_ANSWER.format(stated), *lines]), correct


def _worked(
  example: base.Example, rng: random.Random, error_rate: float
) -> tuple[list[str], Fraction, bool]:
  """Solution lines (one slip with probability `error_rate`), their answer
  and whether it is correct."""
  if rng.random() < error_rate:
    lines, answer, _ = _flawed(example, rng)
    return lines, answer, False
  return *_run(example.meta["steps"]), True


def flawed_solution(
  example: base.Example, rng: random.Random
) -> tuple[str, str]:
  """A solution with one slip, and the kind of slip.

  The slip is either a misread precedence (levels 2-3: every line computed
  right, in the wrong order) or one wrong line whose result the later lines
  use consistently. Either way the final answer is wrong.

  Args:
    example: an `ArithmeticTask` example (its meta holds the steps).
    rng: the random.Random the slip is drawn from.

  Returns:
    The solution's text, ending in its final answer line, and the kind of
    slip: "precedence" or a kind of slip in one line ("dropped_carry",
    "borrow", "sign", "digit", ...).
  """
  lines, answer, kind = _flawed(example, rng)
  return _solution(lines, answer), kind


def _flawed(
  example: base.Example, rng: random.Random
) -> tuple[list[str], Fraction, str]:
  """The lines and answer of `flawed_solution`, and the kind of slip."""
  steps, misread = example.meta["steps"], example.meta["misread"]
  if misread is not None and rng.random() < _MISREAD_SHARE:
    return *_run(misread), "precedence"
  _, answer = _run(steps)
  values = _values(steps)
  groups = [
    (index, kind, slips)
    for index, step in enumerate(steps)
    for kind, slips in _slips(step, *_operands(step, values)).items()
  ]
  # A weighted random order of (step, kind) (Efraimidis-Spirakis keys).
  groups.sort(
    key=lambda g: rng.random() ** (1 / _SLIP_WEIGHTS[g[1]]), reverse=True
  )
  for index, kind, slips in groups:
    for slip in rng.sample(slips, len(slips)):
      lines, result = _run(steps, index, slip)
      if result != answer:
        return lines, result, kind
  # Unreachable: a digit slip in the last step always changes the answer.
  raise RuntimeError(f"No slip changes the answer of {example.problem!r}.")


def parse_answer(text: Optional[str]) -> Optional[Fraction]:
  """The exact value of an answer: "-7/2", "3.5", "\\frac{3}{4}", "x = 4".

  None if `text` is None, too long or not a number.
  """
  if not isinstance(text, str) or len(text) > _MAX_ANSWER_CHARS:
    return None
  text = re.sub(r"[\s$]", "", text).removeprefix("x=")
  if match := re.fullmatch(
    r"([+-]?)\\[dt]?frac\{([+-]?\d{1,18})\}\{([+-]?\d{1,18})\}", text
  ):
    sign, numerator, denominator = match.groups()
  elif match := re.fullmatch(r"([+-]?)(\d{1,18})/(\d{1,18})", text):
    sign, numerator, denominator = match.groups()
  elif re.fullmatch(r"[+-]?(\d{1,18}(\.\d{0,18})?|\.\d{1,18})", text):
    return Fraction(text)
  else:
    return None
  if int(denominator) == 0:
    return None
  value = Fraction(int(numerator), int(denominator))
  return -value if sign == "-" else value


def corpus_text(
  num_texts: int, seed: int = 0, levels: Sequence[int] = LEVELS
) -> Iterator[str]:
  """Texts of the task for training a tokenizer: `num_texts` of them.

  Episode by episode, as the model sees them: the problem, a first attempt
  (flawed half of the time), the instruction and a correct second attempt.
  Solutions keep their newlines. Only training-split problems are used.

  Args:
    num_texts: how many texts to yield (four per episode).
    seed: the seed of the problems and of the slips.
    levels: the levels to take problems of, in turn.

  Returns:
    An iterator over the texts.
  """
  rng = random.Random(f"arithmetic-corpus/{seed}")
  episodes = (
    (
      example.problem,
      solution_text(example, rng, error_rate=0.5)[0],
      INSTRUCTION,
      solution_text(example, rng)[0],
    )
    for example in _examples("train", tuple(levels), seed)
  )
  return itertools.islice(itertools.chain.from_iterable(episodes), num_texts)


@functools.lru_cache(maxsize=None)
def _first_examples(
  split: str, levels: tuple[int, ...], seed: int, count: int
) -> tuple[base.Example, ...]:
  """The first `count` of `_examples`, made once per process (20 000 take
  seconds, and every task of one config asks for the same)."""
  return tuple(itertools.islice(_examples(split, levels, seed), count))


def _examples(
  split: str, levels: tuple[int, ...], seed: int
) -> Iterator[base.Example]:
  """Distinct examples of `split`, cycling through `levels`, forever."""
  rng = random.Random(f"arithmetic/{seed}/{split}")
  seen = set()
  for index in itertools.count():
    level = levels[index % len(levels)]
    for _ in range(_MAX_DRAWS):
      problem = _GENERATORS[level](rng)
      if (
        problem is not None
        and problem.text not in seen
        and split_of(problem.text) == split
      ):
        break
    else:
      raise ValueError(
        f"Found no new level-{level} problem for split {split!r} after "
        f"{index} examples; ask for fewer examples or add levels."
      )
    seen.add(problem.text)
    yield base.Example(
      problem=problem.text,
      answer_key=str(_values(problem.steps)[-1]),
      meta={"level": level, "steps": problem.steps, "misread": problem.misread},
    )


def _level1(rng: random.Random) -> Optional[_Problem]:
  """Two operands, worked place by place: 347 + 285 = (347 + 200) + 80 + 5."""
  op = rng.choice("+-*")
  if op == "*":
    a, b = rng.randint(11, 99), rng.randint(2, 9)
    steps = [_Step("*", Fraction(part), Fraction(b)) for part in _places(a)]
    if len(steps) == 2:
      steps.append(_Step("+", _Ref(0), _Ref(1)))
  else:
    a, b = (rng.randint(10, 10 ** rng.randint(2, 3) - 1) for _ in range(2))
    a, b = max(a, b), min(a, b)
    # Without a carry (or borrow) the place-by-place work is trivial.
    no_carry = (
      _carry_free_sum(a, b) == a + b
      if op == "+"
      else _borrow_free_difference(a, b) == a - b
    )
    if no_carry:
      return None
    steps = []
    for part in _places(b):
      left = _Ref(len(steps) - 1) if steps else Fraction(a)
      steps.append(_Step(op, left, Fraction(part)))
  return _Problem(f"Compute {a} {op} {b}.", tuple(steps), None)


def _level0(rng: random.Random) -> Optional[_Problem]:
  return _expression(
    rng, lambda: Fraction(rng.randint(1, 9)), False, max_value=99
  )


def _level2(rng: random.Random) -> Optional[_Problem]:
  return _expression(rng, lambda: Fraction(rng.randint(1, 20)), False)


def _level3(rng: random.Random) -> Optional[_Problem]:
  return _expression(
    rng, lambda: Fraction(rng.randint(1, 20) * rng.choice((1, 1, -1))), True
  )


def _level4(rng: random.Random) -> Optional[_Problem]:
  """a*x + b = c, solved as a*x = c - b, then x = (c - b) / a."""
  a = rng.choice([v for v in range(-12, 13) if abs(v) >= 2])
  b = rng.choice([v for v in range(-20, 21) if v])
  # Half the equations have integer solutions by construction.
  k = a * rng.randint(-12, 12) if rng.random() < 0.5 else rng.randint(-60, 60)
  if k == 0:
    return None
  c = k + b
  sign = "+" if b > 0 else "-"
  steps = (
    _Step(
      "-" if b > 0 else "+",
      Fraction(c),
      Fraction(abs(b)),
      role="move",
      prefix=f"{a}x = ",
    ),
    _Step("/", _Ref(0), Fraction(a), role="divide", prefix="x = "),
  )
  return _Problem(f"Solve {a}x {sign} {abs(b)} = {c} for x.", steps, None)


def _expression(
  rng: random.Random,
  leaf: Callable[[], Fraction],
  negatives: bool,
  max_value: int = _MAX_VALUE,
) -> Optional[_Problem]:
  """Three or four operands; steps in reading order (precedence, then left
  to right), intermediate results bounded by `max_value` and, without
  `negatives`, >= 0."""
  text = _render(_random_tree(rng, rng.randint(3, 4), leaf))
  steps = _tree_steps(_parse(text, precedence=True))
  values = _values(steps)
  if any(abs(v) > max_value or (v < 0 and not negatives) for v in values):
    return None
  if negatives and not re.search(r"(^|\()-", text):
    return None
  misread = _tree_steps(_parse(text, precedence=False))
  if _values(misread)[-1] == values[-1]:
    misread = None
  return _Problem(f"Compute {text}.", steps, misread)


_GENERATORS = {0: _level0, 1: _level1, 2: _level2, 3: _level3, 4: _level4}


def _places(n: int) -> list[int]:
  """The non-zero place values of n > 0, largest first: 307 -> [300, 7]."""
  digits = str(n)
  return [
    int(d) * 10 ** (len(digits) - 1 - i)
    for i, d in enumerate(digits)
    if d != "0"
  ]


def _random_tree(
  rng: random.Random, leaves: int, leaf: Callable[[], Fraction]
) -> _Tree:
  if leaves == 1:
    return leaf()
  left = rng.randint(1, leaves - 1)
  return (
    rng.choice("+-*"),
    _random_tree(rng, left, leaf),
    _random_tree(rng, leaves - left, leaf),
  )


def _render(tree: _Tree, leading: bool = True) -> str:
  """The text of `tree` with only the parentheses it needs.

  `leading`: the text starts the expression or follows "(", where a negative
  number needs no parentheses of its own.
  """
  if isinstance(tree, Fraction):
    return _number(tree, leading)
  op, left, right = tree
  return (
    f"{_subtree(left, op, leading, False)} {op} "
    f"{_subtree(right, op, False, True)}"
  )


def _subtree(tree: _Tree, parent_op: str, leading: bool, is_right: bool) -> str:
  if isinstance(tree, tuple):
    binds_less = _PRECEDENCE[tree[0]] < _PRECEDENCE[parent_op]
    # a - (b + c) and a - (b - c) need parentheses; a + (b - c) does not.
    if binds_less or (
      is_right
      and parent_op == "-"
      and _PRECEDENCE[tree[0]] == _PRECEDENCE[parent_op]
    ):
      return f"({_render(tree)})"
  return _render(tree, leading)


def _parse(text: str, precedence: bool) -> _Tree:
  """Parses an expression of `_render`; left-associative; `precedence=False`
  reads the operators strictly left to right (parentheses still count)."""
  tokens = re.findall(r"\d+|\S", text)
  position = 0

  def take() -> str:
    nonlocal position
    position += 1
    return tokens[position - 1]

  def primary() -> _Tree:
    token = take()
    if token == "(":
      tree = binary(1)
      take()  # ")"
      return tree
    if token == "-":
      return -Fraction(take())
    return Fraction(token)

  def binary(min_precedence: int) -> _Tree:
    tree = primary()
    while position < len(tokens) and tokens[position] in _PRECEDENCE:
      level = _PRECEDENCE[tokens[position]] if precedence else 1
      if level < min_precedence:
        break
      op = take()
      tree = (op, tree, binary(level + 1))
    return tree

  return binary(1)


def _tree_steps(tree: _Tree) -> tuple[_Step, ...]:
  """One step per operator, innermost first (post-order)."""
  steps = []

  def visit(node: _Tree) -> _Operand:
    if isinstance(node, Fraction):
      return node
    op, left, right = node
    left, right = visit(left), visit(right)
    steps.append(_Step(op, left, right))
    return _Ref(len(steps) - 1)

  visit(tree)
  return tuple(steps)


def _apply(op: str, x: Fraction, y: Fraction) -> Fraction:
  if op == "+":
    return x + y
  if op == "-":
    return x - y
  if op == "*":
    return x * y
  return x / y


def _operands(
  step: _Step, values: Sequence[Fraction]
) -> tuple[Fraction, Fraction]:
  value = lambda o: values[o.step] if isinstance(o, _Ref) else o
  return value(step.left), value(step.right)


def _values(steps: Sequence[_Step]) -> list[Fraction]:
  values = []
  for step in steps:
    values.append(_apply(step.op, *_operands(step, values)))
  return values


def _run(
  steps: Sequence[_Step], slip_index: int = -1, slip: Optional[_Slip] = None
) -> tuple[list[str], Fraction]:
  """The lines of `steps` (with `slip` at `slip_index`) and the last result."""
  values, lines = [], []
  for index, step in enumerate(steps):
    if index == slip_index:
      op, x, y, result = slip.op, slip.left, slip.right, slip.result
    else:
      x, y = _operands(step, values)
      op, result = step.op, _apply(step.op, x, y)
    values.append(result)
    lines.append(
      f"{step.prefix}{_number(x, True)} {op} {_number(y, False)} = "
      f"{_number(result, True)}"
    )
  return lines, values[-1]


def _solution(lines: Sequence[str], answer: Fraction) -> str:
  return "\n".join([*lines, FINAL_ANSWER.format(answer)])


def _number(value: Fraction, leading: bool) -> str:
  """Writes -7 where a number may start and (-7) after an operator."""
  return str(value) if leading or value >= 0 else f"({value})"


def _slips(step: _Step, x: Fraction, y: Fraction) -> dict[str, list[_Slip]]:
  """Realistic wrong versions of `step` on operands x and y, by kind."""
  result = _apply(step.op, x, y)
  slips = {}

  def add(kind, value, op=step.op, left=x, right=y):
    if value is not None and value != result:
      slips.setdefault(kind, []).append(_Slip(kind, op, left, right, value))

  if result.denominator == 1:
    for value in _digit_slips(int(result)):
      add("digit", Fraction(value))
    add("transposed", _transposed(int(result)))
  else:
    for delta in (-1, 1):
      add("numerator", result + Fraction(delta, result.denominator))
  if min(x, y, result) < 0:
    add("sign", -result)
  naturals = min(x, y) >= 0 and x.denominator == y.denominator == 1
  if step.op == "+" and naturals:
    add("dropped_carry", Fraction(_carry_free_sum(int(x), int(y))))
  if step.op == "-" and naturals and x >= y:
    add("borrow", Fraction(_borrow_free_difference(int(x), int(y))))
  if step.op == "*":
    for delta in (x, -x, y, -y):
      add("times_table", result + delta)
  if step.role == "compute":
    confused = {"+": "-", "-": "+", "*": "+"}[step.op]
    add("wrong_operation", _apply(confused, x, y))
  elif step.role == "move":
    flipped = "+" if step.op == "-" else "-"
    add("moved_sign", _apply(flipped, x, y), op=flipped)
  elif x != 0:
    add("inverted", y / x, left=y, right=x)
  return slips


def _digit_slips(value: int) -> list[int]:
  """Each digit of `value` off by one: 85 -> [75, 95, 84, 86]."""
  sign, digits = (-1 if value < 0 else 1), str(abs(value))
  slips = []
  for i, digit in enumerate(digits):
    for new in (int(digit) - 1, int(digit) + 1):
      if 0 <= new <= 9 and not (i == 0 and new == 0 and len(digits) > 1):
        slips.append(sign * int(f"{digits[:i]}{new}{digits[i + 1 :]}"))
  return slips


def _transposed(value: int) -> Optional[Fraction]:
  """The last two digits swapped (52 -> 25), if both are non-zero."""
  digits = str(abs(value))
  if len(digits) < 2 or "0" in digits[-2:]:
    return None
  swapped = int(digits[:-2] + digits[-1] + digits[-2])
  return Fraction(-swapped if value < 0 else swapped)


def _carry_free_sum(a: int, b: int) -> int:
  """a + b of naturals with every carry forgotten: 77 + 8 -> 75."""
  width = max(len(str(a)), len(str(b)))
  digits = (
    f"{(int(p) + int(q)) % 10}"
    for p, q in zip(str(a).zfill(width), str(b).zfill(width))
  )
  return int("".join(digits))


def _borrow_free_difference(a: int, b: int) -> int:
  """a - b (a >= b >= 0) taking the smaller digit from the larger in every
  place instead of borrowing: 83 - 47 -> 44."""
  width = len(str(a))
  digits = (
    f"{abs(int(p) - int(q))}"
    for p, q in zip(str(a).zfill(width), str(b).zfill(width))
  )
  return int("".join(digits))


_FINAL_ANSWER_PATTERN = re.compile(r"final answer is\s{0,4}\$([^$]{0,64})\$")
# One level of nested braces, enough for \frac{3}{4}.
_BOXED_PATTERN = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]{0,16}\}){0,64})\}")


def _extract_answer(response: str, first: bool = False) -> Optional[str]:
  """The last (or, with `first`, the first) "final answer is $X$" or
  \\boxed{X} in the response, stripped."""
  text = (
    response[:_MAX_RESPONSE_CHARS] if first else response[-_MAX_RESPONSE_CHARS:]
  )
  matches = [
    m
    for pattern in (_FINAL_ANSWER_PATTERN, _BOXED_PATTERN)
    for m in pattern.finditer(text)
  ]
  if not matches:
    return None
  pick = min if first else max
  answer = pick(matches, key=lambda m: m.start())[1].strip()
  return answer or None
