"""The multi-turn rollout: every attempt of an episode in one jitted program.

Episode buffer layout (static shapes; P is the prompt bucket, Y the attempt
budget, I the instruction turn's length, A attempts):

  | prompt (left-padded, P) | attempt 1 (Y) | instruction (I) | attempt 2 ...

Each prompt is prefilled once into the KV cache and sampled G times
(`samples_per_prompt`); attempt a is sampled on the cache, the instruction
turn's ids (tokenized once, up front) are prefilled after it, and so on. The
cache holds each turn in a segment of its own (models/kv_cache.py), so
decoding attempt a reads only the prompt and the turns before it. A row that
stops early leaves padding slots in the buffer before the next turn. The
trainer scores exactly this buffer with the same `valid` mask, so its
log-probs are those of the very tokens the sampler produced: token in,
token out. Token t of attempt a of row b is drawn with noise keyed by
(rng, b, a, t) alone (sampling.row_keys).

Memory: the params enter in the training layout (float32, fsdp-sharded) and
are cast to the compute dtype and laid out for decoding once per rollout
(`decode_shardings`: by default not split over fsdp, so that no decode step
gathers weights). With `num_micro_batches` M > 1 the prompts are sampled as
M micro-batches in turn (`lax.map`), so the KV cache holds B / M episodes;
micro-batch m takes prompts m, m + M, ..., so each one stays spread over
every device and no row moves.

Shape legend (docs/design.md): U prompts, G samples per prompt, B episodes
(rows, grouped [prompt 0 x G, prompt 1 x G, ...]), P prompt slots, Y
slots of an attempt, I instruction slots, S slots of an episode, A
attempts, M micro-batches, V vocab.
"""

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from score_jax import episodes as episodes_lib
from score_jax import sampling, sharding
from score_jax.models import kv_cache, transformer


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """What a rollout samples.

  Attributes:
    num_attempts: A, the attempts of an episode.
    max_attempt_len: Y, the most tokens an attempt may have (its stop token
      included).
    sampler: how each token is drawn.
    num_micro_batches: M, the rounds the prompts are sampled in (the KV
      cache holds 1 / M of the episodes at once).
    samples_per_prompt: G, the episodes sampled from each prompt, which is
      prefilled once for all of them.
  """

  num_attempts: int = 2
  max_attempt_len: int = 128
  sampler: sampling.SamplerConfig = sampling.SamplerConfig()
  num_micro_batches: int = 1
  samples_per_prompt: int = 1


def num_slots(prompt_len: int, instruction_len: int, cfg: RolloutConfig) -> int:
  """S, the slots of an episode buffer (the module docstring's layout).

  Args:
    prompt_len: P, the prompt bucket.
    instruction_len: I, the instruction turn's tokens.
    cfg: the rollout's attempts and their budget.

  Returns:
    P + A * Y + (A - 1) * I.
  """
  n = cfg.num_attempts
  return prompt_len + n * cfg.max_attempt_len + (n - 1) * instruction_len


def prompt_len(
  episode_len: int, instruction_len: int, cfg: RolloutConfig
) -> int:
  """P, the prompt slots of an episode buffer (the inverse of `num_slots`).

  Args:
    episode_len: S, the slots of an episode buffer.
    instruction_len: I, the instruction turn's tokens.
    cfg: the rollout's attempts and their budget.

  Returns:
    S - A * Y - (A - 1) * I.
  """
  return episode_len - num_slots(0, instruction_len, cfg)


