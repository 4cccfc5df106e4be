"""Episodes and the batches made of them: the types one step passes along,
and how a batch splits into micro-batches.

  Episode     the rollout's output: every attempt of B episodes in the
              buffer layout of rollout.py, on the devices (or a host copy)
  Supervised  episodes to imitate, in the same layout, on the host
  Packed      episodes packed back to back into rows (packing.py): what
              the train step and the reference's scoring read
  RLBatch     a Packed batch, the reference's log-probs and the rewards
  SFTBatch    a Packed batch to imitate

A batch of rows splits into M micro-batches by one rule, wherever it is
split (the rollout's prompts, the train step's and the reference's packed
rows): row r goes to micro-batch r % M, so that every micro-batch stays
spread over every device and no row moves between devices
(`split_micro_batches`, `merge_micro_batches`). Whether a count splits so
is decided in one place (`check_split`).

Shape legend (docs/design.md): B episodes, U prompts, G samples per prompt,
A attempts, S slots of an episode, R packed rows, T slots of a packed row,
M micro-batches.
"""

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Shard = Callable[[jax.Array, Sequence[Optional[str]]], jax.Array]


def _register(cls):
  jax.tree_util.register_dataclass(
    cls, data_fields=[f.name for f in dataclasses.fields(cls)], meta_fields=[]
  )
  return cls


@_register
@dataclasses.dataclass(frozen=True)
class Episode:
  """A batch of episodes, batch first in every field: the rollout's output
  (global arrays sharded over the batch) or a host copy of some rows.

  Attributes:
    tokens_bs: int32 token ids; padding slots hold the pad id.
    valid_bs: bool, the slots that hold a token of the episode.
    attempt_mask_bas: bool, the tokens the policy produced in attempt a.
    log_probs_bs: float32, the sampler's log-prob of each attempt token
      (0 elsewhere); None in host copies, which only text needs.
    lengths_ba: int32, tokens of each attempt (its stop token included).
  """

  tokens_bs: Any
  valid_bs: Any
  attempt_mask_bas: Any
  log_probs_bs: Any
  lengths_ba: Any


@dataclasses.dataclass(frozen=True)
class Supervised:
  """Episodes to imitate, in the rollout's layout (host numpy, batch first).

  Attributes:
    tokens_bs: int32 token ids, pad ids after the episode.
    valid_bs: bool, the slots that hold a token.
    loss_mask_bs: bool, the tokens to imitate.
  """

  tokens_bs: np.ndarray
  valid_bs: np.ndarray
  loss_mask_bs: np.ndarray


@_register
@dataclasses.dataclass(frozen=True)
class Packed:
  """Episodes packed into rows (packing.py), row first.

  Attributes:
    tokens_rt: int32 token ids; 0 on empty slots.
    episodes_rt: int32, the episode's index in its batch; -1 on empty slots.
    positions_rt: int32, the token's index among its episode's tokens.
    roles_rt: int32, attempt a of a token the policy produced (a >= 0: it
      is trained); -1 for the others.
    sampler_log_probs_rt: float32, the sampler's log-prob of a trained
      token; 0 for the others.
    num_micro_batches: int32 scalar, the micro-batches that hold an episode.
  """

  tokens_rt: Any
  episodes_rt: Any
  positions_rt: Any
  roles_rt: Any
  sampler_log_probs_rt: Any
  num_micro_batches: Any


@_register
@dataclasses.dataclass(frozen=True)
class RLBatch:
  """Sampled episodes, packed, with what the objective needs of them.

  Attributes:
    packed: the episodes.
    reference_log_probs_rt: float32, the frozen reference's log-prob of each
      packed token (train_step.make_reference_fn).
    rewards_ba: float32, each attempt's reward; the episodes grouped
      [prompt 0 x G, prompt 1 x G, ...].
  """

  packed: Packed
  reference_log_probs_rt: Any
  rewards_ba: Any


@_register
@dataclasses.dataclass(frozen=True)
class SFTBatch:
  """Supervised episodes, packed; `packed.roles_rt >= 0` marks the tokens
  to imitate.

  Attributes:
    packed: the episodes.
  """

  packed: Packed


def packed_shardings(rows, replicated) -> Packed:
  """The shardings of a `Packed`.

  Args:
    rows: the sharding of per-row arrays (split over the batch axes).
    replicated: the sharding of a value every device holds.

  Returns:
    A `Packed` of shardings: the rows' for the arrays, `replicated` for the
    micro-batch count.
  """
  return Packed(rows, rows, rows, rows, rows, replicated)


