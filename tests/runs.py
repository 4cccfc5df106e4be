"""What the tests of runs share, through conftest.py's fixtures and for the
worker processes some tests start (which cannot take fixtures): the tiny
config, a task with a reward of the test's choosing, hooks that act in the
middle of a step, what a run leaves that must not depend on whether it was
stopped (metrics rows less timings, the final train state, the data
position, the checkpoints kept and the best), and an evaluation's recount."""

import json
import os

import jax
import pytest

from configs import demo
from score_jax.tasks import base

# A tiny but complete run: 2 supervised, 2 Stage I and 2 Stage II steps of
# 4 prompts x 2 samples on a 1-layer model; a checkpoint every 2 steps.
TINY = {
  "model.num_layers": 1,
  "model.d_model": 32,
  "model.mlp_dim": 64,
  "model.head_dim": 16,
  "rollout.max_attempt_len": 10,
  "prompts_per_step": 4,
  "samples_per_prompt": 2,
  "sft.steps": 2,
  "sft.max_len": 160,
  "stage1_steps": 2,
  "stage2_steps": 2,
  "checkpoint.every_steps": 2,
  "rewards.num_workers": 1,
  "optimizer.learning_rate": 1e-3,
  "eval.num_examples": 8,
  "eval.batch_size": 8,
  "task.num_train": 200,
  "task.num_test": 8,
  "task.num_validation": 8,
  "init.path": "",
}
# Timings differ between runs; everything else must not.
TIMING = (
  "step_s",
  "rollout_s",
  "train_tokens_per_s",
  "generated_tokens_per_s",
  "device_idle_s",
)


def tiny_config(**overrides):
  """configs/demo.py:quick with TINY and then `overrides` (dotted field
  names: {"eval.batch_size": 4})."""
  config = demo.get_config("quick")
  for key, value in {**TINY, **overrides}.items():
    *path, name = key.split(".")
    node = config
    for part in path:
      node = node[part]
    node[name] = value
  return config


def tiny_flags(**overrides) -> list[str]:
  """TINY and `overrides` as score_jax.main's --config.x=y flags."""
  return [f"--config.{k}={v}" for k, v in {**TINY, **overrides}.items()]


class RewardOverride(base.Task):
  """`task` with its reward replaced by `reward(response, answer_key)`; the
  rest is the task's."""

  def __init__(self, task: base.Task, reward):
    self._task, self._reward = task, reward

  def __getattr__(self, name):
    return getattr(self._task, name)

  def examples(self, split):
    return self._task.examples(split)

  def format_problem(self, example):
    return self._task.format_problem(example)

  def demonstration(self, example, rng):
    return self._task.demonstration(example, rng)

  def extract_answer(self, response):
    return self._task.extract_answer(response)

  def reward(self, response, answer_key):
    return self._reward(response, answer_key)


def parity(response, answer_key):
  """A reward that a random model earns half the time (the parity of the
  response's length), so that the policy gradient is not zero."""
  del answer_key
  return float(len(response) % 2)


def parity_task(task, flag=None, notify=None) -> RewardOverride:
  """`task` with the `parity` reward. While the file `flag` exists, the
  first reward call (in a reward worker) removes it and calls `notify()`:
  something that happens mid-grading."""

  def reward(response, answer_key):
    if flag is not None:
      try:
        os.unlink(flag)
        notify()
      except FileNotFoundError:
        pass
    return parity(response, answer_key)

  return RewardOverride(task, reward)


def notify_on(trainer, where: str, call: int, flag: str, send) -> None:
  """Makes the `call`-th rollout, update or scheduled save of `trainer`'s
  next run call `send()` once it has started (JAX dispatches
  asynchronously: the device is still at work), or with where="grading"
  create the file `flag` after the `call`-th rollout, so that its grading
  notifies (see parity_task)."""
  calls = []

  def counted(fn):
    def wrapped(*args, **kwargs):
      out = fn(*args, **kwargs)
      calls.append(where)
      if len(calls) == call:
        if where == "grading":
          open(flag, "w").close()
        else:
          send()
      return out

    return wrapped

  if where in ("rollout", "grading"):
    trainer.rollout_fn = counted(trainer.rollout_fn)
  elif where == "update":
    train_step = trainer.exp.train_step  # The jitted step of an objective.
    trainer.exp.train_step = lambda objective: counted(train_step(objective))
  else:
    open_checkpointer = trainer.checkpointer

    def checkpointer():
      opened = open_checkpointer()
      save = opened.save
      opened.save = lambda *a, **k: (
        save(*a, **k) if k.get("preemption") else counted(save)(*a, **k)
      )
      return opened

    trainer.checkpointer = checkpointer


def rows(workdir):
  """The rows of WORKDIR/metrics.jsonl less their timings."""
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [
      {k: v for k, v in json.loads(line).items() if k not in TIMING}
      for line in f
    ]


def final(trainer):
  """(train state, data state, kept steps, best step) of the latest
  checkpoint in `trainer`'s workdir, on the host."""
  with trainer.checkpointer() as checkpointer:
    step = checkpointer.latest_step()
    state, _ = trainer.initial_state(checkpointer, step)
    _, _, data = checkpointer.restore(
      step,
      trainer.abstract_state,
      trainer.exp.abstract_reference(),
      trainer.exp.config.to_json_best_effort(),
    )
    return (
      jax.device_get(state),
      data,
      checkpointer.all_steps(),
      checkpointer.best_step(),
    )


def agrees_with_its_transcripts(eval_dir) -> bool:
  """Whether an evaluation's metrics.json holds the accuracies and deltas
  recounted from the rewards its transcripts.jsonl holds problem by
  problem (eval_dir: a pathlib.Path)."""
  metrics = json.loads((eval_dir / "metrics.json").read_text())
  rewards = [
    json.loads(line)["rewards"]
    for line in (eval_dir / "transcripts.jsonl").read_text().splitlines()
  ]
  first = [r[0] > 0.5 for r in rewards]
  second = [r[1] > 0.5 for r in rewards]
  n = len(rewards)
  recounted = {
    "accuracy_t1": sum(first) / n,
    "accuracy_t2": sum(second) / n,
    "delta_i_to_c": sum(s and not f for f, s in zip(first, second)) / n,
    "delta_c_to_i": sum(f and not s for f, s in zip(first, second)) / n,
  }
  return metrics["num_examples"] == n and {
    k: metrics[k] for k in recounted
  } == pytest.approx(recounted)
