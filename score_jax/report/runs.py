"""Reading a run directory or a results root of runs.

A run directory is a training workdir: metrics.jsonl (per training step) and
eval/<step>/ with metrics.json, transcripts.jsonl and optionally scaling.json.
A results root holds runs as immediate subdirectories (and may be a run itself).

Bad input raises ReportError, whose message says what to do.
"""

import dataclasses
import json
import math
import os
from typing import Iterator, Optional, Sequence


class ReportError(Exception):
  """Bad input; the message says what is wrong and what to do."""


@dataclasses.dataclass
class Evaluation:
  step: int
  metrics: dict  # eval/<step>/metrics.json; {} when absent
  transcripts: Optional[list[dict]]  # None when transcripts.jsonl is absent
  scaling: Optional[dict]


@dataclasses.dataclass
class Run:
  name: str
  path: str
  training: list[dict]  # metrics.jsonl, one record per step, by step
  evaluations: list[Evaluation]  # by step


def _read_text(path: str) -> str:
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except (OSError, ValueError) as e:
    raise ReportError(f"cannot read {path}: {e}; check the file.") from e


def _parse(text: str, where: str, fix: str):
  try:
    return json.loads(text)
  except ValueError as e:
    raise ReportError(f"{where}: not valid JSON ({e}); {fix}.") from e


def _read_json_object(path: str) -> dict:
  fix = "rerun the evaluation or delete the file"
  value = _parse(_read_text(path), path, fix)
  if not isinstance(value, dict):
    raise ReportError(f"{path}: expected a JSON object; {fix}.")
  return value


def _read_jsonl(path: str) -> Iterator[tuple[int, dict]]:
  """(line number, object) for each non-blank line."""
  for number, line in enumerate(_read_text(path).splitlines(), start=1):
    if not line.strip():
      continue
    where = f"{path} line {number}"
    value = _parse(line, where, "fix or delete that line")
    if not isinstance(value, dict):
      raise ReportError(
        f"{where}: expected a JSON object; fix or delete that line."
      )
    yield number, value


def read_training(path: str) -> list[dict]:
  """The records of metrics.jsonl at `path`, one per step by step; of a
  step logged twice (a resumed run logs the steps after its last
  checkpoint again), the later. Raises ReportError on a line that is not a
  JSON object with an integer 'step'."""
  records = {}
  for number, record in _read_jsonl(path):
    if not isinstance(record.get("step"), int):
      raise ReportError(
        f"{path} line {number}: no integer 'step'; fix or delete that line."
      )
    # A resumed run logs the steps after its last checkpoint again; the later
    # record is the one the checkpoint history continues from.
    records[record["step"]] = record
  return [records[step] for step in sorted(records)]


def read_transcripts(path: str) -> list[dict]:
  """The transcripts of transcripts.jsonl at `path`, in order. Raises
  ReportError unless there is one or more and each has 'attempts' (two or
  more strings) and 'rewards' (two or more numbers)."""
  transcripts = []
  for number, t in _read_jsonl(path):
    attempts, rewards = t.get("attempts"), t.get("rewards")
    if not (
      isinstance(attempts, list)
      and len(attempts) >= 2
      and all(isinstance(a, str) for a in attempts)
      and isinstance(rewards, list)
      and len(rewards) >= 2
      and all(isinstance(r, (int, float)) for r in rewards)
    ):
      raise ReportError(
        f"{path} line {number}: needs 'attempts' (two or "
        "more strings) and 'rewards' (as many numbers); "
        "rerun the evaluation."
      )
    transcripts.append(t)
  if not transcripts:
    raise ReportError(f"{path} is empty; rerun the evaluation.")
  return transcripts


def _read_scaling(path: str) -> dict:
  scaling = _read_json_object(path)
  lists = [
    scaling.get(k)
    for k in (
      "n",
      "majority_of_first_attempts",
      "majority_of_corrected_attempts",
    )
  ]
  if not (
    all(isinstance(v, list) for v in lists)
    and len({len(v) for v in lists}) == 1
    and lists[0]
    and all(isinstance(n, int) and n > 0 for n in lists[0])
    and all(
      isinstance(a, (int, float)) and math.isfinite(a)
      for a in lists[1] + lists[2]
    )
  ):
    raise ReportError(
      f"{path}: needs lists 'n' (positive integers), "
      "'majority_of_first_attempts' and "
      "'majority_of_corrected_attempts' (numbers) of one "
      "length; rerun the scaling evaluation."
    )
  return scaling


