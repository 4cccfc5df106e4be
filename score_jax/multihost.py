"""Multi-host data plumbing: each process handles only its rows of a batch.

On a pod every process runs this same program (JAX's multi-controller
runtime). The batch sharding splits a batch's rows over the devices, and so
over the processes: each process prepares, decodes and scores only the rows
its own devices hold, assembles global arrays from those process-local rows,
and reduces host metrics across processes. With one process every function
here sees the whole batch, so single-host runs take the same code path.
"""

from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils


def process_rows(sharding: jax.sharding.Sharding, num_rows: int) -> np.ndarray:
  """The rows of a batch that this process's devices hold.

  Args:
    sharding: the batch's layout over the devices.
    num_rows: B, the batch's rows.

  Returns:
    int64 [rows held], the indices of the rows this process's devices hold,
    ascending: the order in which `to_global` and `local_rows` lay them out.
  """
  rows = set()
  for index in sharding.addressable_devices_indices_map((num_rows,)).values():
    rows.update(range(num_rows)[index[0]])
  return np.array(sorted(rows), np.int64)


def process_groups(
  sharding: jax.sharding.Sharding, num_groups: int, samples_per_prompt: int
) -> np.ndarray:
  """The groups of rows (e.g. the G samples of one prompt) that this process
  holds. A group split between processes is an error: each process loads
  whole prompts.

  Args:
    sharding: the batch's layout over the devices.
    num_groups: U, the groups; the batch has U * G rows.
    samples_per_prompt: G, the consecutive rows of a group.

  Returns:
    int64 [groups held], the indices of the groups this process holds,
    ascending.

  Raises:
    ValueError: this process holds part of a group.
  """
  rows = process_rows(sharding, num_groups * samples_per_prompt)
  groups = rows.reshape(-1, samples_per_prompt)
  if (
    len(rows) % samples_per_prompt
    or np.any(groups != groups[:, :1] + np.arange(samples_per_prompt))
    or np.any(groups[:, 0] % samples_per_prompt)
  ):
    raise ValueError(
      f"each process must hold whole groups of {samples_per_prompt} rows "
      f"(the samples of a prompt), but this one holds rows {rows.tolist()}; "
      "make prompts_per_step a multiple of the number of processes."
    )
  return groups[:, 0] // samples_per_prompt


def own(items: Sequence[Any], sharding: jax.sharding.Sharding) -> list:
  """This process's part of a batch given in full (every item on one host).

  Args:
    items: the whole batch, one item per row.
    sharding: the batch's layout over the devices.

  Returns:
    The items of this process's rows, in `process_rows` order.
  """
  return [items[i] for i in process_rows(sharding, len(items))]


def to_global(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """Global arrays built from this process's rows.

  Args:
    tree: a pytree of this process's rows (numpy, batch first), in
      `process_rows` order.
    sharding: the global arrays' layout, the batch on the leading axis.

  Returns:
    The pytree of global jax.Arrays, sharded by `sharding`.
  """
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
    tree,
  )


def local_rows(tree: Any) -> Any:
  """This process's rows of batch-sharded global arrays (batch first), as
  numpy, in `process_rows` order."""

  def fetch(x):
    if x.sharding.shard_shape(x.shape)[1:] != x.shape[1:]:
      raise ValueError(
        f"local_rows needs arrays sharded over their first "
        f"axis only, not {x.sharding}."
      )
    # Devices that replicate a block of rows hold the same data: keep one.
    blocks = {s.index[0].start or 0: s.data for s in x.addressable_shards}
    return np.concatenate([np.asarray(blocks[k]) for k in sorted(blocks)])

  return jax.tree.map(fetch, tree)


def all_rows(tree: Any) -> Any:
  """Every row of global arrays, as numpy, on every process."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def gather(tree: Any) -> Any:
  """Process-local numpy values of every process, concatenated along the
  first axis (scalars stacked), for metrics over the whole batch."""
  if jax.process_count() == 1:
    return jax.tree.map(lambda x: np.atleast_1d(np.asarray(x)), tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def is_writer() -> bool:
  """Whether this process writes the run's files: every process holds the
  same results, and one copy is enough."""
  return jax.process_index() == 0


# The bytes of a text that `first_text` carries (longer ones are cut).
_TEXT_BYTES = 1024


def first_text(text: Optional[str]) -> Optional[str]:
  """On every process, the first (in process order) of the processes'
  `text`s that is not None, or None. A collective: every process calls it
  at the same point, so that all act on the same answer."""
  if jax.process_count() == 1:
    return text
  row = np.zeros(_TEXT_BYTES + 1, np.uint8)
  if text is not None:
    encoded = text.encode()[:_TEXT_BYTES]
    row[0] = 1
    row[1 : 1 + len(encoded)] = np.frombuffer(encoded, np.uint8)
  for other in multihost_utils.process_allgather(row):
    if other[0]:
      return bytes(other[1:]).rstrip(b"\0").decode(errors="replace")
  return None


def sync(name: str) -> None:
  """Returns once every process has called it with `name`."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
