"""The Gemma releases' Flax/Orbax checkpoint layout -> params.

The released Gemma and Gemma 2 checkpoints (and the `gemma` library's) are
Orbax PyTree checkpoints of a dict keyed by module path:
  transformer/embedder                       {input_embedding: [V, D]}
  transformer/final_norm                     {scale: [D]}
  transformer/layer_{l}/pre_attention_norm   {scale: [D]}, likewise
      pre_ffw_norm, and in Gemma 2 post_attention_norm, post_ffw_norm
  transformer/layer_{l}/attn/q_einsum        {w: [N, D, H]}
  transformer/layer_{l}/attn/kv_einsum       {w: [2, K, D, H]}
      (qkv_einsum {w: [3, N, D, H]} instead of both when K == N)
  transformer/layer_{l}/attn/attn_vec_einsum {w: [N, H, D]}
  transformer/layer_{l}/mlp/gating_einsum    {w: [2, D, F]} or [2, F, D]
  transformer/layer_{l}/mlp/linear           {w: [F, D]}
The gemma library's later saves nest the same names ({"layer_0": {"attn":
...}}, the MLP weights without "w"); both load. Releases differ in the order
of the gating weights (the library's `transpose_gating_einsum`); the
checkpoint's shape tells which.

Each checkpoint tensor is restored by Orbax straight onto a sharding derived
from its parameter's (every host reads only its blocks); one jitted
transpose-and-stack per parameter then moves the per-layer tensors into our
stacked layout, device to device.
"""

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from score_jax.models.transformer import TransformerConfig


@dataclasses.dataclass(frozen=True)
class _Output:
  """One of our params taken from a checkpoint tensor: `tensor[part]` (or the
  whole tensor when part is None) transposed by `perm`."""

  name: str
  part: Optional[int]
  perm: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class _Source:
  """A checkpoint tensor (`{l}` stands for the layer) and what it holds."""

  name: str
  shape: tuple[int, ...]
  outputs: tuple[_Output, ...]

  @property
  def stacked(self) -> bool:
    return "{l}" in self.name


def _sources(cfg: TransformerConfig, gating_transposed: bool) -> list[_Source]:
  D, N, K, H, F = (
    cfg.d_model,
    cfg.num_heads,
    cfg.num_kv_heads,
    cfg.head_dim,
    cfg.mlp_dim,
  )
  heads_first = (1, 0, 2)  # [n, D, H] -> our [D, n, H]
  split = lambda *names: tuple(
    _Output(n, i, heads_first) for i, n in enumerate(names)
  )
  layer = lambda name: "layer_{l}/" + name
  norm = lambda name, ours: _Source(
    layer(name + "/scale"), (D,), (_Output(ours, None, (0,)),)
  )
  if K == N:
    attention = [
      _Source(layer("attn/qkv_einsum/w"), (3, N, D, H), split("q", "k", "v"))
    ]
  else:
    attention = [
      _Source(
        layer("attn/q_einsum/w"), (N, D, H), (_Output("q", None, heads_first),)
      ),
      _Source(layer("attn/kv_einsum/w"), (2, K, D, H), split("k", "v")),
    ]
  gating_shape, gating_perm = (
    ((2, F, D), (1, 0)) if gating_transposed else ((2, D, F), (0, 1))
  )
  sources = attention + [
    _Source(
      layer("attn/attn_vec_einsum/w"),
      (N, H, D),
      (_Output("o", None, (0, 1, 2)),),
    ),
    _Source(
      layer("mlp/gating_einsum"),
      gating_shape,
      (_Output("gate", 0, gating_perm), _Output("up", 1, gating_perm)),
    ),
    _Source(layer("mlp/linear"), (F, D), (_Output("down", None, (0, 1)),)),
    norm("pre_attention_norm", "attn_norm"),
    norm("pre_ffw_norm", "mlp_norm"),
    _Source(
      "embedder/input_embedding",
      (cfg.vocab_size, D),
      (_Output("embedding", None, (0, 1)),),
    ),
    _Source("final_norm/scale", (D,), (_Output("final_norm", None, (0,)),)),
  ]
  if cfg.post_norms:
    sources += [
      norm("post_attention_norm", "post_attn_norm"),
      norm("post_ffw_norm", "post_mlp_norm"),
    ]
  return sources


def _canonical(keys: tuple[str, ...]) -> str:
  """One name for a tensor in either the flat or the nested layout."""
  parts = "/".join(keys).split("/")
  if parts[0] == "transformer":
    parts = parts[1:]
  if "mlp" in parts and parts[-1] == "w":
    parts = parts[:-1]
  return "/".join(parts)


def _saved_tensors(path: str) -> dict[str, tuple[tuple[str, ...], Any]]:
  """Canonical name -> (key path in the checkpoint, array metadata)."""
  with ocp.PyTreeCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(path)
  tree = getattr(metadata, "item_metadata", metadata)
  tree = getattr(tree, "tree", tree)
  flat = jax.tree_util.tree_flatten_with_path(
    tree, is_leaf=lambda x: hasattr(x, "shape")
  )[0]
  saved = {}
  for key_path, leaf in flat:
    keys = tuple(str(k.key) for k in key_path)
    saved[_canonical(keys)] = (keys, leaf)
  return saved


