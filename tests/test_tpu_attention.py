"""The TPU attention kernels, interpreted on the CPU, against a float64
reference and against the XLA paths the other platforms run."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from score_jax import data, rollout, sampling, sharding
from score_jax.models import attention, presets, tpu_attention
from score_jax.models import transformer as tf


def _reference(q, k, v, lengths, cap):
  """Float64 softmax attention of each entry's queries over its first
  `lengths` slots: (out, log-sum-exp), NaN-free for empty entries."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum("rkqh,rksh->rkqs", q, k)
  logits = cap * np.tanh(logits / cap)
  seen = np.arange(k.shape[2])[None, :] < np.asarray(lengths)[:, None]
  logits = np.where(seen[:, None, None], logits, -np.inf)
  top = np.max(logits, -1, keepdims=True)
  top = np.where(np.isfinite(top), top, 0.0)
  weights = np.exp(logits - top)
  total = weights.sum(-1, keepdims=True)
  out = np.einsum("rkqs,rksh->rkqh", weights, v) / np.where(
    total > 0, total, 1.0
  )
  lse = np.where(
    total[..., 0] > 0,
    top[..., 0] + np.log(np.maximum(total[..., 0], 1e-300)),
    -np.inf,
  )
  return out, lse


def test_decode_kernel_matches_a_float64_reference():
  """Two prompts' segments (256 slots, each read by its 2 rows) and a turn
  of three 128-slot blocks, in one call: rows that read none, one, part of
  two and all of a segment's slots, and a row that reads nothing at all."""
  rng = np.random.default_rng(0)
  U, G, K, Q, H = 2, 2, 2, 3, 128
  B = U * G
  q = rng.normal(size=(U, G, K, Q, H)).astype(np.float32)
  prompt_k = rng.normal(size=(U, K, 256, H)).astype(np.float32) * 0.3
  prompt_v = rng.normal(size=(U, K, 256, H)).astype(np.float32)
  turn_k = rng.normal(size=(B, K, 384, H)).astype(np.float32) * 0.3
  turn_v = rng.normal(size=(B, K, 384, H)).astype(np.float32)
  prompt_lengths = np.array([200, 0], np.int32)
  turn_lengths = np.array([1, 130, 384, 0], np.int32)
  out, lse = tpu_attention.decode_attention(
    q,
    [(prompt_k, prompt_v, prompt_lengths), (turn_k, turn_v, turn_lengths)],
    5.0,
    shard=None,
    interpret=True,
  )
  for b in range(B):
    u, g = divmod(b, G)
    keys = np.concatenate([prompt_k[u], turn_k[b]], axis=1)[None]
    values = np.concatenate([prompt_v[u], turn_v[b]], axis=1)[None]
    seen = np.zeros(256 + 384, bool)
    seen[: prompt_lengths[u]] = True
    seen[256 : 256 + turn_lengths[b]] = True
    if seen.any():  # The reference over the written slots.
      expected_out, expected_lse = _reference(
        q[u, g][None], keys[:, :, seen], values[:, :, seen], [seen.sum()], 5.0
      )
      np.testing.assert_allclose(
        out[u, g], expected_out[0], atol=1e-5, rtol=1e-5
      )
      np.testing.assert_allclose(
        lse[u, g], expected_lse[0], atol=1e-5, rtol=1e-5
      )
    else:
      assert np.all(np.asarray(out[u, g]) == 0)
      assert np.all(np.isneginf(lse[u, g]))
  # Two calls over halves of the keys, combined, give the whole.
  first = tpu_attention.decode_attention(
    q, [(prompt_k, prompt_v, prompt_lengths)], 5.0, None, True
  )
  rest = tpu_attention.decode_attention(
    q, [(turn_k, turn_v, turn_lengths)], 5.0, None, True
  )
  both = tpu_attention.combine([first[0], rest[0]], [first[1], rest[1]])
  np.testing.assert_allclose(both, out, atol=1e-5, rtol=1e-5)


CFG = dataclasses.replace(
  presets.build_config({"preset": "test"}),
  num_heads=4,
  num_kv_heads=2,
  head_dim=128,
  attn_logit_softcap=5.0,
)


def _turns(model, params, kernels):
  """A shared prompt prefilled once for 2 rows each, a decoded turn (rows
  stopping at different lengths) and a 3-token turn: every step's
  logits."""
  model = dataclasses.replace(model, kernels=kernels)
  rng = np.random.default_rng(1)
  prompts = jnp.asarray(rng.integers(0, CFG.vocab_size, (2, 6)))
  segments = (
    model.empty_segment(2, 6, rows_per_entry=2),
    model.empty_segment(4, 5),
    model.empty_segment(4, 3),
  )
  logits, prompt = model.prefill(
    params, prompts, jnp.asarray([5, 3]), segments[0]
  )
  seen = [logits]
  turn = dataclasses.replace(
    segments[1], offsets_e=jnp.repeat(prompt.ends_e(), 2)
  )
  segments = (prompt, turn, segments[2])
  lengths = np.array([4, 2, 3, 1])
  for t in range(4):
    active = jnp.asarray(lengths > t)
    logits, segments = model.extend(
      params,
      jnp.asarray(rng.integers(0, CFG.vocab_size, (4, 1))),
      segments,
      1,
      t,
      active,
    )
    seen.append(jnp.where(active[:, None], logits, 0.0))
    segments = (
      segments[0],
      dataclasses.replace(
        segments[1],
        lengths_e=jnp.asarray(np.minimum(lengths, t + 1), jnp.int32),
      ),
      segments[2],
    )
  segments = segments[:2] + (
    dataclasses.replace(segments[2], offsets_e=segments[1].ends_e()),
  )
  logits, _ = model.extend(
    params, jnp.asarray(rng.integers(0, CFG.vocab_size, (4, 3))), segments, 2, 0
  )
  return seen + [logits]


