"""Token sampling and the `lax.while_loop` decode of one attempt on the KV
cache (models/kv_cache.py).

Shape legend (docs/design.md): B batch rows, Y slots of an attempt, V
vocab.
"""

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

from score_jax.models import transformer


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """temperature 0 is greedy; top_k 0 and top_p 1.0 disable truncation."""

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
      raise ValueError(
        f"sampler settings {self} are invalid: need temperature >= 0, "
        "top_k >= 0 and 0 < top_p <= 1."
      )


def argmax(x_bv):
  """jnp.argmax over the last axis (the first maximum), as two plain
  reductions: the maximum, then the smallest index that holds it. XLA's CPU
  backend runs jnp.argmax's (value, index) reduction over a [256, 32000]
  batch of logits 20x slower, and plain reductions leave a vocabulary that
  is sharded over devices where it lies (each device reduces its shard,
  then one small all-reduce). A row with NaNs (a diverged model, which the
  train step counts) gets some index in range."""
  V = x_bv.shape[-1]
  max_b1 = jnp.max(x_bv, axis=-1, keepdims=True)
  index_bv = jax.lax.broadcasted_iota(jnp.int32, x_bv.shape, 1)
  first_b = jnp.min(jnp.where(x_bv == max_b1, index_bv, V), axis=-1)
  return jnp.minimum(first_b, V - 1)


def row_keys(rng, rows_b, attempt: int):
  """The sampling keys of one attempt, one per row: `rng` folded with the
  row's index in the batch, then the attempt. The sampler folds each
  token's index in (`token_keys`), so a token's noise is a function of
  (rng, row, attempt, token) alone: it does not depend on the batch's
  order, on how the rollout splits it into micro-batches, or on the
  devices.

  Args:
    rng: the rollout's PRNG key.
    rows_b: int32 [B], each row's index in the whole batch.
    attempt: the attempt's index (0 for the first).

  Returns:
    The keys [B], one per row.
  """
  keys_b = jax.vmap(jax.random.fold_in, (None, 0))(rng, rows_b)
  return jax.vmap(jax.random.fold_in, (0, None))(keys_b, attempt)


def token_keys(keys_b, token):
  """The keys of one token of an attempt, one per row.

  Args:
    keys_b: the attempt's keys [B] (`row_keys`).
    token: the token's index in the attempt (a scalar).

  Returns:
    `keys_b` [B], each folded with `token`.
  """
  return jax.vmap(jax.random.fold_in, (0, None))(keys_b, token)


def sample_tokens(logits_bv, keys_b, cfg: SamplerConfig):
  """Draws one token per row, row b with its own key `keys_b[b]`.

  The log-prob is under the policy itself (temperature 1, no truncation),
  which is what the trainer recomputes; the sampling distribution differs
  from it only when temperature != 1 or top-k / top-p truncate.

  Args:
    logits_bv: [B, V], the policy's logits of the next token.
    keys_b: the PRNG keys [B], one per row (`token_keys`).
    cfg: temperature (0: greedy), top-k and top-p.

  Returns:
    (tokens int32 [B], log pi(token) [B] in the logits' dtype).
  """
  if cfg.temperature == 0:
    tokens_b = argmax(logits_bv)
  else:
    scaled_bv = logits_bv / cfg.temperature
    if cfg.top_k:
      kth_b1 = jax.lax.top_k(scaled_bv, cfg.top_k)[0][:, -1:]
      scaled_bv = jnp.where(scaled_bv < kth_b1, -jnp.inf, scaled_bv)
    if cfg.top_p < 1:
      sorted_bv = jnp.sort(scaled_bv, axis=-1)[:, ::-1]
      probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
      # Keep the smallest prefix whose mass reaches top_p (at least one token).
      mass_before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
      kept_bv = jnp.where(mass_before_bv < cfg.top_p, sorted_bv, jnp.inf)
      threshold_b1 = jnp.min(kept_bv, axis=-1, keepdims=True)
      scaled_bv = jnp.where(scaled_bv < threshold_b1, -jnp.inf, scaled_bv)
    # The Gumbel-max trick, as jax.random.categorical draws, with the fast
    # argmax; each row's noise from its own key.
    V = scaled_bv.shape[-1]
    noise_bv = jax.vmap(lambda key: jax.random.gumbel(key, (V,)))(keys_b)
    tokens_b = argmax(scaled_bv + noise_bv)
  # log_softmax at one entry: no [B, V] array of log-probs is written.
  picked_b = jnp.take_along_axis(logits_bv, tokens_b[:, None], axis=-1)[
    :, 0
  ] - jax.nn.logsumexp(logits_bv, axis=-1)
  return tokens_b.astype(jnp.int32), picked_b


