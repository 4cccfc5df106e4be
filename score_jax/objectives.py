"""SCoRe objectives: shaped per-attempt returns, RLOO advantages, KL estimators.

Everything takes the episode's exact token ids and masks (as the rollout
produced them); nothing re-tokenizes text.

Credit (PAPER.md's gamma = 0, the default): every token of attempt i is
credited with attempt i's return R_i only. So the policy gradient is that of
  sum_i E_ctx[ E_{y_i ~ pi(.|ctx_i)} R_i - beta_i KL(pi(.|ctx_i) || pi_ref(.|ctx_i)) ]
with the distribution of each attempt's context ctx_i (the problem and the
earlier attempts) held fixed. With gamma > 0 (Stage II only) attempt i's
return also holds the later attempts' plain rewards, sum_{j>i} gamma^(j-i)
r_j, so an attempt is credited for what it lets the later ones get right;
the bonus stays with the attempt it shapes (crediting attempt 1 with
-alpha * r_1 through attempt 2's bonus would reward a wrong first attempt).

Returns per stage (PAPER.md), attempts i = 1..N:
  stage1: the target attempt (default N) gets r_N with beta1; earlier attempts
          get no reward and the strong beta2 (held near the reference).
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
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from score_jax.models import transformer

STAGES = ("stage1", "stage2", "single_turn")
KL_ESTIMATORS = ("k2", "k1_reward", "k3", "k3_value_k2_grad")
AGGREGATIONS = ("fixed", "token_mean", "sequence_mean")
BASELINES = ("rloo", "batch_mean")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
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
    for name, allowed in (("stage", STAGES), ("kl_estimator", KL_ESTIMATORS),
                          ("baseline", BASELINES),
                          ("aggregation", AGGREGATIONS)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"objective {name}={getattr(self, name)!r} is "
                         f"unknown; choose one of {allowed}.")
    if not 0 <= self.gamma <= 1:
      raise ValueError(f"objective gamma={self.gamma} must be in [0, 1] "
                       "(0 is the paper's).")


def stage_weights(num_attempts: int, cfg: ObjectiveConfig):
  """Per-attempt KL coefficients [N] and whether each attempt is trained [N]
  (numpy: they depend on the stage alone)."""
  attempts = np.arange(num_attempts)
  if cfg.stage == "stage1":
    target = _stage1_target(num_attempts, cfg)
    return (np.where(attempts < target, cfg.beta2, cfg.beta1),
            attempts <= target)
  betas_n = np.full(num_attempts, cfg.beta1)
  if cfg.stage == "stage2":
    return betas_n, np.ones(num_attempts, bool)
  return betas_n, attempts == 0  # single_turn


def _stage1_target(num_attempts: int, cfg: ObjectiveConfig) -> int:
  target = (cfg.stage1_target or num_attempts) - 1
  if not 0 <= target < num_attempts:
    raise ValueError(f"stage1_target={cfg.stage1_target} is outside "
                     f"attempts 1..{num_attempts}.")
  return target


def shaped_returns(rewards_bn, cfg: ObjectiveConfig):
  """Per-attempt returns [B, N] of the stage (see the module docstring)."""
  rewards_bn = jnp.asarray(rewards_bn, jnp.float32)
  n = rewards_bn.shape[1]
  attempts = np.arange(n)
  if cfg.stage == "stage1":
    return jnp.where(attempts == _stage1_target(n, cfg), rewards_bn, 0.0)
  if cfg.stage == "single_turn":
    return jnp.where(attempts == 0, rewards_bn, 0.0)
  previous_bn = jnp.concatenate([rewards_bn[:, :1], rewards_bn[:, :-1]], 1)
  # later_nn[j, i] = gamma^(j - i) for j > i: what attempt j's reward
  # adds to attempt i's return.
  gaps_nn = attempts[:, None] - attempts[None, :]
  later_nn = np.where(gaps_nn > 0, cfg.gamma ** np.maximum(gaps_nn, 1), 0.0)
  return (rewards_bn + cfg.alpha * (rewards_bn - previous_bn)
          + rewards_bn @ jnp.asarray(later_nn, jnp.float32))


def advantages(returns_bn, samples_per_prompt: int, baseline: str):
  """Returns minus a baseline. Rows are grouped as [prompt0 x K, prompt1 x K,
  ...]: "rloo" subtracts the mean of the other K - 1 samples of the same
  prompt; "batch_mean" subtracts the batch mean (plain REINFORCE)."""
  if baseline == "batch_mean":
    return returns_bn - jnp.mean(returns_bn, axis=0, keepdims=True)
  b, n = returns_bn.shape
  if samples_per_prompt < 2 or b % samples_per_prompt:
    raise ValueError(f"the RLOO baseline needs >= 2 samples per prompt and a "
                     f"batch of whole groups; got {b} rows, "
                     f"{samples_per_prompt} samples per prompt.")
  grouped = returns_bn.reshape(b // samples_per_prompt, samples_per_prompt, n)
  others = (grouped.sum(1, keepdims=True) - grouped) / (samples_per_prompt - 1)
  return (grouped - others).reshape(b, n)


def _suffix_sum(x_bs, mask_bs):
  """sum over s' >= s within the mask (the attempt), per row."""
  x_bs = jnp.where(mask_bs, x_bs, 0.0)
  return jnp.flip(jnp.cumsum(jnp.flip(x_bs, 1), axis=1), 1)


