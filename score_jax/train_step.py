"""TrainState, the optimizer, and the one jitted train step.

The step takes the train state, the frozen reference params and a batch of
episodes, accumulates gradients over micro-batches with `lax.scan`, skips the
update when the loss, the gradient, the new params or the new optimizer state
is not finite or the update is absurdly large, and applies Optax. The
objective is a parameter: a SCoRe stage (objectives.policy_loss) or the
supervised loss (objectives.sft_loss) for warm starts and SFT baselines, so
there is one step and one loop for all of them.

The batch is an `RLBatch` or an `SFTBatch` (field suffixes give the shape:
B episodes, S slots, N attempts), batch first and sharded over it.
"""

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from score_jax import objectives
from score_jax import rollout as rollout_lib
from score_jax import sharding as sharding_lib
from score_jax.models import transformer


@dataclasses.dataclass(frozen=True)
class RLBatch:
  """The rollout's episodes, as it left them on the devices, and their
  rewards (rows grouped as [prompt0 x K, prompt1 x K, ...])."""
  episode: rollout_lib.Episode
  rewards_bn: jax.Array  # float32

  @property
  def valid_bs(self) -> jax.Array:
    return self.episode.valid_bs


@dataclasses.dataclass(frozen=True)
class SFTBatch:
  """Supervised episodes in the rollout's layout."""
  tokens_bs: jax.Array     # int32
  valid_bs: jax.Array      # bool
  loss_mask_bs: jax.Array  # bool: the tokens to imitate


for _cls in (RLBatch, SFTBatch):
  jax.tree_util.register_dataclass(
      _cls, data_fields=[f.name for f in dataclasses.fields(_cls)],
      meta_fields=[])


@dataclasses.dataclass(frozen=True)
class TrainState:
  step: jax.Array       # int32 scalar
  params: Any
  opt_state: Any
  rng: jax.Array        # raw PRNG key data (uint32), so Orbax can save it


jax.tree_util.register_dataclass(
    TrainState, data_fields=["step", "params", "opt_state", "rng"],
    meta_fields=[])


def _init_fn(model: transformer.Transformer, optimizer):
  def init(rng, params):
    if params is None:
      params = model.init(rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params),
                      rng=jax.random.key_data(jax.random.fold_in(rng, 1)))
  return init


def abstract_state(model: transformer.Transformer, optimizer,
                   param_shardings, seed: int = 0, params=None) -> TrainState:
  """The TrainState's shapes and dtypes, traced, never allocated, with its
  shardings: params by the rules, the optimizer's per-param state like its
  param, scalars replicated."""
  mesh = jax.tree.leaves(param_shardings)[0].mesh
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  shapes = jax.eval_shape(_init_fn(model, optimizer), jax.random.key(seed),
                          params)
  shardings = TrainState(
      step=replicated, params=param_shardings,
      opt_state=optax.tree_map_params(
          optimizer, lambda _, sharding: sharding, shapes.opt_state,
          param_shardings, transform_non_params=lambda _: replicated),
      rng=replicated)
  return sharding_lib.abstract(shapes, shardings)


def init_state(model: transformer.Transformer, optimizer, param_shardings,
               seed: int, params: Optional[Any] = None):
  """A fresh TrainState created already sharded (`abstract_state`), its
  params random or the given `params` (e.g. loaded weights). Returns (state,
  its shardings)."""
  shardings = jax.tree.map(
      lambda x: x.sharding,
      abstract_state(model, optimizer, param_shardings, seed, params))
  return jax.jit(_init_fn(model, optimizer), out_shardings=shardings)(
      jax.random.key(seed), params), shardings


