"""Hugging Face safetensors <-> params, one shard at a time.

Loading places every tensor straight onto its sharding: each device's block
is read from the memory-mapped safetensors files (`safe_open(...).get_slice`)
by `jax.make_array_from_callback`, and a stacked layer parameter is assembled
from the per-layer tensors of that block only, so no host ever holds a full
parameter it does not own. Saving writes the same layout (tensor names,
shapes, config.json), so a trained policy can be served by other tools.

Tensor layouts: Hugging Face keeps torch Linear weights as [out, in] with
heads flattened into one axis; ours are [in, heads, head_dim] and friends,
with the layers stacked on a leading axis (see transformer.param_axes).
"""

import contextlib
import dataclasses
import json
import math
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from safetensors import safe_open
from safetensors.numpy import save_file

from score_jax.models import hf_config
from score_jax.models.transformer import TransformerConfig

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
# safetensors' names of the dtypes params can have.
_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one of our (per-layer) tensors sits in a Hugging Face tensor.

  The HF tensor, its axes split into `groups` (e.g. [N*H, D] -> ((N, H), (D,))),
  transposed by `perm`, is ours.
  """

  name: Callable[[int], str]  # layer index (ignored when not stacked) -> name
  groups: tuple[tuple[int, ...], ...]
  perm: tuple[int, ...]
  stacked: bool = True

  @property
  def hf_shape(self) -> tuple[int, ...]:
    """The Hugging Face (per-layer) tensor's shape: each group's product."""
    return tuple(math.prod(g) for g in self.groups)

  @property
  def shape(self) -> tuple[int, ...]:
    """Our (per-layer) shape."""
    split = [d for g in self.groups for d in g]
    return tuple(split[axis] for axis in self.perm)

  def to_hf(self, ours: np.ndarray) -> np.ndarray:
    """Our (per-layer) tensor `ours` as the Hugging Face tensor."""
    return ours.transpose(np.argsort(self.perm)).reshape(self.hf_shape)

  def read(self, tensor, index: Sequence[slice]) -> np.ndarray:
    """Our block `index` of one layer, reading only the rows it needs.

    A split axis (e.g. heads x head_dim) is read as the contiguous run of its
    outer part (the heads of the block) and cut to the inner part after.

    Args:
      tensor: the Hugging Face tensor of one layer (a safetensors slice, or
        any array that takes a tuple of slices).
      index: a contiguous slice of each of our (per-layer) axes.

    Returns:
      The block, shaped as `index` cuts our `shape`.
    """
    split = [d for g in self.groups for d in g]
    split_index = [slice(None)] * len(split)
    for ours_axis, split_axis in enumerate(self.perm):
      split_index[split_axis] = index[ours_axis]
    hf_index, block_shape, after = [], [], []
    axis = 0
    for group in self.groups:
      start, stop, step = split_index[axis].indices(group[0])
      assert step == 1, "shards are contiguous blocks"
      inner = math.prod(group[1:])
      hf_index.append(slice(start * inner, stop * inner))
      block_shape += [stop - start, *group[1:]]
      after += [slice(None), *split_index[axis + 1 : axis + len(group)]]
      axis += len(group)
    block = tensor[tuple(hf_index)].reshape(block_shape)
    return block[tuple(after)].transpose(self.perm)


def layouts(cfg: TransformerConfig) -> dict[str, Any]:
  """Our params pytree, with a Layout at each leaf."""
  D, N, K, H, F = (
    cfg.d_model,
    cfg.num_heads,
    cfg.num_kv_heads,
    cfg.head_dim,
    cfg.mlp_dim,
  )
  at = lambda suffix: lambda l: f"model.layers.{l}.{suffix}"
  norm = lambda suffix: Layout(at(suffix), ((D,),), (0,))
  heads_in = lambda suffix, n: Layout(at(suffix), ((n, H), (D,)), (2, 0, 1))
  layers = {
    "attn_norm": norm("input_layernorm.weight"),
    "q": heads_in("self_attn.q_proj.weight", N),
    "k": heads_in("self_attn.k_proj.weight", K),
    "v": heads_in("self_attn.v_proj.weight", K),
    "o": Layout(at("self_attn.o_proj.weight"), ((D,), (N, H)), (1, 2, 0)),
    "gate": Layout(at("mlp.gate_proj.weight"), ((F,), (D,)), (1, 0)),
    "up": Layout(at("mlp.up_proj.weight"), ((F,), (D,)), (1, 0)),
    "down": Layout(at("mlp.down_proj.weight"), ((D,), (F,)), (1, 0)),
  }
  if cfg.post_norms:  # Gemma 2 names its four norms differently.
    layers.update(
      mlp_norm=norm("pre_feedforward_layernorm.weight"),
      post_attn_norm=norm("post_attention_layernorm.weight"),
      post_mlp_norm=norm("post_feedforward_layernorm.weight"),
    )
  else:
    layers["mlp_norm"] = norm("post_attention_layernorm.weight")
  if cfg.qkv_bias:
    for name, n in (("q", N), ("k", K), ("v", K)):
      layers[f"{name}_bias"] = Layout(
        at(f"self_attn.{name}_proj.bias"), ((n, H),), (0, 1)
      )
  top = lambda name, groups, perm: Layout(
    lambda _: name, groups, perm, stacked=False
  )
  tree = {
    "embedding": top(
      "model.embed_tokens.weight", ((cfg.vocab_size,), (D,)), (0, 1)
    ),
    "layers": layers,
    "final_norm": top("model.norm.weight", ((D,),), (0,)),
  }
  if not cfg.tie_embeddings:
    tree["output_embedding"] = top(
      "lm_head.weight", ((cfg.vocab_size,), (D,)), (0, 1)
    )
  return tree


def _tensor_names(layout: Layout, num_layers: int) -> list[str]:
  return (
    [layout.name(l) for l in range(num_layers)]
    if layout.stacked
    else [layout.name(0)]
  )


def _weight_files(model_dir: str) -> dict[str, str]:
  """Tensor name -> safetensors file, from the index or the single file."""
  index = os.path.join(model_dir, _INDEX)
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    return {
      name: os.path.join(model_dir, file) for name, file in weight_map.items()
    }
  single = os.path.join(model_dir, _SINGLE)
  if not os.path.isfile(single):
    raise FileNotFoundError(
      f"{model_dir!r} has neither {_SINGLE} nor {_INDEX}; only safetensors "
      "checkpoints load (re-save others with save_pretrained("
      "safe_serialization=True))."
    )
  with safe_open(single, framework="numpy") as f:
    return {name: single for name in f.keys()}


def stored_dtypes(model_dir: str, cfg: TransformerConfig) -> set[str]:
  """The dtypes the tensors of `cfg`'s params are stored in, read from the
  safetensors headers (other tensors of the directory do not count).

  Args:
    model_dir: a Hugging Face model directory.
    cfg: the model whose params' tensors are looked at.

  Returns:
    The dtypes' names: safetensors' names (e.g. "BF16") mapped to NumPy's
    where params can have them ("bfloat16"), kept otherwise.
  """
  files = _weight_files(model_dir)
  names = {
    name
    for layout in jax.tree.leaves(
      layouts(cfg), is_leaf=lambda x: isinstance(x, Layout)
    )
    for name in _tensor_names(layout, cfg.num_layers)
  }
  dtypes = set()
  for path in sorted(set(files.values())):
    with safe_open(path, framework="numpy") as f:
      dtypes |= {
        f.get_slice(name).get_dtype() for name in f.keys() if name in names
      }
  return {_DTYPES.get(dtype, dtype) for dtype in dtypes}


def load(model_dir: str, cfg: TransformerConfig, shardings: Any) -> Any:
  """Params of `cfg` from a Hugging Face model directory, each on the
  sharding `shardings` gives it. Every tensor's name and shape is checked
  (a ValueError) before any is read.

  Args:
    model_dir: a Hugging Face model directory (config.json and
      *.safetensors).
    cfg: the model config, its shapes the checkpoint's.
    shardings: a sharding for each param, a pytree like the params.

  Returns:
    The params (layers stacked) in cfg.param_dtype.
  """
  files = _weight_files(model_dir)
  tree = layouts(cfg)
  with contextlib.ExitStack() as stack:
    handles = {
      path: stack.enter_context(safe_open(path, framework="numpy"))
      for path in sorted(set(files.values()))
    }

    def slice_of(name: str):
      if name not in files:
        raise ValueError(
          f"{model_dir!r} has no tensor {name!r}; the "
          "checkpoint is incomplete or not the architecture "
          "its config.json (and config.model) describe."
        )
      return handles[files[name]].get_slice(name)

    # Check every tensor before reading any, so a mismatch fails at once.
    is_layout = lambda x: isinstance(x, Layout)
    for layout in jax.tree.leaves(tree, is_leaf=is_layout):
      for name in _tensor_names(layout, cfg.num_layers):
        shape = tuple(slice_of(name).get_shape())
        if shape != layout.hf_shape:
          raise ValueError(
            f"{model_dir!r}: tensor {name!r} has shape {shape}, the model "
            f"config expects {layout.hf_shape}; leave config.model's shape "
            "fields unset so that config.json decides them."
          )
    return jax.tree.map(
      lambda layout, sharding: _load_one(layout, sharding, slice_of, cfg),
      tree,
      shardings,
      is_leaf=is_layout,
    )


def _load_one(layout: Layout, sharding, slice_of, cfg: TransformerConfig):
  dtype = jnp.dtype(cfg.param_dtype)
  shape = ((cfg.num_layers,) if layout.stacked else ()) + layout.shape
  blocks = {}  # replicas of a block are read once

  def block(index):
    key = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
    if key not in blocks:
      if layout.stacked:
        layer_index, rest = index[0], index[1:]
        blocks[key] = np.stack(
          [
            layout.read(slice_of(layout.name(l)), rest)
            for l in range(*layer_index.indices(cfg.num_layers)[:2])
          ]
        )
      else:
        blocks[key] = layout.read(slice_of(layout.name(0)), index)
      blocks[key] = blocks[key].astype(dtype)
    return blocks[key]

  return jax.make_array_from_callback(shape, sharding, block, dtype=dtype)


def save(
  model_dir: str,
  params: Any,
  cfg: TransformerConfig,
  tokenizer=None,
  max_shard_bytes: int = 2 << 30,
) -> None:
  """Writes `params` as a Hugging Face model directory: config.json and
  safetensors (split into files of at most `max_shard_bytes` with an index,
  as `save_pretrained` does). With a `tokenizer` (score_jax.tokenizer), its
  files are written too (with tokenizer_config.json and its chat template),
  config.json gets its bos / eos / pad ids, and generation_config.json the
  same with every stop id as an eos_token_id, so that generation by other
  tools stops where the rollout's does.

  Every process takes part (sharded params are gathered one parameter at a
  time); process 0 writes.

  Args:
    model_dir: the directory to write (a FileExistsError if it holds a
      config.json already).
    params: the params, layers stacked.
    cfg: their model config, which config.json and the tensors' layout
      follow.
    tokenizer: the tokenizer to write with them (None: none, and no token
      ids in config.json).
    max_shard_bytes: the most bytes of tensors in one safetensors file (a
      larger tensor gets a file of its own).
  """
  writer = jax.process_index() == 0
  if writer:
    if os.path.exists(os.path.join(model_dir, "config.json")):
      raise FileExistsError(
        f"{model_dir!r} already holds a model; export to a new directory."
      )
    os.makedirs(model_dir, exist_ok=True)
  is_layout = lambda x: isinstance(x, Layout)
  shards, current, current_bytes = [], {}, 0
  for layout, array in zip(
    jax.tree.leaves(layouts(cfg), is_leaf=is_layout), jax.tree.leaves(params)
  ):
    host = _to_host(array)
    for l, name in enumerate(_tensor_names(layout, cfg.num_layers)):
      tensor = np.ascontiguousarray(
        layout.to_hf(host[l] if layout.stacked else host)
      )
      if current and current_bytes + tensor.nbytes > max_shard_bytes:
        shards.append(_write_shard(model_dir, len(shards), current, writer))
        current, current_bytes = {}, 0
      current[name] = tensor
      current_bytes += tensor.nbytes
  shards.append(_write_shard(model_dir, len(shards), current, writer))
  if not writer:
    return
  _name_shards(model_dir, shards)
  hf = hf_config.to_hf(cfg)
  if tokenizer is not None:
    ids = dict(
      bos_token_id=tokenizer.bos_id,
      pad_token_id=tokenizer.pad_id,
      eos_token_id=list(tokenizer.stop_ids),
    )
    hf.update(ids)
    _write_json(model_dir, "generation_config.json", ids)
    tokenizer.save(model_dir)
  _write_json(model_dir, "config.json", hf)


def _write_json(model_dir: str, name: str, data: dict) -> None:
  with open(os.path.join(model_dir, name), "w") as f:
    json.dump(data, f, indent=2)


def _to_host(array) -> np.ndarray:
  if array.is_fully_addressable:
    return np.asarray(array)
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def _write_shard(model_dir, number, tensors, writer):
  """Writes one file under a temporary name; returns (name, tensor names,
  bytes)."""
  temp = f"shard-{number:05d}.safetensors.tmp"
  if writer:
    # "format": "pt" is what transformers checks before it loads a file.
    save_file(tensors, os.path.join(model_dir, temp), metadata={"format": "pt"})
  return temp, list(tensors), sum(t.nbytes for t in tensors.values())


def _name_shards(model_dir: str, shards) -> None:
  """Gives the shards save_pretrained's names, with an index when several."""
  if len(shards) == 1:
    os.replace(
      os.path.join(model_dir, shards[0][0]), os.path.join(model_dir, _SINGLE)
    )
    return
  weight_map, total = {}, 0
  for i, (temp, names, nbytes) in enumerate(shards):
    final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    os.replace(os.path.join(model_dir, temp), os.path.join(model_dir, final))
    total += nbytes
    weight_map.update({name: final for name in names})
  with open(os.path.join(model_dir, _INDEX), "w") as f:
    json.dump(
      {"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2
    )
