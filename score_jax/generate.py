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

from score_jax import experiment as experiment_lib
from score_jax import multihost
from score_jax import rollout
from score_jax.tasks import base
from score_jax.tasks import rewards as rewards_lib


@dataclasses.dataclass(frozen=True)
class Generated:
  """Episodes of some problems and their texts, not yet graded."""
  device_episode: rollout.Episode  # the rollout's output, on the devices
  # Host numpy rows of it, without the sampler's log-probs (None), which
  # only the train step reads.
  episode: rollout.Episode
  texts_bn: list[list[str]]  # [B][N]: attempt n of row b
  references: list           # the answer key of each row's problem
  rollout_s: float           # sampling and decoding the texts


@dataclasses.dataclass(frozen=True)
class Graded:
  """Generated episodes with their rewards."""
  generated: Generated
  rewards_bn: np.ndarray     # [B, N] float32
  num_failed: int            # reward calls that timed out or raised

  @property
  def device_episode(self) -> rollout.Episode:
    return self.generated.device_episode

  @property
  def episode(self) -> rollout.Episode:
    return self.generated.episode

  @property
  def texts_bn(self) -> list[list[str]]:
    return self.generated.texts_bn


def generate(exp: experiment_lib.Experiment, rollout_fn, params,
             examples: Sequence[base.Example], rng, every_row: bool,
             num_real: Optional[int] = None,
             samples_per_prompt: int = 1,
             on_dispatch: Callable[[Any], None] = lambda outputs: None
             ) -> Generated:
  """Samples every attempt of `samples_per_prompt` episodes of each of
  `examples` (the G that `rollout_fn` samples per prompt): rows
  [example 0 x G, example 1 x G, ...], and decodes their texts.

  Training (`every_row=False`): `examples` are this process's prompts of
  the batch, and it gets back only their rows. Evaluation
  (`every_row=True`, G = 1): `examples` is the whole batch, the same on
  every process, each samples its own rows and gets back every row
  (evaluation is small, and any process may then write the result); only
  the first `num_real` rows (the rest pad the last batch to the compiled
  shape) are returned. `on_dispatch` sees the rollout's outputs as soon
  as the program is dispatched.
  """
  own = multihost.own(examples, exp.batch_sharding(1)) if every_row else (
      examples)
  tokens, valid = exp.prompts(own)
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
  texts = exp.attempt_texts(episode)
  references = [e.reference for e in examples
                for _ in range(samples_per_prompt)]
  return Generated(output, episode, texts, references,
                   time.perf_counter() - start)


def grade(generated: Generated, pool: rewards_lib.RewardPool) -> Graded:
  """Grades every attempt of `generated` in one call, so the workers share
  the whole batch."""
  texts = generated.texts_bn
  num_attempts = len(texts[0])
  result = pool.score(
      [t[n] for n in range(num_attempts) for t in texts],
      [r for _ in range(num_attempts) for r in generated.references])
  rewards_bn = result.rewards.reshape(num_attempts, len(texts)).T
  return Graded(generated, np.ascontiguousarray(rewards_bn),
                result.num_failed)


def generate_and_grade(exp: experiment_lib.Experiment, rollout_fn, params,
                       examples: Sequence[base.Example], rng,
                       pool: rewards_lib.RewardPool, every_row: bool,
                       num_real: Optional[int] = None,
                       samples_per_prompt: int = 1) -> Graded:
  """`grade(generate(...))`; see `generate` for the arguments."""
  return grade(generate(exp, rollout_fn, params, examples, rng, every_row,
                        num_real, samples_per_prompt), pool)
