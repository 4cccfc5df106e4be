"""MATH problems from JSONL files, read directly or through tensorflow-datasets.

The layout is the one of the MATH dataset converted to JSONL and of the
PRM800K split (github.com/openai/prm800k, `prm800k/math_splits/`: train.jsonl
with 12k problems, test.jsonl with MATH500): one JSON object per line with
"problem", "solution", "answer", "level" and "type" (PRM800K: "subject",
"unique_id"). Without "answer", the answer is the last `\\boxed{}` of the
solution, as in the original MATH release.

`read_tfds` builds an array_record copy with a tfds GeneratorBasedBuilder and
reads it back with `tfds.data_source` (random access). Neither step needs
TensorFlow: tfds serialises examples with its bundled protos when writing
array_record, and builds without Apache Beam.
"""

import json
import pathlib
import re
from typing import NamedTuple, Optional

import numpy as np
import tensorflow_datasets as tfds

from score_jax.tasks import base

LAYOUT = (
  'one JSON object per line with "problem" (str) and "answer" (str) or a '
  '"solution" whose last \\boxed{} holds the answer; optional "level", '
  '"type" (or "subject") and "unique_id"'
)
SPLITS = ("train", "validation", "test")
BOXED = re.compile(r"\\(?:boxed|fbox)\b")
_SPACES = re.compile(r"\s*")
_TOKEN = re.compile(r"[^\s$]+")
_LEVEL = re.compile(r"^(?:level\s*)?(\d+)$", re.IGNORECASE)
_UNKNOWN_LEVEL = -1  # How tfds stores a missing level.


class Box(NamedTuple):
  """One `\\boxed{...}` (or `\\fbox`) in a text."""

  start: int  # Where the command starts.
  end: int  # Just after its argument.
  argument: Optional[str]  # None if truncated (unbalanced braces, no token).


def last_boxed(text: str) -> Optional[str]:
  """The argument of the last `\\boxed{...}` (balanced braces), or None."""
  commands = list(BOXED.finditer(text))
  return box_at(text, commands[-1]).argument if commands else None


def box_at(text: str, command: re.Match, limit: Optional[int] = None) -> Box:
  """The box that `command` opens: its argument in balanced braces, or the
  next token for a bare `\\boxed 5`.

  Args:
    text: the text that holds the box.
    command: a `BOXED` match in `text`.
    limit: where the argument must end by (None: the end of `text`).

  Returns:
    The box; its argument is None if it does not end by `limit`.
  """
  limit = len(text) if limit is None else limit
  argument_start = _SPACES.match(text, command.end()).end()
  if argument_start >= limit:
    return Box(command.start(), argument_start, None)
  if text[argument_start] != "{":
    # `\boxed 5`: the argument is the next token.
    token = _TOKEN.match(text, argument_start, limit)
    if token is None:
      return Box(command.start(), argument_start, None)
    return Box(command.start(), token.end(), token.group(0))
  depth = 0
  for position in range(argument_start, limit):
    if text[position] == "{":
      depth += 1
    elif text[position] == "}":
      depth -= 1
      if depth == 0:
        return Box(
          command.start(), position + 1, text[argument_start + 1 : position]
        )
  return Box(command.start(), limit, None)  # Unbalanced: truncated text.


