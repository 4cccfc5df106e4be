"""SCoRe objectives against exact gradients on a tiny two-attempt categorical
policy, hand-computed RLOO baselines, and the paper's shaped rewards
(Section 5.2)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_jax import objectives

V = 4  # tokens per attempt
X = 2  # prompts
CORRECT = np.array([1, 3])  # the rewarded token of each prompt
K = 4  # samples per prompt
GROUPS = 250_000  # prompt groups in the Monte Carlo estimate


def _tables(seed=0):
  rng = np.random.default_rng(seed)
  theta = {"t1": rng.normal(size=(X, V)), "t2": rng.normal(size=(X, V, V))}
  ref = {"t1": rng.normal(size=(X, V)), "t2": rng.normal(size=(X, V, V))}
  return theta, ref


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _exact_gradient(theta, ref, cfg, reverse_kl=False):
  """Gradient of the objective, by enumeration in float64 with the
  closed-form derivatives of a softmax:
    d/dz sum_y pi(y) R(y) = pi * (R - E_pi R)
    d/dz KL(pi || ref)     = pi * (log(pi / ref) - KL)
    d/dz KL(ref || pi)     = pi - ref_probs
  """
  r = lambda y, x: (y == CORRECT[x]).astype(float)
  rewards = np.stack(
    np.broadcast_arrays(
      r(np.arange(V)[:, None], np.arange(X)[:, None, None]),
      r(np.arange(V)[None, :], np.arange(X)[:, None, None]),
    ),
    -1,
  )  # [X,y1,y2,2]
  returns = np.asarray(
    objectives.shaped_returns(jnp.asarray(rewards.reshape(-1, 2)), cfg)
  ).reshape(X, V, V, 2)
  betas, trained = objectives.stage_weights(2, cfg)

  def softmax_grad(z, ref_z, R):
    p, q = _softmax(z), _softmax(ref_z)
    grad_r = p * (R - np.sum(p * R, -1, keepdims=True))
    if reverse_kl:
      grad_kl = p - q
    else:
      log_ratio = np.log(p / q)
      grad_kl = p * (log_ratio - np.sum(p * log_ratio, -1, keepdims=True))
    return grad_r, grad_kl

  g1 = np.zeros((X, V))
  g2 = np.zeros((X, V, V))
  for x in range(X):
    p1 = _softmax(theta["t1"][x])
    if trained[0]:
      # Attempt 1's expected return given y1, attempt 2's policy held fixed
      # (with gamma > 0 it holds r2 too).
      q1 = np.sum(_softmax(theta["t2"][x]) * returns[x, :, :, 0], -1)
      gr, gk = softmax_grad(theta["t1"][x], ref["t1"][x], q1)
      g1[x] = (gr - betas[0] * gk) / X
    if trained[1]:
      for y1 in range(V):
        gr, gk = softmax_grad(
          theta["t2"][x, y1], ref["t2"][x, y1], returns[x, y1, :, 1]
        )
        g2[x, y1] = p1[y1] * (gr - betas[1] * gk) / X
  return np.concatenate([g1.ravel(), g2.ravel()]), trained.sum()


def _estimated_gradient(theta, ref, cfg, seed=1):
  """The objective's own loss on sampled episodes, differentiated by JAX."""
  rng = np.random.default_rng(seed)
  x = np.repeat(np.arange(GROUPS) % X, K)
  p1 = _softmax(theta["t1"])[x]
  y1 = (p1.cumsum(-1) > rng.random((len(x), 1))).argmax(-1)
  p2 = _softmax(theta["t2"])[x, y1]
  y2 = (p2.cumsum(-1) > rng.random((len(x), 1))).argmax(-1)
  rewards = np.stack([y1 == CORRECT[x], y2 == CORRECT[x]], 1).astype(float)
  # A row a token per attempt: episode b's attempt 1, then attempt 2.
  roles = np.tile(np.arange(2, dtype=np.int32), (len(x), 1))
  episodes = np.repeat(np.arange(len(x), dtype=np.int32)[:, None], 2, 1)

  # Data are arguments, not closed-over constants, so XLA does not spend
  # minutes constant-folding them.
  def loss(t1, t2, ref_t1, ref_t2, x, y1, y2, rewards, roles, episodes):
    logp = lambda z, y: jnp.take_along_axis(
      jax.nn.log_softmax(z), y[:, None], -1
    )[:, 0]
    lp = jnp.stack([logp(t1[x], y1), logp(t2[x, y1], y2)], 1)
    ref_lp = jnp.stack([logp(ref_t1[x], y1), logp(ref_t2[x, y1], y2)], 1)
    adv = objectives.advantages(
      objectives.shaped_returns(rewards, cfg),
      samples_per_prompt=K,
      baseline=cfg.baseline,
    )
    weights = objectives.token_weights(
      roles, episodes, len(rewards), 2, cfg, max_attempt_len=1
    )
    return objectives.policy_loss(
      lp, ref_lp, roles, episodes, adv, weights, cfg
    )[0]

  f32 = lambda a: jnp.asarray(a, jnp.float32)
  g1, g2 = jax.jit(jax.grad(loss, argnums=(0, 1)))(
    f32(theta["t1"]),
    f32(theta["t2"]),
    f32(ref["t1"]),
    f32(ref["t2"]),
    jnp.asarray(x),
    jnp.asarray(y1),
    jnp.asarray(y2),
    f32(rewards),
    jnp.asarray(roles),
    jnp.asarray(episodes),
  )
  return -np.concatenate([np.ravel(g1), np.ravel(g2)])


