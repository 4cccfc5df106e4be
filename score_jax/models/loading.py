"""The weights a run starts from (config.init), and params written back out.

  format "params"  an Orbax checkpoint of a params pytree in this package's
                   layout, written by `save` (e.g. the demo's base model)
  format "gemma"   a Gemma / Gemma 2 release checkpoint (Flax/Orbax layout,
                   gemma_checkpoint.py); config.model's preset gives the shapes
  format "hf"      a Hugging Face model directory (config.json, safetensors;
                   hf.py): Gemma, Gemma 2, Llama 3, Qwen2 / Qwen2.5. Its
                   config.json gives the architecture and, unless
                   config.tokenizer_path is set, the tokenizer too

Loaded params land directly on the shardings the rules give them, in the
dtype `param_dtype` resolves: a checkpoint's own unless config.model sets one.
"""

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from score_jax import sharding
from score_jax.models import gemma_checkpoint, hf, hf_config, transformer

FORMATS = ("params", "gemma", "hf")
_PARAM_DTYPES = ("float32", "bfloat16", "float16")


def architecture(init_cfg) -> Optional[dict]:
  """TransformerConfig fields the checkpoint itself fixes (a Hugging Face
  config.json), or None when config.model's preset decides them."""
  if init_cfg.format != "hf" or not init_cfg.path:
    return None
  check(init_cfg)
  return hf_config.architecture(
    hf_config.read(init_cfg.path),
    where=os.path.join(init_cfg.path, "config.json"),
  )


def param_dtype(requested: Optional[str], init_cfg) -> str:
  """The params' dtype: `requested` (config.model.param_dtype) when set, a
  checkpoint being cast to it; else the one dtype config.init's checkpoint
  stores its params in (a bfloat16 release stays bfloat16, half the memory);
  else float32 (random init). Without `requested`, a checkpoint that stores
  several dtypes, one params cannot have, or another than its config.json
  names is an error.

  Args:
    requested: config.model.param_dtype (None or "": not set).
    init_cfg: config.init (its format and path; no path: random init).

  Returns:
    The dtype's name, e.g. "bfloat16".
  """
  if requested:
    return requested
  if not init_cfg.path:
    return "float32"
  path = init_cfg.path
  declared = None
  fmt = check(init_cfg)
  if fmt == "hf":
    declared = hf_config.declared_dtype(hf_config.read(path))
    dtypes = hf.stored_dtypes(
      path, transformer.TransformerConfig(**architecture(init_cfg))
    )
  elif fmt == "gemma":
    dtypes = gemma_checkpoint.stored_dtypes(path)
  else:
    dtypes = {str(x.dtype) for x in jax.tree.leaves(_saved_params(path))}
  choose = (
    "set config.model.param_dtype to the dtype to load them in "
    f"({', '.join(_PARAM_DTYPES)})"
  )
  if not dtypes:
    raise ValueError(
      f"{path!r} holds none of the model's params; check "
      "config.init.path and config.init.format."
    )
  if len(dtypes) > 1:
    raise ValueError(
      f"{path!r} stores its params in several dtypes "
      f"({', '.join(sorted(dtypes))}); {choose}."
    )
  (dtype,) = dtypes
  if dtype not in _PARAM_DTYPES:
    raise ValueError(f"{path!r} stores its params as {dtype}; {choose}.")
  if declared and declared != dtype:
    raise ValueError(
      f"{path!r}: config.json says dtype {declared} but its "
      f"tensors are {dtype}; {choose}."
    )
  return dtype


def tokenizer_path(init_cfg) -> Optional[str]:
  """The tokenizer that comes with the checkpoint (a Hugging Face model
  directory holds its own), or None."""
  if init_cfg.format != "hf" or not init_cfg.path:
    return None
  check(init_cfg)
  return init_cfg.path


def load(
  init_cfg, model_cfg: transformer.TransformerConfig, param_shardings
) -> Any:
  """The params `init_cfg` names, for the model `model_cfg`, sharded like
  `param_shardings`.

  Args:
    init_cfg: config.init: its `format` (one of FORMATS) and `path`, a
      directory.
    model_cfg: the model config, its shapes the checkpoint's.
    param_shardings: a sharding for each param, a pytree like the params.

  Returns:
    The params (layers stacked) in model_cfg.param_dtype.
  """
  fmt = check(init_cfg)
  path = os.path.abspath(init_cfg.path)
  if fmt == "gemma":
    return gemma_checkpoint.load(path, model_cfg, param_shardings)
  if fmt == "hf":
    return hf.load(path, model_cfg, param_shardings)
  abstract_params = jax.eval_shape(
    transformer.Transformer(model_cfg).init, jax.random.key(0)
  )
  target = sharding.abstract(abstract_params, param_shardings)
  _check_shapes(_saved_params(path), abstract_params, init_cfg.path)
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(path, target)


def _saved_params(path: str):
  """The array metadata of a params checkpoint, a pytree like the params."""
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.metadata(os.path.abspath(path)).item_metadata.tree


def check(init_cfg) -> str:
  """The format, after checking it and that the path is a directory."""
  if init_cfg.format not in FORMATS:
    raise ValueError(
      f"config.init.format={init_cfg.format!r} is unknown; "
      f"choose one of {FORMATS}."
    )
  if not os.path.isdir(init_cfg.path):
    raise FileNotFoundError(
      f"config.init.path={init_cfg.path!r} is not a directory; give "
      f"{_WHAT[init_cfg.format]}."
    )
  return init_cfg.format


_WHAT = {
  "params": "a params checkpoint written by score_jax.models.loading.save",
  "gemma": "a Gemma release checkpoint (the directory with _METADATA or "
  "checkpoint in it)",
  "hf": "a Hugging Face model directory (config.json and *.safetensors)",
}


def save(path: str, params: Any) -> None:
  """Writes `params` as an Orbax checkpoint at `path` (which must not exist).
  `hf.save` exports them as Hugging Face safetensors instead."""
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.abspath(path), params)
    checkpointer.wait_until_finished()


def _check_shapes(saved, expected, where: str) -> None:
  saved_paths = dict(jax.tree_util.tree_flatten_with_path(saved)[0])
  for key, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]:
    name = jax.tree_util.keystr(key)
    if key not in saved_paths:
      raise ValueError(
        f"{where} has no tensor {name}; it was written for "
        "another model config."
      )
    if tuple(saved_paths[key].shape) != tuple(leaf.shape):
      raise ValueError(
        f"{where}: {name} has shape {tuple(saved_paths[key].shape)}, the "
        f"model config expects {tuple(leaf.shape)}; set config.model to the "
        "config that wrote it."
      )
