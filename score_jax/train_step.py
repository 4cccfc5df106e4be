"""TrainState, the optimizer, the reference's scoring and the one jitted
train step.

The step takes the train state and a batch of episodes packed into rows
(packing.py), accumulates gradients over the micro-batches that hold any episode
(a `lax.fori_loop` as long as `episodes.Packed.num_micro_batches`), skips the
update when the loss, the gradient, the new params or the new optimizer state is
not finite or the update is absurdly large, and applies Optax. The objective is
a parameter: a SCoRe stage (objectives.policy_loss) or the supervised loss
(objectives.sft_loss) for warm starts and SFT baselines, so there is one step
and one loop for all of them. The frozen reference's log-probs come from their
own program (`make_reference_fn`), which needs no rewards, so the devices run it
while the host grades.

Shape legend (docs/design.md): R packed rows, T slots of a packed row, B
episodes, A attempts, M micro-batches.
"""

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from score_jax import episodes as episodes_lib
from score_jax import objectives
from score_jax import sharding as sharding_lib
from score_jax.models import transformer


@dataclasses.dataclass(frozen=True)
class TrainState:
  """What training carries from step to step (or, in the same structure,
  its shapes or its shardings).

  Attributes:
    step: int32 scalar, the steps taken.
    params: the policy's params (float32 master weights).
    opt_state: the optimizer's state.
    rng: raw PRNG key data (uint32), so that Orbax can save it.
  """

  step: Any
  params: Any
  opt_state: Any
  rng: Any


jax.tree_util.register_dataclass(
  TrainState, data_fields=["step", "params", "opt_state", "rng"], meta_fields=[]
)


def _init_fn(model: transformer.Transformer, optimizer):
  def init(rng, params):
    if params is None:
      params = model.init(rng)
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=optimizer.init(params),
      rng=jax.random.key_data(jax.random.fold_in(rng, 1)),
    )

  return init


def abstract_state(
  model: transformer.Transformer,
  optimizer,
  param_shardings,
  seed: int = 0,
  params=None,
) -> TrainState:
  """The TrainState's shapes and dtypes, traced, never allocated, with its
  shardings: params by the rules, the optimizer's per-param state like its
  param, scalars replicated.

  Args:
    model: the decoder whose params are trained.
    optimizer: the optax.GradientTransformation (`make_optimizer`).
    param_shardings: the params' NamedShardings.
    seed: the random init's seed (the shapes do not depend on it).
    params: given params to start from (None: the random init's).

  Returns:
    A TrainState of jax.ShapeDtypeStruct with shardings.
  """
  mesh = jax.tree.leaves(param_shardings)[0].mesh
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  shapes = jax.eval_shape(
    _init_fn(model, optimizer), jax.random.key(seed), params
  )
  shardings = TrainState(
    step=replicated,
    params=param_shardings,
    opt_state=optax.tree_map_params(
      optimizer,
      lambda _, sharding: sharding,
      shapes.opt_state,
      param_shardings,
      transform_non_params=lambda _: replicated,
    ),
    rng=replicated,
  )
  return sharding_lib.abstract(shapes, shardings)


def init_state(
  model: transformer.Transformer,
  optimizer,
  param_shardings,
  seed: int,
  params: Optional[Any] = None,
):
  """A fresh TrainState created already sharded (`abstract_state`).

  Args:
    model: the decoder whose params are trained.
    optimizer: the optax.GradientTransformation (`make_optimizer`).
    param_shardings: the params' NamedShardings.
    seed: keys the random init and the state's rng.
    params: the params to start from, e.g. loaded weights (None: the
      random init of `seed`).

  Returns:
    (the state at step 0, a TrainState of its shardings).
  """
  shardings = jax.tree.map(
    lambda x: x.sharding,
    abstract_state(model, optimizer, param_shardings, seed, params),
  )
  return jax.jit(_init_fn(model, optimizer), out_shardings=shardings)(
    jax.random.key(seed), params
  ), shardings