def make_optimizer(cfg, total_steps: int, sft_steps: int = 0,
                   sft_learning_rate: float = 0.0):
  """Adam or AdamW with global-norm clipping. The learning rate: over the
  first `sft_steps` (a supervised warm start) a warmup to `sft_learning_rate`
  and a cosine decay; then a linear warmup to cfg.learning_rate and a
  constant or cosine schedule. Returns (optimizer, learning-rate schedule)."""
  if cfg.name not in ("adam", "adamw"):
    raise ValueError(f"config.optimizer.name={cfg.name!r}; use adam or adamw.")
  if cfg.schedule not in ("constant", "cosine"):
    raise ValueError(f"config.optimizer.schedule={cfg.schedule!r}; use "
                     "constant or cosine.")
  rl_steps = max(total_steps - sft_steps, 1)
  warmup = min(cfg.warmup_steps, rl_steps)
  rl = optax.join_schedules([
      optax.linear_schedule(0.0, cfg.learning_rate, max(warmup, 1)),
      optax.constant_schedule(cfg.learning_rate)
      if cfg.schedule == "constant" else
      optax.cosine_decay_schedule(cfg.learning_rate, max(rl_steps - warmup, 1))
  ], [warmup])
  lr_schedule = rl
  if sft_steps:
    sft = optax.warmup_cosine_decay_schedule(
        0.0, sft_learning_rate, min(100, sft_steps // 10 + 1), sft_steps,
        end_value=0.1 * sft_learning_rate)
    lr_schedule = optax.join_schedules([sft, rl], [sft_steps])
  if cfg.name == "adam":
    base = optax.adam(lr_schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
  else:
    base = optax.adamw(lr_schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                       weight_decay=cfg.weight_decay)
  return (optax.chain(optax.clip_by_global_norm(cfg.grad_clip), base),
          lr_schedule)


def _rl_loss(model, objective, max_attempt_len, first):
  def loss_fn(params, reference_log_probs, mb: RLBatch, adv_bn):
    episode = mb.episode
    log_probs, entropy = model.token_log_probs(params, episode.tokens_bs,
                                               episode.valid_bs, first)
    mask_bns = episode.attempt_mask_bns
    loss, aux = objectives.policy_loss(log_probs, reference_log_probs, mask_bns,
                                       adv_bn, objective, max_attempt_len)
    any_attempt = jnp.any(mask_bns, 1)
    count = jnp.maximum(any_attempt.sum(), 1)
    per_attempt = lambda x_bs: jnp.sum(
        jnp.where(mask_bns, x_bs[:, None], 0.0), (0, 2)) / jnp.maximum(
            mask_bns.sum((0, 2)), 1)
    aux = dict(aux,
               entropy_per_attempt=per_attempt(entropy),
               logprob_drift=jnp.sum(jnp.where(
                   any_attempt, jnp.abs(log_probs - episode.log_probs_bs),
                   0.0)) / count)
    return loss, aux
  return loss_fn


def _sft_loss(model):
  def loss_fn(params, reference_log_probs, mb: SFTBatch, adv_bn):
    del reference_log_probs, adv_bn
    return objectives.sft_loss(model, params, mb.tokens_bs, mb.valid_bs,
                               mb.loss_mask_bs), {}
  return loss_fn


def make_train_step(model: transformer.Transformer, optimizer, lr_schedule,
                    objective: Optional[objectives.ObjectiveConfig],
                    num_micro_batches: int, samples_per_prompt: int,
                    rollout_cfg: rollout_lib.RolloutConfig,
                    instruction_len: int, max_update_ratio: float = 1.0):
  """`step(state, reference, batch) -> (state, metrics)`; objective None is
  supervised. An update is refused (metrics["skipped"] = 1, the state kept
  but for its step) unless everything it produces is finite and its norm is
  at most `max_update_ratio` times the params' norm. `reference` holds the
  frozen params in the compute dtype (Transformer.compute_params). Jit it
  with `jit_train_step`.

  Micro-batch m takes rows m, m + M, ... (as the rollout splits), so each
  stays spread over every device; the advantages are computed over the
  whole batch first, since an RLOO group may span micro-batches. The
  reference's log-probs are computed outside the differentiated function,
  so none of its activations are kept; both forward passes score only the
  attempts (slots from the prompt's last token on).
  """
  M = num_micro_batches

  def step(state: TrainState, reference, batch: RLBatch | SFTBatch):
    rows, slots = batch.valid_bs.shape
    if rows % M:
      raise ValueError(f"{rows} episodes do not split into {M} "
                       "micro-batches.")
    metrics = {}
    first = 0
    adv_bn = None
    if objective is not None:
      returns_bn = objectives.shaped_returns(batch.rewards_bn, objective)
      adv_bn = objectives.advantages(returns_bn, samples_per_prompt,
                                     objective.baseline)
      metrics.update(return_per_attempt=jnp.mean(returns_bn, 0),
                     advantage_abs_mean=jnp.mean(jnp.abs(adv_bn)))
      first = rollout_lib.prompt_len(slots, instruction_len, rollout_cfg) - 1
    grad_fn = jax.value_and_grad(
        _sft_loss(model) if objective is None else
        _rl_loss(model, objective, rollout_cfg.max_attempt_len, first),
        has_aux=True)
    # Row r goes to micro-batch r % M: [rows, ...] -> [M, rows / M, ...].
    micro = jax.tree.map(
        lambda x: model.shard(
            jnp.swapaxes(x.reshape(rows // M, M, *x.shape[1:]), 0, 1),
            (None, "activation_batch") + (None,) * (x.ndim - 1)),
        (batch, adv_bn))

    def accumulate(grads_sum, micro_batch):
      mb, adv_mb = micro_batch
      reference_log_probs = None
      if objective is not None:
        reference_log_probs, _ = model.token_log_probs(
            reference, mb.episode.tokens_bs, mb.episode.valid_bs, first)
      (loss, aux), grads = grad_fn(state.params, reference_log_probs, mb,
                                   adv_mb)
      return jax.tree.map(jnp.add, grads_sum, grads), (loss, aux)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads, (losses, auxes) = jax.lax.scan(accumulate, zeros, micro)
    grads = jax.tree.map(lambda g: g / M, grads)
    loss = jnp.mean(losses)
    grad_norm = optax.tree.norm(grads)

    with jax.named_scope("optimizer"):
      updates, new_opt_state = optimizer.update(grads, state.opt_state,
                                                state.params)
      new_params = optax.apply_updates(state.params, updates)
    update_ratio = optax.tree.norm(updates) / optax.tree.norm(state.params)
    # A finite loss and gradient can still give a NaN optimizer state or
    # an update of 1e29 (a learning rate of 1e30): both would be saved.
    good = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            & _all_finite(new_params) & _all_finite(new_opt_state)
            & (update_ratio <= max_update_ratio))
    keep = lambda new, old: jax.tree.map(
        lambda n, o: jnp.where(good, n, o), new, old)
    metrics.update(jax.tree.map(lambda x: jnp.mean(x, 0), auxes),
                   loss=loss, grad_norm=grad_norm, update_ratio=update_ratio,
                   learning_rate=lr_schedule(state.step),
                   skipped=(~good).astype(jnp.int32))
    new_state = TrainState(
        step=state.step + 1,
        params=keep(new_params, state.params),
        opt_state=keep(new_opt_state, state.opt_state),
        rng=state.rng)
    return new_state, metrics

  return step


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def jit_train_step(step_fn, state_shardings, param_shardings, batch_sharding):
  """One compiled step with explicit shardings; the state is donated. The
  reference (compute dtype) is laid out like the params."""
  replicated = jax.sharding.NamedSharding(
      batch_sharding.mesh, jax.sharding.PartitionSpec())
  return jax.jit(step_fn,
                 in_shardings=(state_shardings, param_shardings,
                               batch_sharding),
                 out_shardings=(state_shardings, replicated),
                 donate_argnums=0)
