"""SCoRe's objectives: shaped per-attempt returns, RLOO advantages, KL
estimators, and the supervised loss (docs/design.md has the equations, with
the paper's sections).

Everything takes the episode's exact token ids and masks (as the rollout
produced them, packed into rows by packing.py); nothing re-tokenizes text.

Credit (the paper's gamma = 0, the default): every token of attempt i is
credited with attempt i's return R_i only. So the policy gradient is that of
  sum_i E_ctx[ E_{y_i ~ pi(.|ctx_i)} R_i
               - beta_i KL(pi(.|ctx_i) || pi_ref(.|ctx_i)) ]
with the distribution of each attempt's context ctx_i (the problem and the
earlier attempts) held fixed. With gamma > 0 (Stage II only) attempt i's
return also holds the later attempts' plain rewards, sum_{j>i} gamma^(j-i)
r_j, so an attempt is credited for what it lets the later ones get right;
the bonus stays with the attempt it shapes (crediting attempt 1 with
-alpha * r_1 through attempt 2's bonus would reward a wrong first attempt).

Returns per stage, attempts i = 1..A:
  stage1: the target attempt (default A) gets r_A with beta1; earlier
          attempts get no reward and the strong beta2 (held near the
          reference).
  stage2: R_1 = r_1; R_i = r_i + alpha * (r_i - r_{i-1}), each plus
          sum_{j>i} gamma^(j-i) r_j; beta1 on all.
  single_turn: attempt 1 gets r_1 with beta1; later attempts are not trained.
KL estimators (delta = log pi - log pi_ref per token):
  k2 (default): 0.5 delta^2 as a loss; its gradient is the gradient of the
      per-token KL(pi || pi_ref) at the sampled prefixes.
  k1_reward: -beta * delta summed to the end of the attempt, inside the
      advantage (score-function path); its gradient is that of the whole
      attempt's KL(pi || pi_ref), the prefix's effect included, with more
      variance.
  k3: exp(-delta) - 1 + delta as a loss (its gradient follows KL(pi_ref || pi)).
  k3_value_k2_grad: the value of k3 with the gradient of k2.

Shape legend (docs/design.md): B episodes, A attempts, G samples per
prompt, R packed rows, T slots of a packed row.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

STAGES = ("stage1", "stage2", "single_turn")
KL_ESTIMATORS = ("k2", "k1_reward", "k3", "k3_value_k2_grad")
AGGREGATIONS = ("fixed", "token_mean", "sequence_mean")
BASELINES = ("rloo", "batch_mean")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """An RL objective (config.objective's fields, and the stage its phase
  sets; docs/design.md has the equations)."""

  stage: str = "stage2"
  alpha: float = 10.0
  beta1: float = 0.01
  beta2: float = 0.1
  # Stage I's rewarded attempt (1-based); 0 means the last one.
  stage1_target: int = 0
  kl_estimator: str = "k2"
  baseline: str = "rloo"
  # "fixed": sum over tokens / (rows * max_attempt_len), not length-biased.
  aggregation: str = "fixed"
  # Stage II credits attempt i with gamma^(j-i) of each later attempt j's
  # plain reward; the paper's is 0.
  gamma: float = 0.0

  def __post_init__(self):
    for name, allowed in (
      ("stage", STAGES),
      ("kl_estimator", KL_ESTIMATORS),
      ("baseline", BASELINES),
      ("aggregation", AGGREGATIONS),
    ):
      if getattr(self, name) not in allowed:
        raise ValueError(
          f"objective {name}={getattr(self, name)!r} is "
          f"unknown; choose one of {allowed}."
        )
    if not 0 <= self.gamma <= 1:
      raise ValueError(
        f"objective gamma={self.gamma} must be in [0, 1] (0 is the paper's)."
      )


def stage_weights(num_attempts: int, cfg: ObjectiveConfig):
  """What each attempt gets of the stage (numpy: the stage decides it alone).

  Args:
    num_attempts: A.
    cfg: the stage and its KL coefficients.

  Returns:
    (each attempt's KL coefficient float [A], whether it is trained bool
    [A]).
  """
  attempts = np.arange(num_attempts)
  if cfg.stage == "stage1":
    target = _stage1_target(num_attempts, cfg)
    return (
      np.where(attempts < target, cfg.beta2, cfg.beta1),
      attempts <= target,
    )
  betas_a = np.full(num_attempts, cfg.beta1)
  if cfg.stage == "stage2":
    return betas_a, np.ones(num_attempts, bool)
  return betas_a, attempts == 0  # single_turn


def _stage1_target(num_attempts: int, cfg: ObjectiveConfig) -> int:
  target = (cfg.stage1_target or num_attempts) - 1
  if not 0 <= target < num_attempts:
    raise ValueError(
      f"stage1_target={cfg.stage1_target} is outside "
      f"attempts 1..{num_attempts}."
    )
  return target


def shaped_returns(rewards_ba, cfg: ObjectiveConfig):
  """Each attempt's return under the stage (the module docstring's table).

  Args:
    rewards_ba: the attempts' rewards [B, A].
    cfg: the stage, alpha and gamma.

  Returns:
    float32 [B, A].
  """
  rewards_ba = jnp.asarray(rewards_ba, jnp.float32)
  n = rewards_ba.shape[1]
  attempts = np.arange(n)
  if cfg.stage == "stage1":
    return jnp.where(attempts == _stage1_target(n, cfg), rewards_ba, 0.0)
  if cfg.stage == "single_turn":
    return jnp.where(attempts == 0, rewards_ba, 0.0)
  previous_ba = jnp.concatenate([rewards_ba[:, :1], rewards_ba[:, :-1]], 1)
  # later_aa[j, i] = gamma^(j - i) for j > i: what attempt j's reward
  # adds to attempt i's return.
  gaps_aa = attempts[:, None] - attempts[None, :]
  later_aa = np.where(gaps_aa > 0, cfg.gamma ** np.maximum(gaps_aa, 1), 0.0)
  return (
    rewards_ba
    + cfg.alpha * (rewards_ba - previous_ba)
    + rewards_ba @ jnp.asarray(later_aa, jnp.float32)
  )


def advantages(returns_ba, samples_per_prompt: int, baseline: str):
  """Returns minus a baseline.

  Args:
    returns_ba: [B, A], rows grouped [prompt 0 x G, prompt 1 x G, ...].
    samples_per_prompt: G.
    baseline: "rloo" subtracts the mean of the other G - 1 samples of the
      same prompt; "batch_mean" the batch's mean (plain REINFORCE).

  Returns:
    The advantages [B, A].
  """
  if baseline == "batch_mean":
    return returns_ba - jnp.mean(returns_ba, axis=0, keepdims=True)
  b, n = returns_ba.shape
  if samples_per_prompt < 2 or b % samples_per_prompt:
    raise ValueError(
      f"the RLOO baseline needs >= 2 samples per prompt and a "
      f"batch of whole groups; got {b} rows, "
      f"{samples_per_prompt} samples per prompt."
    )
  grouped = returns_ba.reshape(b // samples_per_prompt, samples_per_prompt, n)
  others = (grouped.sum(1, keepdims=True) - grouped) / (samples_per_prompt - 1)
  return (grouped - others).reshape(b, n)


def _suffix_sums(x_rt, keys_rt):
  """sum over s' >= s of x within each run of equal keys along a row (an
  attempt's tokens lie together in a packed row)."""
  L = x_rt.shape[1]
  after_rt = jnp.flip(jnp.cumsum(jnp.flip(x_rt, 1), axis=1), 1)  # s' >= s
  ends_rt = jnp.pad(
    keys_rt[:, 1:] != keys_rt[:, :-1], ((0, 0), (0, 1)), constant_values=True
  )
  # The last slot of each slot's run, then what follows that run.
  last_rt = jax.lax.cummin(
    jnp.where(ends_rt, jnp.arange(L), L), axis=1, reverse=True
  )
  following_rt = jnp.pad(after_rt[:, 1:], ((0, 0), (0, 1)))
  return after_rt - jnp.take_along_axis(following_rt, last_rt, axis=1)