def decode(
  model: transformer.Transformer,
  params,
  segments: tuple,
  index: int,
  logits_bv,
  keys_b,
  max_new_tokens: int,
  stop_ids: Sequence[int],
  pad_id: int,
  cfg: SamplerConfig,
):
  """Samples up to `max_new_tokens` tokens per row into `segments[index]`,
  token t of row b from the logits before it with `token_keys(keys_b,
  t)[b]`.

  A `lax.while_loop` stops as soon as every row has emitted a stop token
  (the stop token is kept: the policy produced it) or the budget is spent.
  Every row writes step t at slot t; a row that stopped writes padding past
  its length, which no later query sees.

  Args:
    model: the decoder.
    params: its params in the compute dtype, their layers unstacked
      (transformer.unstack_layers).
    segments: the KV cache, a tuple of segments (models/kv_cache.py).
    index: the segment the attempt goes into, an empty turn segment of
      `max_new_tokens` slots.
    logits_bv: float32 [B, V], the logits of each row's first token.
    keys_b: the attempt's PRNG keys [B] (`row_keys`).
    max_new_tokens: Y, the attempt's budget.
    stop_ids: the tokens that end an attempt.
    pad_id: the id written after a row's stop.
    cfg: how each token is drawn.

  Returns:
    (tokens int32 [B, Y], pad_id after a row's stop; the sampler's log pi
    of each token [B, Y] in the logits' dtype, 0 after the stop; the cache,
    segment `index`'s lengths set to each row's token count).
  """
  B = logits_bv.shape[0]
  Y = max_new_tokens
  stop_ids = jnp.asarray(stop_ids, jnp.int32)

  def cond(carry):
    t, done_b = carry[:2]
    return (t < Y) & ~jnp.all(done_b)

  def body(carry):
    t, done_b, tokens_by, log_probs_by, logits_bv, segments = carry
    token_b, log_prob_b = sample_tokens(logits_bv, token_keys(keys_b, t), cfg)
    active_b = ~done_b
    token_b = jnp.where(active_b, token_b, pad_id)
    tokens_by = jax.lax.dynamic_update_index_in_dim(tokens_by, token_b, t, 1)
    log_probs_by = jax.lax.dynamic_update_index_in_dim(
      log_probs_by, jnp.where(active_b, log_prob_b, 0.0), t, 1
    )
    logits_bv, segments = model.extend(
      params, token_b[:, None], segments, index, t, active_b
    )
    current = segments[index]
    current = dataclasses.replace(
      current, lengths_e=jnp.where(active_b, t + 1, current.lengths_e)
    )
    segments = segments[:index] + (current,) + segments[index + 1 :]
    done_b = done_b | jnp.isin(token_b, stop_ids)
    return t + 1, done_b, tokens_by, log_probs_by, logits_bv, segments

  rows = lambda dtype: model.shard(
    jnp.zeros((B, Y), dtype), ("activation_batch", None)
  )
  carry = (
    jnp.int32(0),
    jnp.zeros((B,), bool),
    rows(jnp.int32) + pad_id,
    rows(logits_bv.dtype),
    logits_bv,
    segments,
  )
  _, _, tokens_by, log_probs_by, _, segments = jax.lax.while_loop(
    cond, body, carry
  )
  return tokens_by, log_probs_by, segments
