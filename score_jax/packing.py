"""Packed rows for the train step: episodes back to back, no padding.

An episode buffer (rollout.py) holds a prompt left-padded to its bucket and
attempts padded to their budget; a typical MATH episode fills a third of
its slots. The train step runs on packed rows instead: each row holds the
real tokens of whole episodes back to back, each episode's tokens in order
with their own positions, and a token attends only to the tokens before it
in its own episode. The rows are as many as the batch has episodes (one
episode a row in the worst case) and as long as an episode buffer, so any
batch fits; the train step loops only over the micro-batches that hold an
episode (`episodes.Packed.num_micro_batches`).

The host plans (`plan`: first-fit decreasing on the episodes' real lengths,
filling the micro-batches in order), the devices move the tokens (`pack`,
inside a jitted program: the episodes never leave the devices).

Shape legend (docs/design.md): B episodes, S slots of an episode, A
attempts, R packed rows, T slots of a packed row, M micro-batches.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from score_jax import episodes as episodes_lib
from score_jax import multihost


def row_len(episode_len: int) -> int:
  """T, the slots of a packed row for episodes of `episode_len` slots:
  rounded up to a multiple of 128 (a TPU tile, and the attention kernels'
  block)."""
  return -(-episode_len // 128) * 128


def fill_order(
  rows: Sequence[int] | np.ndarray, num_micro_batches: int
) -> np.ndarray:
  """Packed rows in the order `plan` fills them: micro-batch by
  micro-batch, as the train step splits rows (row r in micro-batch r % M),
  so that the episodes end up in as few micro-batches as can hold them.

  Args:
    rows: the global indices of the packed rows to fill.
    num_micro_batches: M, the train step's.

  Returns:
    `rows` sorted by micro-batch (r % M), then by index.
  """
  rows = np.asarray(rows)
  return rows[np.lexsort((rows, rows % num_micro_batches))]


def plan(
  lengths_b: np.ndarray, rows: np.ndarray, row_len: int, num_micro_batches: int
) -> tuple[np.ndarray, np.ndarray, int]:
  """Where each episode goes: first-fit decreasing of the episodes' real
  lengths into packed rows, taken in `fill_order(rows)`.

  Args:
    lengths_b: [B], the real tokens of each episode.
    rows: the global indices of the packed rows to fill (this process's
      rows; all of them on one host), at least one per episode.
    row_len: T, the slots of a packed row.
    num_micro_batches: M, the train step's.

  Returns:
    (row_b: the global packed row of each episode, offset_b: its first
    slot there, both int32 [B]; the micro-batches in use, 1 + the largest
    micro-batch index of a row that holds an episode, 1 if none does).

  Raises:
    ValueError: the episodes outnumber the rows, or one is longer than a
      row.
  """
  lengths_b = np.asarray(lengths_b, np.int64)
  if len(lengths_b) > len(rows):
    raise ValueError(
      f"{len(lengths_b)} episodes for {len(rows)} packed "
      "rows; the batch must have a packed row per episode."
    )
  if lengths_b.size and lengths_b.max() > row_len:
    raise ValueError(
      f"an episode of {lengths_b.max()} tokens is longer "
      f"than a packed row of {row_len}."
    )
  order = fill_order(rows, num_micro_batches)
  free = np.full(len(order), row_len, np.int64)
  row_b = np.zeros(len(lengths_b), np.int32)
  offset_b = np.zeros(len(lengths_b), np.int32)
  for b in np.argsort(-lengths_b, kind="stable"):
    slot = int(np.argmax(free >= lengths_b[b]))  # the first that fits
    row_b[b] = order[slot]
    offset_b[b] = row_len - free[slot]
    free[slot] -= lengths_b[b]
  used = order[free < row_len]
  num_used = int((used % num_micro_batches).max()) + 1 if used.size else 1
  return row_b, offset_b, num_used


def plan_global(
  lengths_b: np.ndarray,
  rows_sharding,
  num_rows: int,
  row_len: int,
  num_micro_batches: int,
):
  """`plan` of this process's episodes, as global arrays of the whole batch.

  Args:
    lengths_b: the real tokens of this process's episodes [B_local].
    rows_sharding: the packed rows' layout over the mesh (1-D).
    num_rows: R, the packed rows of the whole batch (one an episode).
    row_len: T.
    num_micro_batches: M, the train step's.

  Returns:
    (row_b, offset_b: global int32 [B] arrays, as `plan`; the micro-batches
    in use: the most any process uses, so that all run the same number).
  """
  row_b, offset_b, used = plan(
    lengths_b,
    multihost.process_rows(rows_sharding, num_rows),
    row_len,
    num_micro_batches,
  )
  used = int(multihost.gather(used).max())
  row_b, offset_b = multihost.to_global((row_b, offset_b), rows_sharding)
  return row_b, offset_b, used


def roles(attempt_mask_bas) -> jax.Array:
  """The attempt each slot's token belongs to (int32 [B, S]), -1 for the
  prompt, instructions and padding."""
  A = attempt_mask_bas.shape[1]
  attempts = jnp.arange(A, dtype=jnp.int32)[None, :, None]
  return jnp.max(jnp.where(attempt_mask_bas, attempts, -1), axis=1)


def pack(
  tokens_bs,
  valid_bs,
  roles_bs,
  sampler_log_probs_bs,
  row_b,
  offset_b,
  num_micro_batches,
  num_rows: int,
  row_len: int,
) -> episodes_lib.Packed:
  """Moves each episode's valid slots, in order, to slots offset_b[b] ..
  of packed row row_b[b] (from `plan`), inside a jitted program. Episode b
  keeps index b in `episodes_rt`; its k-th valid token gets position k.

  Args:
    tokens_bs: int [B, S], the episodes' token ids.
    valid_bs: bool [B, S], the slots that hold a token.
    roles_bs: int [B, S], the attempt of each trained token, -1 for the
      others (`roles`).
    sampler_log_probs_bs: float [B, S], the sampler's log-prob of each
      token (0 where it has none).
    row_b: int32 [B], each episode's packed row (`plan`).
    offset_b: int32 [B], its first slot there.
    num_micro_batches: the micro-batches in use (`plan`), a scalar.
    num_rows: R, the packed rows.
    row_len: T, the slots of a packed row.

  Returns:
    The `Packed` rows [R, T], empty slots as `episodes.Packed` describes.
  """
  B, S = tokens_bs.shape
  positions_bs = jnp.cumsum(valid_bs, axis=1, dtype=jnp.int32) - 1
  rows_bs = jnp.broadcast_to(row_b[:, None], (B, S))
  # Padding slots go out of range, which the scatter drops.
  columns_bs = jnp.where(valid_bs, offset_b[:, None] + positions_bs, row_len)

  def scatter(values_bs, empty):
    packed_rt = jnp.full((num_rows, row_len), empty, values_bs.dtype)
    return packed_rt.at[rows_bs, columns_bs].set(values_bs, mode="drop")

  return episodes_lib.Packed(
    tokens_rt=scatter(tokens_bs.astype(jnp.int32), 0),
    episodes_rt=scatter(
      jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None], (B, S)), -1
    ),
    positions_rt=scatter(positions_bs, 0),
    roles_rt=scatter(roles_bs.astype(jnp.int32), -1),
    sampler_log_probs_rt=scatter(sampler_log_probs_bs.astype(jnp.float32), 0.0),
    num_micro_batches=jnp.asarray(num_micro_batches, jnp.int32),
  )


def pack_episodes(
  episode, row_b, offset_b, num_micro_batches, num_rows: int, row_len: int
) -> episodes_lib.Packed:
  """`pack` of the rollout's episodes: the attempts' tokens are trained,
  with the sampler's log-probs.

  Args:
    episode: the rollout's `episodes.Episode` [B, S].
    row_b: int32 [B], each episode's packed row (`plan`).
    offset_b: int32 [B], its first slot there.
    num_micro_batches: the micro-batches in use (`plan`), a scalar.
    num_rows: R, the packed rows.
    row_len: T, the slots of a packed row.

  Returns:
    The `Packed` rows [R, T].
  """
  return pack(
    episode.tokens_bs,
    episode.valid_bs,
    roles(episode.attempt_mask_bas),
    episode.log_probs_bs,
    row_b,
    offset_b,
    num_micro_batches,
    num_rows,
    row_len,
  )


def pack_supervised(
  tokens_bs,
  valid_bs,
  loss_mask_bs,
  row_b,
  offset_b,
  num_micro_batches,
  num_rows: int,
  row_len: int,
) -> episodes_lib.Packed:
  """`pack` of episodes to imitate: the tokens of `loss_mask_bs` are
  trained (role 0), none has a sampler log-prob (0).

  Args:
    tokens_bs: int [B, S], the episodes' token ids.
    valid_bs: bool [B, S], the slots that hold a token.
    loss_mask_bs: bool [B, S], the tokens to imitate.
    row_b: int32 [B], each episode's packed row (`plan`).
    offset_b: int32 [B], its first slot there.
    num_micro_batches: the micro-batches in use (`plan`), a scalar.
    num_rows: R, the packed rows.
    row_len: T, the slots of a packed row.

  Returns:
    The `Packed` rows [R, T].
  """
  return pack(
    tokens_bs,
    valid_bs,
    jnp.where(loss_mask_bs, 0, -1),
    jnp.zeros(tokens_bs.shape, jnp.float32),
    row_b,
    offset_b,
    num_micro_batches,
    num_rows,
    row_len,
  )
