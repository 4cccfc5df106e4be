"""The command line: one-line errors for bad input, and an evaluation run."""

import json
import os
import subprocess
import sys

import pytest

# The evaluations' shape: 10 problems, attempts of at most 12 tokens.
EVAL = {
  "rollout.max_attempt_len": 12,
  "eval.num_examples": 10,
  "task.num_test": 10,
}


def _main(*args, devices=1):
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
  )
  return subprocess.run(
    [sys.executable, "-m", "score_jax.main", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
  "args, message",
  [
    (
      ["--config=configs/demo.py", "--config.sed=1"],
      "unknown config field 'sed' Did you mean \"seed\"",
    ),
    (
      ["--config=configs/demo.py", "--config.seed=abc"],
      "--config.seed=abc: invalid literal",
    ),
    (["--config=configs/missing.py"], "No such file"),
    (["--config=configs/demo.py:bad"], "takes no argument, 'quick' or 'base'"),
    (
      ["--config=configs/demo.py", "--config.model.preset=huge"],
      "preset='huge' is unknown",
    ),
    (
      ["--config=configs/demo.py", "--config.mesh_shape=(3,-1,1)"],
      "not divisible by 3",
    ),
    (
      ["--config=configs/demo.py", "--config.tokenizer_path=/nope.model"],
      "config.tokenizer_path",
    ),
    (
      ["--config=configs/demo.py", "--config.task.name=chess"],
      "config.task.name='chess' is unknown",
    ),
    (
      ["--config=configs/demo.py", "--config.init.path=/nope"],
      "config.init.path='/nope' is not a directory",
    ),
    (
      ["--config=configs/demo.py", "--config.profile_steps=(0,2)"],
      "config.profile_steps=(0, 2): give (first, last) training steps",
    ),
    # Refused before any work: the rewards would run model-written code
    # unisolated.
    (
      ["--config=configs/score_code.py", "--config.task.backend=rlimits"],
      "code rewards need an isolating sandbox and config.task.backend="
      "'rlimits' is not one",
    ),
  ],
)
def test_bad_input_is_one_line(tmp_path, args, message):
  result = _main(*args, f"--workdir={tmp_path}")
  assert result.returncode != 0
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("score_jax: error:"), (
    result.stderr
  )
  assert message in lines[0]
  assert not os.listdir(tmp_path)  # Nothing was started, nothing written.


def test_a_bucket_workdir_is_refused_in_one_line(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "score_jax.main",
      f"--config={REPO}/configs/demo.py",
      "--workdir=gs://bucket/run",
    ],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=120,
    env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO),
  )
  lines = result.stderr.strip().splitlines()
  assert result.returncode != 0 and len(lines) == 1, result.stderr
  assert "Cloud Storage FUSE" in lines[0] and "/gcs/BUCKET" in lines[0]
  assert not os.listdir(tmp_path)  # No local directory named gs:


