"""Inference-time scaling: majority voting over parallel samples, with and
without one round of self-correction, at the same sample budget (the paper's
Section 6).

Each problem gets max(n) two-attempt episodes sampled at a temperature. For a
budget of n samples:
  (a) majority vote over the answers of n parallel first attempts;
  (b) n/2 parallel first attempts, each self-corrected once, and a majority
      vote over the answers of the n/2 second attempts.
Votes are over extracted answer strings (exact for the arithmetic task; for
MATH equal strings are a subset of equal answers, as in self-consistency
work). Writes WORKDIR/eval/<step>/scaling.json.
"""

import collections
import json
import os
from typing import Optional, Sequence

import jax
import numpy as np

from score_jax import data, files, generate, multihost, sampling
from score_jax import experiment as experiment_lib
from score_jax.tasks import rewards as rewards_lib


def majority_reward(
  answers: Sequence[Optional[str]], rewards: Sequence[float]
) -> float:
  """The reward of a majority vote over one problem's responses.

  Args:
    answers: each response's extracted answer; None (no answer) does not
      vote.
    rewards: each response's reward, in the same order.

  Returns:
    The reward of the first response giving the most common answer (the
    earliest on ties); 0 when no response has an answer.
  """
  votes = collections.Counter(a for a in answers if a is not None)
  if not votes:
    return 0.0
  top = max(votes.values())
  winner = next(a for a in answers if a is not None and votes[a] == top)
  return float(rewards[answers.index(winner)])


def curves(
  answers: np.ndarray, rewards: np.ndarray, budgets: Sequence[int]
) -> dict:
  """Majority-vote accuracy per budget n: over n first attempts, or over
  the n/2 second attempts of n/2 episodes.

  Args:
    answers: object [U, G, 2], the extracted answers (None: none) of
      attempts 1 and 2 of G samples of each of U problems.
    rewards: float [U, G, 2], their rewards.
    budgets: the budgets n, even and at most G.

  Returns:
    n (the budgets), majority_of_first_attempts and
    majority_of_corrected_attempts (an accuracy over the U problems per
    budget), and sampled_accuracy_t1 and sampled_accuracy_t2 (the mean
    reward of every sampled attempt 1 and 2).
  """

  def accuracy(n: int, attempt: int) -> float:
    return float(
      np.mean(
        [
          majority_reward(list(a[:n, attempt]), list(r[:n, attempt]))
          for a, r in zip(answers, rewards)
        ]
      )
    )

  return {
    "n": list(budgets),
    "majority_of_first_attempts": [accuracy(n, 0) for n in budgets],
    "majority_of_corrected_attempts": [accuracy(n // 2, 1) for n in budgets],
    "sampled_accuracy_t1": float(rewards[..., 0].mean()),
    "sampled_accuracy_t2": float(rewards[..., 1].mean()),
  }


def evaluate_scaling(
  exp: experiment_lib.Experiment,
  params,
  step: int,
  workdir: str,
  pool: rewards_lib.RewardPool,
) -> dict:
  """Samples max(config.eval.scaling_samples) two-attempt episodes of each
  of the first config.eval.scaling_num_examples problems at
  config.eval.scaling_temperature, grades them and computes `curves`; the
  writer process writes them to `workdir`/eval/`step`/scaling.json.

  Args:
    exp: the experiment (task, rollout, config.eval); two attempts or more,
      of which the first two are used.
    params: the params to sample from.
    step: the training step they are from, naming the output directory.
    workdir: the run's directory.
    pool: the reward workers.

  Returns:
    `curves`' result with step, split, num_examples and temperature.
  """
  cfg = exp.config.eval
  budgets = sorted(cfg.scaling_samples)
  if exp.config.rollout.num_attempts < 2 or any(
    n < 2 or n % 2 for n in budgets
  ):
    raise ValueError(
      "inference-time scaling needs two attempts and even "
      f"config.eval.scaling_samples, got {budgets}."
    )
  samples = budgets[-1]
  examples = exp.task.examples(cfg.split)[: cfg.scaling_num_examples]
  rows = [e for e in examples for _ in range(samples)]
  rollout_fn = exp.rollout_fn(
    sampling.SamplerConfig(temperature=cfg.scaling_temperature)
  )
  answers, rewards = [], []
  for index, (batch, real) in enumerate(
    data.eval_batches(rows, cfg.batch_size)
  ):
    graded = generate.generate_and_grade(
      exp,
      rollout_fn,
      params,
      batch,
      jax.random.fold_in(jax.random.key(exp.config.seed), index),
      pool,
      every_row=True,
      num_real=real,
    )
    rewards.append(graded.rewards_ba[:, :2])
    answers += [
      [exp.task.extract_answer(t[i]) for i in range(2)] for t in graded.texts_ba
    ]
  # [problem, sample, attempt]
  rewards = np.concatenate(rewards).reshape(len(examples), samples, 2)
  answers = np.array(answers, dtype=object).reshape(len(examples), samples, 2)
  result = {
    "step": step,
    "split": cfg.split,
    "num_examples": len(examples),
    "temperature": cfg.scaling_temperature,
    **curves(answers, rewards, budgets),
  }
  if multihost.is_writer():  # Every process holds the same result.
    files.write_atomic(
      os.path.join(workdir, "eval", str(step), "scaling.json"),
      json.dumps(result, indent=2) + "\n",
    )
  return result
