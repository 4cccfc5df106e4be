"""The train step and loop: sharded = single-device, gradient accumulation,
non-finite skips, the frozen reference, schedules, and resume after SIGKILL."""

import dataclasses
import functools
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_jax import (
  checkpoints,
  episodes,
  experiment,
  objectives,
  packing,
  schedule,
  train,
)
from score_jax import train_step as train_step_lib


def _rl_episodes(cfg, rows=8, slots=24, attempts=2, seed=0):
  """Host episodes with a 4-slot prompt, a gap after an early stop, and two
  attempts; and their rewards."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, cfg.vocab_size, (rows, slots)).astype(np.int32)
  valid = np.ones((rows, slots), bool)
  valid[:, 6:8] = False  # a gap, as after an early stop
  mask = np.zeros((rows, attempts, slots), bool)
  mask[:, 0, 4:10] = True
  mask[:, 1, 14:22] = True
  mask &= valid[:, None]
  episode = episodes.Episode(
    tokens,
    valid,
    mask,
    np.zeros((rows, slots), np.float32),
    mask.sum(2, dtype=np.int32),
  )
  return episode, rng.integers(0, 2, (rows, attempts)).astype(np.float32)


def _rl_batch(
  exp, reference, episode, rewards, num_micro_batches=1, row_len=24
):
  """The train step's batch of host episodes: packed (one episode a row
  at the default `row_len`, so every micro-batch holds some) and scored by
  the reference, as the trainer does."""
  rows = exp.batch_sharding(1)
  R, L, M = len(rewards), row_len, num_micro_batches
  row_b, offset_b, used = packing.plan(
    episode.valid_bs.sum(1), np.arange(R), L, M
  )
  pack = jax.jit(
    functools.partial(packing.pack_episodes, num_rows=R, row_len=L),
    out_shardings=exp.packed_shardings(),
  )
  packed = pack(
    jax.device_put(episode, rows),
    jax.device_put(row_b, rows),
    jax.device_put(offset_b, rows),
    used,
  )
  reference_fn = jax.jit(train_step_lib.make_reference_fn(exp.model, M))
  return episodes.RLBatch(
    packed, reference_fn(reference, packed), jax.device_put(rewards, rows)
  )


def _jit_step(exp, state, optimizer, lr, objective, num_micro_batches=1):
  fn = train_step_lib.make_train_step(
    exp.model, optimizer, lr, objective, num_micro_batches, 2, 10
  )
  batch = episodes.RLBatch(None, None, None)
  return train_step_lib.jit_train_step(
    fn,
    jax.tree.map(lambda x: x.sharding, state),
    episodes.batch_shardings(batch, exp.batch_sharding(1), exp.replicated),
  )


def _step_setup(tiny_config, build, mesh_shape, num_micro_batches=1):
  config = tiny_config(mesh_shape=mesh_shape)
  exp = build(config)
  optimizer, lr = train_step_lib.make_optimizer(config.optimizer, 10)
  state, _ = train_step_lib.init_state(
    exp.model, optimizer, exp.param_shardings, seed=0
  )
  step = _jit_step(
    exp,
    state,
    optimizer,
    lr,
    objectives.ObjectiveConfig(stage="stage2"),
    num_micro_batches,
  )
  reference = jax.tree.map(lambda x: x * 0.9, state.params)
  return exp, state, reference, step


def _run_step(tiny_config, build, mesh_shape, num_micro_batches=1):
  exp, state, reference, step = _step_setup(
    tiny_config, build, mesh_shape, num_micro_batches
  )
  batch = _rl_batch(
    exp, reference, *_rl_episodes(exp.model.cfg), num_micro_batches
  )
  new_state, metrics = step(state, batch)
  return jax.device_get(new_state.params), jax.device_get(metrics)


def test_sharded_step_equals_single_device(build, tiny_config):
  params_1, metrics_1 = _run_step(tiny_config, build, (1, 1, 1))
  for shape in [(2, 2, 2), (1, 8, 1)]:
    params_8, metrics_8 = _run_step(tiny_config, build, shape)
    np.testing.assert_allclose(
      metrics_8["loss"], metrics_1["loss"], rtol=1e-5, atol=1e-7
    )
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
      params_8,
      params_1,
    )


def test_gradient_accumulation_equals_one_big_batch(build, tiny_config):
  params_1, metrics_1 = _run_step(
    tiny_config, build, (1, 1, 1), num_micro_batches=1
  )
  params_4, metrics_4 = _run_step(
    tiny_config, build, (1, 1, 1), num_micro_batches=4
  )
  # The gradient itself (Adam's first step hides its scale).
  np.testing.assert_allclose(
    metrics_4["grad_norm"], metrics_1["grad_norm"], rtol=1e-5
  )
  np.testing.assert_allclose(metrics_4["loss"], metrics_1["loss"], rtol=1e-5)
  # Adam divides by |g|, so near-zero gradient entries amplify summation-order
  # noise: compare the updated params at 1% of the learning rate.
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), params_4, params_1
  )


@pytest.mark.parametrize(
  "param_dtype, absorbs", [("float32", True), ("bfloat16", False)]
)
def test_float32_master_weights_absorb_the_papers_learning_rate(
  param_dtype, absorbs, build, tiny_config
):
  """A bfloat16-compute model's Adam step at lr 5e-6 (the paper's) changes
  its float32 master weights; bfloat16 weights round the update away."""
  config = tiny_config(mesh_shape=(1, 1, 1))
  config.model.update(dtype="bfloat16", param_dtype=param_dtype)
  config.optimizer.update(
    learning_rate=5e-6, warmup_steps=0, schedule="constant"
  )
  exp = build(config)
  optimizer, lr = train_step_lib.make_optimizer(config.optimizer, 10)
  state, _ = train_step_lib.init_state(
    exp.model, optimizer, exp.param_shardings, seed=0
  )
  step = _jit_step(exp, state, optimizer, lr, objectives.ObjectiveConfig())
  reference = jax.tree.map(jnp.copy, exp.model.compute_params(state.params))
  assert reference["layers"]["q"].dtype == jnp.bfloat16
  before = jax.device_get(state.params)
  new_state, metrics = step(
    state, _rl_batch(exp, reference, *_rl_episodes(exp.model.cfg))
  )
  assert float(metrics["grad_norm"]) > 0
  after = jax.device_get(new_state.params)
  # The weight matrices (norm scales start at 0, where any update shows).
  changed = np.mean(
    [
      np.mean(after["layers"][k] != before["layers"][k])
      for k in ("q", "k", "v", "o", "gate", "up", "down")
    ]
  )
  assert changed > 0.5 if absorbs else changed < 0.05, changed


def test_non_finite_step_is_skipped(build, tiny_config):
  exp, state, reference, step = _step_setup(tiny_config, build, (1, 1, 1))
  before = jax.device_get(state.params)
  episode, rewards = _rl_episodes(exp.model.cfg)
  rewards[0, 0] = np.nan
  new_state, metrics = step(state, _rl_batch(exp, reference, episode, rewards))
  assert int(metrics["skipped"]) == 1
  assert int(new_state.step) == 1
  jax.tree.map(
    np.testing.assert_array_equal, jax.device_get(new_state.params), before
  )


@pytest.mark.parametrize("fault", ["nan_optimizer_state", "huge_update"])
def test_a_step_that_would_write_nan_or_huge_params_is_skipped(
  fault, build, tiny_config
):
  exp, state, reference, step = _step_setup(tiny_config, build, (1, 1, 1))
  if fault == "nan_optimizer_state":  # NaN from Adam's second moment.
    state = dataclasses.replace(
      state,
      opt_state=jax.tree.map(
        lambda x: x * jnp.nan if x.dtype == jnp.float32 and x.ndim else x,
        state.opt_state,
      ),
    )
  else:  # lr 1e30: a finite update of 1e29.
    huge = exp.config.optimizer.copy_and_resolve_references()
    huge.update(learning_rate=1e30, warmup_steps=0)
    optimizer, lr = train_step_lib.make_optimizer(huge, 10)
    step = _jit_step(
      exp, state, optimizer, lr, objectives.ObjectiveConfig(stage="stage2")
    )
  before = jax.device_get(state.params)
  new_state, metrics = step(
    state, _rl_batch(exp, reference, *_rl_episodes(exp.model.cfg))
  )
  assert int(metrics["skipped"]) == 1 and np.isfinite(metrics["loss"])
  jax.tree.map(
    np.testing.assert_array_equal, jax.device_get(new_state.params), before
  )


def test_schedules():
  p = schedule.phases("interleaved", 10, 20, cycles=3, sft_steps=5)
  assert [(x.name, x.steps) for x in p] == [
    ("sft", 5),
    ("stage1", 4),
    ("stage2", 7),
    ("stage1", 3),
    ("stage2", 7),
    ("stage1", 3),
    ("stage2", 6),
  ]
  assert [(x.name, x.steps) for x in schedule.phases("no_stage1", 10, 20)] == [
    ("stage2", 30)
  ]
  assert schedule.phases("no_shaping", 10, 20)[1].objective.alpha == 0.0
  assert [x.name for x in schedule.phases("single_turn", 1, 2)] == [
    "single_turn"
  ]
  assert schedule.locate(p, 5) == (p[1], 5)
  assert schedule.locate(p, 15) == (p[2], 9)
  with pytest.raises(ValueError, match="config.schedule='stage3'"):
    schedule.phases("stage3", 1, 1)
  with pytest.raises(ValueError, match="config.reference='stage2'"):
    schedule.phases("score", 1, 1, reference="stage2")


@pytest.mark.parametrize(
  "name, reference, expected",
  [
    # (batch, objective's stage and alpha, refresh_reference) per phase,
    # after a warm start of 1 step.
    (
      "score",
      "base",
      [("rollout", "stage1", 10.0, True), ("rollout", "stage2", 10.0, False)],
    ),
    (
      "score",
      "stage1",
      [("rollout", "stage1", 10.0, True), ("rollout", "stage2", 10.0, True)],
    ),
    (
      "no_shaping",
      "base",
      [("rollout", "stage1", 10.0, True), ("rollout", "stage2", 0.0, False)],
    ),
    ("single_turn", "base", [("rollout", "single_turn", 10.0, True)]),
    ("star", "base", [("star", None, None, True), ("star", None, None, True)]),
    ("pair_sft", "base", [("pairs", None, None, True)]),
  ],
)
def test_a_phase_carries_its_batch_objective_and_reference_refresh(
  name, reference, expected
):
  objective = objectives.ObjectiveConfig(beta1=0.5)
  plan = schedule.phases(
    name, 2, 2, cycles=2, sft_steps=1, objective=objective, reference=reference
  )
  assert (plan[0].batch, plan[0].objective, plan[0].refresh_reference) == (
    "demonstrations",
    None,
    False,
  )
  got = [
    (
      p.batch,
      p.objective and p.objective.stage,
      p.objective and p.objective.alpha,
      p.refresh_reference,
    )
    for p in plan[1:]
  ]
  assert got == expected
  # Each RL phase keeps the config's other settings.
  assert all(p.objective.beta1 == 0.5 for p in plan if p.objective)


def test_too_many_non_finite_steps_stop_with_last_checkpoint_intact(
  tmp_path, tiny_config, runs
):
  config = tiny_config(max_consecutive_nonfinite=1, stage1_steps=4)
  exp = experiment.build(config)
  exp.task = runs.RewardOverride(exp.task, lambda *_: float("nan"))
  trainer = train.Trainer(exp, str(tmp_path))
  with pytest.raises(
    train.TrainingStopped, match="last good checkpoint is step 2"
  ):
    trainer.run()
  # The supervised steps' checkpoint is intact and restorable.
  trainer = train.Trainer(exp, str(tmp_path))
  checkpointer = trainer.checkpointer()
  assert checkpointer.all_steps() == [2]
  state, _ = trainer.initial_state(checkpointer, checkpointer.latest_step())
  assert int(state.step) == 2
  assert all(
    np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params))
  )


def _steps(workdir):
  return [
    (row["step"], row["skipped"])
    for row in map(
      json.loads, (workdir / "metrics.jsonl").read_text().splitlines()
    )
  ]


def test_a_stopped_run_stops_again_and_resumes_with_a_lower_lr(
  tmp_path, caplog, tiny_config, runs
):
  # 2 supervised steps, then Stage I's NaN rewards: steps 3 and 4 are
  # skipped (checkpoint 4 saves the count, 2), step 5 is the third: stop.
  config = tiny_config(
    max_consecutive_nonfinite=2, stage1_steps=4, stage2_steps=0
  )
  exp = experiment.build(config)
  exp.task = runs.RewardOverride(exp.task, lambda *_: float("nan"))
  with pytest.raises(
    train.TrainingStopped,
    match=r"3 consecutive steps were "
    r"skipped .*last at step 5\); the last good checkpoint "
    r"is step 4 .* Lower --config.optimizer.learning_rate",
  ):
    train.Trainer(exp, str(tmp_path)).run()
  # Rerun as is, it does not finish silently: the count was saved.
  with pytest.raises(train.TrainingStopped, match="last at step 5"):
    train.Trainer(exp, str(tmp_path)).run()
  assert _steps(tmp_path) == [(1, 0), (2, 0), (3, 1), (4, 1), (5, 1)]
  # The remedy it names is accepted, with a note.
  fixed = experiment.build(
    tiny_config(
      max_consecutive_nonfinite=2,
      stage1_steps=4,
      stage2_steps=0,
      **{"optimizer.learning_rate": 1e-4},
    )
  )
  with caplog.at_level("WARNING"):
    train.Trainer(fixed, str(tmp_path)).run()
  assert "['optimizer.learning_rate'] changed" in caplog.text
  assert _steps(tmp_path) == [(1, 0), (2, 0), (3, 1), (4, 1), (5, 0), (6, 0)]


def test_a_failed_save_stops_training_at_that_step(
  tmp_path, monkeypatch, tiny_config
):
  from orbax.checkpoint._src.handlers import json_checkpoint_handler

  async def full(*args, **kwargs):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(
    json_checkpoint_handler.JsonCheckpointHandler, "async_save", full
  )
  exp = experiment.build(tiny_config())
  with pytest.raises(
    checkpoints.CheckpointError,
    match="saving checkpoint 2 .* failed .*No space left on device",
  ):
    train.Trainer(exp, str(tmp_path)).run()
  assert [step for step, _ in _steps(tmp_path)] == [1, 2]


def test_metrics_jsonl_is_repaired_on_resume(tmp_path, caplog):
  from score_jax import writer as writer_lib

  rows = [
    json.dumps({"step": step, "loss": 1.0}) + "\n" for step in range(1, 6)
  ]
  (tmp_path / "metrics.jsonl").write_text("".join(rows) + '{"step": 6, "lo')
  with caplog.at_level("INFO"):
    writer = writer_lib.MetricsWriter(str(tmp_path), 10, initial_step=4)
  assert "dropped its torn last line 6" in caplog.text
  # Steps 5 and on are redone: their rows are replaced, not duplicated.
  assert (tmp_path / "metrics.jsonl").read_text() == "".join(rows[:4])
  writer.write(5, "stage1", {}, {"loss": 2.0}, tokens=1, step_s=1.0)
  writer.close()
  assert [
    json.loads(line)["step"]
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
  ] == [1, 2, 3, 4, 5]


def test_reference_is_frozen_base_or_stage1_result(tmp_path, tiny_config):
  config = tiny_config(reference="stage1")
  exp = experiment.build(config)
  # The loop reads a phase's fields, never its name: phases renamed run the
  # same (the names only label metrics.jsonl's rows).
  exp.training = dataclasses.replace(
    exp.training,
    phases=tuple(
      dataclasses.replace(p, name=f"phase {i}")
      for i, p in enumerate(exp.training.phases)
    ),
  )
  initial = jax.device_get(exp.model.init(jax.random.key(config.seed)))
  trainer = train.Trainer(exp, str(tmp_path / "stage1_ref"))
  trainer.run()
  checkpointer = trainer.checkpointer()
  # 2 SFT, 2 Stage I and 2 Stage II steps, a checkpoint every 2.
  end_of_sft, reference_in_sft = trainer.initial_state(checkpointer, step=2)
  end_of_stage1, reference_in_stage1 = trainer.initial_state(
    checkpointer, step=4
  )
  _, reference = trainer.initial_state(checkpointer, step=6)
  checkpointer.close()
  # The warm-started model is the base: the reference of Stage I ...
  jax.tree.map(
    np.testing.assert_array_equal, jax.device_get(reference_in_sft), initial
  )
  jax.tree.map(
    np.testing.assert_array_equal,
    jax.device_get(reference_in_stage1),
    jax.device_get(end_of_sft.params),
  )
  assert not np.array_equal(
    jax.device_get(reference_in_stage1)["embedding"], initial["embedding"]
  )
  # ... and with reference="stage1" the Stage I result is that of Stage II.
  jax.tree.map(
    np.testing.assert_array_equal,
    jax.device_get(reference),
    jax.device_get(end_of_stage1.params),
  )
  assert not np.array_equal(
    jax.device_get(reference)["embedding"],
    jax.device_get(end_of_sft.params)["embedding"],
  )

  # Every step is logged with what the issue lists, to JSONL and TensorBoard.
  lines = [
    json.loads(line)
    for line in (tmp_path / "stage1_ref" / "metrics.jsonl")
    .read_text()
    .splitlines()
  ]
  assert [line["phase"] for line in lines] == (
    ["phase 0"] * 2 + ["phase 1"] * 2 + ["phase 2"] * 2
  )
  rl_keys = {
    "reward_t1",
    "reward_t2",
    "delta",
    "delta_i_to_c",
    "delta_c_to_i",
    "kl_t1",
    "kl_t2",
    "entropy_t1",
    "entropy_t2",
    "length_t1",
    "length_t2",
    "edit_distance_ratio",
    "logprob_drift",
    "grad_norm",
    "learning_rate",
    "train_tokens_per_s",
    "generated_tokens_per_s",
    "step_s",
    "device_idle_s",
  }
  for line in lines[2:]:
    assert rl_keys <= set(line), rl_keys - set(line)
    assert all(np.isfinite(line[k]) for k in rl_keys)
  events = os.listdir(tmp_path / "stage1_ref" / "tensorboard")
  assert any(name.startswith("events.out.tfevents") for name in events)


def test_grading_beside_the_reference_changes_no_number(
  tmp_path, runs, tiny_config
):
  """The reference scores a step's episodes while the host grades them,
  or before (config.overlap_grading=False): the same metrics bit for bit
  but the timings, and the same params."""
  results = {}
  for overlap in (True, False):
    workdir = tmp_path / str(overlap)
    exp = experiment.build(
      tiny_config(overlap_grading=overlap, **{"sft.steps": 0})
    )
    state, _ = train.train(exp, str(workdir))
    lines = [
      json.loads(line)
      for line in (workdir / "metrics.jsonl").read_text().splitlines()
    ]
    assert all(line["device_idle_s"] >= 0 for line in lines)
    results[overlap] = (
      jax.device_get(state.params),
      [
        {k: v for k, v in line.items() if k not in runs.TIMING}
        for line in lines
      ],
    )
  assert len(results[True][1]) == 4
  assert results[True][1] == results[False][1]
  jax.tree.map(
    np.testing.assert_array_equal, results[True][0], results[False][0]
  )


def _train_process(repo, tiny_flags, workdir, log, **overrides):
  """`main --mode=train` in a subprocess; its output goes to the file `log`
  (a pipe nobody reads would fill up and block it)."""
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count=2",
  )
  return subprocess.Popen(
    [
      sys.executable,
      "-m",
      "score_jax.main",
      "--config=configs/demo.py:quick",
      "--mode=train",
      f"--workdir={workdir}",
      "--config.mesh_shape=(2,1,1)",
      *tiny_flags(**overrides),
    ],
    cwd=repo,
    env=env,
    stdout=log,
    stderr=subprocess.STDOUT,
  )


def test_sigkill_and_resume_ends_with_the_same_params(
  tmp_path, build, tiny_config, repo, tiny_flags
):
  overrides = {"stage2_steps": 4}  # 8 steps, checkpoints every 2
  log_path = tmp_path / "log.txt"
  log = open(log_path, "w")
  tail = lambda: log_path.read_text()[-3000:]
  straight = _train_process(
    repo, tiny_flags, tmp_path / "straight", log, **overrides
  )
  assert straight.wait(timeout=600) == 0, tail()

  killed = _train_process(
    repo, tiny_flags, tmp_path / "killed", log, **overrides
  )
  checkpoint_dir = tmp_path / "killed" / "checkpoints"
  deadline = time.time() + 600
  while not (checkpoint_dir / "4").exists():  # mid Stage I -> Stage II
    assert time.time() < deadline and killed.poll() is None, tail()
    time.sleep(0.2)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  assert not (checkpoint_dir / "8").exists()
  resumed = _train_process(
    repo, tiny_flags, tmp_path / "killed", log, **overrides
  )
  assert resumed.wait(timeout=600) == 0, tail()

  exp = build(tiny_config(mesh_shape=(1, 1, 1), **overrides))
  finals = []
  for run in ("straight", "killed"):
    trainer = train.Trainer(exp, str(tmp_path / run))
    state, _ = trainer.initial_state(
      trainer.checkpointer(), trainer.checkpointer().latest_step()
    )
    assert int(state.step) == 8
    finals.append(jax.device_get(state.params))
  jax.tree.map(np.testing.assert_array_equal, *finals)
  steps = [
    json.loads(line)["step"]
    for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
  ]
  assert steps == list(range(1, 9))  # Redone steps replace their rows.


def test_a_run_starts_from_the_params_config_init_names(
  tmp_path, build, tiny_config
):
  from score_jax.models import loading

  saved = build(tiny_config(mesh_shape=(1, 1, 1))).model.init(jax.random.key(7))
  loading.save(str(tmp_path / "base"), saved)
  exp = build(
    tiny_config(mesh_shape=(1, 4, 1), **{"init.path": str(tmp_path / "base")})
  )
  trainer = train.Trainer(exp, str(tmp_path / "run"))
  state, reference = trainer.initial_state(trainer.checkpointer(), None)
  for tree in (state.params, reference):
    jax.tree.map(
      np.testing.assert_array_equal, jax.device_get(tree), jax.device_get(saved)
    )
  assert (
    state.params["embedding"].sharding.spec
    == exp.param_shardings["embedding"].spec
  )
  other = build(
    tiny_config(
      mesh_shape=(1, 1, 1),
      **{"init.path": str(tmp_path / "base"), "model.num_layers": 2},
    )
  )
  with pytest.raises(ValueError, match="has shape .* expects"):
    other.initial_params()
  with pytest.raises(FileNotFoundError, match="is not a directory"):
    build(
      tiny_config(mesh_shape=(1, 1, 1), **{"init.path": str(tmp_path / "nope")})
    )


def test_profile_steps_write_a_trace(tmp_path, tiny_config):
  # Two supervised steps (no rollout to compile); the second is traced.
  config = tiny_config(stage1_steps=0, stage2_steps=0, profile_steps=(2, 2))
  train.Trainer(experiment.build(config), str(tmp_path)).run()
  assert list((tmp_path / "profile").rglob("*.xplane.pb"))


def test_validation_during_training_chooses_the_best_checkpoint(
  tmp_path, tiny_config
):
  config = tiny_config(
    stage2_steps=0, **{"eval.every_steps": 2, "checkpoint.max_to_keep": 1}
  )
  trainer = train.Trainer(experiment.build(config), str(tmp_path))
  trainer.run()
  rows = [
    json.loads(line)
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
  ]
  validated = {
    r["step"]: r["val/accuracy_t2"] for r in rows if "val/accuracy_t2" in r
  }
  assert sorted(validated) == [2, 4]
  for step, accuracy in validated.items():
    m = json.loads(
      (tmp_path / "validation" / str(step) / "metrics.json").read_text()
    )
    assert (m["split"], m["accuracy_t2"]) == ("validation", accuracy)
  assert not (tmp_path / "eval").exists()  # Test evaluations only there.
  # The best checkpoint is the one of the highest validation accuracy (the
  # latest of equals), whatever the training reward says.
  best = max(validated, key=lambda step: (validated[step], step))
  assert trainer.best_step == best
  with trainer.checkpointer() as checkpointer:
    assert checkpoints.resolve_step(checkpointer, "best") == best
    assert best in checkpointer.all_steps()


def test_a_workdir_from_before_integrity_records_is_adopted_and_resumes(
  tmp_path, repo, tiny_config, tiny_flags
):
  supervised = {"stage1_steps": 0, "stage2_steps": 0}  # 2 steps, saved.
  train.Trainer(
    experiment.build(tiny_config(**supervised)), str(tmp_path)
  ).run()
  for record in (tmp_path / "checkpoints").rglob("integrity*.json"):
    record.unlink()
  with train.Trainer(
    experiment.build(tiny_config(**supervised)), str(tmp_path)
  ).checkpointer() as checkpointer:
    with pytest.raises(checkpoints.CheckpointError, match="no intact"):
      checkpointer.intact_latest()
  # The documented command.
  adopted = subprocess.run(
    [
      sys.executable,
      "-m",
      "score_jax.main",
      "--mode=adopt",
      "--config=configs/demo.py:quick",
      f"--workdir={tmp_path}",
      *tiny_flags(**supervised),
    ],
    cwd=repo,
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert adopted.returncode == 0, adopted.stderr[-3000:]
  assert adopted.stdout.startswith(f"checkpoint 2 in {tmp_path}: ")
  assert adopted.stdout.endswith(
    "values, all finite; wrote its integrity record, a rerun resumes from it\n"
  )
  trainer = train.Trainer(
    experiment.build(tiny_config(**supervised)), str(tmp_path)
  )
  with trainer.checkpointer() as checkpointer:
    assert checkpointer.intact_latest() == 2
    state, _ = trainer.initial_state(checkpointer, 2)
  assert int(state.step) == 2
