"""The multi-turn rollout: every attempt of an episode in one jitted program.

Episode buffer layout (static shapes; P is the prompt bucket, A the attempt
budget, I the instruction turn's length, N attempts):

  | prompt (left-padded, P) | attempt 1 (A) | instruction (I) | attempt 2 (A) | ...

Attempt i is sampled on the KV cache, the instruction turn's ids (tokenized
once, up front) are prefilled into the same cache, and so on. A row that stops
early leaves padding slots before the next turn. The trainer scores exactly
this buffer with the same `valid` mask, so its log-probs are those of the very
tokens the sampler produced: token in, token out.

Memory: the params enter in the training layout (float32, fsdp-sharded) and
are cast to the compute dtype and laid out for decoding once per rollout
(`decode_shardings`: by default not split over fsdp, so that no decode step
gathers weights). With `num_micro_batches` M > 1 the batch is sampled as M
micro-batches in turn (`lax.map`), so the KV cache holds B / M episodes;
micro-batch m takes rows m, m + M, ..., so each one stays spread over every
device and no row moves.

Shape legend: B batch, P prompt slots, S episode slots, N attempts,
M micro-batches.
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
  num_micro_batches: int = 1


@dataclasses.dataclass(frozen=True)
class Episode:
  """A batch of episodes, batch first in every field (the rollout's output:
  global arrays sharded over the batch; or a host copy of some rows)."""
  tokens_bs: jax.Array         # int32, padding slots hold pad ids
  valid_bs: jax.Array          # bool
  attempt_mask_bns: jax.Array  # bool: tokens the policy produced in attempt n
  log_probs_bs: jax.Array      # float32: sampler log pi of attempt tokens
  lengths_bn: jax.Array        # int32: tokens per attempt (stop included)


jax.tree_util.register_dataclass(
    Episode, data_fields=[f.name for f in dataclasses.fields(Episode)],
    meta_fields=[])


def num_slots(prompt_len: int, instruction_len: int, cfg: RolloutConfig) -> int:
  n = cfg.num_attempts
  return prompt_len + n * cfg.max_attempt_len + (n - 1) * instruction_len


def prompt_len(episode_len: int, instruction_len: int,
               cfg: RolloutConfig) -> int:
  """The prompt slots P of an episode buffer of `episode_len` slots."""
  return episode_len - num_slots(0, instruction_len, cfg)


def rollout(model: transformer.Transformer, params, prompt_tokens_bp,
            prompt_valid_bp, rng, instruction_ids: Sequence[int],
            stop_ids: Sequence[int], pad_id: int, cfg: RolloutConfig,
            decode_shardings=None) -> Episode:
  """Runs N attempts with the instruction turn between them (jit this).
  `decode_shardings` lays out the compute-dtype params for decoding."""
  params = model.compute_params(params)
  if decode_shardings is not None:
    params = jax.lax.with_sharding_constraint(params, decode_shardings)
  params = transformer.unstack_layers(params)  # once, outside the decode loops
  episodes = lambda tokens, valid, rows: _episodes(
      model, params, tokens, valid, rng, rows, instruction_ids, stop_ids,
      pad_id, cfg)
  M = cfg.num_micro_batches
  B = prompt_tokens_bp.shape[0]
  if M == 1:
    return episodes(prompt_tokens_bp, prompt_valid_bp,
                    jnp.arange(B, dtype=jnp.int32))
  if B % M:
    raise ValueError(f"a rollout of {B} episodes does not split into "
                     f"config.rollout.num_micro_batches={M}.")
  # Row b goes to micro-batch b % M: [B, ...] -> [M, B / M, ...].
  split = lambda x: model.shard(
      jnp.swapaxes(x.reshape(B // M, M, *x.shape[1:]), 0, 1),
      (None, "activation_batch") + (None,) * (x.ndim - 1))
  merged = jax.lax.map(
      lambda xs: episodes(*xs),
      (split(prompt_tokens_bp), split(prompt_valid_bp),
       split(jnp.arange(B, dtype=jnp.int32))))
  return jax.tree.map(
      lambda x: jnp.swapaxes(x, 0, 1).reshape(B, *x.shape[2:]), merged)


def _episodes(model, params, prompt_tokens_bp, prompt_valid_bp, rng, rows_b,
              instruction_ids, stop_ids, pad_id, cfg: RolloutConfig):
  """One batch's episodes, every row at once; `rows_b` are the rows' indices
  in the whole batch, which key their sampling noise."""
  B, P = prompt_tokens_bp.shape
  I, A, N = len(instruction_ids), cfg.max_attempt_len, cfg.num_attempts
  S = num_slots(P, I, cfg)
  decode_state = sampling.init_state(model, B, S)
  with jax.named_scope("prefill"):
    decode_state = sampling.write(model, params, decode_state,
                                  prompt_tokens_bp, prompt_valid_bp)
  instruction_bi = jnp.broadcast_to(jnp.asarray(instruction_ids, jnp.int32),
                                    (B, I))
  masks, lengths = [], []
  for attempt in range(N):
    start = P + attempt * (A + I)
    with jax.named_scope("decode"):
      decode_state = sampling.decode(
          model, params, decode_state,
          sampling.row_keys(rng, rows_b, attempt), A, stop_ids, pad_id,
          cfg.sampler)
    in_attempt_s = (jnp.arange(S) >= start) & (jnp.arange(S) < start + A)
    mask_bs = decode_state.valid & in_attempt_s[None]
    masks.append(mask_bs)
    lengths.append(jnp.sum(mask_bs, axis=1, dtype=jnp.int32))
    if attempt < N - 1:
      with jax.named_scope("prefill"):
        decode_state = sampling.write(model, params, decode_state,
                                      instruction_bi, jnp.ones((B, I), bool))
  return Episode(
      tokens_bs=jnp.where(decode_state.valid, decode_state.tokens, pad_id),
      valid_bs=decode_state.valid,
      attempt_mask_bns=jnp.stack(masks, axis=1),
      log_probs_bs=decode_state.log_probs,
      lengths_bn=jnp.stack(lengths, axis=1))


def make_rollout_fn(model: transformer.Transformer,
                    instruction_ids: Sequence[int], stop_ids: Sequence[int],
                    pad_id: int, cfg: RolloutConfig, mesh=None,
                    param_shardings=None, decode_shardings=None,
                    batch_axes=None):
  """`fn(params, prompt_tokens, prompt_valid, rng) -> Episode`, jitted once per
  prompt bucket. With a mesh, the batch is sharded over `batch_axes`, the
  params arrive with `param_shardings` and decode with `decode_shardings`."""
  fn = lambda params, tokens, valid, rng: rollout(
      model, params, tokens, valid, rng, tuple(instruction_ids),
      tuple(stop_ids), pad_id, cfg, decode_shardings)
  if mesh is None:
    return jax.jit(fn)
  rows = NamedSharding(mesh, PartitionSpec(batch_axes))
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(fn, in_shardings=(param_shardings, rows, rows, replicated),
                 out_shardings=rows)


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
  tokens = np.asarray(episode.tokens_bs)
  masks = np.asarray(episode.attempt_mask_bns)
  return [[tokens[b][mask] for mask in masks[b]]
          for b in range(tokens.shape[0])]
