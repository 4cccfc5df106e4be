"""The report: intervals against independent computations, labels and row
order, highlighted diffs, escaped model text, plots, and one-line errors."""

import json
import math
import os
import re
import subprocess
import sys
from xml.etree import ElementTree

import numpy as np
import pytest

from score_jax.report import __main__ as cli
from score_jax.report import charts, stats
from score_jax.report import runs as runs_lib
from score_jax.report import table as table_lib
from score_jax.report import transcripts as transcripts_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Per-problem (r1, r2) counts: 40 c->c, 12 i->c, 3 c->i, 45 i->i.
PATTERN = {(1, 1): 40, (0, 1): 12, (1, 0): 3, (0, 0): 45}


def _rewards(pattern):
  pairs = [pair for pair, count in pattern.items() for _ in range(count)]
  return [float(a) for a, _ in pairs], [float(b) for _, b in pairs]


def _transcript(
  r1, r2, first="x = 1\ny = 2\nanswer 3", second="x = 1\ny = 3\nanswer 4"
):
  return {
    "problem": "1 + 2 = ?",
    "reference": "3",
    "attempts": [first, second],
    "answers": ["3", "4"],
    "lengths": [5, 5],
    "rewards": [r1, r2],
  }


def _write_eval(run_dir, step, pattern=None, transcripts=None, **metrics):
  """eval/<step>/ with transcripts for `pattern` and a metrics.json that
  agrees with them unless `metrics` overrides a field."""
  if transcripts is None:
    transcripts = [_transcript(a, b) for a, b in zip(*_rewards(pattern))]
  r1 = np.array([t["rewards"][0] for t in transcripts])
  r2 = np.array([t["rewards"][1] for t in transcripts])
  result = {
    "accuracy_t1": r1.mean(),
    "accuracy_t2": r2.mean(),
    "delta": r2.mean() - r1.mean(),
    "delta_i_to_c": ((r1 < 0.5) & (r2 > 0.5)).mean(),
    "delta_c_to_i": ((r1 > 0.5) & (r2 < 0.5)).mean(),
    "step": step,
    "split": "test",
    "num_examples": len(transcripts),
    "edit_distance_ratio": 0.1,
    "failed_reward_calls": 0,
    **metrics,
  }
  out = os.path.join(run_dir, "eval", str(step))
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "metrics.json"), "w") as f:
    json.dump(result, f)
  with open(os.path.join(out, "transcripts.jsonl"), "w") as f:
    f.writelines(json.dumps(t) + "\n" for t in transcripts)
  return out


def _html(directory):
  assert cli.main([str(directory)]) == 0
  with open(os.path.join(directory, "report.html"), encoding="utf-8") as f:
    return f.read()


def _score_test_accepts(successes, n, p, z=1.96):
  return abs(successes / n - p) <= z * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize(
  "successes, n", [(43, 100), (3, 100), (0, 10), (10, 10), (7, 20)]
)
def test_wilson_interval_is_the_set_the_score_test_accepts(successes, n):
  grid = np.linspace(1e-9, 1 - 1e-9, 200_001)
  accepted = grid[[_score_test_accepts(successes, n, p) for p in grid]]
  low, high = stats.wilson_interval(successes, n)
  assert low == pytest.approx(max(accepted.min(), 0), abs=1e-5)
  assert high == pytest.approx(min(accepted.max(), 1), abs=1e-5)


def test_wilson_interval_hand_computed():
  # 0 of 10: the upper end solves p = z^2 / (n + z^2) in closed form.
  assert stats.wilson_interval(0, 10) == pytest.approx(
    (0.0, 1.96**2 / (10 + 1.96**2))
  )
  # 5 of 10: centred on 1/2, half-width z*sqrt(10*.25 + z^2/4) / (10 + z^2)
  # = 1.96 * 1.8602 / 13.8416 = 0.2634 by hand.
  low, high = stats.wilson_interval(5, 10)
  assert (low, high) == pytest.approx((0.2366, 0.7634), abs=1e-4)