def read_jsonl(path: str | pathlib.Path) -> list[base.Example]:
  """The examples of one MATH JSONL file, in file order.

  `answer_key` is the answer string; `meta` holds "level" (int or None),
  "type" (str or None) and "unique_id" (from the file, else "<file>:<line>").
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"No MATH data file at {path}; expected {LAYOUT}.")
  examples = []
  with path.open("rb") as lines:
    for line_number, raw in enumerate(lines, start=1):
      line = _decode(raw, f"{path}:{line_number}")
      if line.strip():
        examples.append(
          _parse_line(
            line, f"{path}:{line_number}", f"{path.name}:{line_number}"
          )
        )
  if not examples:
    raise ValueError(f"{path} holds no examples; expected {LAYOUT}.")
  return examples


def read_split(data_dir: str | pathlib.Path, split: str) -> list[base.Example]:
  """The examples of `{data_dir}/{split}.jsonl`, in file order.

  Args:
    data_dir: the directory of the split files (`LAYOUT`).
    split: the split's name, e.g. "train" or "test".

  Returns:
    The examples, as `read_jsonl` gives them.

  Raises:
    FileNotFoundError: if the split's file is not there.
  """
  path = pathlib.Path(data_dir) / f"{split}.jsonl"
  if not path.is_file():
    raise FileNotFoundError(
      f"No MATH split file {path}: put {split}.jsonl in {data_dir} "
      f"({LAYOUT}), e.g. PRM800K's prm800k/math_splits/{split}.jsonl."
    )
  return read_jsonl(path)


class MathJsonl(tfds.core.GeneratorBasedBuilder):
  """MATH from {train,validation,test}.jsonl files in the manual dir.

  A prepared copy is reused as is: delete its directory after the JSONL
  files change.
  """

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    f"Put train.jsonl and test.jsonl ({LAYOUT}) in the manual dir, e.g. "
    "the files of PRM800K's prm800k/math_splits/."
  )
  # tfds finds a builder's URL checksums next to its source through the
  # `importlib_resources` backport, which it does not install on Python >=
  # 3.9; this builder downloads nothing, so it has no checksums to find.
  code_path = None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="MATH problems with their answers.",
      features=tfds.features.FeaturesDict(
        {
          "problem": tfds.features.Text(),
          "answer": tfds.features.Text(),
          "level": tfds.features.Scalar(dtype=np.int32),
          "type": tfds.features.Text(),
          "unique_id": tfds.features.Text(),
        }
      ),
      # Keep file order, so both readers return the same list.
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    manual_dir = pathlib.Path(dl_manager.manual_dir)
    files = {split: manual_dir / f"{split}.jsonl" for split in SPLITS}
    present = {split: path for split, path in files.items() if path.is_file()}
    if not present:
      raise FileNotFoundError(
        f"No train.jsonl, validation.jsonl or test.jsonl in {manual_dir}; "
        f"expected {LAYOUT}."
      )
    return {
      split: self._generate_examples(path) for split, path in present.items()
    }

  def _generate_examples(self, path):
    for index, example in enumerate(read_jsonl(path)):
      yield (
        index,
        {
          "problem": example.problem,
          "answer": example.answer_key,
          "level": _UNKNOWN_LEVEL
          if example.meta["level"] is None
          else example.meta["level"],
          "type": example.meta["type"] or "",
          "unique_id": example.meta["unique_id"],
        },
      )


def read_tfds(
  split: str, manual_dir: str | pathlib.Path, data_dir: str | pathlib.Path
) -> list[base.Example]:
  """The examples of `split`, via an array_record dataset under `data_dir`.

  Builds the dataset from `{manual_dir}/{split}.jsonl` (and its sibling split
  files) on first use, then reads it with `tfds.data_source`.

  Args:
    split: one of `SPLITS`.
    manual_dir: the directory of the JSONL split files (`LAYOUT`).
    data_dir: where the array_record copy is built and kept (delete it after
      the JSONL files change).

  Returns:
    The examples in file order, as `read_jsonl` gives them.

  Raises:
    ValueError: for a split not in `SPLITS`.
    FileNotFoundError: if `{manual_dir}/{split}.jsonl` is not there.
  """
  if split not in SPLITS:
    raise ValueError(f"Unknown MATH split {split!r}; use one of {SPLITS}.")
  if not (pathlib.Path(manual_dir) / f"{split}.jsonl").is_file():
    raise FileNotFoundError(
      f"No {split}.jsonl in {manual_dir}; expected {LAYOUT}."
    )
  source = tfds.data_source(
    MathJsonl.name,
    split=split,
    data_dir=str(data_dir),
    builder_kwargs={"file_format": "array_record"},
    download_and_prepare_kwargs={
      "download_config": tfds.download.DownloadConfig(
        manual_dir=str(manual_dir)
      )
    },
  )
  return [_example_from_record(source[index]) for index in range(len(source))]


def _parse_line(line: str, where: str, default_id: str) -> base.Example:
  """One JSONL line as an Example; `where` ("file:line") names it in errors."""
  try:
    row = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(
      f"{where}: not valid JSON ({e.msg}); expected {LAYOUT}."
    ) from None
  if not isinstance(row, dict):
    raise ValueError(f"{where}: not a JSON object; expected {LAYOUT}.")
  problem = row.get("problem")
  if not isinstance(problem, str) or not problem.strip():
    raise ValueError(f'{where}: missing "problem"; expected {LAYOUT}.')
  answer = row.get("answer")
  # A number is unambiguous as text; a list or an object is not an answer
  # (str() would make "[1, 2]" of it, graded against silently).
  if isinstance(answer, bool) or not isinstance(
    answer, (str, int, float, type(None))
  ):
    raise ValueError(
      f'{where}: "answer" is a {type(answer).__name__}, not '
      f"a string; expected {LAYOUT}."
    )
  if answer is None:
    solution = row.get("solution")
    answer = last_boxed(solution) if isinstance(solution, str) else None
    if answer is None:
      raise ValueError(
        f'{where}: no "answer" and no \\boxed{{}} in "solution"; '
        f"expected {LAYOUT}."
      )
  kind = row.get("type", row.get("subject"))
  return base.Example(
    problem=problem,
    answer_key=str(answer),
    meta={
      "level": _parse_level(row.get("level")),
      "type": None if kind is None else str(kind),
      "unique_id": str(row.get("unique_id") or default_id),
    },
  )


def _decode(raw: bytes, where: str) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(
      f"{where}: not valid UTF-8 (byte {e.start + 1}); save "
      f"the file as UTF-8; expected {LAYOUT}."
    ) from None


def _parse_level(level) -> Optional[int]:
  """5 from 5, "5" or "Level 5"; None when absent or unknown ("Level ?")."""
  if isinstance(level, int):
    return level
  match = _LEVEL.match(str(level).strip()) if level is not None else None
  return int(match.group(1)) if match else None


def _example_from_record(record: dict) -> base.Example:
  text = {
    key: value.decode("utf-8")
    for key, value in record.items()
    if isinstance(value, bytes)
  }
  level = int(record["level"])
  return base.Example(
    problem=text["problem"],
    answer_key=text["answer"],
    meta={
      "level": None if level == _UNKNOWN_LEVEL else level,
      "type": text["type"] or None,
      "unique_id": text["unique_id"],
    },
  )
