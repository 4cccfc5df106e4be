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
  """The reward of the most common answer (the earliest on ties); responses
  without an answer do not vote, and no answer at all scores 0."""
  votes = collections.Counter(a for a in answers if a is not None)
  if not votes:
    return 0.0
  top = max(votes.values())
  winner = next(a for a in answers if a is not None and votes[a] == top)
  return float(rewards[answers.index(winner)])


def curves(
  answers: np.ndarray, rewards: np.ndarray, budgets: Sequence[int]
) -> dict:
  """Majority-vote accuracy per budget n from answers and rewards of shape
  [problem, sample, attempt]: n first attempts, or n/2 second attempts."""

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
