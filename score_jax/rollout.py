"""The multi-turn rollout: every attempt of an episode in one jitted program.

Episode buffer layout (static shapes; P is the prompt bucket, A the attempt
budget, I the instruction turn's length, N attempts):

  | prompt (left-padded, P) | attempt 1 (A) | instruction (I) | attempt 2 (A) | ...

Attempt i is sampled on the KV cache, the instruction turn's ids (tokenized
once, up front) are prefilled into the same cache, and so on. A row that stops
early leaves padding slots before the next turn. The trainer scores exactly
this buffer with the same `valid` mask, so its log-probs are those of the very
tokens the sampler produced: token in, token out.

Shape legend: B batch, P prompt slots, S episode slots, N attempts.
"""

import bisect
import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from score_jax import sampling
from score_jax.models import transformer

DEFAULT_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048)


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  num_attempts: int = 2
  max_attempt_len: int = 128
  sampler: sampling.SamplerConfig = sampling.SamplerConfig()


@dataclasses.dataclass(frozen=True)
class Episode:
  tokens: jax.Array        # [B, S] int32, padding slots hold pad ids
  valid: jax.Array         # [B, S] bool
  attempt_mask: jax.Array  # [N, B, S] bool: tokens the policy produced in attempt i
  log_probs: jax.Array     # [B, S] float32: sampler log pi of attempt tokens
  lengths: jax.Array       # [B, N] int32: tokens per attempt (stop token included)


jax.tree_util.register_dataclass(
    Episode, data_fields=[f.name for f in dataclasses.fields(Episode)],
    meta_fields=[])


def num_slots(prompt_len: int, instruction_len: int, cfg: RolloutConfig) -> int:
  n = cfg.num_attempts
  return prompt_len + n * cfg.max_attempt_len + (n - 1) * instruction_len


def rollout(model: transformer.Transformer, params, prompt_tokens_bp,
            prompt_valid_bp, rng, instruction_ids: Sequence[int],
            stop_ids: Sequence[int], pad_id: int,
            cfg: RolloutConfig) -> Episode:
  """Runs N attempts with the instruction turn between them (jit this)."""
  B, P = prompt_tokens_bp.shape
  I, A, N = len(instruction_ids), cfg.max_attempt_len, cfg.num_attempts
  S = num_slots(P, I, cfg)
  params = transformer.unstack_layers(params)  # once, outside the decode loops
  state = sampling.init_state(model, B, S)
  state = sampling.write(model, params, state, prompt_tokens_bp,
                         prompt_valid_bp)
  instruction_bi = jnp.broadcast_to(jnp.asarray(instruction_ids, jnp.int32),
                                    (B, I))
  masks, lengths = [], []
  for attempt in range(N):
    start = P + attempt * (A + I)
    state = sampling.decode(model, params, state,
                            jax.random.fold_in(rng, attempt), A, stop_ids,
                            pad_id, cfg.sampler)
    in_attempt_s = (jnp.arange(S) >= start) & (jnp.arange(S) < start + A)
    mask_bs = state.valid & in_attempt_s[None]
    masks.append(mask_bs)
    lengths.append(jnp.sum(mask_bs, axis=1, dtype=jnp.int32))
    if attempt < N - 1:
      state = sampling.write(model, params, state, instruction_bi,
                             jnp.ones((B, I), bool))
  return Episode(
      tokens=jnp.where(state.valid, state.tokens, pad_id),
      valid=state.valid,
      attempt_mask=jnp.stack(masks),
      log_probs=state.log_probs,
      lengths=jnp.stack(lengths, axis=1))


def make_rollout_fn(model: transformer.Transformer,
                    instruction_ids: Sequence[int], stop_ids: Sequence[int],
                    pad_id: int, cfg: RolloutConfig, mesh=None,
                    param_shardings=None, batch_axes=None):
  """`fn(params, prompt_tokens, prompt_valid, rng) -> Episode`, jitted once per
  prompt bucket. With a mesh, the batch is sharded over `batch_axes` and the
  params keep `param_shardings`."""
  fn = lambda params, tokens, valid, rng: rollout(
      model, params, tokens, valid, rng, tuple(instruction_ids),
      tuple(stop_ids), pad_id, cfg)
  if mesh is None:
    return jax.jit(fn)
  rows = NamedSharding(mesh, PartitionSpec(batch_axes))
  replicated = NamedSharding(mesh, PartitionSpec())
  out = Episode(tokens=rows, valid=rows,
                attempt_mask=NamedSharding(mesh, PartitionSpec(None,
                                                               batch_axes)),
                log_probs=rows, lengths=rows)
  return jax.jit(fn, in_shardings=(param_shardings, rows, rows, replicated),
                 out_shardings=out)


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int,
                buckets: Sequence[int] = DEFAULT_BUCKETS):
  """Left-pads token lists to the smallest bucket that holds the longest one,
  so batches of the same bucket reuse one compiled rollout."""
  longest = max(len(p) for p in prompts)
  index = bisect.bisect_left(buckets, longest)
  if index == len(buckets):
    raise ValueError(f"a prompt has {longest} tokens, more than the largest "
                     f"bucket {buckets[-1]}; raise config.prompt_buckets or "
                     "shorten the prompts.")
  width = buckets[index]
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  valid = np.zeros((len(prompts), width), bool)
  for row, prompt in enumerate(prompts):
    if len(prompt):
      tokens[row, -len(prompt):] = prompt
      valid[row, -len(prompt):] = True
  return tokens, valid


def attempt_token_ids(episode: Episode) -> list[list[np.ndarray]]:
  """Host-side: per row, the token ids of each attempt."""
  tokens = np.asarray(episode.tokens)
  masks = np.asarray(episode.attempt_mask)
  return [[tokens[b][masks[i, b]] for i in range(masks.shape[0])]
          for b in range(tokens.shape[0])]