def rollout(
  model: transformer.Transformer,
  params,
  prompt_tokens_up,
  prompt_valid_up,
  rng,
  instruction_ids: Sequence[int],
  stop_ids: Sequence[int],
  pad_id: int,
  cfg: RolloutConfig,
  decode_shardings=None,
) -> episodes_lib.Episode:
  """Every attempt of G episodes of each prompt, with the instruction turn
  between attempts (jit this: `make_rollout_fn`).

  Args:
    model: the decoder the rollout runs (its activation rules).
    params: the policy's params, in the training layout.
    prompt_tokens_up: int32 [U, P], the first turns, left-padded.
    prompt_valid_up: bool [U, P], their real tokens.
    rng: a PRNG key; token t of attempt a of row b draws its noise from
      (rng, b, a, t) alone (sampling.row_keys).
    instruction_ids: the instruction turn's I token ids.
    stop_ids: the tokens that end an attempt (kept in it).
    pad_id: the id of padding slots.
    cfg: attempts, budget, sampler, micro-batches, samples per prompt.
    decode_shardings: the layout of the compute-dtype params for decoding
      (None: as they come).

  Returns:
    The B = U * G episodes, grouped [prompt 0 x G, prompt 1 x G, ...], in
    the module docstring's layout.
  """
  # Layer by layer, so that relaying the weights out for decoding holds at
  # most one layer's worth of them in transit; once, outside the decode
  # loops, and materialised (optimization_barrier): XLA would otherwise
  # slice each layer's weights out of the stack again on every step.
  params = model.compute_params(transformer.unstack_layers(params))
  if decode_shardings is not None:
    params = jax.lax.with_sharding_constraint(
      params, sharding.unstacked(decode_shardings, model.cfg.num_layers)
    )
  params = jax.lax.optimization_barrier(params)
  episodes = lambda tokens, valid, prompts: _episodes(
    model,
    params,
    tokens,
    valid,
    rng,
    prompts,
    instruction_ids,
    stop_ids,
    pad_id,
    cfg,
  )
  M = cfg.num_micro_batches
  U = prompt_tokens_up.shape[0]
  prompts_u = jnp.arange(U, dtype=jnp.int32)
  if M == 1:
    return episodes(prompt_tokens_up, prompt_valid_up, prompts_u)
  micro = episodes_lib.split_micro_batches(
    (prompt_tokens_up, prompt_valid_up, prompts_u), M, model.shard
  )
  merged = jax.lax.map(lambda xs: episodes(*xs), micro)
  return episodes_lib.merge_micro_batches(merged, cfg.samples_per_prompt)


def _episodes(
  model,
  params,
  prompt_tokens_up,
  prompt_valid_up,
  rng,
  prompts_u,
  instruction_ids,
  stop_ids,
  pad_id,
  cfg: RolloutConfig,
) -> episodes_lib.Episode:
  """The episodes of one micro-batch's prompts, every row at once;
  `prompts_u` are the prompts' indices in the whole batch, which key the
  sampling noise of their rows."""
  U, P = prompt_tokens_up.shape
  G, Y, A = cfg.samples_per_prompt, cfg.max_attempt_len, cfg.num_attempts
  I, B = len(instruction_ids), U * G
  lengths_u = jnp.sum(prompt_valid_up, axis=1, dtype=jnp.int32)
  # The cache holds each prompt from its slot 0 on.
  aligned_up = jnp.take_along_axis(
    prompt_tokens_up, (jnp.arange(P) + P - lengths_u[:, None]) % P, axis=1
  )
  segments = [model.empty_segment(U, P, rows_per_entry=G)]
  for attempt in range(A):
    segments.append(model.empty_segment(B, Y))
    if attempt < A - 1:
      segments.append(model.empty_segment(B, I))
  with jax.named_scope("prefill"):
    logits_uv, segments[0] = model.prefill(
      params, aligned_up, lengths_u, segments[0]
    )
  logits_bv = kv_cache.expand_rows(logits_uv, G)
  ends_b = kv_cache.expand_rows(segments[0].ends_e(), G)
  segments = tuple(segments)
  rows_b = (prompts_u[:, None] * G + jnp.arange(G, dtype=jnp.int32)).reshape(B)
  instruction_bi = jnp.broadcast_to(
    jnp.asarray(instruction_ids, jnp.int32), (B, I)
  )
  tokens, log_probs, lengths = [], [], []
  for attempt in range(A):
    index = 1 + 2 * attempt
    segments = _replaced(segments, index, offsets_e=ends_b)
    with jax.named_scope("decode"):
      tokens_by, log_probs_by, segments = sampling.decode(
        model,
        params,
        segments,
        index,
        logits_bv,
        sampling.row_keys(rng, rows_b, attempt),
        Y,
        stop_ids,
        pad_id,
        cfg.sampler,
      )
    tokens.append(tokens_by)
    log_probs.append(log_probs_by)
    lengths.append(segments[index].lengths_e)
    ends_b = segments[index].ends_e()
    if attempt < A - 1:
      segments = _replaced(segments, index + 1, offsets_e=ends_b)
      with jax.named_scope("prefill"):
        logits_bv, segments = model.extend(
          params, instruction_bi, segments, index + 1, 0
        )
      segments = _replaced(
        segments, index + 1, lengths_e=jnp.full((B,), I, jnp.int32)
      )
      ends_b = segments[index + 1].ends_e()
  return _assemble(
    prompt_tokens_up,
    prompt_valid_up,
    G,
    instruction_bi,
    tokens,
    log_probs,
    lengths,
    pad_id,
  )


