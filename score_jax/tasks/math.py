"""MATH: the paper's prompts, final-answer extraction and answer equivalence.

A response states its answer as "Final Answer: The final answer is $X$. I hope
it is correct." (the format the prompt asks for) or in `\\boxed{X}`; whichever
comes last in the response wins. Equivalence with the reference is decided by
math-verify (sympy underneath: fractions, radicals, percent, degrees, units,
intervals, sets, tuples, matrices, equations and inequalities), behind cheap
guards: an exact-text fast path, a word comparison for text answers (where a
symbolic product would call anagrams equal), and size and nesting caps that
reject pathological answers before any parsing. The hard backstop against a
hanging or crashing grader is `rewards.RewardPool`.
"""

import functools
import re
import threading
from typing import Any, Optional, Sequence

import math_verify
from math_verify import errors as math_verify_errors

from score_jax.tasks import base
from score_jax.tasks import math_data

_ANSWER_FORMAT = (
    'write it in the form "Final Answer: The final answer is $answer$. '
    'I hope it is correct."')
FIRST_TURN_PROMPT = (
    "You are a math expert. When you respond, respond only with the Solution "
    "of the final Problem, thinking step by step. At the end of the Solution, "
    f"when you give your final answer, {_ANSWER_FORMAT}")
INSTRUCTION = (
    "There might be an error in the solution above because of lack of "
    "understanding of the question. Please correct the error, if any, and "
    "rewrite the solution. Only output the final solution! At the end of the "
    f"Solution, when you give your final answer, {_ANSWER_FORMAT}")

# Only the end of a response can hold its final answer; scanning a bounded
# tail keeps extraction linear-time and cheap on runaway generations.
MAX_RESPONSE_CHARS = 20_000
# The longest MATH reference answers (matrices of fractions) are a few
# hundred characters; anything far longer is not an answer.
MAX_ANSWER_CHARS = 1_000
MAX_NESTING = 50

_FINAL_ANSWER = re.compile(r"final answer\s*(?:is\b|:)\s*:?\s*", re.IGNORECASE)
_HOPE = re.compile(r"\.?\s*I hope it is correct.*", re.IGNORECASE | re.DOTALL)
_SCIENTIFIC = re.compile(r"^([-+]?\d+(?:\.\d+)?)\s*[eE]\s*([-+]?\d+)$")
_TEXT_WRAPPER = re.compile(
    r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_WORDS = re.compile(r"^[a-z]+(?: [a-z]+)*$")
_LATEX_SPACING = re.compile(r"\\left|\\right|\\[,;:! ]|\s|\$")
_LATEX_FRACTIONS = re.compile(r"\\[dt]frac")

# math-verify's own parse/compare limits (signal.alarm, whole seconds). They
# let a slow sympy call give up gracefully where alarms work (the main thread
# of a process, e.g. a RewardPool worker); the pool's kill is the backstop.
_DEFAULT_GRADING_TIMEOUT_S = 1
_LATEX_ONLY = (math_verify.LatexExtractionConfig(boxed_match_priority=0),)
_WARM_UP_PAIRS = (
    (r"\frac{1}{2}", "0.5"), ("(1,2)", "[1,3]"), ("x > 3", r"(3, \infty)"),
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}",
     r"\begin{pmatrix}1\\3\end{pmatrix}"),
    (r"\{1,2\}", "1,2"), (r"2\sqrt{2}", r"\sqrt{8}"))


def extract_final_answer(response: str) -> Optional[str]:
  """The final answer stated in `response`, or None if it states none.

  Looks for "final answer is $X$" (also `\\(X\\)`, or plain text up to the end
  of the line) and for `\\boxed{X}`; the one that starts last wins.
  """
  text = response[-MAX_RESPONSE_CHARS:]
  candidates = []
  final_answers = list(_FINAL_ANSWER.finditer(text))
  if final_answers:
    statement = final_answers[-1]
    candidates.append(
        (statement.start(), _stated_answer(text[statement.end():])))
  boxes = list(math_data.BOXED.finditer(text))
  if boxes:
    candidates.append(
        (boxes[-1].start(), math_data.last_boxed(text[boxes[-1].start():])))
  if not candidates:
    return None
  _, answer = max(candidates, key=lambda candidate: candidate[0])
  if answer is not None and math_data.BOXED.search(answer):
    answer = math_data.last_boxed(answer)
  if answer is None:
    return None
  answer = answer.strip().rstrip(".").strip()
  return answer or None


