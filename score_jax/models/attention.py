"""Scaled dot-product attention with grouped kv heads and Gemma 2's soft-cap.

Two shapes of it, one numerics: `self_attention` over the keys of the same
tokens (training and scoring, and a prompt's prefill: each token sees the
tokens at or before it of its own episode), and `segment_attention` over a
KV cache of segments (a turn's prefill and decoding; kv_cache.py). Both
take queries already scaled and rotated, keep the logits and the softmax in
float32 and weigh the values in the compute dtype.

Shape legend (docs/design.md): B batch rows, T query tokens, S key slots, N
query heads, K kv heads, Q query heads per kv head (N / K), H head_dim, U
prompts (the entries of a shared segment), G rows per entry (samples per
prompt), E entries of a segment, Z queries per row and kv head (T * Q).
"""

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from score_jax.models import kv_cache, tpu_attention

# Large negative instead of -inf, so that fully masked rows stay finite.
MASK_VALUE = -2.3819763e38

Shard = Callable[[jax.Array, Sequence[Optional[str]]], jax.Array]
BKQTS = (
  "activation_batch",
  "activation_kv_heads",
  "activation_heads",
  "activation_length",
  None,
)


def accumulation_dtype(dtype):
  """float32, or float64 for a float64 model (the tests' references)."""
  return jnp.promote_types(dtype, jnp.float32)


def softcap(x, cap):
  """Gemma 2's logit soft-cap, cap * tanh(x / cap), in x's dtype.

  Args:
    x: the logits, any shape.
    cap: the cap (None: `x` as it is).

  Returns:
    The capped logits, shaped like `x`.
  """
  return x if cap is None else cap * jnp.tanh(x / cap)


def episode_mask(
  episodes_bt, positions_bt, key_episodes_bs, key_positions_bs, window
):
  """Which keys each query sees: key s of its own episode (ids >= 0; -1 is
  padding) at a position <= its own and within the sliding `window`.

  Args:
    episodes_bt: int32 [B, T], the queries' episode ids.
    positions_bt: int32 [B, T], the queries' positions.
    key_episodes_bs: int32 [B, S], the keys' episode ids (-1: seen by no
      query).
    key_positions_bs: int32 [B, S], the keys' positions.
    window: a query sees keys less than `window` positions back (an int, or
      an int32 scalar).

  Returns:
    bool [B, T, S]: query t sees key s.
  """
  distance_bts = positions_bt[:, :, None] - key_positions_bs[:, None, :]
  return (
    (episodes_bt[:, :, None] == key_episodes_bs[:, None, :])
    & (key_episodes_bs[:, None, :] >= 0)
    & (distance_bts >= 0)
    & (distance_bts < window)
  )


def self_attention(
  q_btnh,
  k_btkh,
  v_btkh,
  episodes_bt,
  positions_bt,
  window,
  cap,
  shard: Shard,
  block_len: int,
  kernels: str = "xla",
  shortest_window: Optional[int] = None,
):
  """Attention among T tokens of rows that hold one or more episodes, each
  token's episode id (`episodes_bt`, -1 for padding) and position given;
  an episode's tokens lie in slot order. With T > `block_len` the queries
  go in blocks of `block_len`, each against the keys up to its own end: the
  blocks above the diagonal, which the mask would empty, are never
  computed. With `kernels` "tpu" (or "tpu_interpret"), splash attention
  does the same, for rows of whole 128-token blocks that no layer's
  sliding window (`shortest_window`) is shorter than; splash ignores
  `positions_bt` and `window`.

  Args:
    q_btnh: [B, T, N, H], the queries, scaled and rotated.
    k_btkh: [B, T, K, H], the keys, rotated.
    v_btkh: [B, T, K, H], the values.
    episodes_bt: int32 [B, T], each token's episode id, -1 for padding.
    positions_bt: int32 [B, T], each token's RoPE position.
    window: the layer's sliding window in positions (a huge value: global);
      an int, or an int32 scalar under the layers' scan.
    cap: the logits' soft-cap (None: none).
    shard: `shard(x, logical_axes)`, constrains an activation's sharding.
    block_len: query tokens per block on the XLA path.
    kernels: "xla", "tpu" or "tpu_interpret" (the TPU kernels, interpreted
      on the CPU).
    shortest_window: the shortest sliding window of any layer (None: no
      layer has one).

  Returns:
    [B, T, N, H], the attention's output per query head.
  """
  T = q_btnh.shape[1]
  if (
    kernels != "xla"
    and T % 128 == 0
    and (shortest_window is None or shortest_window >= T)
  ):
    return tpu_attention.splash_self_attention(
      q_btnh,
      k_btkh,
      v_btkh,
      episodes_bt,
      cap,
      shard,
      interpret=kernels == "tpu_interpret",
    )
  outputs = []
  for start in range(0, T, block_len):
    stop = min(start + block_len, T)
    mask_bts = episode_mask(
      episodes_bt[:, start:stop],
      positions_bt[:, start:stop],
      episodes_bt[:, :stop],
      positions_bt[:, :stop],
      window,
    )
    outputs.append(
      dot_product_attention(
        q_btnh[:, start:stop],
        k_btkh[:, :stop],
        v_btkh[:, :stop],
        mask_bts,
        cap,
        shard,
      )
    )
  return outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, 1)