def test_cached_attention_with_the_kernel_equals_xla():
  model = tf.Transformer(CFG)
  params = tf.unstack_layers(model.init(jax.random.key(0)))
  for xla, kernel in zip(
    _turns(model, params, "xla"), _turns(model, params, "tpu_interpret")
  ):
    np.testing.assert_allclose(kernel, xla, atol=2e-5, rtol=2e-5)


def test_sharded_rollout_with_the_kernel_gives_the_xla_tokens():
  """The kernel in shard_map over a (data, fsdp, tensor) mesh: a sampled
  rollout's tokens and log-probs are those of the XLA path."""
  mesh = sharding.make_mesh((2, 2, 2))
  rules = common.SHARDING_RULES
  cfg = dataclasses.replace(CFG, num_kv_heads=2, num_heads=4)
  params, shardings = sharding.init_sharded(
    tf.Transformer(cfg).init, tf.param_axes(cfg), mesh, rules, jax.random.key(0)
  )
  rng = np.random.default_rng(2)
  prompts = [
    list(rng.integers(16, cfg.vocab_size, rng.integers(3, 12)))
    for _ in range(4)
  ]
  tokens, valid = data.pad_prompts(prompts, 0, buckets=(16,))
  rcfg = rollout.RolloutConfig(
    num_attempts=2,
    max_attempt_len=6,
    sampler=sampling.SamplerConfig(1.0),
    samples_per_prompt=2,
  )
  episodes = []
  for kernels in ("xla", "tpu_interpret"):
    model = tf.Transformer(
      cfg, shard=sharding.ActivationSharding(mesh, rules), kernels=kernels
    )
    fn = rollout.make_rollout_fn(
      model,
      (3, 7, 11),
      (1, 5),
      0,
      rcfg,
      mesh=mesh,
      param_shardings=shardings,
      batch_axes=dict(rules)["batch"],
    )
    episodes.append(
      jax.device_get(fn(params, tokens, valid, jax.random.key(4)))
    )
  np.testing.assert_array_equal(episodes[1].tokens_bs, episodes[0].tokens_bs)
  np.testing.assert_allclose(
    episodes[1].log_probs_bs, episodes[0].log_probs_bs, atol=1e-4
  )


def test_splash_attention_equals_the_blocked_xla_path_and_its_gradient():
  """Packed rows of several episodes, three 128-token blocks: outputs and
  the gradients with respect to q, k and v."""
  rng = np.random.default_rng(3)
  B, T, N, K, H = 2, 384, 2, 1, 128
  q = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(B, T, K, H)), jnp.float32) * 0.3
  v = jnp.asarray(rng.normal(size=(B, T, K, H)), jnp.float32)
  lengths = [[100, 200, 50, 34], [384]]
  episodes = np.full((B, T), -1, np.int32)
  positions = np.zeros((B, T), np.int32)
  for b, row in enumerate(lengths):
    start = 0
    for e, n in enumerate(row):
      episodes[b, start : start + n] = e
      positions[b, start : start + n] = np.arange(n)
      start += n
  no_shard = lambda x, axes: x

  def run(kernels):
    f = lambda q, k, v: attention.self_attention(
      q,
      k,
      v,
      jnp.asarray(episodes),
      jnp.asarray(positions),
      2**30,
      5.0,
      no_shard,
      128,
      kernels,
    )
    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(jnp.asarray(rng.normal(size=out.shape), jnp.float32))

  rng_state = rng.bit_generator.state
  xla_out, xla_grads = run("xla")
  rng.bit_generator.state = rng_state
  splash_out, splash_grads = run("tpu_interpret")
  real = episodes >= 0
  np.testing.assert_allclose(
    np.asarray(splash_out)[real],
    np.asarray(xla_out)[real],
    atol=2e-5,
    rtol=2e-5,
  )
  for got, want in zip(splash_grads, xla_grads):
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("platform, expected", [("cpu", "xla"), ("tpu", "tpu")])
def test_kernels_follow_the_meshs_platform(platform, expected):
  mesh = sharding.make_mesh((1, -1, 1))
  if platform == "tpu":
    pytest.importorskip("libtpu")
    from score_jax import aot

    devices = aot.tpu_devices("v5e-4")
    mesh = sharding.make_mesh((1, -1, 1), devices)
  assert tpu_attention.platform_kernels(mesh) == expected
