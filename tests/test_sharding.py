"""Sharded forward passes equal the single-device one; params follow the
rules."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import common
from score_jax import sharding
from score_jax.models import presets
from score_jax.models import transformer as tf

# Dimensions divisible by 8 so every rule can apply; 2 kv heads cannot be split
# 8 ways, which exercises the fall back to replication.
CFG = dataclasses.replace(
  presets.build_config({"preset": "test"}),
  vocab_size=128,
  d_model=64,
  num_heads=8,
  num_kv_heads=2,
  mlp_dim=128,
)
RULES = common.SHARDING_RULES


def _inputs():
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (8, 12)))
  valid = jnp.asarray(rng.random((8, 12)) > 0.2).at[:, -1].set(True)
  return tokens, valid


def _forward(params, tokens, valid):
  model = tf.Transformer(CFG)
  return model.apply(
    params, tokens, tf.positions_from_mask(valid), tf.episode_ids(valid)
  )


def test_make_mesh_fills_minus_one_and_rejects_bad_shapes():
  assert sharding.make_mesh((2, -1, 1)).shape == {
    "data": 2,
    "fsdp": 4,
    "tensor": 1,
  }
  with pytest.raises(ValueError, match="needs 4 devices but 8"):
    sharding.make_mesh((2, 2, 1))
  with pytest.raises(ValueError, match="at most one -1"):
    sharding.make_mesh((-1, -1, 1))
  with pytest.raises(ValueError, match="not divisible by 3"):
    sharding.make_mesh((3, -1, 1))


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2)])
def test_sharded_forward_equals_single_device(shape):
  model = tf.Transformer(CFG)
  rng = jax.random.key(0)
  reference_params = model.init(rng)
  tokens, valid = _inputs()
  expected = np.asarray(_forward(reference_params, tokens, valid))

  mesh = sharding.make_mesh(shape)
  params, shardings = sharding.init_sharded(
    model.init, tf.param_axes(CFG), mesh, RULES, rng
  )
  # Sharded init draws the same numbers as unsharded init.
  jax.tree.map(
    np.testing.assert_array_equal,
    jax.tree.map(np.asarray, params),
    jax.tree.map(np.asarray, reference_params),
  )
  batch = sharding.batch_sharding(mesh, RULES, 2)
  logits = jax.jit(_forward)(
    params, jax.device_put(tokens, batch), jax.device_put(valid, batch)
  )
  np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5, rtol=1e-5)


def test_params_follow_the_rules():
  model = tf.Transformer(CFG)
  axes = tf.param_axes(CFG)
  fsdp_params, _ = sharding.init_sharded(
    model.init, axes, sharding.make_mesh((1, 8, 1)), RULES, jax.random.key(0)
  )
  flat_axes = dict(
    jax.tree_util.tree_flatten_with_path(
      axes, is_leaf=lambda x: isinstance(x, tuple)
    )[0]
  )
  for path, array in jax.tree_util.tree_flatten_with_path(fsdp_params)[0]:
    total = array.size * array.dtype.itemsize
    expected = total // 8 if "embed" in flat_axes[path] else total
    assert sharding.bytes_per_device(array) == expected, path

  tp_params, tp_shardings = sharding.init_sharded(
    model.init, axes, sharding.make_mesh((1, 1, 8)), RULES, jax.random.key(0)
  )
  layers = tp_shardings["layers"]
  assert layers["q"].spec == P(None, None, "tensor", None)
  assert layers["k"].spec == P(None, None, None, None)  # 2 kv heads: replicated
  assert layers["down"].spec == P(None, "tensor", None)
  assert tp_shardings["embedding"].spec == P("tensor", None)
  assert sharding.bytes_per_device(tp_params["layers"]["gate"]) * 8 == (
    tp_params["layers"]["gate"].nbytes
  )


def test_unknown_logical_axis_is_a_clear_error():
  mesh = sharding.make_mesh((1, 8, 1))
  with pytest.raises(ValueError, match="'experts' has no entry"):
    sharding.partition_spec(("experts", "embed"), (8, 64), mesh, RULES)