def test_eval_run_on_a_sharded_mesh(tmp_path, tiny_flags, runs):
  result = _main(
    "--config=configs/demo.py:quick",
    "--mode=eval",
    *tiny_flags(**EVAL),
    "--checkpoint=base",
    "--config.mesh_shape=(2,-1,1)",
    f"--workdir={tmp_path}",
    devices=8,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  m = json.loads((tmp_path / "eval" / "0" / "metrics.json").read_text())
  assert m["num_examples"] == 10
  assert runs.agrees_with_its_transcripts(tmp_path / "eval" / "0")
  lines = (
    (tmp_path / "eval" / "0" / "transcripts.jsonl").read_text().splitlines()
  )
  transcripts = [json.loads(line) for line in lines]
  assert len(transcripts) == 10
  assert all(
    len(t["attempts"]) == 2 and len(t["rewards"]) == 2 for t in transcripts
  )
  assert all(max(t["lengths"]) <= 12 for t in transcripts)


# 2 supervised and 2 Stage I steps, a checkpoint every 2.
TRAIN = {**EVAL, "stage2_steps": 0}


def test_eval_restores_a_checkpoint_onto_another_mesh(tmp_path, tiny_flags):
  trained = _main(
    "--config=configs/demo.py:quick",
    *tiny_flags(**TRAIN),
    "--config.mesh_shape=(1,1,1)",
    f"--workdir={tmp_path}",
  )
  assert trained.returncode == 0, trained.stderr[-3000:]
  assert "step 4: accuracy@t1" in trained.stdout
  # The checkpoint of a 1-device run, restored onto 8 devices (bitwise
  # equality of re-sharded restores: test_checkpoints.py).
  (tmp_path / "eval" / "4" / "metrics.json").unlink()
  resharded = _main(
    "--config=configs/demo.py:quick",
    "--mode=eval",
    *tiny_flags(**TRAIN),
    "--checkpoint=4",
    "--config.mesh_shape=(2,2,2)",
    f"--workdir={tmp_path}",
    devices=8,
  )
  assert resharded.returncode == 0, resharded.stderr[-3000:]
  m = json.loads((tmp_path / "eval" / "4" / "metrics.json").read_text())
  assert (m["step"], m["num_examples"]) == (4, 10)

  for which, step in (("best", 4), ("2", 2)):
    result = _main(
      "--config=configs/demo.py:quick",
      "--mode=eval",
      *tiny_flags(**TRAIN),
      f"--checkpoint={which}",
      f"--workdir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"step {step}: accuracy@t1" in result.stdout

  missing = _main(
    "--config=configs/demo.py:quick",
    "--mode=eval",
    *tiny_flags(**TRAIN),
    "--checkpoint=3",
    f"--workdir={tmp_path}",
  )
  assert missing.returncode != 0
  assert "Traceback" not in missing.stderr  # Orbax's threads ended cleanly.
  assert missing.stderr.strip().splitlines()[-1] == (
    f"score_jax: error: --checkpoint=3: no such checkpoint in "
    f"{tmp_path}/checkpoints (steps [2, 4]); use latest, best, base or one "
    "of the steps."
  )


@pytest.mark.parametrize(
  "setup, args, message",
  [
    (
      lambda d: (d / "run").write_text(""),
      [],
      "run is a file, not a directory; pass a directory",
    ),
    (
      lambda d: (d / "file").write_text(""),
      ["--workdir={d}/file/run"],
      "file/run cannot be written (Not a directory); pass a directory",
    ),
    # Evaluation reads it after training: checked before the first step.
    (
      lambda d: None,
      ["--config.eval.split=tests"],
      "config.eval.split='tests': Unknown split 'tests'",
    ),
    # A stray directory and no intact checkpoint: nothing to resume from.
    (
      lambda d: (d / "run" / "checkpoints" / "10").mkdir(parents=True),
      [],
      "no intact checkpoint in {d}/run/checkpoints: 10: it has no integrity "
      "record",
    ),
  ],
)
def test_faults_found_before_training_are_one_line(
  tmp_path, setup, args, message, tiny_flags
):
  setup(tmp_path)
  args = [a.format(d=tmp_path) for a in args]
  if not any(a.startswith("--workdir") for a in args):
    args.append(f"--workdir={tmp_path}/run")
  result = _main(
    "--config=configs/demo.py:quick",
    *tiny_flags(**TRAIN),
    "--config.eval.base=False",
    *args,
  )
  assert result.returncode != 0 and "Traceback" not in result.stderr, (
    result.stderr[-3000:]
  )
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("score_jax: error:"), result.stderr[-3000:]
  assert message.format(d=tmp_path) in last, last
  assert not (tmp_path / "run" / "metrics.jsonl").exists()  # No step ran.


def test_a_read_only_workdir_is_one_line(tmp_path, monkeypatch):
  # As root, chmod does not make a directory read-only: a refusing stub.
  import tempfile

  from score_jax import experiment

  def refuse(dir):
    raise PermissionError(13, "Permission denied")

  monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
  with pytest.raises(
    ValueError,
    match=rf"^--workdir={tmp_path} cannot be "
    r"written \(Permission denied\); pass a directory this "
    "user can write.$",
  ):
    experiment.check_workdir(str(tmp_path))


def test_skipped_steps_are_named_in_the_last_line_and_the_report(tmp_path):
  from score_jax import main
  from score_jax.report import runs as runs_lib

  rows = [
    {"step": s, "phase": "stage1", "skipped": int(s in (3, 4))}
    for s in range(1, 7)
  ]
  (tmp_path / "metrics.jsonl").write_text(
    "".join(json.dumps(r) + "\n" for r in rows)
  )
  assert main._skipped_note(str(tmp_path)) == (
    "; 2 of its 6 training steps were skipped (non-finite or oversized "
    "updates: 'skipped' in metrics.jsonl)"
  )
  assert runs_lib.skipped_steps(rows, 3) == 1


def test_evaluation_never_builds_a_trainer(
  tmp_path, monkeypatch, capsys, tiny_config
):
  import jax

  from score_jax import checkpoints, experiment, main, train, train_step

  config = tiny_config(mesh_shape=(1, 1, 1))
  exp = experiment.build(config, jax.devices()[:1])
  # A checkpoint as training writes it.
  state, _ = train_step.init_state(
    exp.model, exp.training.optimizer, exp.param_shardings, config.seed
  )
  with checkpoints.Checkpointer(str(tmp_path / "checkpoints")) as saver:
    saver.save(3, state, state.params, {}, config.to_json_best_effort(), None)

  def refuse(*args, **kwargs):
    raise AssertionError("evaluation built a Trainer")

  monkeypatch.setattr(train, "Trainer", refuse)
  for which, step in (("latest", 3), ("base", 0)):
    main._evaluate(exp, str(tmp_path), which)
    assert f"step {step}: accuracy@t1" in capsys.readouterr().out
    assert (tmp_path / "eval" / str(step) / "metrics.json").exists()