def test_paired_delta_interval_matches_numpy():
  r1, r2 = map(np.array, _rewards(PATTERN))
  d = r2 - r1
  half = 1.96 * np.std(d, ddof=1) / np.sqrt(d.size)
  estimate = stats.paired_difference(r1 > 0.5, r2 > 0.5)
  assert (estimate.value, estimate.low, estimate.high) == pytest.approx(
    (d.mean(), d.mean() - half, d.mean() + half)
  )
  assert estimate.excludes_zero()  # 0.09 +- 0.074
  flat = stats.paired_difference(
    np.array([1, 0, 1, 0]) > 0.5, np.array([0, 1, 1, 0]) > 0.5
  )
  assert flat.value == 0 and not flat.excludes_zero()


def test_single_run_table(tmp_path, capsys):
  _write_eval(tmp_path, 120, PATTERN)
  page = _html(tmp_path)
  assert capsys.readouterr().out.strip() == str(tmp_path / "report.html")
  assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []
  [row] = table_lib.comparison_rows(runs_lib.read_runs(str(tmp_path)))
  assert (row.label, row.n, row.warnings) == (tmp_path.name, 100, [])
  estimates = row.estimates
  assert estimates["accuracy_t1"].value == pytest.approx(0.43)
  assert (estimates["accuracy_t1"].low, estimates["accuracy_t1"].high) == (
    stats.wilson_interval(43, 100)
  )
  assert estimates["delta_i_to_c"].value == pytest.approx(0.12)
  assert estimates["delta_c_to_i"].value == pytest.approx(0.03)
  # The table shows 43.0 [low, high] and a marked, signed Delta.
  low, high = stats.wilson_interval(43, 100)
  assert f'43.0 <span class="ci">[{100 * low:.1f}, {100 * high:.1f}]' in page
  d = estimates["delta"]
  assert (
    f'<td class="significant">+9.0 <span class="ci">[+{100 * d.low:.1f},'
    f" +{100 * d.high:.1f}]</span>*</td>"
  ) in page
  # The same cells in results.md, the README's table.
  header, rule, line = (tmp_path / "results.md").read_text().splitlines()
  assert header.startswith("| method | Accuracy@t1 |") and rule.count("|") == 8
  assert line.startswith(
    f"| {tmp_path.name} | 43.0 [{100 * low:.1f}, {100 * high:.1f}] |"
  )
  assert f"| **+9.0 [+{100 * d.low:.1f}, +{100 * d.high:.1f}]** |" in line
  assert line.endswith("| 100 |")


def test_results_root_labels_and_order(tmp_path):
  flat = {(1, 1): 5, (0, 0): 5}
  for name in ("zeta", "alpha", "score", "star", "pair_sft", "no_stage1"):
    _write_eval(tmp_path / name, 100, flat)
  _write_eval(tmp_path / "score", 50, flat)  # two trained steps: "@<step>"
  _write_eval(tmp_path / "base", 0, flat)
  _write_eval(tmp_path / "self_refine", 0, flat, label="Self-Refine")
  (tmp_path / "notes").mkdir()  # not a run: no eval/, no metrics.jsonl
  rows = table_lib.comparison_rows(runs_lib.read_runs(str(tmp_path)))
  assert [r.label for r in rows] == [
    "Base",
    "Self-Refine",
    "star",
    "pair_sft",
    "score@50",
    "score@100",
    "no_stage1",
    "alpha",
    "zeta",
  ]
  page = _html(tmp_path)
  table = page.split('<table class="results">')[1].split("</tbody>")[0]
  assert table.count("<tr><th>") == 1 + len(rows)  # the header, then rows
  positions = [table.index(f"<tr><th>{r.label}</th>") for r in rows]
  assert positions == sorted(positions)


