"""The training loop: the schedule's phases, step by step, to checkpoints.

A step's host path reads one way (docs/design.md, "One step"):
  data       the step's problems (data.PromptIterator), G copies of each
  generate   the batch its phase's `batch` names: sampled episodes
             (generate.py) packed on the devices and scored by the
             reference while the host grades them, or episodes to imitate
  train step the jitted step of the phase's objective (Experiment.train_step)
  checkpoint on schedule, and on a preemption notice
The loop dispatches on the phase's fields (schedule.Phase), never on its
name. The run resumes from the latest intact checkpoint in the workdir.
"""

import dataclasses
import functools
import os
import random
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from score_jax import checkpoints as checkpoints_lib
from score_jax import data as data_lib
from score_jax import (
  device_timeline,
  generate,
  host_failures,
  multihost,
  packing,
  preemption,
)
from score_jax import episodes as episodes_lib
from score_jax import evaluate as evaluate_lib
from score_jax import experiment as experiment_lib
from score_jax import metrics as metrics_lib
from score_jax import schedule as schedule_lib
from score_jax import train_step as train_step_lib
from score_jax import writer as writer_lib
from score_jax.tasks import rewards as rewards_lib


class TrainingStopped(RuntimeError):
  """Too many consecutive skipped steps; the last good checkpoint stands."""


def _fingerprint(tree) -> float:
  """A cheap checksum to assert that the reference params never change."""
  return float(
    sum(jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in jax.tree.leaves(tree))
  )


