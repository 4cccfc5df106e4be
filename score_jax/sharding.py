"""Device mesh, logical-axis rules and shardings, and multi-host start-up.

The model names logical axes ("embed", "heads", ...); the config owns the mesh
and the rules that map logical axes to mesh axes. A mesh axis that does not
divide a dimension is dropped for that dimension (the dimension is replicated
along it): for example a single kv head cannot be split over "tensor".
"""

import dataclasses
import math
import os
from typing import Any, Optional, Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")


def make_mesh(shape: Sequence[int], devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices`.

  Args:
    shape: the sizes of the three mesh axes, data, fsdp and tensor; one entry
      may be -1 to take the devices the others leave.
    devices: the devices to lay out (None: all of them, jax.devices()).

  Returns:
    The Mesh, its axes MESH_AXES, all of type Auto.

  Raises:
    ValueError: `shape` has not three entries, or more than one -1, or its
      sizes do not multiply to the number of devices.
  """
  devices = jax.devices() if devices is None else devices
  shape = list(shape)
  if len(shape) != len(MESH_AXES) or shape.count(-1) > 1:
    raise ValueError(
      f"config.mesh_shape={tuple(shape)} must have "
      f"{len(MESH_AXES)} entries {MESH_AXES} with at most one -1."
    )
  known = math.prod(d for d in shape if d != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(
        f"config.mesh_shape={tuple(shape)}: {len(devices)} "
        f"devices are not divisible by {known}."
      )
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(
      f"config.mesh_shape={tuple(shape)} needs "
      f"{math.prod(shape)} devices but {len(devices)} are "
      "present; use -1 for one axis to fill the rest."
    )
  return jax.make_mesh(
    tuple(shape),
    MESH_AXES,
    axis_types=(AxisType.Auto,) * len(MESH_AXES),
    devices=devices,
  )


def partition_spec(
  logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules
) -> PartitionSpec:
  """Maps logical axis names to mesh axes, dropping what cannot apply.

  A rule's mesh axis is kept for a dimension only if it is not already used
  by an earlier dimension, its size is over 1, and the product of the kept
  axes' sizes divides the dimension; otherwise the dimension is replicated
  along it.

  Args:
    logical_axes: the logical axis name of each dimension (None replicates
      it).
    shape: the array's shape, one entry per logical axis.
    mesh: the device mesh.
    rules: (logical axis, mesh axis or axes or None) pairs, e.g.
      config.sharding_rules.

  Returns:
    The PartitionSpec, one entry per dimension.

  Raises:
    ValueError: a logical axis has no rule.
  """
  rules = dict(rules)
  used = set()
  spec = []
  for name, dim in zip(logical_axes, shape):
    if name is not None and name not in rules:
      raise ValueError(
        f"logical axis {name!r} has no entry in "
        "config.sharding_rules; add one (None replicates)."
      )
    target = rules.get(name)
    mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
    kept = []
    for axis in mesh_axes:
      size = math.prod(mesh.shape[a] for a in kept + [axis])
      if axis not in used and mesh.shape[axis] > 1 and dim % size == 0:
        kept.append(axis)
    used.update(kept)
    spec.append(kept[0] if len(kept) == 1 else (tuple(kept) or None))
  return PartitionSpec(*spec)


def tree_shardings(axes_tree: Any, shapes_tree: Any, mesh: Mesh, rules) -> Any:
  """NamedShardings for a pytree, given its logical axes and shapes.

  Args:
    axes_tree: the pytree's logical axes, a tuple of names per array.
    shapes_tree: the pytree of arrays or ShapeDtypeStructs, the same
      structure.
    mesh: the device mesh.
    rules: the logical-axis rules (`partition_spec`).

  Returns:
    A NamedSharding per array, in the pytree's structure.
  """
  is_axes = lambda x: isinstance(x, tuple)
  return jax.tree.map(
    lambda axes, x: NamedSharding(
      mesh, partition_spec(axes, x.shape, mesh, rules)
    ),
    axes_tree,
    shapes_tree,
    is_leaf=is_axes,
  )


def unstacked(shardings: Any, num_layers: int) -> Any:
  """The shardings of params whose stacked layers are split into a tuple
  of per-layer dicts (transformer.unstack_layers).

  Args:
    shardings: the stacked params' shardings, a dict whose "layers" entry
      has the layers axis first.
    num_layers: L, the layers.

  Returns:
    `shardings` with "layers" a tuple of L copies of the layer's shardings
    without the leading layers axis.
  """
  layer = jax.tree.map(
    lambda s: NamedSharding(s.mesh, PartitionSpec(*s.spec[1:])),
    shardings["layers"],
  )
  return dict(shardings, layers=(layer,) * num_layers)


def override(rules, overrides) -> tuple:
  """`rules` with the entries of `overrides` replacing theirs."""
  return tuple({**dict(rules), **dict(overrides)}.items())


@dataclasses.dataclass(frozen=True)
class ActivationSharding:
  """`shard(x, logical_axes)`: constrains an activation to the mesh axes the
  rules give its logical axes (the model calls it where activations are
  made; see transformer.py)."""

  mesh: Mesh
  rules: tuple

  def __call__(self, x, logical_axes: Sequence[Optional[str]]):
    spec = partition_spec(logical_axes, x.shape, self.mesh, self.rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))


def batch_sharding(mesh: Mesh, rules, ndim: int) -> NamedSharding:
  """Shards the leading (batch) dimension over the batch rule's mesh axes.

  Args:
    mesh: the device mesh.
    rules: the logical-axis rules; their "batch" entry is used as it is.
    ndim: the arrays' number of dimensions; all but the first are
      replicated.

  Returns:
    The NamedSharding.
  """
  target = dict(rules)["batch"]
  return NamedSharding(mesh, PartitionSpec(target, *([None] * (ndim - 1))))


def init_sharded(init_fn, axes_tree: Any, mesh: Mesh, rules, *args):
  """Runs `init_fn(*args)` with its outputs created already sharded.

  eval_shape gives the shapes without allocating, the rules give shardings,
  and jit's out_shardings makes each device build only its own shard, so full
  parameters never exist on one host.

  Args:
    init_fn: builds the pytree from `args`.
    axes_tree: the logical axes of its outputs (`tree_shardings`).
    mesh: the device mesh.
    rules: the logical-axis rules.
    *args: what `init_fn` takes.

  Returns:
    (the sharded outputs, their NamedShardings).
  """
  shapes = jax.eval_shape(init_fn, *args)
  shardings = tree_shardings(axes_tree, shapes, mesh, rules)
  return jax.jit(init_fn, out_shardings=shardings)(*args), shardings


def initialize_distributed(
  multihost: bool, heartbeat_timeout_s: float = 60.0
) -> None:
  """Starts JAX's multi-controller runtime on multi-host launches.

  On Cloud TPU pods `jax.distributed.initialize()` finds the coordinator from
  the TPU metadata; elsewhere it reads JAX_COORDINATOR_ADDRESS, and the
  process count and index come from JAX_NUM_PROCESSES and JAX_PROCESS_ID
  (which jax itself does not read). A single host runs without it.
  JAX's heartbeat timeout is twice `heartbeat_timeout_s` (and at least its
  default, 100 s), so that training's own heartbeat (host_failures.py)
  names a failed process before JAX ends the others.

  Args:
    multihost: whether this is a multi-host launch (False: does nothing).
    heartbeat_timeout_s: the seconds training's own heartbeat waits for a
      process.
  """
  if not multihost:
    return
  processes: dict[str, Any] = {
    arg: int(os.environ[name])
    for arg, name in (
      ("num_processes", "JAX_NUM_PROCESSES"),
      ("process_id", "JAX_PROCESS_ID"),
    )
    if name in os.environ
  }
  jax.distributed.initialize(
    heartbeat_timeout_seconds=int(max(100, 2 * heartbeat_timeout_s)),
    **processes,
  )
  logging.info(
    "process %d of %d, %d local / %d global devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )


def describe(shardings: Any) -> dict[str, str]:
  """A readable {path: partition spec} summary for logs."""
  flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
  return {jax.tree_util.keystr(path): str(s.spec) for path, s in flat}


def bytes_per_device(tree) -> int:
  """Bytes one device holds of `tree`'s arrays (concrete, or abstract with
  shardings)."""
  return int(
    sum(
      np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
      for x in jax.tree.leaves(tree)
    )
  )


def abstract(tree, shardings):
  """Shape/dtype/sharding placeholders of `tree` laid out by `shardings`
  (to restore or compile onto).

  Args:
    tree: a pytree of arrays or ShapeDtypeStructs.
    shardings: a sharding per leaf, the same structure.

  Returns:
    A ShapeDtypeStruct per leaf, with its shape, dtype and sharding.
  """
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    tree,
    shardings,
  )