def make_optimizer(
  cfg, total_steps: int, sft_steps: int = 0, sft_learning_rate: float = 0.0
):
  """Adam or AdamW with global-norm clipping. The learning rate: over the
  first `sft_steps` (a supervised warm start) a warmup to `sft_learning_rate`
  and a cosine decay; then a linear warmup to cfg.learning_rate and a
  constant or cosine schedule.

  Args:
    cfg: config.optimizer (name, schedule, learning_rate, warmup_steps,
      b1, b2, eps, weight_decay, grad_clip).
    total_steps: the steps of all phases.
    sft_steps: the supervised warm start's steps, first (0: none).
    sft_learning_rate: the warm start's peak learning rate.

  Returns:
    (the optax.GradientTransformation, step -> learning rate).

  Raises:
    ValueError: cfg.name or cfg.schedule is unknown.
  """
  if cfg.name not in ("adam", "adamw"):
    raise ValueError(f"config.optimizer.name={cfg.name!r}; use adam or adamw.")
  if cfg.schedule not in ("constant", "cosine"):
    raise ValueError(
      f"config.optimizer.schedule={cfg.schedule!r}; use constant or cosine."
    )
  rl_steps = max(total_steps - sft_steps, 1)
  warmup = min(cfg.warmup_steps, rl_steps)
  rl = optax.join_schedules(
    [
      optax.linear_schedule(0.0, cfg.learning_rate, max(warmup, 1)),
      optax.constant_schedule(cfg.learning_rate)
      if cfg.schedule == "constant"
      else optax.cosine_decay_schedule(
        cfg.learning_rate, max(rl_steps - warmup, 1)
      ),
    ],
    [warmup],
  )
  lr_schedule = rl
  if sft_steps:
    sft = optax.warmup_cosine_decay_schedule(
      0.0,
      sft_learning_rate,
      min(100, sft_steps // 10 + 1),
      sft_steps,
      end_value=0.1 * sft_learning_rate,
    )
    lr_schedule = optax.join_schedules([sft, rl], [sft_steps])
  if cfg.name == "adam":
    base = optax.adam(lr_schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
  else:
    base = optax.adamw(
      lr_schedule,
      b1=cfg.b1,
      b2=cfg.b2,
      eps=cfg.eps,
      weight_decay=cfg.weight_decay,
    )
  return (
    optax.chain(optax.clip_by_global_norm(cfg.grad_clip), base),
    lr_schedule,
  )


def _over_micro_batches(num_used, body, carry):
  """carry = body(m, carry) for the micro-batches m < num_used in use (a
  loop whose length the data decides, named for --mode=aot's costs)."""
  with jax.named_scope("micro_batches"):
    return jax.lax.fori_loop(0, num_used, body, carry)


def make_reference_fn(model: transformer.Transformer, num_micro_batches: int):
  """The frozen reference's scoring of a packed batch, micro-batch by
  micro-batch as the train step splits them, only those in use.

  Args:
    model: the decoder.
    num_micro_batches: M, the train step's.

  Returns:
    `fn(reference, packed) -> log-probs float32 [R, T]`: the reference's
    log-prob of every token of `packed` (0 where `token_log_probs` gives 0
    and in the micro-batches not in use); `reference` holds the params in
    the compute dtype (Transformer.compute_params).
  """

  def fn(reference, packed: episodes_lib.Packed):
    rows = episodes_lib.split_micro_batches(
      (packed.tokens_rt, packed.positions_rt, packed.episodes_rt),
      num_micro_batches,
      model.shard,
    )
    tokens_mrt = rows[0]

    def body(m, out_mrt):
      log_probs_rt, _ = model.token_log_probs(reference, *(x[m] for x in rows))
      return jax.lax.dynamic_update_index_in_dim(out_mrt, log_probs_rt, m, 0)

    out_mrt = _over_micro_batches(
      packed.num_micro_batches, body, jnp.zeros(tokens_mrt.shape, jnp.float32)
    )
    return episodes_lib.merge_micro_batches(out_mrt)

  return fn


def make_gradient_fn(
  model: transformer.Transformer,
  objective: Optional[objectives.ObjectiveConfig],
  num_micro_batches: int,
  samples_per_prompt: int,
  max_attempt_len: int,
):
  """The loss of a batch and its gradient, accumulated over the
  micro-batches in use.

  The advantages and each token's weight in the loss are computed over the
  whole batch first (an RLOO group may span micro-batches, and a token
  weighs what it weighs in the batch's loss), so the gradients of the
  micro-batches add up to the batch's. Micro-batch m takes rows m, m + M,
  ... (packing.plan fills them in that order).

  Args:
    model: the decoder.
    objective: the SCoRe objective of an `RLBatch` (None: the supervised
      loss of an `SFTBatch`).
    num_micro_batches: M.
    samples_per_prompt: G, the episodes of an RLOO group.
    max_attempt_len: Y, the attempt budget (objectives.token_weights).

  Returns:
    `fn(params, batch) -> (loss, grads, metrics)`: the loss summed over
    the micro-batches, the gradient like `params`, and (for an `RLBatch`)
    per-attempt returns, KL, entropy, the advantages' mean magnitude and
    the log-prob drift from the sampler.
  """

  def fn(params, batch: episodes_lib.RLBatch | episodes_lib.SFTBatch):
    packed = batch.packed
    roles_rt, episodes_rt = packed.roles_rt, packed.episodes_rt
    metrics = {}
    rows = dict(
      tokens=packed.tokens_rt,
      positions=packed.positions_rt,
      episodes=episodes_rt,
      roles=roles_rt,
    )
    if objective is None:
      rows["weights"] = objectives.imitation_weights(
        roles_rt, packed.positions_rt
      )
      adv_ba = None
    else:
      assert isinstance(batch, episodes_lib.RLBatch), type(batch)
      B, A = batch.rewards_ba.shape
      returns_ba = objectives.shaped_returns(batch.rewards_ba, objective)
      adv_ba = objectives.advantages(
        returns_ba, samples_per_prompt, objective.baseline
      )
      metrics.update(
        return_per_attempt=jnp.mean(returns_ba, 0),
        advantage_abs_mean=jnp.mean(jnp.abs(adv_ba)),
      )
      rows.update(
        weights=objectives.token_weights(
          roles_rt, episodes_rt, B, A, objective, max_attempt_len
        ),
        reference_log_probs=batch.reference_log_probs_rt,
        sampler_log_probs=packed.sampler_log_probs_rt,
      )
      keys_rt = jnp.where(roles_rt >= 0, episodes_rt * A + roles_rt, B * A)
      tokens_ba = jax.ops.segment_sum(
        jnp.ones(keys_rt.size), keys_rt.ravel(), num_segments=B * A + 1
      )[:-1].reshape(B, A)
    micro = episodes_lib.split_micro_batches(
      rows, num_micro_batches, model.shard
    )

    def loss_fn(params, mb):
      log_probs_rt, entropy_rt = model.token_log_probs(
        params, mb["tokens"], mb["positions"], mb["episodes"]
      )
      if objective is None:
        return objectives.sft_loss(log_probs_rt, mb["weights"]), {}
      loss, kl_sum_ba = objectives.policy_loss(
        log_probs_rt,
        mb["reference_log_probs"],
        mb["roles"],
        mb["episodes"],
        adv_ba,
        mb["weights"],
        objective,
      )
      attempt_rt = mb["roles"] >= 0
      attempts_rta = mb["roles"][..., None] == jnp.arange(A)
      return loss, dict(
        kl_sum_ba=kl_sum_ba,
        entropy_sum_a=jnp.sum(
          jnp.where(attempts_rta, entropy_rt[..., None], 0.0), (0, 1)
        ),
        drift_sum=jnp.sum(
          jnp.where(
            attempt_rt, jnp.abs(log_probs_rt - mb["sampler_log_probs"]), 0.0
          )
        ),
      )

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def body(m, carry):
      grads_sum, loss_sum, aux_sum = carry
      (loss, aux), grads = grad_fn(params, jax.tree.map(lambda x: x[m], micro))
      return (
        jax.tree.map(jnp.add, grads_sum, grads),
        loss_sum + loss,
        jax.tree.map(jnp.add, aux_sum, aux),
      )

    zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
    loss_and_aux = jax.eval_shape(
      lambda: loss_fn(params, jax.tree.map(lambda x: x[0], micro))
    )
    grads, loss, aux = _over_micro_batches(
      packed.num_micro_batches, body, (zeros(params), *zeros(loss_and_aux))
    )
    if objective is not None:
      attempt_tokens_a = tokens_ba.sum(0)
      metrics.update(
        kl_per_attempt=jnp.mean(
          aux["kl_sum_ba"] / jnp.maximum(tokens_ba, 1), 0
        ),
        entropy_per_attempt=aux["entropy_sum_a"]
        / jnp.maximum(attempt_tokens_a, 1),
        logprob_drift=aux["drift_sum"] / jnp.maximum(attempt_tokens_a.sum(), 1),
      )
    return loss, grads, metrics

  return fn


def make_train_step(
  model: transformer.Transformer,
  optimizer,
  lr_schedule,
  objective: Optional[objectives.ObjectiveConfig],
  num_micro_batches: int,
  samples_per_prompt: int,
  max_attempt_len: int,
  max_update_ratio: float = 1.0,
):
  """One train step: `make_gradient_fn`'s gradient, then Optax. An update
  is refused (metrics["skipped"] = 1, the state kept but for its step)
  unless everything it produces is finite and its norm is at most
  `max_update_ratio` times the params' norm. Jit it with `jit_train_step`.

  Args:
    model: the decoder.
    optimizer: the optax.GradientTransformation (`make_optimizer`).
    lr_schedule: step -> learning rate, for the metrics.
    objective: the SCoRe objective of an `RLBatch` (None: the supervised
      loss of an `SFTBatch`).
    num_micro_batches: M.
    samples_per_prompt: G, the episodes of an RLOO group.
    max_attempt_len: Y, the attempt budget.
    max_update_ratio: the largest update norm, relative to the params'.

  Returns:
    `step(state, batch) -> (state, metrics)`, the state's step advanced
    by one whether or not the update was applied.
  """
  gradient_fn = make_gradient_fn(
    model, objective, num_micro_batches, samples_per_prompt, max_attempt_len
  )

  def step(
    state: TrainState, batch: episodes_lib.RLBatch | episodes_lib.SFTBatch
  ):
    loss, grads, metrics = gradient_fn(state.params, batch)
    grad_norm = optax.tree.norm(grads)

    with jax.named_scope("optimizer"):
      updates, new_opt_state = optimizer.update(
        grads, state.opt_state, state.params
      )
      new_params = optax.apply_updates(state.params, updates)
    update_ratio = optax.tree.norm(updates) / optax.tree.norm(state.params)
    # A finite loss and gradient can still give a NaN optimizer state or
    # an update of 1e29 (a learning rate of 1e30): both would be saved.
    good = (
      jnp.isfinite(loss)
      & jnp.isfinite(grad_norm)
      & _all_finite(new_params)
      & _all_finite(new_opt_state)
      & (update_ratio <= max_update_ratio)
    )
    keep = lambda new, old: jax.tree.map(
      lambda n, o: jnp.where(good, n, o), new, old
    )
    metrics.update(
      loss=loss,
      grad_norm=grad_norm,
      update_ratio=update_ratio,
      learning_rate=lr_schedule(state.step),
      skipped=(~good).astype(jnp.int32),
    )
    new_state = TrainState(
      step=state.step + 1,
      params=keep(new_params, state.params),
      opt_state=keep(new_opt_state, state.opt_state),
      rng=state.rng,
    )
    return new_state, metrics

  return step


def _all_finite(tree) -> jax.Array:
  leaves = [
    jnp.all(jnp.isfinite(x))
    for x in jax.tree.leaves(tree)
    if jnp.issubdtype(x.dtype, jnp.inexact)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def jit_train_step(step_fn, state_shardings, batch_shardings):
  """One compiled step with explicit shardings; the state is donated.

  Args:
    step_fn: `make_train_step`'s step.
    state_shardings: a TrainState of the state's shardings.
    batch_shardings: the batch's (episodes.batch_shardings).

  Returns:
    The jitted `step(state, batch) -> (state, metrics)`, the metrics
    replicated.
  """
  replicated = jax.sharding.NamedSharding(
    jax.tree.leaves(state_shardings)[0].mesh, jax.sharding.PartitionSpec()
  )
  return jax.jit(
    step_fn,
    in_shardings=(state_shardings, batch_shardings),
    out_shardings=(state_shardings, replicated),
    donate_argnums=0,
  )
