"""Generate and grade: prompts -> the rollout -> attempt texts -> rewards.

The one path from problems to graded episodes, taken by training (its
process's rows), evaluation and inference-time scaling (every row on every
process) and the sampled baselines (STaR, Pair-SFT).
"""

import dataclasses
import time
from typing import Optional, Sequence

import jax
import numpy as np

from score_jax import experiment as experiment_lib
from score_jax import multihost
from score_jax import rollout
from score_jax.tasks import base
from score_jax.tasks import rewards as rewards_lib


@dataclasses.dataclass(frozen=True)
class Graded:
  """Episodes of `examples`, their texts and rewards."""
  device_episode: rollout.Episode  # the rollout's output, on the devices
  # Host numpy rows of it, without the sampler's log-probs (None), which
  # only the train step reads.
  episode: rollout.Episode
  texts_bn: list[list[str]]  # [B][N]: attempt n of row b
  rewards_bn: np.ndarray     # [B, N] float32
  num_failed: int            # reward calls that timed out or raised
  rollout_s: float           # sampling and decoding the texts


def generate_and_grade(exp: experiment_lib.Experiment, rollout_fn, params,
                       examples: Sequence[base.Example], rng,
                       pool: rewards_lib.RewardPool, every_row: bool,
                       num_real: Optional[int] = None) -> Graded:
  """Samples and grades every attempt of `examples`.

  Training (`every_row=False`): `examples` are this process's rows of the
  batch, and it gets back only those. Evaluation (`every_row=True`):
  `examples` is the whole batch, the same on every process, each samples its
  own rows and gets back every row (evaluation is small, and any process may
  then write the result); only the first `num_real` rows (the rest pad the
  last batch to the compiled shape) are graded and returned.
  """
  own = multihost.own(examples, exp.batch_sharding(1)) if every_row else (
      examples)
  tokens, valid = exp.prompts(own)
  start = time.perf_counter()
  output = rollout_fn(params, tokens, valid, rng)
  to_host = dataclasses.replace(output, log_probs_bs=None)
  if every_row:
    n = len(examples) if num_real is None else num_real
    episode = jax.tree.map(lambda x: x[:n], multihost.all_rows(to_host))
    examples = examples[:n]
  else:
    episode = multihost.local_rows(to_host)
  texts = exp.attempt_texts(episode)
  rollout_s = time.perf_counter() - start
  num_attempts = len(texts[0])
  references = [e.reference for e in examples]
  # One call for every attempt, so the workers share the whole batch.
  result = pool.score([t[n] for n in range(num_attempts) for t in texts],
                      [r for _ in range(num_attempts) for r in references])
  rewards_bn = result.rewards.reshape(num_attempts, len(texts)).T
  return Graded(output, episode, texts, np.ascontiguousarray(rewards_bn),
                result.num_failed, rollout_s)
