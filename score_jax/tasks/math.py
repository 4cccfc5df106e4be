"""MATH: the paper's prompts, final-answer extraction and answer equivalence.

A response states its answer as "Final Answer: The final answer is $X$. I hope
it is correct." (the format the prompt asks for) or in `\\boxed{X}`; whichever
comes last in the response wins; without either, "The answer is X" counts. An
answer may come in parts: boxes that follow one another ("\\boxed{1},
\\boxed{2}", "k = \\boxed{45}, n = \\boxed{2}") or math segments ("$x = 1$
or $x = 3$"), which are graded together as the list, set, tuple or named
values they spell. A statement in prose ("The volume of $V$ is 120.") is
graded by the value after its copula ("is", "are", ...).

Equivalence with the answer key is decided by math-verify (sympy underneath:
fractions, radicals, percent, degrees, units, intervals, sets, tuples,
matrices, equations and inequalities), behind cheap guards: an exact-text
fast path, a word comparison for text answers (where a symbolic product would
call anagrams equal), and size and nesting caps that reject pathological
answers before any parsing. Grading time is limited in CPU time, so that an
answer's reward does not depend on how busy the machine is; the hard backstop
against a hanging or crashing grader is `rewards.RewardPool`.
"""

import functools
import logging
import re
import threading
from typing import Any, Optional, Sequence

import math_verify

from score_jax.tasks import base, cpu_time, math_data

_ANSWER_FORMAT = (
  'write it in the form "Final Answer: The final answer is $answer$. '
  'I hope it is correct."'
)
FIRST_TURN_PROMPT = (
  "You are a math expert. When you respond, respond only with the Solution "
  "of the final Problem, thinking step by step. At the end of the Solution, "
  f"when you give your final answer, {_ANSWER_FORMAT}"
)
INSTRUCTION = (
  "There might be an error in the solution above because of lack of "
  "understanding of the question. Please correct the error, if any, and "
  "rewrite the solution. Only output the final solution! At the end of the "
  f"Solution, when you give your final answer, {_ANSWER_FORMAT}"
)

# Only the end of a response can hold its final answer; scanning a bounded
# tail keeps extraction linear-time and cheap on runaway generations.
MAX_RESPONSE_CHARS = 20_000
# The longest MATH answers (matrices of fractions) are a few
# hundred characters; anything far longer is not an answer.
MAX_ANSWER_CHARS = 1_000
MAX_NESTING = 50

# (Markdown may bold the words: "**Final Answer**: $5$".)
_FINAL_ANSWER = re.compile(
  r"final answer\**\s*(?:is\b|:)\s*:?\**\s*", re.IGNORECASE
)
_ANSWER = re.compile(r"\banswer\**\s*(?:is\b|:)\s*:?\**\s*", re.IGNORECASE)
# Around an answer: spaces, markdown bold, a full stop.
_EDGES = re.compile(r"^[\s*]+|[\s.*]+$")
_HOPE = re.compile(r"\.?\s*I hope it is correct.*", re.IGNORECASE | re.DOTALL)
# Prose states its answer after a copula: "The largest $n$ is 34."
_COPULA = re.compile(r"\b(?:is|are|was|were|equals)\b:?", re.IGNORECASE)
_VALUE = re.compile(r"[\d$]")  # A digit or (masked) math.
_PLAIN_VALUE = re.compile(r"\d|\bnot\b", re.IGNORECASE)
# A clause after a plain value: "5, which is prime".
_CLAUSE = re.compile(r",\s*(?!(?:and|or)\b)[A-Za-z]{3,}")
_MATH_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_MATH_OPENING = re.compile(r"(?<!\\)\$|\\\(|\\\[")
# What may separate the parts of one answer: "$1$, $2$ and $3$".
_SEPARATOR = r"(?:\s|,|;|\band\b|\bor\b)"
_BETWEEN_SEGMENTS = re.compile(rf"{_SEPARATOR}*")
# Boxes may also sit in math segments or an aligned display, with a name
# before each: "$k = \boxed{45}, n = \boxed{2}$", "x &= \boxed{3} \\ y &= ...".
_BOX_SEPARATOR = (
  r"(?:\s|,|;|\$|&|\\\\|\\[,;:! ()\[\]]|\\q?quad\b|"
  r"\\text\s*\{\s*(?:and|or|,)?\s*\}|\band\b|\bor\b)"
)
_LABEL = (
  r"(?<![\w\\}])(?P<label>(?:[A-Za-z]+|\\[A-Za-z]+)"
  r"(?:_(?:\{[^{}]*\}|\w))?'*)\s*&?=\s*[\s$]*"
)
_BETWEEN_BOXES = re.compile(rf"{_BOX_SEPARATOR}*(?:{_LABEL})?")
_LABEL_BEFORE = re.compile(rf"{_LABEL}$")
# Boxes farther apart than this are separate statements, not one answer.
_MAX_BOX_GAP = 100
_SCIENTIFIC = re.compile(r"^([-+]?\d+(?:\.\d+)?)\s*[eE]\s*([-+]?\d+)$")
_TEXT_WRAPPER = re.compile(
  r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}"
)
_WORDS = re.compile(r"^[a-z]+(?: [a-z]+)*$")
_LATEX_SPACING = re.compile(r"\\left|\\right|\\[,;:! ]|\s|\$")
_LATEX_FRACTIONS = re.compile(r"\\[dt]frac")

