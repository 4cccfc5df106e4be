"""Packed rows: the plan against a brute-force check, the move against the
episodes, and the packed train step's loss and gradients against a float64
reference on the unpacked episodes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_jax import episodes, objectives, packing
from score_jax import train_step as train_step_lib
from score_jax.models import presets
from score_jax.models import transformer as tf


def _check_plan(lengths, rows, row_len, num_micro_batches):
  row_b, offset_b, used = packing.plan(
    lengths, rows, row_len, num_micro_batches
  )
  occupied = {}
  for b, (row, offset) in enumerate(zip(row_b, offset_b)):
    assert row in rows and 0 <= offset
    assert offset + lengths[b] <= row_len
    for slot in range(offset, offset + lengths[b]):
      assert (row, slot) not in occupied, "two episodes share a slot"
      occupied[row, slot] = b
  assert used == 1 + max(r % num_micro_batches for r in row_b)
  return row_b, offset_b, used


def test_plan_puts_every_episode_whole_in_as_few_micro_batches_as_fit():
  rng = np.random.default_rng(0)
  for _ in range(30):
    num_episodes = int(rng.integers(1, 40))
    row_len = int(rng.integers(20, 100))
    lengths = rng.integers(1, row_len + 1, num_episodes)
    M = int(rng.choice([1, 2, 4]))
    rows = np.arange(num_episodes + (-num_episodes % M))
    _, _, used = _check_plan(lengths, rows, row_len, M)
    # Micro-batches hold len(rows) / M rows; at least the tokens' worth of
    # rows is needed, and first-fit decreasing uses at most 11/9 of the
    # optimum plus one row.
    rows_per_micro_batch = len(rows) // M
    lower = -(-lengths.sum() // row_len)
    assert used * rows_per_micro_batch >= lower
    assert (used - 1) * rows_per_micro_batch < 11 / 9 * (
      num_episodes if row_len < 2 * lengths.min() else lower
    ) + 1


def test_plan_fills_micro_batches_in_the_train_steps_order():
  """Rows r, r + M, ... form micro-batch r % M; short episodes all land in
  micro-batch 0, spread over its rows (one per device)."""
  row_b, _, used = _check_plan(np.full(4, 5), np.arange(8), 10, 4)
  assert used == 1
  assert sorted(set(row_b.tolist())) == [0, 4]
  row_b, _, used = _check_plan(np.full(8, 5), np.arange(8), 10, 4)
  assert used == 2
  assert sorted(set(row_b.tolist())) == [0, 1, 4, 5]
  # A process that holds rows 4..7 only fills its own.
  row_b, _, used = _check_plan(np.full(4, 9), np.arange(4, 8), 10, 2)
  assert sorted(row_b.tolist()) == [4, 5, 6, 7] and used == 2


def test_plan_refuses_an_episode_longer_than_a_row():
  with pytest.raises(ValueError, match="longer than a packed row of 10"):
    packing.plan(np.array([11]), np.arange(1), 10, 1)


def test_pack_moves_each_episodes_tokens_in_order():
  rng = np.random.default_rng(1)
  B, S, L = 6, 12, 16
  tokens = rng.integers(1, 50, (B, S)).astype(np.int32)
  valid = rng.random((B, S)) < 0.7
  valid[:, 0] = True
  mask = np.zeros((B, 2, S), bool)
  mask[:, 0, 3:6], mask[:, 1, 8:11] = True, True
  mask &= valid[:, None]
  sampler = rng.normal(size=(B, S)).astype(np.float32)
  episode = episodes.Episode(
    tokens, valid, mask, sampler, mask.sum(2, dtype=np.int32)
  )
  row_b, offset_b, used = packing.plan(valid.sum(1), np.arange(B), L, 2)
  packed = jax.device_get(
    packing.pack_episodes(episode, row_b, offset_b, used, B, L)
  )
  assert int(packed.num_micro_batches) == used
  roles = np.asarray(packing.roles(mask))
  for b in range(B):
    row, start = row_b[b], offset_b[b]
    n = valid[b].sum()
    here = slice(start, start + n)
    np.testing.assert_array_equal(
      packed.tokens_rt[row, here], tokens[b][valid[b]]
    )
    np.testing.assert_array_equal(packed.episodes_rt[row, here], b)
    np.testing.assert_array_equal(packed.positions_rt[row, here], np.arange(n))
    np.testing.assert_array_equal(
      packed.roles_rt[row, here], roles[b][valid[b]]
    )
    np.testing.assert_array_equal(
      packed.sampler_log_probs_rt[row, here], sampler[b][valid[b]]
    )
  assert (packed.episodes_rt >= 0).sum() == valid.sum()
  assert (packed.roles_rt[packed.episodes_rt < 0] == -1).all()


CFG = dataclasses.replace(
  presets.build_config({"preset": "test"}),
  attn_logit_softcap=5.0,
  sliding_window=6,
  alternate_local_global=True,
  post_norms=True,
)


def _episodes(rows=8, slots=20, seed=0):
  """Episodes in the rollout's layout: a left-padded prompt, two attempts
  that stop early (a gap before the instruction), rewards."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, CFG.vocab_size, (rows, slots)).astype(np.int32)
  valid = np.ones((rows, slots), bool)
  mask = np.zeros((rows, 2, slots), bool)
  for b in range(rows):
    valid[b, : rng.integers(0, 3)] = False  # prompt padding
    first = int(rng.integers(2, 7))
    mask[b, 0, 4 : 4 + first] = True
    valid[b, 4 + first : 10] = False  # stopped early
    second = int(rng.integers(2, 7))
    mask[b, 1, 12 : 12 + second] = True
    valid[b, 12 + second :] = False
  sampler = rng.normal(size=(rows, slots)).astype(np.float32) * mask.any(1)
  episode = episodes.Episode(
    tokens, valid, mask, sampler, mask.sum(2, dtype=np.int32)
  )
  rewards = rng.integers(0, 2, (rows, 2)).astype(np.float32)
  return episode, rewards


