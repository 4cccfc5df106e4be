"""Inference-time scaling: majority votes against a brute-force count, and a
run through the real sampler."""

import json

import jax
import numpy as np

from score_jax import experiment, scaling
from score_jax.tasks import rewards as rewards_lib


def test_majority_reward():
  assert scaling.majority_reward(["3", "4", "4"], [1, 0, 0]) == 0.0
  assert scaling.majority_reward(["3", None, None], [1, 0, 0]) == 1.0
  # A tie goes to the answer seen first.
  assert scaling.majority_reward(["5", "3", "3", "5"], [0, 1, 1, 0]) == 0.0
  assert scaling.majority_reward([None, None], [0, 0]) == 0.0


def _brute_force_vote(answers, rewards):
  """The reward of a most frequent answer, by counting every pair."""
  best, best_count = 0.0, 0
  for i, a in enumerate(answers):
    if a is None:
      continue
    count = sum(a == b for b in answers)
    if count > best_count:
      best, best_count = rewards[i], count
  return float(best)


def test_curves_match_a_brute_force_vote():
  rng = np.random.default_rng(0)
  problems, samples = 50, 8
  answers = rng.choice(
    np.array(["1", "2", "3", None], dtype=object), (problems, samples, 2)
  )
  rewards = (answers == "2").astype(float)  # "2" is right everywhere
  result = scaling.curves(answers, rewards, [2, 4, 8])
  for k, n in enumerate([2, 4, 8]):
    first = np.mean(
      [
        _brute_force_vote(list(a[:n, 0]), list(r[:n, 0]))
        for a, r in zip(answers, rewards)
      ]
    )
    corrected = np.mean(
      [
        _brute_force_vote(list(a[: n // 2, 1]), list(r[: n // 2, 1]))
        for a, r in zip(answers, rewards)
      ]
    )
    assert result["majority_of_first_attempts"][k] == first
    assert result["majority_of_corrected_attempts"][k] == corrected
  assert result["sampled_accuracy_t1"] == rewards[..., 0].mean()


def test_scaling_run_writes_its_curves(tmp_path, tiny_config):
  config = tiny_config(
    **{"eval.scaling_num_examples": 3, "eval.scaling_samples": (2, 4)}
  )
  exp = experiment.build(config)
  params = exp.model.init(jax.random.key(0))
  with rewards_lib.RewardPool(exp.task.reward, 1, 5.0) as pool:
    result = scaling.evaluate_scaling(exp, params, 7, str(tmp_path), pool)
  saved = json.loads((tmp_path / "eval" / "7" / "scaling.json").read_text())
  assert saved == result
  assert saved["n"] == [2, 4] and saved["num_examples"] == 3
  assert saved["temperature"] == 0.7
