"""Training objectives on token log-probabilities.

Everything here takes the episode's exact token ids (as the rollout produced
them) and masks; nothing re-tokenizes text.
"""

import jax
import jax.numpy as jnp

from score_jax.models import transformer


def token_log_probs(model: transformer.Transformer, params, tokens_bt,
                    valid_bt):
  """log p(tokens[:, t] | tokens[:, <t]) for t >= 1, as [B, T] (0 at t = 0).

  `valid_bt` marks real tokens; padding anywhere in a row is skipped by the
  attention mask and by the positions, exactly as the sampler sees it.
  """
  logits_btv, _ = model.apply(params, tokens_bt,
                              transformer.positions_from_mask(valid_bt),
                              transformer.causal_mask(valid_bt))
  log_probs_btv = jax.nn.log_softmax(logits_btv[:, :-1], axis=-1)
  picked_bt = jnp.take_along_axis(log_probs_btv, tokens_bt[:, 1:, None],
                                  axis=-1)[..., 0]
  return jnp.pad(picked_bt, ((0, 0), (1, 0)))


def sft_loss(model, params, tokens_bt, valid_bt, loss_mask_bt):
  """Mean negative log-likelihood of the tokens where `loss_mask_bt` is set."""
  log_probs_bt = token_log_probs(model, params, tokens_bt, valid_bt)
  # The first token has no prediction to score.
  weights_bt = loss_mask_bt.astype(jnp.float32).at[:, 0].set(0.0)
  return -jnp.sum(log_probs_bt * weights_bt) / jnp.maximum(weights_bt.sum(), 1)