BASE = objectives.ObjectiveConfig(alpha=10.0, beta1=0.3, beta2=1.0)


@pytest.mark.parametrize(
  "cfg",
  [
    dataclasses.replace(BASE, stage="stage1"),
    dataclasses.replace(BASE, stage="stage2"),
    dataclasses.replace(BASE, stage="stage2", alpha=0.0),
    dataclasses.replace(BASE, stage="single_turn"),
    dataclasses.replace(BASE, stage="stage2", kl_estimator="k1_reward"),
    dataclasses.replace(BASE, stage="stage1", kl_estimator="k3_value_k2_grad"),
    dataclasses.replace(BASE, stage="stage2", baseline="batch_mean"),
    dataclasses.replace(BASE, stage="stage2", gamma=1.0),
  ],
  ids=[
    "stage1",
    "stage2",
    "no_shaping",
    "single_turn",
    "k1_reward",
    "k3_value_k2_grad",
    "batch_mean",
    "gamma",
  ],
)
def test_estimated_gradient_matches_exact(cfg):
  theta, ref = _tables()
  exact, num_trained = _exact_gradient(theta, ref, cfg)
  # The loss averages over trained attempts (the fixed normaliser).
  estimate = _estimated_gradient(theta, ref, cfg) * num_trained
  error = np.linalg.norm(estimate - exact) / np.linalg.norm(exact)
  assert error < 0.02, error


def test_k3_gradient_follows_reverse_kl():
  cfg = dataclasses.replace(BASE, stage="stage2", kl_estimator="k3", beta1=2.0)
  theta, ref = _tables(seed=3)
  exact, num_trained = _exact_gradient(theta, ref, cfg, reverse_kl=True)
  estimate = _estimated_gradient(theta, ref, cfg) * num_trained
  assert np.linalg.norm(estimate - exact) / np.linalg.norm(exact) < 0.02
  forward, _ = _exact_gradient(theta, ref, cfg)
  assert np.linalg.norm(estimate - forward) / np.linalg.norm(forward) > 0.05


def test_shaped_reward_table():
  """The paper (Section 5.2): alpha = 10 gives wrong->right 11,
  right->wrong -10, right->right 1, wrong->wrong 0 for attempt 2; attempt 1
  gets r1."""
  rewards = jnp.asarray([[0, 1], [1, 0], [1, 1], [0, 0]], jnp.float32)
  returns = objectives.shaped_returns(
    rewards, objectives.ObjectiveConfig(stage="stage2", alpha=10.0)
  )
  np.testing.assert_array_equal(np.asarray(returns)[:, 1], [11, -10, 1, 0])
  np.testing.assert_array_equal(np.asarray(returns)[:, 0], [0, 1, 1, 0])
  stage1_cfg = objectives.ObjectiveConfig(stage="stage1", beta1=0.01, beta2=0.1)
  stage1 = objectives.shaped_returns(rewards, stage1_cfg)
  np.testing.assert_array_equal(
    np.asarray(stage1), [[0, 1], [0, 0], [0, 1], [0, 0]]
  )
  betas1, trained1 = objectives.stage_weights(2, stage1_cfg)
  np.testing.assert_allclose(betas1, [0.1, 0.01])
  np.testing.assert_array_equal(trained1, [True, True])


