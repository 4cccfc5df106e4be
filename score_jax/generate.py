"""Generate and grade: prompts -> the rollout -> attempt texts -> rewards.

The one path from problems to graded episodes, taken by training (its
process's rows), evaluation and inference-time scaling (every row on every
process) and the sampled baselines (STaR, Pair-SFT). It comes in two halves,
`generate` and `grade`, so that the trainer can put the devices to work
(the reference's log-probs need no rewards) while the host grades.
"""

import dataclasses
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from score_jax import data, multihost
from score_jax import episodes as episodes_lib
from score_jax import experiment as experiment_lib
from score_jax.tasks import base
from score_jax.tasks import rewards as rewards_lib


@dataclasses.dataclass(frozen=True)
class Generated:
  """Episodes of some problems and their texts, not yet graded.

  Attributes:
    device_episode: the rollout's output, on the devices.
    episode: host numpy rows of it, without the sampler's log-probs (None),
      which only the train step reads.
    texts_ba: [B][A], the text of attempt a of row b.
    answer_keys: each row's problem's answer key (Example.answer_key).
    rollout_s: seconds spent sampling and decoding the texts.
  """

  device_episode: episodes_lib.Episode
  episode: episodes_lib.Episode
  texts_ba: list[list[str]]
  answer_keys: list
  rollout_s: float


@dataclasses.dataclass(frozen=True)
class Graded:
  """Generated episodes with their rewards.

  Attributes:
    generated: the episodes.
    rewards_ba: float32 [B, A], each attempt's reward.
    num_failed: reward calls that timed out or raised.
  """

  generated: Generated
  rewards_ba: np.ndarray
  num_failed: int

  @property
  def device_episode(self) -> episodes_lib.Episode:
    """The rollout's output, on the devices."""
    return self.generated.device_episode

  @property
  def episode(self) -> episodes_lib.Episode:
    """Host numpy rows of the episodes, without the sampler's log-probs."""
    return self.generated.episode

  @property
  def texts_ba(self) -> list[list[str]]:
    """[B][A], the text of attempt a of row b."""
    return self.generated.texts_ba


def generate(
  exp: experiment_lib.Experiment,
  rollout_fn,
  params,
  examples: Sequence[base.Example],
  rng,
  every_row: bool,
  num_real: Optional[int] = None,
  samples_per_prompt: int = 1,
  on_dispatch: Callable[[Any], None] = lambda outputs: None,
) -> Generated:
  """Samples every attempt of G episodes of each of `examples`, rows
  [example 0 x G, example 1 x G, ...], and decodes their texts.

  Args:
    exp: the experiment (tokenizer, task, prompt buckets, mesh).
    rollout_fn: from `exp.rollout_fn`, sampling G = `samples_per_prompt`
      episodes a prompt.
    params: the params to sample from.
    examples: training (`every_row=False`): this process's prompts of the
      batch. Evaluation (`every_row=True`, G = 1): the whole batch, the
      same on every process.
    rng: the rollout's PRNG key.
    every_row: whether every process gets back every row (evaluation is
      small, and any process may then write the result) or only its own.
    num_real: with `every_row`, the rows returned: the first `num_real`
      (the rest pad the last batch to the compiled shape). None: all.
    samples_per_prompt: G.
    on_dispatch: sees the rollout's outputs as soon as the program is
      dispatched.

  Returns:
    The episodes and their texts.
  """
  own = (
    multihost.own(examples, exp.batch_sharding(1)) if every_row else (examples)
  )
  tokens, valid = data.prompt_arrays(
    exp.task,
    exp.tokenizer,
    own,
    exp.config.rollout.prompt_buckets,
    exp.batch_sharding(2),
  )
  start = time.perf_counter()
  output = rollout_fn(params, tokens, valid, rng)
  on_dispatch(output)
  to_host = dataclasses.replace(output, log_probs_bs=None)
  if every_row:
    n = len(examples) if num_real is None else num_real
    episode = jax.tree.map(lambda x: x[:n], multihost.all_rows(to_host))
    examples = examples[:n]
  else:
    episode = multihost.local_rows(to_host)
  texts = data.attempt_texts(exp.tokenizer, episode)
  answer_keys = [
    e.answer_key for e in examples for _ in range(samples_per_prompt)
  ]
  return Generated(
    output, episode, texts, answer_keys, time.perf_counter() - start
  )


def grade(generated: Generated, pool: rewards_lib.RewardPool) -> Graded:
  """Grades every attempt of `generated` in one call, so that the workers
  share the whole batch.

  Args:
    generated: the episodes and their texts.
    pool: the reward workers.

  Returns:
    The episodes with their rewards.
  """
  texts = generated.texts_ba
  A = len(texts[0])
  result = pool.score(
    [t[a] for a in range(A) for t in texts],
    [k for _ in range(A) for k in generated.answer_keys],
  )
  rewards_ba = result.rewards.reshape(A, len(texts)).T
  return Graded(generated, np.ascontiguousarray(rewards_ba), result.num_failed)


def generate_and_grade(
  exp: experiment_lib.Experiment,
  rollout_fn,
  params,
  examples: Sequence[base.Example],
  rng,
  pool: rewards_lib.RewardPool,
  every_row: bool,
  num_real: Optional[int] = None,
  samples_per_prompt: int = 1,
) -> Graded:
  """`grade(generate(...))`: samples, decodes and grades every attempt.

  Args:
    exp: the experiment (tokenizer, task, prompt buckets, mesh).
    rollout_fn: from `exp.rollout_fn`, sampling G = `samples_per_prompt`
      episodes a prompt.
    params: the params to sample from.
    examples: this process's prompts of the batch, or with `every_row` the
      whole batch (`generate`).
    rng: the rollout's PRNG key.
    pool: the reward workers.
    every_row: whether every process gets back every row or only its own.
    num_real: with `every_row`, the rows returned: the first `num_real`.
      None: all.
    samples_per_prompt: G.

  Returns:
    The episodes, their texts and their rewards.
  """
  return grade(
    generate(
      exp,
      rollout_fn,
      params,
      examples,
      rng,
      every_row,
      num_real,
      samples_per_prompt,
    ),
    pool,
  )