@dataclasses.dataclass
class Trainer:
  """Trains `exp` in `workdir` (`run`); a rerun resumes there.

  Attributes:
    exp: the experiment.
    workdir: where checkpoints, metrics.jsonl and evaluations go.
  """

  exp: experiment_lib.Experiment
  workdir: str

  def __post_init__(self):
    cfg = self.exp.config
    training = self.exp.training
    self.plan, self.total_steps = training.phases, training.total_steps
    self.optimizer = training.optimizer
    self.examples = data_lib.training_examples(
      self.exp.task,
      self.exp.tokenizer,
      cfg.rollout.max_prompt_len or max(cfg.rollout.prompt_buckets),
    )
    self.iterator = data_lib.PromptIterator(
      len(self.examples), cfg.prompts_per_step, cfg.seed
    )
    if self.exp.model.cfg.param_dtype != "float32":
      raise ValueError(
        f"the params are {self.exp.model.cfg.param_dtype} (config.model."
        "param_dtype, or the checkpoint's); training keeps float32 master "
        f"weights, since an update of lr {cfg.optimizer.learning_rate:g} "
        "rounds away in 16 bits: set --config.model.param_dtype=float32 "
        "(the forward pass stays in config.model.dtype)."
      )
    # Which of each step's prompts this process loads, samples and scores
    # (its devices' rows of the batch; all of them on one host).
    self.own_prompts = multihost.process_groups(
      self.exp.batch_sharding(1), cfg.prompts_per_step, cfg.samples_per_prompt
    )
    self.rollout_fn = self.exp.rollout_fn(
      training.sampler, training.rollout.samples_per_prompt
    )
    self.abstract_state = self.exp.abstract_state()
    self.batch_fns = {
      "demonstrations": self._demonstration_batch,
      "rollout": self._rollout_batch,
      "star": functools.partial(self._sampled_batch, self._star),
      "pairs": functools.partial(self._sampled_batch, self._pairs),
    }
    self.timeline = device_timeline.DeviceTimeline()

  # -- state ---------------------------------------------------------------

  def checkpointer(self) -> checkpoints_lib.Checkpointer:
    """A Checkpointer of WORKDIR/checkpoints (config.checkpoint.max_to_keep)."""
    return checkpoints_lib.Checkpointer(
      f"{self.workdir}/checkpoints", self.exp.config.checkpoint.max_to_keep
    )

  def initial_state(
    self, checkpointer: checkpoints_lib.Checkpointer, step: Optional[int]
  ):
    """The state training starts from, restored or fresh; also resets the
    loop's skip count and recent rewards (restored with a checkpoint).

    Args:
      checkpointer: the run's checkpoints.
      step: the checkpoint to resume from (see checkpoints.py for the
        restore order; its data position is restored too). None: a fresh
        state, from config.init's weights if any, else the random init.

    Returns:
      (the train state, the reference params in the compute dtype; a fresh
      run's reference is a copy of its params).
    """
    self.consecutive_skips = 0
    # Training rewards since the last scheduled save, which chooses the best.
    self.recent_rewards = []
    if step is None:
      state, _ = train_step_lib.init_state(
        self.exp.model,
        self.optimizer,
        self.exp.param_shardings,
        self.exp.config.seed,
        self.exp.initial_params(),
      )
      # The reference starts as the base model.
      return state, self._frozen_copy(state.params)
    # Restored onto placeholders: no second copy of the state is allocated.
    state, reference, data_state = checkpointer.restore(
      step,
      self.abstract_state,
      self.exp.abstract_reference(),
      self.exp.config.to_json_best_effort(),
    )
    self.iterator.restore(data_state)
    # Saved, so that a run stopped by skipped steps, rerun, stops again
    # unless what it changed (the optimizer) makes the steps good.
    self.consecutive_skips = int(data_state.get("consecutive_skips", 0))
    self.recent_rewards = list(data_state.get("recent_rewards", []))
    logging.info("restored step %d from %s", step, self.workdir)
    return state, reference

  def _frozen_copy(self, params):
    """The reference: the params in the compute dtype (the forward pass's
    numerics at its memory), a copy that the donated state never aliases."""
    copy = lambda p: jax.tree.map(jnp.copy, self.exp.model.compute_params(p))
    return jax.jit(copy, out_shardings=self.exp.param_shardings)(params)

  # -- batches: one per Phase.batch, each (state, reference, examples,
  # rng, pool, step) -> (batch, host metrics) ----------------------------

  def _demonstration_batch(
    self, state, reference, examples, rng, pool, step: int
  ):
    """The task's demonstrations of `examples`, to imitate."""
    del state, reference, rng, pool
    cfg = self.exp.config
    rng = random.Random(cfg.seed * 1_000_003 + step)
    supervised = data_lib.demonstrations(
      self.exp.tokenizer,
      [self.exp.task.format_problem(e) for e in examples],
      [self.exp.task.demonstration(e, rng) for e in examples],
      self.exp.instruction_ids,
      cfg.sft.max_len,
    )
    return self._supervised_batch(supervised), {}

  def _sampled_batch(
    self, selection, state, reference, examples, rng, pool, step: int
  ):
    """Episodes of `examples` sampled from the reference, graded, and
    turned into what to imitate by `selection` (STaR's or Pair-SFT's)."""
    del state
    graded = generate.grade(self._generate(reference, examples, rng), pool)
    supervised = selection(graded, step)
    host = self._host_metrics(graded)
    host["sft_rows_kept"] = float(np.mean(supervised.loss_mask_bs.any(1)))
    return self._supervised_batch(supervised), host

  def _star(self, graded: generate.Graded, step: int):
    del step
    return data_lib.star_batch(graded.episode, graded.rewards_ba)

  def _pairs(self, graded: generate.Graded, step: int):
    cfg = self.exp.config
    return data_lib.pair_batch(
      graded.episode,
      graded.rewards_ba,
      cfg.samples_per_prompt,
      cfg.rollout.max_attempt_len,
      self.exp.tokenizer.pad_id,
      cfg.seed * 1_000_003 + step,
    )

  def _rollout_batch(self, state, reference, examples, rng, pool, step: int):
    """Episodes of `examples` sampled from the policy. They stay on the
    devices as the rollout left them and are packed there; the reference
    scores them while the host grades (or first, with
    config.overlap_grading off: the same numbers); only the rewards, graded
    on the host for this process's rows, go up."""
    del step
    generated = self._generate(state.params, examples, rng)
    packed = self._pack(
      packing.pack_episodes,
      generated.episode.valid_bs,
      self.exp.row_len,
      generated.device_episode,
    )
    reference_log_probs = self.exp.reference_fn(reference, packed)
    self.timeline.dispatched(reference_log_probs)
    if not self.exp.config.overlap_grading:
      jax.block_until_ready(reference_log_probs)
    graded = generate.grade(generated, pool)
    rewards_ba = multihost.to_global(
      graded.rewards_ba, self.exp.batch_sharding(1)
    )
    return episodes_lib.RLBatch(
      packed, reference_log_probs, rewards_ba
    ), self._host_metrics(graded)

  def _generate(self, params, examples, rng) -> generate.Generated:
    """The episodes of `examples` (this process's rows of the batch, G
    copies of each prompt), sampled from `params` and decoded."""
    G = self.exp.training.rollout.samples_per_prompt
    return generate.generate(
      self.exp,
      self.rollout_fn,
      params,
      examples[::G],
      rng,
      every_row=False,
      samples_per_prompt=G,
      on_dispatch=self.timeline.dispatched,
    )

  def _supervised_batch(self, supervised: episodes_lib.Supervised):
    """An SFTBatch of this process's supervised episodes."""
    device = multihost.to_global(
      (supervised.tokens_bs, supervised.valid_bs, supervised.loss_mask_bs),
      self.exp.batch_sharding(1),
    )
    return episodes_lib.SFTBatch(
      self._pack(
        packing.pack_supervised,
        supervised.valid_bs,
        packing.row_len(supervised.tokens_bs.shape[1]),
        *device,
      )
    )

  def _pack(self, pack, valid_bs: np.ndarray, row_len: int, *device_args):
    """The episodes of `device_args` packed into rows of `row_len` slots
    (packing.py): planned on the host from this process's rows
    (`valid_bs`), moved on the devices by `pack`."""
    cfg = self.exp.config
    row_b, offset_b, used = packing.plan_global(
      valid_bs.sum(1),
      self.exp.batch_sharding(1),
      cfg.prompts_per_step * cfg.samples_per_prompt,
      row_len,
      cfg.num_micro_batches,
    )
    packed = self.exp.pack_fn(pack, row_len)(
      *device_args, row_b, offset_b, used
    )
    self.timeline.dispatched(packed)
    return packed

  def _host_metrics(self, graded: generate.Graded) -> dict:
    """Metrics of the graded episodes over the whole batch (every
    process's rows)."""
    cfg = self.exp.config
    texts, rewards = graded.texts_ba, graded.rewards_ba
    rollout_s = graded.generated.rollout_s
    all_rewards, all_lengths, edit_ratios, all_failures = multihost.gather(
      (
        rewards,
        graded.episode.lengths_ba,
        np.array([metrics_lib.edit_distance_ratio(t[0], t[1]) for t in texts]),
        graded.num_failed,
      )
    )
    host = dict(
      metrics_lib.self_correction(all_rewards[:, 0], all_rewards[:, 1]),
      reward_failures=int(all_failures.sum()),
      edit_distance_ratio=float(np.mean(edit_ratios)),
      generated_tokens_per_s=float(all_lengths.sum() / rollout_s),
      rollout_s=rollout_s,
    )
    for i in range(cfg.rollout.num_attempts):
      host[f"reward_t{i + 1}"] = float(all_rewards[:, i].mean())
      host[f"length_t{i + 1}"] = float(all_lengths[:, i].mean())
    return host

  # -- loop ----------------------------------------------------------------

  def run(self) -> train_step_lib.TrainState:
    """Trains to the end of the schedule; on a preemption notice, saves and
    raises preemption.Preempted; when another process fails, raises
    host_failures.HostFailed."""
    hosts = self.exp.config.hosts
    with self.checkpointer() as checkpointer, preemption.Notice() as notice:
      with host_failures.HostWatch(
        hosts.step_timeout_s,
        hosts.heartbeat_timeout_s,
        checkpointer.last_complete,
      ) as watch:
        try:
          return self._run(checkpointer, notice, watch)
        except (
          preemption.Preempted,
          TrainingStopped,
          host_failures.HostFailed,
          checkpoints_lib.CheckpointError,
        ):
          raise
        except Exception as e:  # A collective that a dead process broke?
          failure = watch.explain()
          if failure is not None:
            raise failure from e
          raise

  def _data_state(self) -> dict:
    """What a checkpoint holds besides the model: the data position, and
    what the next steps need to do as the run would have done unstopped."""
    return dict(
      self.iterator.state(),
      consecutive_skips=self.consecutive_skips,
      recent_rewards=list(self.recent_rewards),
    )

  def _stop(self, checkpointer, step: int, state, reference, data_state):
    """Saves `step` on a preemption notice, unless it is saved already;
    raises preemption.Preempted once the save is complete."""
    checkpointer.save(
      step,
      state,
      reference,
      data_state,
      self.exp.config.to_json_best_effort(),
      None,
      preemption=True,
    )
    checkpointer.wait()
    raise preemption.Preempted(step, checkpointer.directory)

  def _run(self, checkpointer, notice, watch) -> train_step_lib.TrainState:
    cfg = self.exp.config
    state, reference = self.initial_state(
      checkpointer, checkpointer.intact_latest()
    )
    reference_print = _fingerprint(reference)
    writer = writer_lib.MetricsWriter(
      self.workdir, self.total_steps, int(state.step), multihost.is_writer()
    )
    profile = _Profile(cfg.profile_steps, self.workdir)
    if int(state.step):
      writer.event(
        f"resumed after step {int(state.step)} from {checkpointer.directory}"
      )
    watch.starting(int(state.step))
    with (
      rewards_lib.RewardPool(
        self.exp.task.reward, cfg.rewards.num_workers, cfg.rewards.timeout_s
      ) as pool,
      profile,
    ):
      first_step = int(state.step)
      for step in range(first_step, self.total_steps):
        checkpointer.check()  # No step trains on past a failed save.
        profile.before(step + 1)
        # What a save holds if a notice stops this step before its update.
        before = reference, self._data_state()
        phase, phase_start = schedule_lib.locate(self.plan, step)
        if step in (phase_start, first_step):
          writer.event(_describe(phase, phase_start))
        if phase.refresh_reference and step == phase_start:
          reference = self._frozen_copy(state.params)
          reference_print = _fingerprint(reference)
        start = time.perf_counter()
        self.timeline.begin()
        # Every phase sees G copies of each prompt: one batch shape for all.
        # The host-side batch holds this process's prompts only.
        examples = [
          self.examples[i]
          for i in self.iterator.next()[self.own_prompts]
          for _ in range(cfg.samples_per_prompt)
        ]
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), step)
        batch, host = self.batch_fns[phase.batch](
          state, reference, examples, rng, pool, step
        )
        watch.check(step + 1, "rollout")
        if notice.reached():  # After the rollout: the step is redone.
          self._stop(checkpointer, step, state, *before)
        if "reward_t1" in host:
          self.recent_rewards.append(
            host[f"reward_t{cfg.rollout.num_attempts}"]
          )
        state, step_metrics = self.exp.train_step(phase.objective)(state, batch)
        self.timeline.dispatched(step_metrics)
        step_metrics = jax.device_get(step_metrics)
        host["device_idle_s"] = self.timeline.idle_seconds()
        self.consecutive_skips = (
          self.consecutive_skips + 1 if step_metrics["skipped"] else 0
        )
        step_s = time.perf_counter() - start
        profile.after(step + 1)
        validation = self._validate(state.params, step + 1, pool)
        if validation:
          writer.event(
            f"step {step + 1}: validation "
            + "  ".join(
              f"{k.removeprefix('val/')} {v:.3f}"
              for k, v in validation.items()
              if "accuracy" in k
            )
          )
        writer.write(
          step + 1,
          phase.name,
          {**host, **validation},
          step_metrics,
          tokens=int(jnp.sum(batch.packed.episodes_rt >= 0)),
          step_s=step_s,
        )
        if self.consecutive_skips > cfg.max_consecutive_nonfinite:
          checkpointer.wait()
          raise TrainingStopped(
            f"{self.consecutive_skips} consecutive steps were skipped (a "
            "non-finite loss, gradient, params or optimizer state, or an "
            f"update over config.max_update_ratio; last at step {step + 1}"
            f"); {_last_good(checkpointer)}. Lower "
            "--config.optimizer.learning_rate or check the data, then "
            "rerun to resume."
          )
        done = step + 1 == self.total_steps
        if (step + 1) % cfg.checkpoint.every_steps == 0 or done:
          if _fingerprint(reference) != reference_print:
            raise AssertionError("the reference params changed during training")
          train_reward = (
            float(np.mean(self.recent_rewards)) if self.recent_rewards else None
          )
          self.recent_rewards = []
          checkpointer.save(
            step + 1,
            state,
            reference,
            self._data_state(),
            cfg.to_json_best_effort(),
            train_reward,
            validation.get(f"val/accuracy_t{cfg.rollout.num_attempts}"),
          )
          writer.event(
            f"step {step + 1}: checkpoint saved in {checkpointer.directory}"
          )
        watch.check(step + 1, "update")
        if notice.reached():  # After the update and its scheduled save.
          self._stop(
            checkpointer, step + 1, state, reference, self._data_state()
          )
    checkpointer.wait()
    writer.close()
    self.best_step = checkpointer.best_step()
    return state

  def _validate(self, params, step: int, pool) -> dict:
    """The validation metrics (val/...) after `step` when
    config.eval.every_steps asks for them, and after the last step, so that
    the last checkpoint competes for the best; else {}."""
    cfg = self.exp.config.eval
    if not cfg.every_steps or (
      step % cfg.every_steps and step != self.total_steps
    ):
      return {}
    result = evaluate_lib.evaluate(
      self.exp,
      params,
      step,
      self.workdir,
      pool,
      split=cfg.validation_split,
      directory="validation",
    )
    # The rates (accuracies, deltas, edit distance); not the counts.
    return {
      f"val/{name}": value
      for name, value in result.items()
      if isinstance(value, float)
    }