def kl_value_and_surrogate(delta_bs, estimator: str):
  """(value per token, a loss whose gradient is the estimator's)."""
  k2 = 0.5 * delta_bs ** 2
  k3 = jnp.exp(-delta_bs) - 1.0 + delta_bs
  if estimator == "k2":
    return k2, k2
  if estimator == "k3":
    return k3, k3
  if estimator == "k3_value_k2_grad":
    mixed = jax.lax.stop_gradient(k3 - k2) + k2
    return mixed, mixed
  # k1_reward: the KL enters through the advantages, not as a loss.
  return delta_bs, jnp.zeros_like(delta_bs)


def policy_loss(log_probs_bs, reference_log_probs_bs, attempt_mask_bns, adv_bn,
                cfg: ObjectiveConfig, max_attempt_len: int):
  """The SCoRe loss to minimise, and per-attempt diagnostics.

  log_probs_bs carries the gradient; reference_log_probs_bs is the frozen
  reference; adv_bn are `advantages(shaped_returns(...))`, computed over the
  whole batch (an RLOO group may span micro-batches).
  """
  mask_bns = attempt_mask_bns.astype(bool)
  betas_n, trained_n = stage_weights(mask_bns.shape[1], cfg)
  delta_bs = log_probs_bs - reference_log_probs_bs
  kl_value_bs, kl_surrogate_bs = kl_value_and_surrogate(delta_bs,
                                                         cfg.kl_estimator)

  num_rows = log_probs_bs.shape[0]
  per_token_bs = jnp.zeros_like(log_probs_bs)
  kl_per_attempt = []
  for i in range(mask_bns.shape[1]):
    mask_bs = mask_bns[:, i] & trained_n[i]
    token_adv_bs = jnp.broadcast_to(adv_bn[:, i:i + 1], log_probs_bs.shape)
    if cfg.kl_estimator == "k1_reward":
      kl_to_go_bs = _suffix_sum(jax.lax.stop_gradient(delta_bs), mask_bs)
      token_adv_bs = token_adv_bs - betas_n[i] * kl_to_go_bs
    loss_bs = (-jax.lax.stop_gradient(token_adv_bs) * log_probs_bs
               + betas_n[i] * kl_surrogate_bs)
    per_token_bs = per_token_bs + jnp.where(mask_bs, loss_bs, 0.0)
    tokens_b = jnp.maximum(mask_bns[:, i].sum(1), 1)
    kl_per_attempt.append(jnp.mean(
        jnp.sum(jnp.where(mask_bns[:, i], kl_value_bs, 0.0), 1) / tokens_b))

  trained_bs = jnp.any(mask_bns & trained_n[None, :, None], axis=1)
  if cfg.aggregation == "fixed":
    normaliser = num_rows * max_attempt_len * int(np.sum(trained_n))
    loss = jnp.sum(per_token_bs) / normaliser
  elif cfg.aggregation == "token_mean":
    loss = jnp.sum(per_token_bs) / jnp.maximum(trained_bs.sum(), 1)
  else:  # sequence_mean
    loss = jnp.mean(jnp.sum(per_token_bs, 1)
                    / jnp.maximum(trained_bs.sum(1), 1))
  return loss, {"kl_per_attempt": jnp.stack(kl_per_attempt)}


def sft_loss(model: transformer.Transformer, params, tokens_bt, valid_bt,
             loss_mask_bt):
  """Mean negative log-likelihood of the tokens where `loss_mask_bt` is set."""
  log_probs_bt, _ = model.token_log_probs(params, tokens_bt, valid_bt)
  # The first token has no prediction to score.
  weights_bt = loss_mask_bt.astype(jnp.float32).at[:, 0].set(0.0)
  return -jnp.sum(log_probs_bt * weights_bt) / jnp.maximum(weights_bt.sum(), 1)