def _unpacked_loss(model, params, reference, episode, rewards, cfg, Y):
  """The Stage II loss written out on the unpacked episodes, one episode a
  row, padding and all: the definition, not the packed path."""
  valid = jnp.asarray(episode.valid_bs)
  positions, ids = tf.positions_from_mask(valid), tf.episode_ids(valid)
  log_probs, _ = model.token_log_probs(
    params, episode.tokens_bs, positions, ids
  )
  ref, _ = model.token_log_probs(reference, episode.tokens_bs, positions, ids)
  adv = objectives.advantages(
    objectives.shaped_returns(rewards, cfg), 2, cfg.baseline
  )
  mask = jnp.asarray(episode.attempt_mask_bas)
  per_token = (
    -adv[:, :, None] * log_probs[:, None]
    + cfg.beta1 * 0.5 * (log_probs - ref)[:, None] ** 2
  )
  B = rewards.shape[0]
  return jnp.sum(jnp.where(mask, per_token, 0.0)) / (B * Y * 2)


def _packed_loss_and_grads(
  model, params, reference, episode, rewards, cfg, Y, row_len, M
):
  B = rewards.shape[0]
  row_b, offset_b, used = packing.plan(
    episode.valid_bs.sum(1), np.arange(B), row_len, M
  )
  packed = packing.pack_episodes(episode, row_b, offset_b, used, B, row_len)
  batch = episodes.RLBatch(
    packed,
    train_step_lib.make_reference_fn(model, M)(reference, packed),
    jnp.asarray(rewards),
  )
  loss, grads, _ = jax.jit(
    train_step_lib.make_gradient_fn(model, cfg, M, 2, Y)
  )(params, batch)
  return loss, grads


def _relative_error(a, b):
  flat = lambda t: jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(t)])
  return float(jnp.linalg.norm(flat(a) - flat(b)) / jnp.linalg.norm(flat(b)))


@pytest.mark.parametrize(
  "row_len, micro_batches", [(20, 4), (64, 2)], ids=["episode_a_row", "packed"]
)
def test_packed_loss_and_gradients_match_a_float64_unpacked_reference(
  row_len, micro_batches
):
  """Float32 packed rows (several episodes a row, micro-batched) give the
  float64 loss and gradients of the unpacked episodes as closely as the
  float32 unpacked computation does."""
  episode, rewards = _episodes()
  cfg = objectives.ObjectiveConfig(stage="stage2", beta1=0.3)
  Y = 6
  params32 = tf.Transformer(CFG).init(jax.random.key(0))
  reference32 = jax.tree.map(lambda x: 0.9 * x, params32)
  with jax.enable_x64(True):
    cfg64 = dataclasses.replace(CFG, dtype="float64", param_dtype="float64")
    model64 = tf.Transformer(cfg64)
    to64 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), t)
    loss64, grads64 = jax.value_and_grad(_unpacked_loss, argnums=1)(
      model64, to64(params32), to64(reference32), episode, rewards, cfg, Y
    )
    loss64, grads64 = float(loss64), jax.device_get(grads64)
  model = tf.Transformer(CFG)
  loss_dense, grads_dense = jax.value_and_grad(_unpacked_loss, argnums=1)(
    model, params32, reference32, episode, rewards, cfg, Y
  )
  loss, grads = _packed_loss_and_grads(
    model,
    params32,
    reference32,
    episode,
    rewards,
    cfg,
    Y,
    row_len,
    micro_batches,
  )
  dense_error = _relative_error(grads_dense, grads64)
  assert _relative_error(grads, grads64) <= max(3 * dense_error, 1e-6)
  assert abs(float(loss) - loss64) <= max(
    3 * abs(float(loss_dense) - loss64), 1e-6 * abs(loss64)
  )
  assert abs(loss64) > 1e-3
