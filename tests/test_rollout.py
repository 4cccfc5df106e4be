"""The sampler and the multi-turn rollout against independent references."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from score_jax import data, rollout, sampling, sharding
from score_jax.models import presets
from score_jax.models import transformer as tf

CFG = dataclasses.replace(
  presets.build_config({"preset": "test"}),
  num_heads=8,
  num_kv_heads=2,
  d_model=64,
  mlp_dim=128,
)
MODEL = tf.Transformer(CFG)
PAD = 0
STOP_IDS = (1, 5, 9, 13)
INSTRUCTION = (3, 7, 11, 2, 4)
GREEDY = rollout.RolloutConfig(
  num_attempts=2,
  max_attempt_len=10,
  sampler=sampling.SamplerConfig(temperature=0.0),
)


def _diverse_params(rng):
  """Random params with the layers scaled up: at init the tied embeddings make
  greedy decoding repeat the last token, which would test little."""
  params = MODEL.init(rng)
  return dict(params, layers=jax.tree.map(lambda x: 3.0 * x, params["layers"]))


@pytest.fixture(scope="module")
def params():
  return _diverse_params(jax.random.key(0))


def _prompts(batch=8, seed=0):
  rng = np.random.default_rng(seed)
  return [
    list(rng.integers(16, CFG.vocab_size, rng.integers(3, 12)))
    for _ in range(batch)
  ]


def _run(params, prompts, cfg, rng=jax.random.key(1), **kwargs):
  tokens, valid = data.pad_prompts(prompts, PAD, buckets=(16, 32))
  fn = rollout.make_rollout_fn(MODEL, INSTRUCTION, STOP_IDS, PAD, cfg, **kwargs)
  return fn(params, tokens, valid, rng)


@jax.jit
def _next_token_no_cache(params, tokens_t, length):
  """Argmax after the first `length` tokens, by a full forward pass (no
  cache)."""
  valid = (jnp.arange(tokens_t.shape[0]) < length)[None]
  logits = MODEL.apply(
    params, tokens_t[None], tf.positions_from_mask(valid), tf.episode_ids(valid)
  )
  return jnp.argmax(logits[0, length - 1])


def _reference_greedy_episode(params, prompt, cfg):
  """One row, a growing Python list, a full forward pass per token."""
  sequence = list(prompt)
  attempts = []
  for attempt in range(cfg.num_attempts):
    produced = []
    for _ in range(cfg.max_attempt_len):
      buffer = np.zeros(64, np.int32)
      buffer[: len(sequence)] = sequence
      token = int(_next_token_no_cache(params, buffer, len(sequence)))
      sequence.append(token)
      produced.append(token)
      if token in STOP_IDS:
        break
    attempts.append(produced)
    if attempt < cfg.num_attempts - 1:
      sequence.extend(INSTRUCTION)
  return attempts, sequence


def test_greedy_rollout_equals_no_cache_argmax_loop(params):
  prompts = _prompts()
  episode = _run(params, prompts, GREEDY)
  got = data.attempt_token_ids(episode)
  stopped_early = 0
  for row, prompt in enumerate(prompts):
    attempts, sequence = _reference_greedy_episode(params, prompt, GREEDY)
    for i in range(2):
      assert got[row][i].tolist() == attempts[i], (row, i)
    stopped_early += len(attempts[0]) < GREEDY.max_attempt_len
    # The valid slots are exactly the reference's sequence.
    assert (
      np.asarray(episode.tokens_bs)[row][
        np.asarray(episode.valid_bs)[row]
      ].tolist()
      == sequence
    )
  # The fixture must exercise both early stops and the full budget.
  assert 0 < stopped_early < len(prompts)


def test_sampled_rollout_equals_a_float64_no_cache_reference():
  """In float64, where rounding cannot decide a draw: each prompt prefilled
  once for its two samples, the cached, segmented rollout samples the very
  tokens that a full forward pass per token with the same noise keys
  (row, attempt, token) samples, with the same log-probs."""
  with jax.enable_x64(True):
    cfg64 = dataclasses.replace(CFG, dtype="float64", param_dtype="float64")
    model = tf.Transformer(cfg64)
    params = jax.tree.map(
      lambda x: jnp.asarray(x, jnp.float64), _diverse_params(jax.random.key(0))
    )
    sampler = sampling.SamplerConfig(temperature=1.0)
    cfg = dataclasses.replace(
      GREEDY, sampler=sampler, samples_per_prompt=2, max_attempt_len=6
    )
    prompts = _prompts(batch=3, seed=5)
    tokens, valid = data.pad_prompts(prompts, PAD, buckets=(16,))
    rng = jax.random.key(7)
    episode = jax.device_get(
      rollout.make_rollout_fn(model, INSTRUCTION, STOP_IDS, PAD, cfg)(
        params, tokens, valid, rng
      )
    )

    @jax.jit
    def logits_after(tokens_t, length):
      valid_t = (jnp.arange(tokens_t.shape[0]) < length)[None]
      return model.apply(
        params,
        tokens_t[None],
        tf.positions_from_mask(valid_t),
        tf.episode_ids(valid_t),
      )[0, length - 1]

    for row in range(6):
      sequence = list(prompts[row // 2])
      for attempt in range(2):
        keys = sampling.row_keys(rng, jnp.asarray([row]), attempt)
        ids = episode.tokens_bs[row][episode.attempt_mask_bas[row, attempt]]
        log_probs = episode.log_probs_bs[row][
          episode.attempt_mask_bas[row, attempt]
        ]
        for t, (token, log_prob) in enumerate(zip(ids, log_probs)):
          buffer = np.zeros(64, np.int32)
          buffer[: len(sequence)] = sequence
          logits = logits_after(buffer, len(sequence))
          expected, expected_log_prob = sampling.sample_tokens(
            logits[None], sampling.token_keys(keys, t), sampler
          )
          assert int(expected[0]) == token, (row, attempt, t)
          assert abs(float(expected_log_prob[0]) - log_prob) < 1e-9
          sequence.append(int(token))
        if attempt == 0:
          sequence.extend(INSTRUCTION)
    # The two samples of a prompt differ: the noise is per row.
    assert any(
      (episode.tokens_bs[2 * u] != episode.tokens_bs[2 * u + 1]).any()
      for u in range(3)
    )


def test_three_attempts_match_reference(params):
  cfg = dataclasses.replace(GREEDY, num_attempts=3, max_attempt_len=6)
  prompts = _prompts(batch=4, seed=3)
  got = data.attempt_token_ids(_run(params, prompts, cfg))
  for row, prompt in enumerate(prompts):
    attempts, _ = _reference_greedy_episode(params, prompt, cfg)
    assert [a.tolist() for a in got[row]] == attempts


def test_sampler_log_probs_equal_trainer_log_probs(params):
  cfg = dataclasses.replace(GREEDY, sampler=sampling.SamplerConfig(1.0))
  episode = _run(params, _prompts(), cfg)
  trainer, _ = MODEL.token_log_probs(
    params,
    episode.tokens_bs,
    tf.positions_from_mask(episode.valid_bs),
    tf.episode_ids(episode.valid_bs),
  )
  policy = np.asarray(episode.attempt_mask_bas).any(1)
  assert policy.sum() > 50
  diff = np.abs(np.asarray(trainer) - np.asarray(episode.log_probs_bs))[policy]
  assert diff.max() < 1e-4


@pytest.mark.parametrize("micro_batches", [2, 4])
def test_sampled_tokens_do_not_depend_on_micro_batching(params, micro_batches):
  """A token's noise is keyed by (row, attempt, token): sampling the batch
  in micro-batches gives every row the tokens it gets in one pass."""
  cfg = dataclasses.replace(GREEDY, sampler=sampling.SamplerConfig(1.0))
  prompts = _prompts()
  whole = jax.tree.map(np.asarray, _run(params, prompts, cfg))
  split = jax.tree.map(
    np.asarray,
    _run(
      params, prompts, dataclasses.replace(cfg, num_micro_batches=micro_batches)
    ),
  )
  np.testing.assert_array_equal(split.tokens_bs, whole.tokens_bs)
  np.testing.assert_array_equal(split.attempt_mask_bas, whole.attempt_mask_bas)
  np.testing.assert_allclose(split.log_probs_bs, whole.log_probs_bs, atol=1e-5)
  # Sampled, not greedy: rows with the same prompt differ.
  again = jax.tree.map(np.asarray, _run(params, prompts[:1] * 8, cfg))
  assert len({tuple(row) for row in again.tokens_bs}) > 1


def test_stopped_rows_are_padded_and_masks_are_disjoint(params):
  episode = jax.tree.map(np.asarray, _run(params, _prompts(), GREEDY))
  masks = episode.attempt_mask_bas
  assert not (masks[:, 0] & masks[:, 1]).any()
  for row in range(episode.tokens_bs.shape[0]):
    for i in range(2):
      ids = episode.tokens_bs[row][masks[row, i]]
      assert len(ids) == episode.lengths_ba[row, i]
      # Only the last token of an attempt may be a stop token.
      assert not np.isin(ids[:-1], STOP_IDS).any()
      if len(ids) < GREEDY.max_attempt_len:
        assert ids[-1] in STOP_IDS
  padding = ~episode.valid_bs
  assert (episode.tokens_bs[padding] == PAD).all()
  assert (episode.log_probs_bs[padding] == 0).all()


def test_attempt_two_conditions_on_attempt_one(params):
  """Writing different attempt-1 tokens into the cache changes the logits
  that attempt 2 starts from."""
  layers = tf.unstack_layers(params)
  start_logits = []
  for attempt_one in ([30, 31, 32], [30, 40, 32]):
    segments = (
      MODEL.empty_segment(1, 4),
      MODEL.empty_segment(1, 3),
      MODEL.empty_segment(1, len(INSTRUCTION)),
    )
    _, prompt = MODEL.prefill(
      layers, jnp.asarray([[20, 21, 22, 23]]), jnp.asarray([4]), segments[0]
    )
    segments = (
      prompt,
      dataclasses.replace(segments[1], offsets_e=prompt.ends_e()),
      segments[2],
    )
    _, segments = MODEL.extend(
      layers, jnp.asarray([attempt_one]), segments, 1, 0
    )
    turn = dataclasses.replace(segments[1], lengths_e=jnp.asarray([3]))
    segments = (
      prompt,
      turn,
      dataclasses.replace(segments[2], offsets_e=turn.ends_e()),
    )
    logits, _ = MODEL.extend(layers, jnp.asarray([INSTRUCTION]), segments, 2, 0)
    start_logits.append(np.asarray(logits))
  assert np.abs(start_logits[0] - start_logits[1]).max() > 1e-3


def _chi_square(counts, probs):
  expected = probs * counts.sum()
  keep = expected > 0
  assert counts[~keep].sum() == 0, "sampled a token of probability 0"
  return np.sum((counts[keep] - expected[keep]) ** 2 / expected[keep])


@pytest.mark.parametrize(
  "cfg",
  [
    sampling.SamplerConfig(temperature=0.7),
    sampling.SamplerConfig(temperature=1.0, top_k=3),
    sampling.SamplerConfig(temperature=1.3, top_p=0.8),
  ],
)
def test_sampling_follows_the_categorical_distribution(cfg):
  logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
  num_samples = 40_000
  tokens, log_probs = sampling.sample_tokens(
    jnp.tile(jnp.asarray(logits, jnp.float32), (num_samples, 1)),
    jax.random.split(jax.random.key(7), num_samples),
    cfg,
  )
  # Independent float64 reference of the truncated, tempered distribution.
  scaled = logits / cfg.temperature
  probs = np.exp(scaled - scaled.max())
  probs /= probs.sum()
  order = np.argsort(-probs)
  keep = np.zeros_like(probs, bool)
  if cfg.top_k:
    keep[order[: cfg.top_k]] = True
  else:
    mass_before = np.cumsum(probs[order]) - probs[order]
    keep[order[mass_before < cfg.top_p]] = True
  probs = np.where(keep, probs, 0.0)
  probs /= probs.sum()
  counts = np.bincount(np.asarray(tokens), minlength=len(logits))
  degrees = keep.sum() - 1
  critical = {2: 13.82, 3: 16.27, 5: 20.52}[degrees]  # chi-square, p = 0.001
  assert _chi_square(counts, probs) < critical
  # Log-probs are the policy's, untempered and untruncated.
  policy = logits - np.log(np.exp(logits).sum())
  np.testing.assert_allclose(
    np.asarray(log_probs), policy[np.asarray(tokens)], atol=1e-5
  )


@pytest.mark.parametrize("vocab", [5, 128, 300])
def test_argmax_equals_jnp_argmax(vocab):
  """Ties pick the first maximum; a row with a NaN gets an index in range."""
  rng = np.random.default_rng(vocab)
  x = rng.integers(-3, 3, (64, vocab)).astype(np.float32)  # many ties
  x[1] = -np.inf
  x[3, -1] = 9.0
  x[4, 0] = 9.0
  x[5, vocab // 2] = np.nan
  got = np.asarray(jax.jit(sampling.argmax)(x))
  finite = np.arange(64) != 5
  np.testing.assert_array_equal(got[finite], np.argmax(x, axis=-1)[finite])
  assert 0 <= got[5] < vocab


def test_same_bucket_does_not_recompile(params):
  fn = rollout.make_rollout_fn(MODEL, INSTRUCTION, STOP_IDS, PAD, GREEDY)
  for seed, bucket_width in [(0, 16), (1, 16), (2, 32)]:
    prompts = _prompts(seed=seed)
    if bucket_width == 32:
      prompts[0] = prompts[0] + [17] * 12
    tokens, valid = data.pad_prompts(prompts, PAD, buckets=(16, 32))
    assert tokens.shape[1] == bucket_width
    fn(params, tokens, valid, jax.random.key(seed))
  assert fn._cache_size() == 2


def test_prompt_longer_than_buckets_is_a_clear_error():
  with pytest.raises(ValueError, match="larger than|more than the largest"):
    data.pad_prompts([[1] * 40], PAD, buckets=(16, 32))


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 8, 1)])
def test_sharded_rollout_equals_single_device(params, shape):
  prompts = _prompts()
  expected = jax.tree.map(np.asarray, _run(params, prompts, GREEDY))
  mesh = sharding.make_mesh(shape)
  rules = common.SHARDING_RULES
  sharded_params, shardings = sharding.init_sharded(
    _diverse_params, tf.param_axes(CFG), mesh, rules, jax.random.key(0)
  )
  got = _run(
    sharded_params,
    prompts,
    GREEDY,
    mesh=mesh,
    param_shardings=shardings,
    batch_axes=dict(rules)["batch"],
  )
  assert got.tokens_bs.sharding.spec[0] == ("data", "fsdp")
  got = jax.tree.map(np.asarray, got)
  np.testing.assert_array_equal(got.tokens_bs, expected.tokens_bs)
  np.testing.assert_array_equal(got.attempt_mask_bas, expected.attempt_mask_bas)
  np.testing.assert_allclose(got.log_probs_bs, expected.log_probs_bs, atol=1e-5)