def test_two_base_rows_are_told_apart(tmp_path):
  flat = {(1, 1): 5, (0, 0): 5}
  _write_eval(tmp_path / "base", 0, flat)
  _write_eval(tmp_path / "score", 0, flat)
  rows = table_lib.comparison_rows(runs_lib.read_runs(str(tmp_path)))
  assert [r.label for r in rows] == ["Base (base)", "Base (score)"]


def test_root_that_is_also_a_run(tmp_path):
  _write_eval(tmp_path, 0, PATTERN)
  _write_eval(tmp_path / "score", 10, PATTERN)
  rows = table_lib.comparison_rows(runs_lib.read_runs(str(tmp_path)))
  assert [r.label for r in rows] == ["Base", "score"]


def test_metrics_json_disagreeing_with_transcripts_is_flagged(tmp_path, capsys):
  _write_eval(tmp_path, 7, PATTERN, accuracy_t2=0.60, num_examples=99)
  page = _html(tmp_path)
  warnings = capsys.readouterr().err
  assert "accuracy_t2 = 0.6000 but the transcripts give 0.5200" in warnings
  assert "num_examples = 99 but transcripts.jsonl has 100" in warnings
  assert 'class="warnings"' in page and "⚠" in page
  # The table still reports what the transcripts say.
  assert "<td>52.0 " in page


def test_metrics_json_alone_gives_a_row_without_intervals(tmp_path):
  out = _write_eval(tmp_path, 9, PATTERN)
  os.remove(os.path.join(out, "transcripts.jsonl"))
  [row] = table_lib.comparison_rows(runs_lib.read_runs(str(tmp_path)))
  assert row.estimates["accuracy_t2"] == stats.Estimate(0.52)
  assert row.n == 100 and "no confidence intervals" in row.warnings[0]
  assert "<td>52.0</td>" in _html(tmp_path)


def test_changed_lines_are_highlighted_and_unchanged_are_not():
  rows = transcripts_lib.side_by_side("a\nb\nc\nd", "a\nB\nc\nd\ne")
  cells = re.findall(r'<td class="(\w+)">([^<]*)</td>', rows)
  assert ("same", "a") in cells and ("same", "c") in cells
  assert ("same", "d") in cells
  assert ("removed", "b") in cells and ("added", "B") in cells
  assert ("added", "e") in cells
  assert '<td class="empty"></td>' in rows  # "e" has no partner line
  assert not any(
    c in ("removed", "added") for c, t in cells if t in ("a", "c", "d")
  )


def test_transcripts_prefer_changes_and_escape_model_text(tmp_path):
  evil = "<script>alert(1)</script>"
  transcripts = (
    [_transcript(1.0, 1.0)] * 5
    + [_transcript(0.0, 0.0)] * 5
    + [_transcript(0.0, 1.0, second=evil + "\nanswer 3")] * 5
    + [_transcript(1.0, 0.0)] * 2
  )
  picked = transcripts_lib.pick_transcripts(transcripts, limit=8)
  assert [transcripts_lib._outcome(t) for t in picked] == [
    "i→c",
    "c→i",
    "i→c",
    "c→i",
    "i→c",
    "i→c",
    "i→c",
    "c→c",
  ]
  _write_eval(tmp_path, 3, transcripts=transcripts)
  page = _html(tmp_path)
  assert "<script" not in page
  assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
  assert page.count('<div class="card">') == 8
  assert '<td class="added">&lt;script&gt;' in page


