"""Parity with the reference implementation: tiny models written by Hugging
Face transformers (tests/fixtures/hf/, made by scripts/make_hf_fixtures.py:
each family, and linear and YaRN RoPE scaling) load onto a sharded mesh and
give transformers' float32 logits and greedy continuation. No torch needed
here."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_jax import sampling
from score_jax.models import hf
from score_jax.models import transformer as tf
from tests import hf_fixtures as fx


@functools.partial(jax.jit, static_argnums=(0, 3))
def greedy(cfg, params, prompt, length):
  """The rollout's own path: prefill, then the KV-cache decode loop."""
  model = tf.Transformer(cfg)
  params = tf.unstack_layers(params)
  B, P = prompt.shape
  logits, segment = model.prefill(
    params, prompt, jnp.full((B,), P), model.empty_segment(B, P)
  )
  turn = dataclasses.replace(
    model.empty_segment(B, length), offsets_e=segment.ends_e()
  )
  tokens, _, _ = sampling.decode(
    model,
    params,
    (segment, turn),
    1,
    logits,
    sampling.row_keys(jax.random.key(0), jnp.arange(B), 0),
    length,
    stop_ids=(),
    pad_id=0,
    cfg=sampling.SamplerConfig(temperature=0.0),
  )
  return tokens


@pytest.mark.parametrize("name", fx.ARCHITECTURES)
def test_logits_and_greedy_continuation_match_transformers(name):
  cfg = fx.fixture_config(name)
  shardings = fx.mesh_shardings(cfg)
  params = hf.load(fx.fixture_dir(name), cfg, shardings)
  assert jax.tree.map(lambda x: x.sharding, params) == shardings
  diff = fx.max_logit_diff(name, cfg, params)
  print(f"{name}: max abs logit diff {diff:.2e}")
  assert diff < fx.MAX_LOGIT_DIFF
  ref = fx.expected(name)
  continuation = greedy(
    cfg, params, jnp.asarray(ref["prompt"]), ref["continuation"].shape[1]
  )
  np.testing.assert_array_equal(np.asarray(continuation), ref["continuation"])


# Each fixture's distinctive option, switched off: the logits must move, or
# the fixture would not be testing it (YaRN: its frequency ramp and its
# attention factor, each on its own).
_SWITCHED_OFF = [
  ("gemma", dict(scale_embeddings=False)),
  ("gemma2", dict(sliding_window=None, alternate_local_global=False)),
  ("llama3", dict(rope_scale_factor=None)),
  ("qwen2", dict(norm_one_plus_scale=True)),
  ("llama3_linear", dict(rope_scale_factor=None)),
  ("qwen2_yarn", dict(rope_scaling_type="linear")),
  ("qwen2_yarn", dict(rope_attention_factor=1.0)),
]


@pytest.mark.parametrize("name,switched_off", _SWITCHED_OFF)
def test_fixture_depends_on_the_family_options(name, switched_off):
  wrong = fx.fixture_config(name, **switched_off)
  params = hf.load(
    fx.fixture_dir(name), wrong, fx.mesh_shardings(wrong, (1, 1, 1))
  )
  assert fx.max_logit_diff(name, wrong, params) > 1e-2
