"""Token sampling, prefill and the `lax.while_loop` decode on the KV cache.

The decode works on an episode buffer with static shapes: `tokens[B, S]` and
`valid[B, S]` cover every slot of the KV cache, so that padding is explicit and
the trainer can later score exactly the same buffer (see rollout.py).

Shape legend: B batch, S episode slots, T tokens written by one call, V vocab.
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
          "top_k >= 0 and 0 < top_p <= 1.")


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
  row's index in the batch (`rows_b` [B] int32), then the attempt. The
  sampler folds each token's index in (`token_keys`), so a token's noise is
  a function of (rng, row, attempt, token) alone: it does not depend on the
  batch's order, on how the rollout splits it into micro-batches, or on the
  devices."""
  keys_b = jax.vmap(jax.random.fold_in, (None, 0))(rng, rows_b)
  return jax.vmap(jax.random.fold_in, (0, None))(keys_b, attempt)


def token_keys(keys_b, token):
  """`keys_b` [B] (from row_keys) folded with the token's index in the
  attempt (a scalar)."""
  return jax.vmap(jax.random.fold_in, (0, None))(keys_b, token)


def sample_tokens(logits_bv, keys_b, cfg: SamplerConfig):
  """Draws one token per row, row b with its own key `keys_b[b]`. Returns
  (tokens [B], log pi(token) [B]).

  The log-prob is under the policy itself (temperature 1, no truncation),
  which is what the trainer recomputes; the sampling distribution differs
  from it only when temperature != 1 or top-k / top-p truncate.
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
  picked_b = (jnp.take_along_axis(logits_bv, tokens_b[:, None], axis=-1)[:, 0]
              - jax.nn.logsumexp(logits_bv, axis=-1))
  return tokens_b.astype(jnp.int32), picked_b


@dataclasses.dataclass(frozen=True)
class DecodeState:
  """Everything the decode loop carries: the episode buffer and the cache."""
  tokens: jax.Array       # [B, S] int32
  valid: jax.Array        # [B, S] bool: slot holds a real token
  log_probs: jax.Array    # [B, S] float32: sampler log-probs of sampled tokens
  cache: dict             # the transformer's KV cache over the S slots
  next_position: jax.Array  # [B] int32: RoPE position of the row's next token
  last_logits: jax.Array  # [B, V] float32: logits for the next token


jax.tree_util.register_dataclass(
    DecodeState, data_fields=[f.name for f in dataclasses.fields(DecodeState)],
    meta_fields=[])


def write(model: transformer.Transformer, params, decode_state: DecodeState,
          tokens_bt, valid_bt) -> DecodeState:
  """Writes T tokens at the cache's end index for every row and runs them
  through the model (prefill of a prompt or an instruction, or one decode
  step). Rows where `valid_bt` is False get padding slots."""
  start = decode_state.cache["end_index"]
  T = tokens_bt.shape[1]
  valid_bs = jax.lax.dynamic_update_slice(decode_state.valid, valid_bt,
                                          (0, start))
  offsets_bt = jnp.cumsum(valid_bt.astype(jnp.int32), axis=1) - 1
  positions_bt = (decode_state.next_position[:, None]
                  + jnp.maximum(offsets_bt, 0))
  slots_t = start + jnp.arange(T)
  S = decode_state.valid.shape[1]
  mask_bts = (jnp.arange(S)[None, None, :] <= slots_t[None, :, None]) & (
      valid_bs[:, None, :])
  # The next token is predicted from the row's last real token of this call.
  last_real_b = T - 1 - jnp.argmax(valid_bt[:, ::-1], axis=1)
  logits_b1v, cache = model.apply(params, tokens_bt, positions_bt, mask_bts,
                                  decode_state.cache, logits_at_b=last_real_b)
  new_logits_bv = logits_b1v[:, 0]
  wrote_any_b = jnp.any(valid_bt, axis=1)
  return dataclasses.replace(
      decode_state,
      tokens=jax.lax.dynamic_update_slice(
          decode_state.tokens,
          jnp.where(valid_bt, tokens_bt, 0).astype(jnp.int32), (0, start)),
      valid=valid_bs,
      cache=cache,
      next_position=decode_state.next_position + jnp.sum(
          valid_bt, axis=1, dtype=jnp.int32),
      last_logits=jnp.where(wrote_any_b[:, None], new_logits_bv,
                            decode_state.last_logits))


def decode(model: transformer.Transformer, params, decode_state: DecodeState,
           keys_b, max_new_tokens: int, stop_ids: Sequence[int], pad_id: int,
           cfg: SamplerConfig) -> DecodeState:
  """Samples up to `max_new_tokens` per row into the next slots, token t of
  row b with `token_keys(keys_b, t)[b]` (keys_b: row_keys of the attempt).

  A `lax.while_loop` stops as soon as every row has emitted a stop token (the
  stop token is kept: the policy produced it) or the budget is spent. Slots
  after a row's stop are padding. On return the cache's end index points past
  the whole budget, so what is written next lands at the same slot for every
  row however early the loop stopped.
  """
  start = decode_state.cache["end_index"]
  B = decode_state.tokens.shape[0]
  stop_ids = jnp.asarray(stop_ids, jnp.int32)
  # Per-layer weights split once here: slicing stacked layers inside the loop
  # would copy every layer's weights on every step.
  params = transformer.unstack_layers(params)

  def cond(carry):
    i, done_b, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done_b)

  def body(carry):
    i, done_b, decode_state = carry
    token_b, log_prob_b = sample_tokens(decode_state.last_logits,
                                        token_keys(keys_b, i), cfg)
    active_b = ~done_b
    token_b = jnp.where(active_b, token_b, pad_id)
    log_probs = jax.lax.dynamic_update_slice(
        decode_state.log_probs, jnp.where(active_b, log_prob_b, 0.0)[:, None],
        (0, start + i))
    decode_state = write(
        model, params, dataclasses.replace(decode_state, log_probs=log_probs),
        token_b[:, None], active_b[:, None])
    done_b = done_b | jnp.isin(token_b, stop_ids)
    return i + 1, done_b, decode_state

  _, _, decode_state = jax.lax.while_loop(
      cond, body, (jnp.int32(0), jnp.zeros((B,), bool), decode_state))
  cache = dict(decode_state.cache, end_index=start + max_new_tokens)
  return dataclasses.replace(decode_state, cache=cache)


def init_state(model: transformer.Transformer, batch_size: int,
               num_slots: int) -> DecodeState:
  """An empty episode buffer and cache, sharded like the batch."""
  rows = lambda dtype: model.shard(jnp.zeros((batch_size, num_slots), dtype),
                                   ("activation_batch", None))
  return DecodeState(
      tokens=rows(jnp.int32),
      valid=rows(bool),
      log_probs=rows(jnp.float32),
      cache=model.init_cache(batch_size, num_slots),
      next_position=jnp.zeros((batch_size,), jnp.int32),
      last_logits=model.shard(
          jnp.zeros((batch_size, model.cfg.vocab_size), jnp.float32),
          ("activation_batch", "activation_vocab")))
