"""Packed rows for the train step: episodes back to back, no padding.

An episode buffer (rollout.py) holds a prompt left-padded to its bucket and
attempts padded to their budget; a typical MATH episode fills a third of
its slots. The train step runs on packed rows instead: each row holds the
real tokens of whole episodes back to back, each episode's tokens in order
with their own positions, and a token attends only to the tokens before it
in its own episode. The rows are as many as the batch has episodes (one
episode a row in the worst case) and as long as an episode buffer, so any
batch fits; the train step loops only over the micro-batches that hold an
episode (`Packed.num_micro_batches`).

The host plans (`plan`: first-fit decreasing on the episodes' real lengths,
filling the micro-batches in order), the devices move the tokens (`pack`,
inside a jitted program: the episodes never leave the devices).

Shape legend: B episodes, S episode slots, A attempts, R packed rows, L
slots of a packed row, M micro-batches.
"""

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Packed:
  """Episodes packed into rows (module docstring), batch (row) first."""
  tokens_rl: jax.Array             # int32; 0 on empty slots
  episodes_rl: jax.Array           # int32: the episode's row in its batch; -1 empty
  positions_rl: jax.Array          # int32: index among its episode's tokens
  roles_rl: jax.Array              # int32: attempt a of a token the policy
                                   # produced (a >= 0: it is trained); -1 else
  sampler_log_probs_rl: jax.Array  # float32: the sampler's log pi; 0 else
  num_micro_batches: jax.Array     # int32 scalar: micro-batches in use


jax.tree_util.register_dataclass(
    Packed, data_fields=[f.name for f in dataclasses.fields(Packed)],
    meta_fields=[])


def shardings(rows, replicated) -> Packed:
  """Shardings of a Packed: rows split over the batch axes (`rows`), the
  micro-batch count on every device (`replicated`)."""
  return Packed(rows, rows, rows, rows, rows, replicated)


def abstract(num_rows: int, row_len: int, shardings_: Packed) -> Packed:
  """A Packed's shapes, dtypes and shardings (to compile for)."""
  row = lambda dtype, sharding: jax.ShapeDtypeStruct((num_rows, row_len),
                                                     dtype, sharding=sharding)
  return Packed(row(jnp.int32, shardings_.tokens_rl),
                row(jnp.int32, shardings_.episodes_rl),
                row(jnp.int32, shardings_.positions_rl),
                row(jnp.int32, shardings_.roles_rl),
                row(jnp.float32, shardings_.sampler_log_probs_rl),
                jax.ShapeDtypeStruct((), jnp.int32,
                                     sharding=shardings_.num_micro_batches))


def row_len(episode_len: int) -> int:
  """Packed rows' length for episodes of `episode_len` slots: rounded up
  to a multiple of 128 (a TPU tile, and the attention kernels' block)."""
  return -(-episode_len // 128) * 128


def fill_order(rows: Sequence[int], num_micro_batches: int) -> np.ndarray:
  """Packed rows (global indices) in the order `plan` fills them: micro-batch
  by micro-batch, as the train step splits rows (row r in micro-batch
  r % M), so that the episodes end up in as few micro-batches as can hold
  them."""
  rows = np.asarray(rows)
  return rows[np.lexsort((rows, rows % num_micro_batches))]


def plan(lengths_b: np.ndarray, rows: np.ndarray, row_len: int,
         num_micro_batches: int) -> tuple[np.ndarray, np.ndarray, int]:
  """Where each episode goes: first-fit decreasing of the episodes' real
  lengths (`lengths_b`, tokens) into packed rows of `row_len` slots, taken
  in `fill_order(rows)` (this process's rows; all of them on one host).

  Returns (row_b: the global packed row of each episode, offset_b: its
  first slot there, both int32; the micro-batches in use, 1 + the largest
  micro-batch index of a row that holds an episode).
  """
  lengths_b = np.asarray(lengths_b, np.int64)
  if len(lengths_b) > len(rows):
    raise ValueError(f"{len(lengths_b)} episodes for {len(rows)} packed "
                     "rows; the batch must have a packed row per episode.")
  if lengths_b.size and lengths_b.max() > row_len:
    raise ValueError(f"an episode of {lengths_b.max()} tokens is longer "
                     f"than a packed row of {row_len}.")
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


def roles(attempt_mask_bas) -> jax.Array:
  """The attempt each slot's token belongs to (int32 [B, S]), -1 for the
  prompt, instructions and padding."""
  A = attempt_mask_bas.shape[1]
  attempts = jnp.arange(A, dtype=jnp.int32)[None, :, None]
  return jnp.max(jnp.where(attempt_mask_bas, attempts, -1), axis=1)


def pack(tokens_bs, valid_bs, roles_bs, sampler_log_probs_bs, row_b, offset_b,
         num_micro_batches, num_rows: int, row_len: int) -> Packed:
  """Moves each episode's valid slots, in order, to slots offset_b[b] ..
  of packed row row_b[b] (from `plan`), inside a jitted program. Episode b
  keeps index b in `episodes_rl`; its k-th valid token gets position k."""
  B, S = tokens_bs.shape
  positions_bs = jnp.cumsum(valid_bs, axis=1, dtype=jnp.int32) - 1
  rows_bs = jnp.broadcast_to(row_b[:, None], (B, S))
  # Padding slots go out of range, which the scatter drops.
  columns_bs = jnp.where(valid_bs, offset_b[:, None] + positions_bs, row_len)

  def scatter(values_bs, empty):
    packed_rl = jnp.full((num_rows, row_len), empty, values_bs.dtype)
    return packed_rl.at[rows_bs, columns_bs].set(values_bs, mode="drop")

  return Packed(
      tokens_rl=scatter(tokens_bs.astype(jnp.int32), 0),
      episodes_rl=scatter(jnp.broadcast_to(
          jnp.arange(B, dtype=jnp.int32)[:, None], (B, S)), -1),
      positions_rl=scatter(positions_bs, 0),
      roles_rl=scatter(roles_bs.astype(jnp.int32), -1),
      sampler_log_probs_rl=scatter(sampler_log_probs_bs.astype(jnp.float32),
                                   0.0),
      num_micro_batches=jnp.asarray(num_micro_batches, jnp.int32))


def pack_episodes(episode, row_b, offset_b, num_micro_batches, num_rows: int,
                  row_len: int) -> Packed:
  """`pack` of the rollout's episodes (rollout.Episode): the attempts'
  tokens are trained, with the sampler's log-probs."""
  return pack(episode.tokens_bs, episode.valid_bs,
              roles(episode.attempt_mask_bns), episode.log_probs_bs, row_b,
              offset_b, num_micro_batches, num_rows, row_len)


def pack_supervised(tokens_bs, valid_bs, loss_mask_bs, row_b, offset_b,
                    num_micro_batches, num_rows: int, row_len: int) -> Packed:
  """`pack` of episodes to imitate: the tokens of `loss_mask_bs` are
  trained (role 0), none has a sampler log-prob."""
  return pack(tokens_bs, valid_bs, jnp.where(loss_mask_bs, 0, -1),
              jnp.zeros(tokens_bs.shape, jnp.float32), row_b, offset_b,
              num_micro_batches, num_rows, row_len)