def kl_value_and_surrogate(delta_rt, estimator: str):
  """A KL estimator of each token.

  Args:
    delta_rt: log pi - log pi_ref of each token [R, T].
    estimator: one of KL_ESTIMATORS (the module docstring's).

  Returns:
    (its value per token [R, T], a loss whose gradient is the estimator's
    [R, T]).
  """
  k2 = 0.5 * delta_rt**2
  k3 = jnp.exp(-delta_rt) - 1.0 + delta_rt
  if estimator == "k2":
    return k2, k2
  if estimator == "k3":
    return k3, k3
  if estimator == "k3_value_k2_grad":
    mixed = jax.lax.stop_gradient(k3 - k2) + k2
    return mixed, mixed
  # k1_reward: the KL enters through the advantages, not as a loss.
  return delta_rt, jnp.zeros_like(delta_rt)


def trained_tokens(roles_rt, num_attempts: int, cfg: ObjectiveConfig):
  """Which tokens the stage trains: those of its trained attempts.

  Args:
    roles_rt: each token's attempt, -1 for none (episodes.Packed).
    num_attempts: A.
    cfg: the stage.

  Returns:
    bool [R, T].
  """
  _, trained_a = stage_weights(num_attempts, cfg)
  return (roles_rt >= 0) & jnp.asarray(trained_a)[jnp.maximum(roles_rt, 0)]