def _describe(phase: schedule_lib.Phase, start: int) -> str:
  """A phase, for the console line at its start."""
  what = (
    f"{phase.objective.stage} objective"
    if phase.objective
    else "supervised loss"
  )
  refresh = ", the reference refreshed" if phase.refresh_reference else ""
  return (
    f"steps {start + 1}-{start + phase.steps}: phase {phase.name} "
    f"({phase.batch} batches, {what}{refresh})"
  )


class _Profile:
  """A jax.profiler trace of the steps config.profile_steps = (first, last)
  into WORKDIR/profile/, on process 0 (every process runs the same
  programs)."""

  def __init__(self, steps, workdir: str):
    self._first, self._last = tuple(steps) or (0, 0)
    self._directory = os.path.join(workdir, "profile")
    self._tracing = False

  def before(self, step: int) -> None:
    if step == self._first and multihost.is_writer():
      jax.profiler.start_trace(self._directory)
      self._tracing = True

  def after(self, step: int) -> None:
    """Called once `step`'s results are on the host: its work is done."""
    if self._tracing and step == self._last:
      self._stop()

  def _stop(self) -> None:
    jax.profiler.stop_trace()
    self._tracing = False
    logging.info(
      "profile of steps %d to %d: %s", self._first, self._last, self._directory
    )

  def __enter__(self) -> "_Profile":
    return self

  def __exit__(self, *exc_info) -> None:
    if self._tracing:  # A run that ended, or failed, inside the range.
      self._stop()


def _last_good(checkpointer: checkpoints_lib.Checkpointer) -> str:
  """The checkpoint a rerun resumes from: skipped steps never reach the
  params, so every saved one is finite and within config.max_update_ratio."""
  step = checkpointer.latest_step()
  if step is None:
    return "there is no checkpoint yet (a rerun starts afresh)"
  return f"the last good checkpoint is step {step} in {checkpointer.directory}"


def train(
  exp: experiment_lib.Experiment,
  workdir: str,
) -> tuple[train_step_lib.TrainState, Optional[int]]:
  """Trains to the end of the schedule (`Trainer.run`), resuming from the
  latest intact checkpoint in `workdir`.

  Args:
    exp: the experiment.
    workdir: where checkpoints, metrics.jsonl and evaluations go.

  Returns:
    (the final train state, the step of the best checkpoint: by validation
    accuracy, else training reward; None when neither was measured).
  """
  trainer = Trainer(exp, workdir)
  state = trainer.run()
  return state, trainer.best_step