def _replaced(segments: tuple, index: int, **fields) -> tuple:
  """The cache with `fields` of segment `index` replaced (its offsets_e or
  lengths_e, int32 [B])."""
  segment = dataclasses.replace(segments[index], **fields)
  return segments[:index] + (segment,) + segments[index + 1 :]


def _assemble(
  prompt_tokens_up,
  prompt_valid_up,
  G,
  instruction_bi,
  tokens,
  log_probs,
  lengths,
  pad_id,
) -> episodes_lib.Episode:
  """The episode buffer (module docstring's layout) from the prompts and
  each attempt's tokens [B, Y], log-probs [B, Y] and lengths [B]."""
  B, I = instruction_bi.shape
  Y, A = tokens[0].shape[1], len(tokens)
  token_parts = [kv_cache.expand_rows(prompt_tokens_up, G)]
  valid_parts = [kv_cache.expand_rows(prompt_valid_up, G)]
  log_prob_parts = [jnp.zeros(token_parts[0].shape, log_probs[0].dtype)]
  attempt_of_slot = [np.full(token_parts[0].shape[1], -1)]
  for attempt in range(A):
    valid_by = jnp.arange(Y) < lengths[attempt][:, None]
    token_parts.append(jnp.where(valid_by, tokens[attempt], pad_id))
    valid_parts.append(valid_by)
    log_prob_parts.append(log_probs[attempt])
    attempt_of_slot.append(np.full(Y, attempt))
    if attempt < A - 1:
      token_parts.append(instruction_bi)
      valid_parts.append(jnp.ones((B, I), bool))
      log_prob_parts.append(jnp.zeros((B, I), log_probs[0].dtype))
      attempt_of_slot.append(np.full(I, -1))
  valid_bs = jnp.concatenate(valid_parts, 1)
  attempt_of_slot = np.concatenate(attempt_of_slot)
  return episodes_lib.Episode(
    tokens_bs=jnp.concatenate(token_parts, 1),
    valid_bs=valid_bs,
    attempt_mask_bas=valid_bs[:, None, :]
    & (attempt_of_slot[None, None, :] == np.arange(A)[None, :, None]),
    log_probs_bs=jnp.concatenate(log_prob_parts, 1),
    lengths_ba=jnp.stack(lengths, axis=1),
  )


def make_rollout_fn(
  model: transformer.Transformer,
  instruction_ids: Sequence[int],
  stop_ids: Sequence[int],
  pad_id: int,
  cfg: RolloutConfig,
  mesh=None,
  param_shardings=None,
  decode_shardings=None,
  batch_axes=None,
):
  """The rollout, jitted (it compiles once per prompt bucket).

  Args:
    model: the decoder the rollout runs.
    instruction_ids: the instruction turn's token ids.
    stop_ids: the tokens that end an attempt.
    pad_id: the id of padding slots.
    cfg: attempts, budget, sampler, micro-batches, samples per prompt.
    mesh: the devices (None: jit places everything).
    param_shardings: the layout the params arrive in.
    decode_shardings: the layout they decode in.
    batch_axes: the mesh axes the prompts and episodes are split over.

  Returns:
    `fn(params, prompt_tokens_up, prompt_valid_up, rng) -> Episode`, as
    `rollout`.
  """
  fn = lambda params, tokens, valid, rng: rollout(
    model,
    params,
    tokens,
    valid,
    rng,
    tuple(instruction_ids),
    tuple(stop_ids),
    pad_id,
    cfg,
    decode_shardings,
  )
  if mesh is None:
    return jax.jit(fn)
  rows = NamedSharding(mesh, PartitionSpec(batch_axes))
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(
    fn,
    in_shardings=(param_shardings, rows, rows, replicated),
    out_shardings=rows,
  )
