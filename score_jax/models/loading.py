"""The weights a run starts from (config.init), and params written back out.

  format "params"  an Orbax checkpoint of a params pytree in this package's
                   layout, written by `save` (e.g. the demo's base model)

Loaded params land directly on the shardings the rules give them.
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

FORMATS = ("params",)


def load(init_cfg, param_shardings, abstract_params) -> Any:
  """The params `init_cfg` (path, format) names, sharded like
  `param_shardings`; `abstract_params` gives the shapes the model expects."""
  if init_cfg.format not in FORMATS:
    raise ValueError(f"config.init.format={init_cfg.format!r} is unknown; "
                     f"choose one of {FORMATS}.")
  path = os.path.abspath(init_cfg.path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"config.init.path={init_cfg.path!r} is not a "
                            "directory; give a params checkpoint written by "
                            "score_jax.models.loading.save.")
  target = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract_params, param_shardings)
  with ocp.StandardCheckpointer() as checkpointer:
    saved = checkpointer.metadata(path).item_metadata.tree
    _check_shapes(saved, abstract_params, init_cfg.path)
    return checkpointer.restore(path, target)


def save(path: str, params: Any) -> None:
  """Writes `params` as an Orbax checkpoint at `path` (which must not exist)."""
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.abspath(path), params)
    checkpointer.wait_until_finished()


def _check_shapes(saved, expected, where: str) -> None:
  saved_paths = dict(jax.tree_util.tree_flatten_with_path(saved)[0])
  for key, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]:
    name = jax.tree_util.keystr(key)
    if key not in saved_paths:
      raise ValueError(f"{where} has no tensor {name}; it was written for "
                       "another model config.")
    if tuple(saved_paths[key].shape) != tuple(leaf.shape):
      raise ValueError(
          f"{where}: {name} has shape {tuple(saved_paths[key].shape)}, the "
          f"model config expects {tuple(leaf.shape)}; set config.model to the "
          "config that wrote it.")