def read_evaluation(directory: str, step: int) -> Optional[Evaluation]:
  """The evaluation of one step, checked (ReportError if malformed).

  Args:
    directory: eval/<step>/ of a run, with metrics.json, transcripts.jsonl
      and scaling.json, each optional.
    step: the step it evaluated.

  Returns:
    The evaluation (its metrics {} and transcripts and scaling None where
    their file is absent), or None if neither metrics.json nor
    transcripts.jsonl is there yet.
  """
  paths = {
    name: os.path.join(directory, name)
    for name in ("metrics.json", "transcripts.jsonl", "scaling.json")
  }
  exists = {name: os.path.isfile(path) for name, path in paths.items()}
  if not (exists["metrics.json"] or exists["transcripts.jsonl"]):
    return None
  return Evaluation(
    step=step,
    metrics=(
      _read_json_object(paths["metrics.json"]) if exists["metrics.json"] else {}
    ),
    transcripts=(
      read_transcripts(paths["transcripts.jsonl"])
      if exists["transcripts.jsonl"]
      else None
    ),
    scaling=(
      _read_scaling(paths["scaling.json"]) if exists["scaling.json"] else None
    ),
  )


def _is_run(path: str) -> bool:
  return os.path.isdir(os.path.join(path, "eval")) or os.path.isfile(
    os.path.join(path, "metrics.jsonl")
  )


def read_run(path: str) -> Run:
  """The run in the directory `path`, named after it: its metrics.jsonl
  ([] if absent) and the evaluations of eval/<step>/ that have results, by
  step."""
  eval_dir = os.path.join(path, "eval")
  steps = sorted(
    int(name)
    for name in (os.listdir(eval_dir) if os.path.isdir(eval_dir) else [])
    if name.isdigit()
  )
  evaluations = [
    read_evaluation(os.path.join(eval_dir, str(step)), step) for step in steps
  ]
  training_path = os.path.join(path, "metrics.jsonl")
  return Run(
    name=os.path.basename(os.path.abspath(path)),
    path=path,
    training=(
      read_training(training_path) if os.path.isfile(training_path) else []
    ),
    evaluations=[e for e in evaluations if e is not None],
  )


def read_runs(directory: str) -> list[Run]:
  """The runs of a run directory or of a results root (which may be both)."""
  if not os.path.isdir(directory):
    raise ReportError(
      f"{directory} is not a directory; pass a run directory "
      "(with eval/<step>/) or a results root whose "
      "subdirectories are runs."
    )
  subdirectories = sorted(
    os.path.join(directory, name) for name in os.listdir(directory)
  )
  paths = ([directory] if _is_run(directory) else []) + [
    p for p in subdirectories if os.path.isdir(p) and _is_run(p)
  ]
  runs = [read_run(path) for path in paths]
  if not any(run.evaluations for run in runs):
    raise ReportError(
      f"no eval results under {directory}: expected "
      "eval/<step>/metrics.json in it or in its "
      "subdirectories; evaluate first (python -m "
      "score_jax.main --mode=eval --workdir=...)."
    )
  return runs


def skipped_steps(training: Sequence[dict], until: int) -> int:
  """How many of the training steps up to `until` the train step refused
  (non-finite, or an update over config.max_update_ratio).

  Args:
    training: a run's training records (`Run.training`).
    until: the last step counted.

  Returns:
    The number of those records marked 'skipped'.
  """
  return sum(bool(r.get("skipped")) for r in training if r["step"] <= until)


def skipped_note(skipped: int, steps: int) -> str:
  """The report's note on a run's skipped training steps.

  Args:
    skipped: how many were skipped (`skipped_steps`).
    steps: the number of training steps they are out of.

  Returns:
    A sentence (no final period) saying how many and why.
  """
  return (
    f"{skipped} of its {steps} training steps were skipped (non-finite "
    "or oversized updates: 'skipped' in metrics.jsonl)"
  )