# CPU seconds that grading one answer may take. Typical answers take a few
# milliseconds; a new shape of answer costs a worker up to ~0.4 s once, while
# the LaTeX parser builds its tables for it (`S_{MBCN}:S=7:32`).
DEFAULT_GRADING_CPU_S = 1.0
_LATEX_ONLY = (math_verify.LatexExtractionConfig(boxed_match_priority=0),)
_WARM_UP_PAIRS = (
  (r"\frac{1}{2}", "0.5"),
  ("(1,2)", "[1,3]"),
  ("x > 3", r"(3, \infty)"),
  (
    r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}",
    r"\begin{pmatrix}1\\3\end{pmatrix}",
  ),
  (r"\{1,2\}", "1,2"),
  (r"2\sqrt{2}", r"\sqrt{8}"),
)


class _WithoutTimeoutWarning(logging.Filter):
  """Drops math-verify's warning that its own (wall-clock) timeouts are off:
  grading here runs under `cpu_time.cpu_time_limit` instead."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "Timeout is disabled" not in record.getMessage()


for _logger in ("math_verify.parser", "math_verify.grader"):
  logging.getLogger(_logger).addFilter(_WithoutTimeoutWarning())


def extract_final_answer(response: str) -> Optional[str]:
  """The final answer stated in `response`, or None if it states none.

  Looks for "final answer is $X$" (also `\\(X\\)`, or plain text up to the end
  of the line) and for `\\boxed{X}`; the one that starts last wins. Without
  either, looks for "answer is X". An answer in parts comes back with its
  parts joined by ", " ("k = 45, n = 2").
  """
  parts = _final_answer_parts(response)
  return None if parts is None else ", ".join(parts)


def answers_match(
  prediction: str, answer_key: str, cpu_budget_s: Optional[float] = None
) -> bool:
  """Whether `prediction` is mathematically equivalent to `answer_key`.

  Args:
    prediction: an extracted answer (LaTeX or plain), without "$" delimiters.
    answer_key: the answer it is graded against, e.g. a MATH `answer`
      field.
    cpu_budget_s: CPU seconds the comparison may take, or None for no limit.
      Only applied in the main thread (it uses a signal); past it,
      `cpu_time.CpuTimeExceeded` is raised.

  Returns:
    Whether they are equivalent; False also when either is empty or over the
    size and nesting caps.
  """
  prediction, answer_key = prediction.strip(), answer_key.strip()
  if not prediction or not answer_key:
    return False
  if not (_within_limits(prediction) and _within_limits(answer_key)):
    return False
  if _canonical(prediction) == _canonical(answer_key):
    return True
  prediction_words = _as_words(prediction)
  answer_key_words = _as_words(answer_key)
  if prediction_words is not None and answer_key_words is not None:
    return prediction_words == answer_key_words
  if (
    cpu_budget_s is None
    or threading.current_thread() is not threading.main_thread()
  ):
    return _verify(prediction, answer_key)
  with cpu_time.cpu_time_limit(cpu_budget_s):
    return _verify(prediction, answer_key)


class MathTask(base.Task):
  """MATH with the paper's zero-shot prompt and self-correction instruction.

  Examples come from `{data_dir}/{split}.jsonl` (e.g. PRM800K's
  `math_splits/`: 12k train, MATH500 test), read directly or, with
  `tfds_dir`, through an array_record copy built there on first use.
  """

  name = "math"
  first_turn_prompt = FIRST_TURN_PROMPT
  instruction = INSTRUCTION

  def __init__(
    self,
    data_dir: Optional[str] = None,
    tfds_dir: Optional[str] = None,
    grading_cpu_s: Optional[float] = DEFAULT_GRADING_CPU_S,
  ):
    self.data_dir = data_dir
    self.tfds_dir = tfds_dir
    self.grading_cpu_s = grading_cpu_s
    self._examples = {}
    # Sympy imports and builds much lazily on first use (~1 s). Paying that
    # here, before a RewardPool forks, lets every worker, including those
    # that replace killed ones, start warm.
    for prediction, answer_key in _WARM_UP_PAIRS:
      answers_match(prediction, answer_key)

  def examples(self, split: str) -> Sequence[base.Example]:
    """The examples of `{data_dir}/{split}.jsonl` in file order, read once
    (see `base.Task.examples`); raises ValueError without a data_dir."""
    if self.data_dir is None:
      raise ValueError(
        "MathTask needs data_dir: a directory holding {split}.jsonl files "
        f"({math_data.LAYOUT}), e.g. PRM800K's prm800k/math_splits."
      )
    if split not in self._examples:
      if self.tfds_dir is None:
        self._examples[split] = math_data.read_split(self.data_dir, split)
      else:
        self._examples[split] = math_data.read_tfds(
          split, manual_dir=self.data_dir, data_dir=self.tfds_dir
        )
    return self._examples[split]

  def format_problem(self, example: base.Example) -> str:
    """The paper's prompt, then "Problem:" and `example`'s problem."""
    # The prompt speaks of "the final Problem": label it as in the Minerva
    # format that the answer template comes from (exact layout unspecified).
    return f"{self.first_turn_prompt}\n\nProblem:\n{example.problem}"

  def reward(self, response: str, answer_key: Any) -> float:
    """Grades one attempt by answer equivalence (see `base.Task.reward`).

    Args:
      response: the attempt's text; graded is its final answer
        (`extract_final_answer`), its parts read in the answer key's form.
      answer_key: the problem's answer (its str() is compared).

    Returns:
      1.0 if the final answer is equivalent to `answer_key` (`answers_match`
      within `grading_cpu_s`), else 0.0, also when there is none or the
      grader fails.

    Raises:
      base.Rejected: for a response over MAX_RESPONSE_CHARS with no final
        answer in its tail, an answer over the size or nesting caps, or
        grading over `grading_cpu_s` of CPU time.
    """
    try:
      parts = _final_answer_parts(response)
    except Exception:  # pylint: disable=broad-except
      return 0.0
    if parts is None:
      if len(response) > MAX_RESPONSE_CHARS:
        raise base.Rejected(
          f"a response of {len(response)} characters with "
          f"no final answer in its last {MAX_RESPONSE_CHARS}"
        )
      return 0.0
    answer_key = str(answer_key)
    answer = _combined(parts, answer_key)
    if not _within_limits(answer):
      raise base.Rejected(
        f"an answer of {len(answer)} characters or nested "
        f"deeper than {MAX_NESTING}"
      )
    try:
      return float(answers_match(answer, answer_key, self.grading_cpu_s))
    except cpu_time.CpuTimeExceeded as e:
      raise base.Rejected(
        f"grading took over {self.grading_cpu_s:g} s of CPU time"
      ) from e
    # A grader failure on odd model output is a wrong answer, not a crash.
    except Exception:  # pylint: disable=broad-except
      return 0.0

  def extract_answer(self, response: str) -> Optional[str]:
    """`extract_final_answer(response)`."""
    return extract_final_answer(response)


def _final_answer_parts(response: str) -> Optional[list[str]]:
  """The parts of the final answer in `response`, or None (see
  `extract_final_answer`)."""
  text = response[-MAX_RESPONSE_CHARS:]
  candidates = [
    candidate
    for candidate in (_last_statement(_FINAL_ANSWER, text), _last_boxes(text))
    if candidate is not None
  ]
  if not candidates:
    # Only then a plainer statement ("The answer is $5$."): one after a box
    # is more often a remark ("the answer is consistent") than an answer.
    plain = _last_statement(_ANSWER, text)
    if plain is None:
      return None
    candidates = [plain]
  _, parts = max(candidates, key=lambda candidate: candidate[0])
  if parts is None or None in parts:  # Truncated.
    return None
  parts = [_EDGES.sub("", part) for part in parts]
  return [part for part in parts if part] or None


def _last_statement(
  pattern: re.Pattern, text: str
) -> Optional[tuple[int, Optional[list[str]]]]:
  """Where the last statement that `pattern` opens starts and its parts."""
  statements = list(pattern.finditer(text))
  if not statements:
    return None
  return statements[-1].start(), _stated_parts(text[statements[-1].end() :])


def _stated_parts(rest: str) -> Optional[list[str]]:
  """The answer at the start of `rest`, the text after "final answer is"."""
  if _MATH_OPENING.match(rest):
    return _math_run(rest, 0) or None
  line = _HOPE.sub("", rest.split("\n", 1)[0])
  segments = _math_segments(line)
  predicate_start = _predicate_start(line, segments)
  segments = [segment for segment in segments if segment[0] >= predicate_start]
  # The math states the value ("is the number $34$"), unless words before it
  # do too ("is 0.75 or $\frac35$", "is not $5$").
  if segments and not _PLAIN_VALUE.search(
    line, predicate_start, segments[0][0]
  ):
    return _math_run(line, segments[0][0])
  pieces, position = [], predicate_start
  for start, end, content in segments:
    pieces += [line[position:start], content]
    position = end
  predicate = "".join(pieces) + line[position:]
  clause = _CLAUSE.search(predicate)
  return [predicate[: clause.start()] if clause else predicate]


def _predicate_start(line: str, segments: list[tuple[int, int, str]]) -> int:
  """Where the value stated by a line of prose starts: after its last copula
  outside math that math or a number follows ("The largest $n$ is 34", "The
  answer is 5, which is prime"), else its last copula, else 0."""
  pieces, position = [], 0
  for start, end, _ in segments:
    pieces += [line[position:start], "$" * (end - start)]
    position = end
  masked = "".join(pieces) + line[position:]
  copulas = list(_COPULA.finditer(masked))
  last_value = max(
    (value.start() for value in _VALUE.finditer(masked)), default=-1
  )
  for copula in reversed(copulas):
    if copula.end() <= last_value:
      return copula.end()
  if copulas and masked[copulas[-1].end() :].strip(" ."):
    return copulas[-1].end()
  return 0


def _math_segments(line: str) -> list[tuple[int, int, str]]:
  """(start, end, content) of each math segment (`$...$`, `\\(...\\)`) in
  `line`."""
  segments = []
  opening = _MATH_OPENING.search(line)
  while opening:
    segment = _math_segment_at(line, opening.start())
    if segment is None:
      break
    content, end = segment
    segments.append((opening.start(), end, content))
    opening = _MATH_OPENING.search(line, end)
  return segments


def _math_run(text: str, start: int) -> list[str]:
  """The contents of the math segments from `start` on that only separators
  (commas, "and", "or") part: ["1", "2", "3"] for "$1$, $2$ and $3$."."""
  parts = []
  segment = _math_segment_at(text, start)
  while segment is not None:
    content, end = segment
    parts.append(content)
    segment = _math_segment_at(text, _BETWEEN_SEGMENTS.match(text, end).end())
  return parts


def _math_segment_at(text: str, start: int) -> Optional[tuple[str, int]]:
  """The content and end of the math segment opening at `start`, or None."""
  for opening, closing in _MATH_DELIMITERS:
    if text.startswith(opening, start):
      content_start = start + len(opening)
      end = _find_unescaped(text, closing, content_start)
      return None if end < 0 else (text[content_start:end], end + len(closing))
  return None


def _last_boxes(text: str) -> Optional[tuple[int, list[Optional[str]]]]:
  """Where the last run of boxes starts and its parts, or None if no box.

  A run is the last box and the boxes before it that only separators and
  names part ("\\boxed{1}, \\boxed{2}", "$k = \\boxed{45}$, $n = \\boxed{2}$");
  in a run of several, a box's name goes with its value ("k = 45"). A part
  is None if its box is truncated.
  """
  commands = list(math_data.BOXED.finditer(text))
  if not commands:
    return None
  run = [math_data.box_at(text, commands[-1])]
  labels = []
  for command in reversed(commands[:-1]):
    # A box that does not end before the run encloses it: the run is inside.
    box = math_data.box_at(text, command, limit=run[0].start)
    if box.argument is None or run[0].start - box.end > _MAX_BOX_GAP:
      break
    between = _BETWEEN_BOXES.fullmatch(text, box.end, run[0].start)
    if between is None:
      break
    run.insert(0, box)
    labels.insert(0, between.group("label"))
  if len(run) == 1:
    return run[0].start, [run[0].argument]
  first_label = _LABEL_BEFORE.search(
    text, max(0, run[0].start - _MAX_BOX_GAP), run[0].start
  )
  labels.insert(0, first_label.group("label") if first_label else None)
  return run[0].start, [
    f"{label} = {box.argument}" if label else box.argument
    for label, box in zip(labels, run)
  ]


def _combined(parts: list[str], answer_key: str) -> str:
  """One answer from its parts, in the answer key's form where it has one.

  The parts joined by commas read as a list or a set of values (or named
  values); when the answer key is a tuple, they are one too, so that order
  counts and repeats stay ("\\boxed{5}, \\boxed{5}" is (5, 5)).
  """
  joined = ", ".join(parts)
  if len(parts) > 1 and _is_tuple(answer_key):
    return f"({joined})"
  return joined


def _is_tuple(answer: str) -> bool:
  """Whether `answer` is one parenthesised group with a comma inside it."""
  body = re.sub(r"\\left|\\right", "", answer).strip()
  if not (body.startswith("(") and body.endswith(")")):
    return False
  depth = 0
  has_comma = False
  for position, char in enumerate(body):
    if char in "([{":
      depth += 1
    elif char in ")]}":
      depth -= 1
      if depth == 0 and position < len(body) - 1:
        return False  # "(1,2),(3,4)": the first group closes early.
    elif char == "," and depth == 1:
      has_comma = True
  return has_comma


def _find_unescaped(text: str, delimiter: str, start: int) -> int:
  """The index of the first `delimiter` at or after `start` not preceded by a
  backslash (so `\\$5` stays inside `$...$`), or -1."""
  while True:
    index = text.find(delimiter, start)
    if index <= 0 or text[index - 1] != "\\" or delimiter[0] == "\\":
      return index
    start = index + 1


def _within_limits(answer: str) -> bool:
  """Cheap guard against inputs that would make parsing slow or recursive."""
  if len(answer) > MAX_ANSWER_CHARS:
    return False
  depth = 0
  for char in answer:
    if char in "{([":
      depth += 1
      if depth > MAX_NESTING:
        return False
    elif char in "})]":
      depth -= 1
  return True


def _canonical(answer: str) -> str:
  """Text that differs only in spacing and sizing commands compares equal."""
  return _LATEX_FRACTIONS.sub(r"\\frac", _LATEX_SPACING.sub("", answer))


def _as_words(answer: str) -> Optional[str]:
  """The answer as lowercase words ("Monday", "\\text{east}"), or None.

  Word answers are compared as text: sympy would read "Evelyn" as the product
  E*v*e*l*y*n and call it equal to any anagram. One- and two-letter answers
  stay symbolic (variables, "xy").
  """
  words = _TEXT_WRAPPER.sub(r"\1", answer).strip().rstrip(".").lower()
  words = " ".join(words.split())
  if _WORDS.match(words) and max(len(word) for word in words.split()) >= 3:
    return words
  return None


def _verify(prediction: str, answer_key: str) -> bool:
  """math-verify's verdict on two answers, without its own timeouts."""
  gold = _parse(answer_key)
  target = _parse(prediction)
  if not gold or not target:
    return False
  return math_verify.verify(
    list(gold), list(target), timeout_seconds=None, allow_set_relation_comp=True
  )


@functools.lru_cache(maxsize=4096)
def _parse(answer: str) -> tuple:
  """math-verify's reading of one answer (cached: answer keys repeat)."""
  scientific = _SCIENTIFIC.match(answer)
  if scientific:
    # LaTeX has no e-notation: "1.5e3" would read as 1.5 * e * 3.
    answer = rf"{scientific.group(1)} \times 10^{{{scientific.group(2)}}}"
  return tuple(
    math_verify.parse(
      f"${answer}$", extraction_config=_LATEX_ONLY, parsing_timeout=None
    )
  )