def test_three_attempt_bonus_is_relative_to_previous_attempt():
  rewards = jnp.asarray([[0, 1, 1], [1, 0, 1], [0, 0, 1]], jnp.float32)
  returns = objectives.shaped_returns(
    rewards, objectives.ObjectiveConfig(stage="stage2", alpha=10.0)
  )
  np.testing.assert_array_equal(
    np.asarray(returns), [[0, 11, 1], [1, -10, 11], [0, 0, 11]]
  )
  stage1b_cfg = objectives.ObjectiveConfig(
    stage="stage1", beta1=0.01, beta2=0.1, stage1_target=3
  )
  stage1b = objectives.shaped_returns(rewards, stage1b_cfg)
  np.testing.assert_array_equal(np.asarray(stage1b)[:, :2], 0)
  np.testing.assert_allclose(
    objectives.stage_weights(3, stage1b_cfg)[0], [0.1, 0.1, 0.01]
  )


def test_gamma_credits_later_plain_rewards_in_stage2_only():
  rewards = jnp.asarray([[0, 1, 1], [1, 0, 1], [0, 0, 0]], jnp.float32)
  cfg = objectives.ObjectiveConfig(stage="stage2", alpha=10.0, gamma=0.5)
  returns = objectives.shaped_returns(rewards, cfg)
  # Shaped returns as in the test above, plus 0.5 r_{i+1} + 0.25 r_{i+2}.
  np.testing.assert_allclose(
    np.asarray(returns), [[0.75, 11.5, 1], [1.25, -9.5, 11], [0, 0, 0]]
  )
  stage1 = objectives.shaped_returns(
    rewards, dataclasses.replace(cfg, stage="stage1")
  )
  np.testing.assert_array_equal(np.asarray(stage1)[:, :2], 0)
  with pytest.raises(ValueError, match="gamma=2.0 must be in"):
    objectives.ObjectiveConfig(gamma=2.0)


def test_rloo_hand_computed():
  returns = jnp.asarray(
    [[1.0], [0.0], [0.0], [1.0], [11.0], [0.0], [1.0], [-10.0]]
  )
  got = np.asarray(
    objectives.advantages(returns, samples_per_prompt=4, baseline="rloo")
  )[:, 0]
  # Each sample minus the mean of the other three in its group of four.
  np.testing.assert_allclose(
    got,
    [
      1 - 1 / 3,
      -2 / 3,
      -2 / 3,
      1 - 1 / 3,
      11 - (-9 / 3),
      0 - 2 / 3,
      1 - 1 / 3,
      -10 - 12 / 3,
    ],
    rtol=1e-6,
  )
  with pytest.raises(ValueError, match="samples per prompt"):
    objectives.advantages(returns, samples_per_prompt=3, baseline="rloo")


def test_fixed_normaliser_is_not_length_biased():
  """Under "fixed" a token's weight does not depend on its sequence's length;
  under "sequence_mean" a short sequence's tokens weigh more."""
  roles = np.full((2, 8), -1, np.int32)
  roles[0, :2] = 0  # short attempt
  roles[1, :8] = 0  # long attempt
  episodes = np.repeat(np.arange(2, dtype=np.int32)[:, None], 8, 1)
  rewards = jnp.asarray([[1.0, 0.0], [0.0, 0.0]])
  cfg = objectives.ObjectiveConfig(
    stage="single_turn", beta1=0.0, baseline="batch_mean"
  )

  def token_grads(aggregation):
    c = dataclasses.replace(cfg, aggregation=aggregation)
    adv = objectives.advantages(
      objectives.shaped_returns(rewards, c), 2, c.baseline
    )
    weights = objectives.token_weights(roles, episodes, 2, 2, c, 8)
    f = lambda lp: objectives.policy_loss(
      lp, jnp.zeros_like(lp), roles, episodes, adv, weights, c
    )[0]
    return np.asarray(jax.grad(f)(jnp.zeros((2, 8))))

  fixed = token_grads("fixed")
  assert np.allclose(np.abs(fixed[0, :2]), np.abs(fixed[1, :8]).max())
  per_sequence = token_grads("sequence_mean")
  assert np.abs(per_sequence[0, 0]) > 3 * np.abs(per_sequence[1, 0])


def test_unknown_settings_are_clear_errors():
  with pytest.raises(ValueError, match="kl_estimator='k9' is unknown"):
    objectives.ObjectiveConfig(kl_estimator="k9")