def stored_dtypes(path: str) -> set[str]:
  """The dtypes of the arrays in the Orbax PyTree checkpoint at `path` (a
  Gemma release's or, the same kind of checkpoint, a params one's)."""
  return {str(leaf.dtype) for _, leaf in _saved_tensors(path).values()}


def load(path: str, cfg: TransformerConfig, shardings: Any) -> Any:
  """Params of `cfg` from a Gemma-layout checkpoint at `path`, each on the
  sharding `shardings` gives it. Every tensor's name and shape is checked
  (a ValueError) before any is read.

  Args:
    path: the checkpoint's directory (the module docstring's layout, flat
      or nested).
    cfg: a Gemma or Gemma 2 model config, its shapes the checkpoint's.
    shardings: a NamedSharding for each param, a pytree like the params.

  Returns:
    The params (layers stacked) in cfg.param_dtype.
  """
  if not cfg.tie_embeddings or cfg.qkv_bias or not cfg.norm_one_plus_scale:
    raise ValueError(
      "config.init.format='gemma' holds Gemma and Gemma 2 "
      "checkpoints; config.model must be a Gemma preset."
    )
  saved = _saved_tensors(path)
  gating = saved.get("layer_0/mlp/gating_einsum")
  # A square MLP (d_model == mlp_dim; no released model) reads untransposed.
  transposed = (
    gating is not None
    and cfg.mlp_dim != cfg.d_model
    and tuple(gating[1].shape) == (2, cfg.mlp_dim, cfg.d_model)
  )
  sources = _sources(cfg, gating_transposed=transposed)
  for source in sources:  # all checks first: fail before reading anything
    for name in _names(source, cfg):
      if name not in saved:
        raise ValueError(
          f"{path!r} has no tensor {name!r}, which "
          "config.model needs; choose the preset (or fields) "
          "of this checkpoint."
        )
      shape = tuple(saved[name][1].shape)
      if shape != source.shape:
        raise ValueError(
          f"{path!r}: {name} has shape {shape}, config.model expects "
          f"{source.shape}; choose the preset (or fields) of this "
          "checkpoint."
        )
  flat_shardings = dict(_flatten(shardings))
  params = {}
  for source in sources:
    params.update(_load_source(path, source, cfg, saved, flat_shardings))
  return _unflatten(params)


def _names(source: _Source, cfg: TransformerConfig) -> list[str]:
  if not source.stacked:
    return [source.name]
  return [source.name.format(l=l) for l in range(cfg.num_layers)]


def _load_source(path, source: _Source, cfg, saved, shardings) -> dict:
  """Restores one kind of tensor for every layer, then stacks and
  transposes it into our params on their shardings."""
  first = source.outputs[0]
  target = shardings[_our_path(first.name)]
  our_spec = tuple(target.spec) + (None,) * 8
  if source.stacked:
    our_spec = our_spec[1:]  # the per-layer tensors have no layers axis
  # Checkpoint axis j is our axis argsort(perm)[j]; a split axis is whole.
  spec = (() if first.part is None else (None,)) + tuple(
    our_spec[i] for i in np.argsort(first.perm)
  )
  sharding = NamedSharding(target.mesh, PartitionSpec(*spec))
  dtype = jnp.dtype(cfg.param_dtype)
  item, restore_args, key_paths = {}, {}, []
  for name in _names(source, cfg):
    keys = saved[name][0]
    key_paths.append(keys)
    _insert(
      item, keys, jax.ShapeDtypeStruct(source.shape, dtype, sharding=sharding)
    )
    _insert(
      restore_args, keys, ocp.ArrayRestoreArgs(sharding=sharding, dtype=dtype)
    )
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(
      path,
      args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True
      ),
    )
  tensors = [_lookup(restored, keys) for keys in key_paths]

  def convert(tensors):
    outputs = {}
    for output in source.outputs:
      parts = [
        (t if output.part is None else t[output.part]).transpose(output.perm)
        for t in tensors
      ]
      outputs[output.name] = jnp.stack(parts) if source.stacked else parts[0]
    return outputs

  out_shardings = {o.name: shardings[_our_path(o.name)] for o in source.outputs}
  converted = jax.jit(convert, out_shardings=out_shardings)(tensors)
  return {_our_path(name): x for name, x in converted.items()}


_TOP_LEVEL = ("embedding", "final_norm", "output_embedding")


def _our_path(name: str) -> tuple[str, ...]:
  return (name,) if name in _TOP_LEVEL else ("layers", name)


def _flatten(tree) -> list:
  return [
    (tuple(k.key for k in path), leaf)
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  ]


def _unflatten(flat: dict) -> dict:
  tree = {}
  for keys, leaf in flat.items():
    _insert(tree, keys, leaf)
  return tree


def _insert(tree: dict, keys, leaf) -> None:
  for key in keys[:-1]:
    tree = tree.setdefault(key, {})
  tree[keys[-1]] = leaf


def _lookup(tree, keys):
  for key in keys:
    tree = tree[key]
  return tree