def token_weights(
  roles_rt,
  episodes_rt,
  num_episodes: int,
  num_attempts: int,
  cfg: ObjectiveConfig,
  max_attempt_len: int,
):
  """Each token's weight in the loss, over the whole batch: a weighted sum
  of per-token losses over every micro-batch is then the batch's loss
  under cfg.aggregation:
    fixed          1 / (B * Y * trained attempts): a token weighs the same
                   in a short and a long attempt;
    token_mean     1 / trained tokens;
    sequence_mean  1 / (B * the episode's trained tokens).

  Args:
    roles_rt: each token's attempt, -1 for none (episodes.Packed).
    episodes_rt: each token's episode, -1 for an empty slot.
    num_episodes: B.
    num_attempts: A.
    cfg: the stage and the aggregation.
    max_attempt_len: Y.

  Returns:
    float32 [R, T], 0 for the tokens not trained.
  """
  trained_rt = trained_tokens(roles_rt, num_attempts, cfg)
  if cfg.aggregation == "fixed":
    _, trained_a = stage_weights(num_attempts, cfg)
    weight_rt = jnp.full(
      roles_rt.shape,
      1.0 / (num_episodes * max_attempt_len * int(np.sum(trained_a))),
    )
  elif cfg.aggregation == "token_mean":
    weight_rt = jnp.full(roles_rt.shape, 1.0) / jnp.maximum(trained_rt.sum(), 1)
  else:  # sequence_mean
    counts_e = jax.ops.segment_sum(
      trained_rt.ravel().astype(jnp.float32),
      jnp.maximum(episodes_rt, 0).ravel(),
      num_segments=num_episodes,
    )
    weight_rt = 1.0 / (
      num_episodes * jnp.maximum(counts_e[jnp.maximum(episodes_rt, 0)], 1.0)
    )
  return jnp.where(trained_rt, weight_rt, 0.0).astype(jnp.float32)


def policy_loss(
  log_probs_rt,
  reference_log_probs_rt,
  roles_rt,
  episodes_rt,
  adv_ba,
  weights_rt,
  cfg: ObjectiveConfig,
):
  """The SCoRe loss over some rows of a batch's tokens (docs/design.md).

  Args:
    log_probs_rt: the policy's log-prob of each token [R, T]; it carries
      the gradient.
    reference_log_probs_rt: the frozen reference's [R, T].
    roles_rt: each token's attempt, -1 for none (episodes.Packed).
    episodes_rt: each token's episode, -1 for an empty slot.
    adv_ba: the whole batch's `advantages(shaped_returns(...))` [B, A] (an
      RLOO group may span micro-batches).
    weights_rt: the whole batch's `token_weights` [R, T].
    cfg: the stage, its KL coefficients and estimator.

  Returns:
    (the loss to minimise, a scalar; the KL estimate summed over each
    episode's attempt [B, A]).
  """
  B, A = adv_ba.shape
  betas_a, _ = stage_weights(A, cfg)
  attempt_rt = jnp.maximum(roles_rt, 0)
  episode_rt = jnp.maximum(episodes_rt, 0)
  delta_rt = log_probs_rt - reference_log_probs_rt
  kl_value_rt, kl_surrogate_rt = kl_value_and_surrogate(
    delta_rt, cfg.kl_estimator
  )
  beta_rt = jnp.asarray(betas_a, jnp.float32)[attempt_rt]
  adv_rt = adv_ba[episode_rt, attempt_rt]
  keys_rt = jnp.where(roles_rt >= 0, episode_rt * A + attempt_rt, -1)
  if cfg.kl_estimator == "k1_reward":
    kl_to_go_rt = _suffix_sums(
      jnp.where(roles_rt >= 0, jax.lax.stop_gradient(delta_rt), 0.0), keys_rt
    )
    adv_rt = adv_rt - beta_rt * kl_to_go_rt
  loss_rt = (
    -jax.lax.stop_gradient(adv_rt) * log_probs_rt + beta_rt * kl_surrogate_rt
  )
  kl_sum_ba = jax.ops.segment_sum(
    jnp.where(roles_rt >= 0, kl_value_rt, 0.0).ravel(),
    jnp.maximum(keys_rt, 0).ravel(),
    num_segments=B * A,
  ).reshape(B, A)
  return jnp.sum(weights_rt * loss_rt), kl_sum_ba


def imitation_weights(roles_rt, positions_rt):
  """Each token's weight in the supervised loss.

  Args:
    roles_rt: >= 0 for a token to imitate (episodes.SFTBatch).
    positions_rt: each token's index in its episode (its first is not
      imitated: nothing predicts it).

  Returns:
    float32 [R, T]: 1 / the whole batch's imitated tokens for each of them,
    0 for the others.
  """
  imitated_rt = (roles_rt >= 0) & (positions_rt > 0)
  return (imitated_rt / jnp.maximum(imitated_rt.sum(), 1)).astype(jnp.float32)


def sft_loss(log_probs_rt, weights_rt):
  """The negative log-likelihood of the imitated tokens, weighted.

  Args:
    log_probs_rt: the policy's log-prob of each token [R, T].
    weights_rt: `imitation_weights` (its mean over the whole batch).

  Returns:
    A scalar.
  """
  return -jnp.sum(weights_rt * log_probs_rt)