def dot_product_attention(q_btnh, k_bskh, v_bskh, mask_bts, cap, shard: Shard):
  """softmax(q k^T, masked) v, the logits soft-capped and the softmax in
  float32 (float64 for float64 queries). A query that sees no key gets the
  mean of the values.

  Args:
    q_btnh: [B, T, N, H], the queries, scaled and rotated.
    k_bskh: [B, S, K, H], the keys, rotated.
    v_bskh: [B, S, K, H], the values.
    mask_bts: bool [B, T, S], the keys each query sees.
    cap: the logits' soft-cap (None: none).
    shard: `shard(x, logical_axes)`, constrains an activation's sharding.

  Returns:
    [B, T, N, H] in the queries' dtype.
  """
  B, T, N, H = q_btnh.shape
  K = k_bskh.shape[2]
  q_btkqh = q_btnh.reshape(B, T, K, N // K, H)
  logits_bkqts = jnp.einsum(
    "btkqh,bskh->bkqts",
    q_btkqh,
    k_bskh,
    preferred_element_type=accumulation_dtype(q_btnh.dtype),
  )
  logits_bkqts = shard(softcap(logits_bkqts, cap), BKQTS)
  logits_bkqts = jnp.where(mask_bts[:, None, None], logits_bkqts, MASK_VALUE)
  probs_bkqts = jax.nn.softmax(logits_bkqts, axis=-1).astype(q_btnh.dtype)
  out_btkqh = jnp.einsum("bkqts,bskh->btkqh", probs_bkqts, v_bskh)
  return out_btkqh.reshape(B, T, N, H)


def segment_attention(
  q_btnh,
  positions_bt,
  segments,
  layer: int,
  window: int,
  cap,
  shard: Shard,
  kernels: str = "xla",
  active_b=None,
):
  """Attention of T new tokens per row over the written slots of every
  segment of a KV cache (the new tokens' own keys already written, in the
  last segment): key slot s of a segment is seen by query t when it is
  written, at a position <= the query's and within the sliding `window`.

  A shared segment (the prompt: one entry per prompt, read by its G rows)
  is read once per entry, its rows' queries stacked as extra query heads,
  as grouped-query attention stacks heads. With `kernels` "tpu", the
  segments are read by tpu_attention.decode_attention (each row's written
  slots only; none for rows not in `active_b`, whose outputs are unused),
  when `window` reaches past every slot.

  Args:
    q_btnh: [B, T, N, H], the new tokens' queries, scaled and rotated.
    positions_bt: int32 [B, T], the new tokens' RoPE positions.
    segments: the kv_cache.Segments the new tokens read, the last one
      holding their keys and values; B rows, or B / G prompts for a shared
      segment.
    layer: the layer whose keys and values are read.
    window: the layer's sliding window in positions (a huge value: global).
    cap: the logits' soft-cap (None: none).
    shard: `shard(x, logical_axes)`, constrains an activation's sharding.
    kernels: "xla", "tpu" or "tpu_interpret" (the TPU kernels, interpreted
      on the CPU).
    active_b: bool [B], the rows whose outputs are used, for the kernels
      (None: every row).

  Returns:
    [B, T, N, H] in the queries' dtype.
  """
  if kernels != "xla" and window >= sum(s.num_slots for s in segments):
    return _segment_attention_kernels(
      q_btnh, segments, layer, cap, shard, kernels == "tpu_interpret", active_b
    )
  B, T, N, H = q_btnh.shape
  K = segments[0].k_leksh[layer].shape[1]
  Q = N // K
  q_btkqh = q_btnh.reshape(B, T, K, Q, H)
  acc = accumulation_dtype(q_btnh.dtype)
  logits, masks = [], []
  for segment in segments:
    k_eksh = segment.k_leksh[layer]
    G = segment.rows_per_entry
    if G == 1:
      logits_bkqts = jnp.einsum(
        "btkqh,bksh->bkqts", q_btkqh, k_eksh, preferred_element_type=acc
      )
    else:
      q_ugtkqh = q_btkqh.reshape(B // G, G, T, K, Q, H)
      logits_ukqgts = jnp.einsum(
        "ugtkqh,uksh->ukqgts", q_ugtkqh, k_eksh, preferred_element_type=acc
      )
      logits_bkqts = jnp.moveaxis(logits_ukqgts, 3, 1).reshape(B, K, Q, T, -1)
    key_positions_bs = kv_cache.expand_rows(segment.positions_es(), G)
    valid_bs = kv_cache.expand_rows(segment.valid_es(), G)
    masks.append(
      episode_mask(
        jnp.zeros_like(positions_bt),
        positions_bt,
        jnp.where(valid_bs, 0, -1),
        key_positions_bs,
        window,
      )
    )
    logits.append(logits_bkqts)
  logits_bkqts = shard(softcap(jnp.concatenate(logits, -1), cap), BKQTS)
  mask_bts = jnp.concatenate(masks, -1)
  logits_bkqts = jnp.where(mask_bts[:, None, None], logits_bkqts, MASK_VALUE)
  probs_bkqts = jax.nn.softmax(logits_bkqts, axis=-1).astype(q_btnh.dtype)
  # The segments' shares are summed in float32 and rounded once, as one
  # einsum over all the keys would.
  out_btkqh = jnp.zeros((B, T, K, Q, H), acc)
  start = 0
  for segment in segments:
    v_eksh = segment.v_leksh[layer]
    S, G = segment.num_slots, segment.rows_per_entry
    probs = probs_bkqts[..., start : start + S]
    start += S
    if G == 1:
      out_btkqh += jnp.einsum(
        "bkqts,bksh->btkqh", probs, v_eksh, preferred_element_type=acc
      )
    else:
      probs_ugkqts = probs.reshape(B // G, G, K, Q, T, S)
      out_btkqh += jnp.einsum(
        "ugkqts,uksh->ugtkqh", probs_ugkqts, v_eksh, preferred_element_type=acc
      ).reshape(B, T, K, Q, H)
  return out_btkqh.reshape(B, T, N, H).astype(q_btnh.dtype)


def _segment_attention_kernels(
  q_btnh, segments, layer, cap, shard, interpret, active_b
):
  """segment_attention with tpu_attention.decode_attention, every segment
  in one call. With T > 1 new tokens (a turn's prefill, once per turn) the
  last segment, which holds them, is read by the XLA path with its causal
  mask, and the two parts combined."""
  B, T, N, H = q_btnh.shape
  K = segments[0].k_leksh[layer].shape[1]
  Q = N // K
  G = segments[0].rows_per_entry
  U = B // G
  active_b = jnp.ones((B,), bool) if active_b is None else active_b
  read = segments if T == 1 else segments[:-1]
  inputs = []
  for segment in read:
    if segment.rows_per_entry == 1:
      lengths = jnp.where(active_b, segment.lengths_e, 0)
    else:  # Read while any of the prompt's rows samples.
      lengths = jnp.where(
        jnp.any(active_b.reshape(U, G), axis=1), segment.lengths_e, 0
      )
    inputs.append((segment.k_leksh[layer], segment.v_leksh[layer], lengths))
  # [B, T, N, H] -> [U, G, K, T * Q, H]: a prompt's rows' queries (for one
  # new token, the same array).
  q_ugkzh = jnp.moveaxis(q_btnh.reshape(U, G, T, K, Q, H), 2, 3).reshape(
    U, G, K, T * Q, H
  )
  out, lse = tpu_attention.decode_attention(
    q_ugkzh, inputs, cap, shard, interpret
  )
  back = lambda x, *h: jnp.moveaxis(x.reshape(U, G, K, T, Q, *h), 3, 2).reshape(
    B, T, K, Q, *h
  )
  if T == 1:
    return back(out, H).reshape(B, T, N, H)
  last = segments[-1]
  k_btkh = jnp.swapaxes(last.k_leksh[layer], 1, 2)[:, :T]
  v_btkh = jnp.swapaxes(last.v_leksh[layer], 1, 2)[:, :T]
  new_out, new_lse = _causal_with_lse(
    q_btnh.reshape(B, T, K, Q, H), k_btkh, v_btkh, cap
  )
  return (
    tpu_attention.combine([back(out, H), new_out], [back(lse), new_lse])
    .reshape(B, T, N, H)
    .astype(q_btnh.dtype)
  )


def _causal_with_lse(q_btkqh, k_btkh, v_btkh, cap):
  """Causal attention among T new tokens (written from slot 0 of their
  segment), and the log-sum-exp of each query's logits."""
  T = q_btkqh.shape[1]
  logits = jnp.einsum(
    "btkqh,bskh->btkqs", q_btkqh, k_btkh, preferred_element_type=jnp.float32
  )
  logits = softcap(logits, cap)
  causal_ts = jnp.tril(jnp.ones((T, T), bool))
  logits = jnp.where(causal_ts[None, :, None, None], logits, MASK_VALUE)
  lse = jax.nn.logsumexp(logits, axis=-1)
  probs = jnp.exp(logits - lse[..., None]).astype(v_btkh.dtype)
  out = jnp.einsum(
    "btkqs,bskh->btkqh", probs, v_btkh, preferred_element_type=jnp.float32
  )
  return out, lse
