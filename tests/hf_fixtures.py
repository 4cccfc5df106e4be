"""The committed Hugging Face fixtures (tests/fixtures/hf/, written by
scripts/make_hf_fixtures.py) and helpers shared by their tests."""

import os

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from configs import common
from score_jax import sharding
from score_jax.models import hf_config
from score_jax.models import transformer as tf

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
ARCHITECTURES = (
  "gemma",
  "gemma2",
  "llama3",
  "qwen2",
  "llama3_linear",
  "qwen2_yarn",
)
MAX_LOGIT_DIFF = 1e-4  # float32, against transformers


def fixture_dir(name: str) -> str:
  return os.path.join(FIXTURES, name)


def expected(name: str):
  """tokens, mask, logits, prompt, continuation (from transformers)."""
  return np.load(os.path.join(fixture_dir(name), "expected.npz"))


def fixture_config(name: str, **overrides) -> tf.TransformerConfig:
  return tf.TransformerConfig(
    **{**hf_config.architecture(hf_config.read(fixture_dir(name))), **overrides}
  )


def mesh_shardings(cfg, mesh_shape=(1, 4, 2)):
  """Param shardings on a (data, fsdp, tensor) mesh of the CPU devices."""
  mesh = sharding.make_mesh(
    mesh_shape, jax.devices()[: int(np.prod(mesh_shape))]
  )
  shapes = jax.eval_shape(tf.Transformer(cfg).init, jax.random.key(0))
  return sharding.tree_shardings(
    tf.param_axes(cfg), shapes, mesh, common.SHARDING_RULES
  )


def logits(cfg, params, tokens, mask) -> np.ndarray:
  mask = jnp.asarray(mask, bool)
  out = tf.Transformer(cfg).apply(
    params,
    jnp.asarray(tokens),
    tf.positions_from_mask(mask),
    tf.episode_ids(mask),
  )
  return np.asarray(out)


def max_logit_diff(name: str, cfg, params) -> float:
  """Largest |ours - transformers'| over the real (unpadded) tokens."""
  ref = expected(name)
  valid = ref["mask"].astype(bool)
  return float(
    np.abs(logits(cfg, params, ref["tokens"], ref["mask"]) - ref["logits"])[
      valid
    ].max()
  )


def hf_tensors(model_dir) -> dict[str, np.ndarray]:
  """Every tensor of a safetensors model directory."""
  tensors = {}
  for name in sorted(os.listdir(model_dir)):
    if name.endswith(".safetensors"):
      with safe_open(os.path.join(model_dir, name), framework="numpy") as f:
        tensors.update({key: f.get_tensor(key) for key in f.keys()})
  return tensors