def test_training_and_scaling_plots(tmp_path):
  with open(tmp_path / "metrics.jsonl", "w") as f:
    for step in range(1, 61):
      phase = "sft" if step <= 10 else "stage1" if step <= 40 else "stage2"
      record = {"step": step, "phase": phase, "loss": 1.0}
      if phase != "sft":
        record.update(reward_t1=0.3, reward_t2=0.3 + step / 200)
      f.write(json.dumps(record) + "\n")
    # A resumed run logs step 60 again; the later record wins.
    f.write(
      json.dumps(
        {"step": 60, "phase": "stage2", "reward_t1": 0.9, "reward_t2": 0.9}
      )
      + "\n"
    )
  out = _write_eval(tmp_path, 60, PATTERN)
  with open(os.path.join(out, "scaling.json"), "w") as f:
    json.dump(
      {
        "temperature": 0.7,
        "num_examples": 20,
        "n": [2, 4, 8, 16, 32],
        "majority_of_first_attempts": [0.4, 0.45, 0.5, 0.52, 0.53],
        "majority_of_corrected_attempts": [0.42, 0.5, 0.56, 0.6, 0.61],
      },
      f,
    )
  training = runs_lib.read_training(str(tmp_path / "metrics.jsonl"))
  assert len(training) == 60 and training[-1]["reward_t1"] == 0.9
  assert charts.phase_starts(training) == [
    (1, "sft"),
    (10.5, "stage1"),
    (40.5, "stage2"),
  ]
  page = _html(tmp_path)
  assert page.count("<svg") == 2
  assert page.count('class="phase"') == 2  # two boundaries, none at the start
  assert "attempt 1 (moving average" in page and "attempt 2 (moving" in page
  for n in (2, 4, 8, 16, 32):  # the log2 axis ticks at each power of two
    assert f'text-anchor="middle">{n}</text>' in page
  assert "majority of n/2 attempts, each corrected once" in page
  # The training chart also stands alone as an SVG file, which parses.
  svg = ElementTree.parse(tmp_path / "plots" / f"{tmp_path.name}_training.svg")
  assert svg.getroot().tag == "{http://www.w3.org/2000/svg}svg"
  assert svg.getroot().find("{http://www.w3.org/2000/svg}style") is not None


def test_moving_average_and_ticks():
  np.testing.assert_allclose(
    charts.moving_average([0, 3, 6, 9], 3), [1.5, 3, 6, 7.5]
  )
  assert charts.nice_ticks(0.23, 0.61) == [0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
  assert charts.nice_ticks(1, 3000) == [0, 1000, 2000, 3000]


def _error(argv, capsys):
  assert cli.main(argv) == 1
  captured = capsys.readouterr()
  assert captured.out == ""
  [line] = captured.err.splitlines()
  assert line.startswith("score_jax.report: error: ")
  return line


def test_errors(tmp_path, capsys):
  assert "is not a directory" in _error([str(tmp_path / "nope")], capsys)
  (tmp_path / "empty" / "eval").mkdir(parents=True)
  assert "no eval results under" in _error([str(tmp_path / "empty")], capsys)
  out = _write_eval(tmp_path / "bad_json", 5, PATTERN)
  with open(os.path.join(out, "metrics.json"), "w") as f:
    f.write('{"accuracy_t1": 0.5,')
  line = _error([str(tmp_path / "bad_json")], capsys)
  assert "metrics.json: not valid JSON" in line
  _write_eval(tmp_path / "bad_jsonl", 5, PATTERN)
  with open(tmp_path / "bad_jsonl" / "metrics.jsonl", "w") as f:
    f.write('{"step": 1, "phase": "sft"}\n{"step": 2,\n')
  line = _error([str(tmp_path / "bad_jsonl")], capsys)
  assert "metrics.jsonl line 2: not valid JSON" in line
  assert "fix or delete that line" in line
  assert not (tmp_path / "bad_jsonl" / "report.html").exists()
  out = _write_eval(tmp_path / "no_problems", 5, PATTERN)
  open(os.path.join(out, "transcripts.jsonl"), "w").close()
  assert "transcripts.jsonl is empty" in _error(
    [str(tmp_path / "no_problems")], capsys
  )


def test_command_line_error_is_one_line_and_exit_code_1(tmp_path):
  result = subprocess.run(
    [sys.executable, "-m", "score_jax.report", str(tmp_path / "missing")],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert result.returncode == 1 and result.stdout == ""
  assert result.stderr.count("\n") == 1
  assert result.stderr.startswith("score_jax.report: error: ")
  assert "Traceback" not in result.stderr