def abstract_packed(num_rows: int, row_len: int, shardings: Packed) -> Packed:
  """A `Packed`'s shapes, dtypes and shardings, to compile for.

  Args:
    num_rows: R, the packed rows.
    row_len: T, the slots of a row.
    shardings: from `packed_shardings`.

  Returns:
    A `Packed` of jax.ShapeDtypeStruct.
  """
  row = lambda dtype, sharding: jax.ShapeDtypeStruct(
    (num_rows, row_len), dtype, sharding=sharding
  )
  return Packed(
    row(jnp.int32, shardings.tokens_rt),
    row(jnp.int32, shardings.episodes_rt),
    row(jnp.int32, shardings.positions_rt),
    row(jnp.int32, shardings.roles_rt),
    row(jnp.float32, shardings.sampler_log_probs_rt),
    jax.ShapeDtypeStruct((), jnp.int32, sharding=shardings.num_micro_batches),
  )


def batch_shardings(batch: RLBatch | SFTBatch, rows, replicated):
  """The shardings of a batch of the kind of `batch`.

  Args:
    batch: an RLBatch or an SFTBatch (only its type is read).
    rows: the sharding of arrays of rows or episodes.
    replicated: the sharding of a value every device holds.

  Returns:
    A batch of the same kind holding shardings.
  """
  packed = packed_shardings(rows, replicated)
  if isinstance(batch, SFTBatch):
    return SFTBatch(packed)
  return RLBatch(packed, rows, rows)


def splits(count: int, num_micro_batches: int, batch_shards: int) -> bool:
  """Whether rows split into micro-batches of equal size, each a multiple
  of the batch shards (a row a device at least).

  Args:
    count: the rows to split.
    num_micro_batches: M.
    batch_shards: how many ways the mesh splits the batch (1: any size).

  Returns:
    True if M >= 1 divides `count` and `batch_shards` divides
    `count` / M.
  """
  M = num_micro_batches
  return M >= 1 and count % M == 0 and (count // M) % batch_shards == 0


def check_split(
  count: int, num_micro_batches: int, batch_shards: int, what: str
) -> None:
  """Raises a ValueError naming `what` unless `splits(...)`.

  Args:
    count: the rows to split.
    num_micro_batches: M.
    batch_shards: how many ways the mesh splits the batch (1: any size).
    what: the rows and the setting, for the message, e.g. "prompts_per_step
      x samples_per_prompt = 64 episodes ... config.num_micro_batches=3".
  """
  if not splits(count, num_micro_batches, batch_shards):
    raise ValueError(
      f"{what}: {count} rows do not split into {num_micro_batches} "
      f"micro-batches of equal size, each a multiple of the "
      f"{batch_shards} batch shards of the mesh."
    )


def split_micro_batches(tree, num_micro_batches: int, shard: Shard):
  """Per-row arrays [N, ...] as M micro-batches [M, N / M, ...]: row r goes
  to micro-batch r % M.

  Args:
    tree: a pytree of arrays with the rows first, as many in each.
    num_micro_batches: M; it must divide the rows (`check_split`).
    shard: constrains each micro-batch's rows to lie over the batch axes
      (the model's ActivationSharding).

  Returns:
    The pytree with each array [M, N / M, ...].
  """
  M = num_micro_batches

  def split(x):
    check_split(x.shape[0], M, 1, "a micro-batch split")
    parts = jnp.swapaxes(x.reshape(x.shape[0] // M, M, *x.shape[1:]), 0, 1)
    return shard(parts, (None, "activation_batch") + (None,) * (x.ndim - 1))

  return jax.tree.map(split, tree)


def merge_micro_batches(tree, rows_per_item: int = 1):
  """The inverse of `split_micro_batches`, where each row of the split
  became `rows_per_item` consecutive rows (the rollout: a prompt, G
  episodes).

  Args:
    tree: a pytree of arrays [M, N / M * G, ...].
    rows_per_item: G.

  Returns:
    The pytree with each array [N * G, ...], item n's rows at n * G ...
    n * G + G - 1.
  """
  G = rows_per_item

  def merge(x):
    M, rows = x.shape[:2]
    grouped = x.reshape(M, rows // G, G, *x.shape[2:])
    return jnp.swapaxes(grouped, 0, 1).reshape(M * rows, *x.shape[2:])

  return jax.tree.map(merge, tree)
