"""scripts/demo_results.py: the commands it runs and README's results block."""

import json
import sys

import pytest

from scripts import demo_results


def test_every_method_runs_in_its_own_workdir():
  commands = {
    m: demo_results.command(m, "/r", "quick") for m in demo_results.METHODS
  }
  assert all(f"--workdir=/r/{m}" in c for m, c in commands.items())
  assert all("--config=configs/demo.py:quick" in c for c in commands.values())
  assert "--checkpoint=base" in commands["self_refine"]
  assert "--config.schedule=no_shaping" in commands["no_shaping"]
  assert "--config.eval.scaling_num_examples=100" in commands["score"]


def test_readme_block_is_replaced_and_the_rest_kept(tmp_path):
  root, repo = tmp_path / "root", tmp_path / "repo"
  (root / "plots").mkdir(parents=True)
  (repo / "docs").mkdir(parents=True)
  (root / "results.md").write_text("| method |\n|---|\n| Base |\n")
  (root / "plots" / "score_training.svg").write_text("<svg/>")
  readme = repo / "README.md"
  readme.write_text(
    f"intro\n{demo_results.README_BEGIN}\nold table\n"
    f"{demo_results.README_END}\noutro\n"
  )
  demo_results.update_readme(str(repo), str(root), "")
  text = readme.read_text()
  assert text.startswith("intro\n") and text.endswith("\noutro\n")
  assert "old table" not in text and "| Base |" in text
  assert "python -m scripts.demo_results --root=DIR`" in text
  assert (repo / "docs" / "demo_score_training.svg").read_text() == "<svg/>"

  readme.write_text("no markers\n")
  with pytest.raises(SystemExit, match="has no <!-- results:begin -->"):
    demo_results.update_readme(str(repo), str(root), "")
  assert readme.read_text() == "no markers\n"


def _marker_command(tmp_path, name, seconds, code=0):
  """A run that records its start, sleeps, records its end and exits."""
  script = (
    f"import pathlib, time; d = pathlib.Path({str(tmp_path)!r}); "
    f"(d / '{name}.start').touch(); time.sleep({seconds}); "
    f"(d / '{name}.end').touch(); raise SystemExit({code})"
  )
  return [sys.executable, "-c", script]


def test_runs_go_jobs_at_a_time_and_log_to_files(tmp_path):
  commands = {
    name: _marker_command(tmp_path, name, 1.0) for name in ("a", "b", "c")
  }
  demo_results.run_all(commands, str(tmp_path), 2, str(tmp_path))
  start = lambda n: (tmp_path / f"{n}.start").stat().st_mtime
  end = lambda n: (tmp_path / f"{n}.end").stat().st_mtime
  # a and b overlapped; c waited for a free slot.
  assert start("b") < end("a") and start("a") < end("b")
  assert start("c") >= min(end("a"), end("b"))
  assert sorted(p.name for p in tmp_path.glob("*.log")) == [
    "a.log",
    "b.log",
    "c.log",
  ]


def test_a_failed_run_stops_the_others_and_names_its_log(tmp_path):
  commands = {
    "bad": _marker_command(tmp_path, "bad", 0.1, code=3),
    "slow": _marker_command(tmp_path, "slow", 30),
  }
  with pytest.raises(SystemExit, match=r"bad exited with 3; see .*bad\.log"):
    demo_results.run_all(commands, str(tmp_path), 2, str(tmp_path))
  assert not (tmp_path / "slow.end").exists()


def _transcript(problem, working_end, answer2_right):
  attempt1 = (
    "Final Answer: The final answer is $5$. I hope it is correct."
    f"\n2 + 3 = 5\n5 * 2 = {working_end}"
  )
  return {
    "problem": f"Compute (2 + 3) * 2 + 0 * {problem}.",
    "reference": "10",
    "attempts": [attempt1, "Final Answer: ..."],
    "rewards": [0.0, 1.0 if answer2_right else 0.0],
  }


def test_working_table_counts_attempt_1s_working_and_attempt_2_given_it(
  tmp_path,
):
  # score: working right 3 of 4 (10, 10.0, 10, 12), attempt 2 right in 2 of
  # those 3; the older evaluation (step 0) is not the one counted.
  runs = {
    ("score", 400): [
      _transcript(0, "10", True),
      _transcript(1, "10.0", True),
      _transcript(2, "10", False),
      _transcript(3, "12", True),
    ],
    ("score", 0): [_transcript(0, "12", False)],
    ("base", 0): [
      _transcript(0, "9", False),
      _transcript(1, "10", False),
      _transcript(2, "10", True),
      _transcript(4, "10", True),
    ],
  }
  for (method, step), transcripts in runs.items():
    directory = tmp_path / method / "eval" / str(step)
    directory.mkdir(parents=True)
    (directory / "transcripts.jsonl").write_text(
      "".join(json.dumps(t) + "\n" for t in transcripts)
    )
  table = demo_results.working_table(str(tmp_path)).splitlines()
  # base: working right 3 of 4, attempt 2 right in 2 of those 3. SCoRe's
  # attempt 2 minus base's on problems 0-2 (4 is base's only): d = (1, 1,
  # -1), mean 1/3, sd 2/sqrt(3), half-width 1.96 sd / sqrt(3) = 1.307.
  assert table[2:] == [
    "| base | 75.0 | 66.7 | +33.3 [−97.3, +164.0] | 4 |",
    "| score | 75.0 | 66.7 | — | 4 |",
  ]
  # An interval that excludes 0 is bold: d = (1, 1, 0, 1), mean 3/4, sd 1/2,
  # half-width 1.96 * 0.5 / 2 = 0.49.
  directory = tmp_path / "star" / "eval" / "400"
  directory.mkdir(parents=True)
  (directory / "transcripts.jsonl").write_text(
    "".join(json.dumps(_transcript(p, "10", False)) + "\n" for p in range(4))
  )
  assert (
    demo_results.working_table(str(tmp_path)).splitlines()[-2]
    == "| star | 100.0 | 0.0 | **+75.0 [+26.0, +124.0]** | 4 |"
  )
