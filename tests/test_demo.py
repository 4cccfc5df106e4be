"""The demo's `:quick` variant end to end, as a newcomer runs it: the shipped
base model, its evaluation, Stage I, Stage II, checkpoints, a restore for
evaluation, and the report."""

import json
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args):
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count=2",
  )
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "score_jax.main",
      "--config=configs/demo.py:quick",
      *args,
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def test_quick_demo_end_to_end(tmp_path, runs):
  console = _main(f"--workdir={tmp_path}")
  # A quiet console: the progress bar and a line per event, no INFO logs
  # (absl's "I1207 ..." lines: Orbax's, JAX's) without --verbosity=0.
  out = console.stdout + console.stderr
  assert not re.search(r"^I\d{4} ", out, re.M), out[-3000:]
  for event in (
    "steps 1-4: phase stage1",
    "steps 5-8: phase stage2",
    "step 4: checkpoint saved",
    "step 0: accuracy@t1",
    "step 8: accuracy@t1",
    "report: ",
  ):
    assert event in out, (event, out[-3000:])
  phases = [
    json.loads(line)["phase"]
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
  ]
  assert phases == ["stage1"] * 4 + ["stage2"] * 4
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "8"]
  for step in (0, 8):
    metrics = json.loads(
      (tmp_path / "eval" / str(step) / "metrics.json").read_text()
    )
    assert metrics["num_examples"] == 64
    assert runs.agrees_with_its_transcripts(tmp_path / "eval" / str(step))
  # The shipped base model has learned the task: it states an answer first,
  # then works the problem, and its working is often right (the answer it
  # states before working much less often: 10% on the validation split).
  base_transcripts = [
    json.loads(line)
    for line in (tmp_path / "eval" / "0" / "transcripts.jsonl")
    .read_text()
    .splitlines()
  ]
  working_right = [
    t["attempts"][0].rsplit(" = ", 1)[-1] == t["reference"]
    for t in base_transcripts
  ]
  assert sum(working_right) / len(working_right) > 0.4
  assert all(
    t["attempts"][0].startswith("Final Answer:") for t in base_transcripts
  )
  report = (tmp_path / "report.html").read_text()
  assert "Base" in report and "<svg" in report

  # Restoring the Stage I checkpoint for evaluation.
  result = _main(f"--workdir={tmp_path}", "--mode=eval", "--checkpoint=4")
  assert "step 4: accuracy@t1" in result.stdout
  assert runs.agrees_with_its_transcripts(tmp_path / "eval" / "4")
