"""generate_and_grade, the one path from problems to graded episodes, and
the rollouts it reuses across evaluations."""

import jax
import numpy as np

from score_jax import data, evaluate, experiment, generate, sampling
from score_jax.tasks import rewards as rewards_lib


def test_rewards_are_the_tasks_own_grades_of_the_texts(tiny_config):
  exp = experiment.build(tiny_config())
  params = exp.model.init(jax.random.key(0))
  examples = list(exp.task.examples("validation")[:5])
  batch = examples + [examples[0]] * 3  # padded to a batch of 8
  sampler = sampling.SamplerConfig(temperature=1.0)
  with rewards_lib.RewardPool(exp.task.reward, 1, 5.0) as pool:
    graded = generate.generate_and_grade(
      exp,
      exp.rollout_fn(sampler),
      params,
      batch,
      jax.random.key(3),
      pool,
      every_row=True,
      num_real=5,
    )
  assert len(graded.texts_ba) == 5 and graded.rewards_ba.shape == (5, 2)
  assert graded.episode.tokens_bs.shape[0] == 5
  expected = [
    [exp.task.reward(text, e.answer_key) for text in row]
    for row, e in zip(graded.texts_ba, examples)
  ]
  np.testing.assert_array_equal(graded.rewards_ba, expected)
  assert graded.texts_ba == data.attempt_texts(exp.tokenizer, graded.episode)


def test_evaluations_compile_the_rollout_once(tmp_path, tiny_config):
  config = tiny_config(**{"eval.num_examples": 6})
  exp = experiment.build(config)
  params = exp.model.init(jax.random.key(0))
  with rewards_lib.RewardPool(exp.task.reward, 1, 5.0) as pool:
    first = evaluate.evaluate(exp, params, 1, str(tmp_path), pool)
    second = evaluate.evaluate(exp, params, 2, str(tmp_path), pool)
  rollout_fn = exp.rollout_fn(evaluate.GREEDY)
  assert rollout_fn is exp.rollout_fn(sampling.SamplerConfig(temperature=0.0))
  # One prompt bucket, one compilation for both evaluations.
  assert rollout_fn._cache_size() == 1
  assert {k: v for k, v in first.items() if k != "step"} == {
    k: v for k, v in second.items() if k != "step"
  }