def answers_match(
    prediction: str, reference: str,
    timeout_s: Optional[int] = _DEFAULT_GRADING_TIMEOUT_S) -> bool:
  """Whether `prediction` is mathematically equivalent to `reference`.

  Args:
    prediction: an extracted answer (LaTeX or plain), without "$" delimiters.
    reference: the reference answer, e.g. a MATH `answer` field.
    timeout_s: math-verify's per-step limit in whole seconds, or None. Only
      used in a main thread, where signal alarms work.
  """
  prediction, reference = prediction.strip(), reference.strip()
  if not prediction or not reference:
    return False
  if not (_within_limits(prediction) and _within_limits(reference)):
    return False
  if _canonical(prediction) == _canonical(reference):
    return True
  prediction_words = _as_words(prediction)
  reference_words = _as_words(reference)
  if prediction_words is not None and reference_words is not None:
    return prediction_words == reference_words
  if threading.current_thread() is not threading.main_thread():
    timeout_s = None
  gold = _parse(reference, timeout_s)
  target = _parse(prediction, timeout_s)
  if not gold or not target:
    return False
  return math_verify.verify(list(gold), list(target),
                            timeout_seconds=timeout_s,
                            allow_set_relation_comp=True)


class MathTask(base.Task):
  """MATH with the paper's zero-shot prompt and self-correction instruction.

  Examples come from `{data_dir}/{split}.jsonl` (e.g. PRM800K's
  `math_splits/`: 12k train, MATH500 test), read directly or, with
  `tfds_dir`, through an array_record copy built there on first use.
  """

  name = "math"
  first_turn_prompt = FIRST_TURN_PROMPT
  instruction = INSTRUCTION

  def __init__(self, data_dir: Optional[str] = None,
               tfds_dir: Optional[str] = None,
               grading_timeout_s: Optional[int] = _DEFAULT_GRADING_TIMEOUT_S):
    self.data_dir = data_dir
    self.tfds_dir = tfds_dir
    self.grading_timeout_s = grading_timeout_s
    self._examples = {}
    # Sympy imports and builds much lazily on first use (~1 s). Paying that
    # here, before a RewardPool forks, lets every worker, including those
    # that replace killed ones, start warm.
    for prediction, reference in _WARM_UP_PAIRS:
      answers_match(prediction, reference, grading_timeout_s)

  def examples(self, split: str) -> Sequence[base.Example]:
    if self.data_dir is None:
      raise ValueError(
          "MathTask needs data_dir: a directory holding {split}.jsonl files "
          f"({math_data.LAYOUT}), e.g. PRM800K's prm800k/math_splits.")
    if split not in self._examples:
      if self.tfds_dir is None:
        self._examples[split] = math_data.read_split(self.data_dir, split)
      else:
        self._examples[split] = math_data.read_tfds(
            split, manual_dir=self.data_dir, data_dir=self.tfds_dir)
    return self._examples[split]

  def format_problem(self, example: base.Example) -> str:
    # The prompt speaks of "the final Problem": label it as in the Minerva
    # format that the answer template comes from (exact layout unspecified).
    return f"{self.first_turn_prompt}\n\nProblem:\n{example.problem}"

  def reward(self, response: str, reference: Any) -> float:
    try:
      answer = extract_final_answer(response)
    except Exception:  # pylint: disable=broad-except
      return 0.0
    if answer is not None and not _within_limits(answer.strip()):
      raise base.Rejected(f"an answer of {len(answer)} characters or nested "
                          f"deeper than {MAX_NESTING}")
    if answer is None and len(response) > MAX_RESPONSE_CHARS:
      raise base.Rejected(f"a response of {len(response)} characters with no "
                          f"final answer in its last {MAX_RESPONSE_CHARS}")
    try:
      return float(answer is not None and answers_match(
          answer, str(reference), self.grading_timeout_s))
    # (math-verify's TimeoutException derives from BaseException.)
    except math_verify_errors.TimeoutException as e:
      raise base.Rejected(f"grading took over {self.grading_timeout_s} s") from e
    # A grader failure on odd model output is a wrong answer, not a crash.
    except Exception:  # pylint: disable=broad-except
      return 0.0

  def extract_answer(self, response: str) -> Optional[str]:
    return extract_final_answer(response)


def _stated_answer(rest: str) -> Optional[str]:
  """The answer at the start of `rest`, the text after "final answer is"."""
  for opening, closing in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"),
                           ("\\[", "\\]")):
    if rest.startswith(opening):
      end = _find_unescaped(rest, closing, len(opening))
      return None if end < 0 else rest[len(opening):end]
  return _HOPE.sub("", rest.split("\n", 1)[0])


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


@functools.lru_cache(maxsize=4096)
def _parse(answer: str, timeout_s: Optional[int]) -> tuple:
  """math-verify's reading of one answer (cached: references repeat)."""
  scientific = _SCIENTIFIC.match(answer)
  if scientific:
    # LaTeX has no e-notation: "1.5e3" would read as 1.5 * e * 3.
    answer = rf"{scientific.group(1)} \times 10^{{{scientific.group(2)}}}"
  return tuple(math_verify.parse(
      f"${answer}$", extraction_config=_LATEX_ONLY, parsing_timeout=timeout_s))
