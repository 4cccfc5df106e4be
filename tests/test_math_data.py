"""Tests for MATH JSONL loading, directly and through tfds array_record."""

import importlib.util
import json
import sys

import pytest

from score_jax.tasks import base, math_data
from score_jax.tasks import math as math_task

# Rows as in the MATH release (no "answer": the last \boxed of the solution).
MATH_ROWS = [
  {
    "problem": "What is $\\frac{1}{2}+\\frac{1}{3}$?",
    "solution": "We get $\\frac{3}{6}+\\frac{2}{6}=\\boxed{\\frac{5}{6}}$.",
    "level": "Level 2",
    "type": "Prealgebra",
  },
  {
    "problem": "Find the set.",
    "level": "Level ?",
    "type": "Algebra",
    "solution": "First \\boxed{1}; in the end \\boxed{\\{1, \\{2\\}\\}}.",
  },
]
# Rows as in PRM800K's math_splits (answer, subject, int level, unique_id).
PRM800K_ROWS = [
  {
    "problem": "Convert $(0,3)$ to polar coordinates.",
    "solution": "... $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$",
    "answer": "\\left( 3, \\frac{\\pi}{2} \\right)",
    "subject": "Precalculus",
    "level": 2,
    "unique_id": "test/precalculus/807.json",
  },
  {
    "problem": "Compute $7 \\cdot 8$.",
    "solution": "$\\boxed{56}$",
    "answer": "56",
    "subject": "Prealgebra",
    "level": 1,
    "unique_id": "test/prealgebra/1.json",
  },
]


def _expected(rows, file_name):
  """Examples built from the rows by hand, independent of the loader."""
  references = [r"\frac{5}{6}", r"\{1, \{2\}\}"]
  levels = {"Level 2": 2, "Level ?": None, 1: 1, 2: 2}
  return [
    base.Example(
      problem=row["problem"],
      answer_key=row.get("answer") or references[i],
      meta={
        "level": levels[row["level"]],
        "type": row.get("type") or row.get("subject"),
        "unique_id": row.get("unique_id", f"{file_name}:{i + 1}"),
      },
    )
    for i, row in enumerate(rows)
  ]


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(row) + "\n" for row in rows))
  return path


@pytest.fixture
def split_dir(tmp_path):
  data_dir = tmp_path / "math_splits"
  data_dir.mkdir()
  _write_jsonl(data_dir / "train.jsonl", MATH_ROWS)
  _write_jsonl(data_dir / "test.jsonl", PRM800K_ROWS)
  return data_dir


def test_read_split_both_layouts(split_dir):
  assert math_data.read_split(split_dir, "train") == _expected(
    MATH_ROWS, "train.jsonl"
  )
  assert math_data.read_split(split_dir, "test") == _expected(
    PRM800K_ROWS, "test.jsonl"
  )


def test_blank_lines_are_skipped(tmp_path):
  path = tmp_path / "train.jsonl"
  path.write_text("\n" + json.dumps(PRM800K_ROWS[1]) + "\n\n")
  assert math_data.read_jsonl(path) == _expected(PRM800K_ROWS[1:], "")


def test_tfds_array_record_matches_jsonl_without_tensorflow(
  split_dir, tmp_path
):
  assert importlib.util.find_spec("tensorflow") is None
  tfds_dir = tmp_path / "tfds"
  for split in ("train", "test"):
    assert math_data.read_tfds(split, split_dir, tfds_dir) == (
      math_data.read_split(split_dir, split)
    )
  assert list(tfds_dir.glob("math_jsonl/*/*.array_record-*"))
  assert "tensorflow" not in sys.modules


def test_math_task_examples_from_both_readers(split_dir, tmp_path):
  direct = math_task.MathTask(data_dir=str(split_dir))
  via_tfds = math_task.MathTask(
    data_dir=str(split_dir), tfds_dir=str(tmp_path / "tfds")
  )
  assert (
    direct.examples("test")
    == via_tfds.examples("test")
    == _expected(PRM800K_ROWS, "test.jsonl")
  )
  with pytest.raises(FileNotFoundError, match="validation.jsonl"):
    direct.examples("validation")
  with pytest.raises(FileNotFoundError, match="validation.jsonl"):
    via_tfds.examples("validation")


@pytest.mark.parametrize(
  "content,message",
  [
    (
      '{"problem": "p", "answer": "1"}\n{"problem": "q", "answer": \n',
      r"train\.jsonl:2: not valid JSON",
    ),
    (
      '{"problem": "p", "answer": "1"}\n["problem"]\n',
      r"train\.jsonl:2: not a JSON object",
    ),
    ('{"answer": "1"}\n', r'train\.jsonl:1: missing "problem"'),
    (
      '{"problem": "p", "solution": "no box"}\n',
      r'train\.jsonl:1: no "answer" and no \\boxed\{\} in "solution"',
    ),
    ("\n\n", "holds no examples"),
    (
      '{"problem": "p", "answer": "1"}\n{"problem": "q", "answer": [1, 2]}\n',
      r'train\.jsonl:2: "answer" is a list, not a string',
    ),
    (
      '{"problem": "p", "answer": "1"}\n{"problem": "q\xff", "answer": "1"}\n',
      r"train\.jsonl:2: not valid UTF-8 \(byte 15\)",
    ),
  ],
)
def test_malformed_files_get_one_line_errors(tmp_path, content, message):
  (tmp_path / "train.jsonl").write_bytes(content.encode("latin-1"))
  for read in (
    lambda: math_data.read_split(tmp_path, "train"),
    lambda: math_data.read_tfds("train", tmp_path, tmp_path / "t"),
  ):
    with pytest.raises(ValueError, match=message) as error:
      read()
    assert "expected one JSON object per line" in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_files_name_the_expected_layout(tmp_path):
  with pytest.raises(FileNotFoundError, match="test.jsonl.*one JSON object"):
    math_data.read_split(tmp_path, "test")
  with pytest.raises(FileNotFoundError, match="one JSON object"):
    math_data.read_jsonl(tmp_path / "nope.jsonl")
  with pytest.raises(FileNotFoundError, match="test.jsonl"):
    math_data.read_tfds("test", tmp_path, tmp_path / "tfds")
  with pytest.raises(ValueError, match="Unknown MATH split"):
    math_data.read_tfds("dev", tmp_path, tmp_path / "tfds")


@pytest.mark.parametrize(
  "text,expected",
  [
    (r"so $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
    (r"\boxed{1} and \fbox{2}", "2"),
    (r"\boxed{\{1, \{2\}\}}", r"\{1, \{2\}\}"),
    (r"\boxed 5$", "5"),
    (r"\boxed{\frac{1}{2}", None),
    ("no box", None),
  ],
)
def test_last_boxed(text, expected):
  assert math_data.last_boxed(text) == expected
