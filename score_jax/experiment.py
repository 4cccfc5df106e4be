"""Builds what every mode needs from a config: tokenizer, task, models,
mesh, shardings, and the jitted programs a step runs (the rollout, the
reference's scoring, packing, the train step), each built once.

The data side (prompts, attempt texts, supervised episodes) is data.py's;
the host path of a step is train.py's: data -> generate -> train step ->
checkpoint.
"""

import dataclasses
import functools
import os
import tempfile
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from score_jax import (
  data,
  objectives,
  packing,
  rollout,
  sampling,
  sharding,
  tasks,
)
from score_jax import episodes as episodes_lib
from score_jax import schedule as schedule_lib
from score_jax import tokenizer as tokenizer_lib
from score_jax import train_step as train_step_lib
from score_jax.models import loading, presets, tpu_attention, transformer
from score_jax.tasks import base


@dataclasses.dataclass(frozen=True)
class Training:
  """The typed training settings, built once from the config
  (`Experiment.training`): what the trainer runs and --mode=aot compiles.

  Attributes:
    phases: the schedule (schedule.phases).
    total_steps: the steps of all phases.
    optimizer: an optax.GradientTransformation.
    lr_schedule: step -> learning rate.
    sampler: how training's rollouts draw tokens.
    rollout: training's rollout (G samples of each prompt from one
      prefill where the batch allows it).
    objective: config.objective as Stage II's (what --mode=aot compiles).
  """

  phases: tuple[schedule_lib.Phase, ...]
  total_steps: int
  optimizer: Any
  lr_schedule: Any
  sampler: sampling.SamplerConfig
  rollout: rollout.RolloutConfig
  objective: objectives.ObjectiveConfig


@dataclasses.dataclass
class Experiment:
  """What every mode needs, built from a config by `build`: the pieces
  (tokenizer, task, models, mesh, shardings) and, built on first use, the
  jitted programs (rollout, reference scoring, packing, train step) and
  the abstract (traced, never allocated) state.

  Attributes:
    config: the experiment's config.
    tokenizer: turns text into tokens and back.
    task: the problems and their reward.
    model: the decoder with training's activation rules.
    mesh: the devices, (data, fsdp, tensor).
    param_shardings: the params' layout.
    decode_model: the decoder with the rollout's rules
      (config.rollout.decode_rules in place of theirs).
    decode_shardings: the layout of the rollout's compute-dtype params.
    instruction_ids: the instruction turn's tokens.
  """

  config: ml_collections.ConfigDict
  tokenizer: tokenizer_lib.Tokenizer
  task: base.Task
  model: transformer.Transformer
  mesh: jax.sharding.Mesh
  param_shardings: Any
  decode_model: transformer.Transformer
  decode_shardings: Any
  instruction_ids: list[int]
  # Jitted programs by their settings: each compiles once per shape and is
  # reused by every later call.
  _rollout_fns: dict = dataclasses.field(default_factory=dict, repr=False)
  _train_steps: dict = dataclasses.field(default_factory=dict, repr=False)
  _pack_fns: dict = dataclasses.field(default_factory=dict, repr=False)

  @property
  def rules(self) -> tuple:
    """config.sharding_rules: logical axis -> mesh axes."""
    return tuple(self.config.sharding_rules)

  @property
  def batch_shards(self) -> int:
    """How many ways the batch dimension is split over the mesh."""
    return batch_shards(self.mesh, self.rules)

  def batch_sharding(self, ndim: int) -> jax.sharding.NamedSharding:
    """The layout of an array of `ndim` dims with the batch first."""
    return sharding.batch_sharding(self.mesh, self.rules, ndim)

  @property
  def replicated(self) -> jax.sharding.NamedSharding:
    """The layout of a value every device holds."""
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

  @functools.cached_property
  def training(self) -> Training:
    """The training settings; a step's episodes must split into the
    config's micro-batches (checked here, before anything runs)."""
    cfg = self.config
    rows = cfg.prompts_per_step * cfg.samples_per_prompt
    for field, count in (
      ("num_micro_batches", cfg.num_micro_batches),
      ("rollout.num_micro_batches", cfg.rollout.num_micro_batches),
    ):
      episodes_lib.check_split(
        rows,
        count,
        self.batch_shards,
        f"prompts_per_step x samples_per_prompt into config.{field}="
        f"{count}, on the mesh {dict(self.mesh.shape)}",
      )
    objective = objectives.ObjectiveConfig(
      stage="stage2", **dict(cfg.objective)
    )
    phases = tuple(
      schedule_lib.phases(
        cfg.schedule,
        cfg.stage1_steps,
        cfg.stage2_steps,
        cfg.cycles,
        cfg.sft.steps,
        objective,
        cfg.reference,
      )
    )
    total_steps = sum(p.steps for p in phases)
    optimizer, lr_schedule = train_step_lib.make_optimizer(
      cfg.optimizer, total_steps, cfg.sft.steps, cfg.sft.learning_rate
    )
    sampler = sampling.SamplerConfig(
      cfg.rollout.temperature, cfg.rollout.top_k, cfg.rollout.top_p
    )
    # Each prompt is prefilled once for its samples where the step's
    # prompts split into the rollout's micro-batches; else each sample is
    # a prompt of its own.
    prefill_once = episodes_lib.splits(
      cfg.prompts_per_step, cfg.rollout.num_micro_batches, self.batch_shards
    )
    return Training(
      phases=phases,
      total_steps=total_steps,
      optimizer=optimizer,
      lr_schedule=lr_schedule,
      sampler=sampler,
      rollout=self.rollout_config(
        sampler, cfg.samples_per_prompt if prefill_once else 1
      ),
      objective=objective,
    )

  @functools.cached_property
  def train_prompt_bucket(self) -> int:
    """P of training's rollouts: the bucket that holds
    config.rollout.max_prompt_len (data.prompt_bucket)."""
    r = self.config.rollout
    return data.prompt_bucket(r.prompt_buckets, r.max_prompt_len)

  @functools.cached_property
  def row_len(self) -> int:
    """T, the slots of a packed row: training's longest episode fits one."""
    return packing.row_len(
      rollout.num_slots(
        self.train_prompt_bucket,
        len(self.instruction_ids),
        self.training.rollout,
      )
    )

  def packed_shardings(self) -> episodes_lib.Packed:
    """The layout of a packed batch (episodes.packed_shardings)."""
    return episodes_lib.packed_shardings(
      self.batch_sharding(1), self.replicated
    )

  def rollout_config(
    self, sampler=sampling.SamplerConfig(), samples_per_prompt: int = 1
  ) -> rollout.RolloutConfig:
    """A rollout's settings: config.rollout's attempts, their budget and
    micro-batches.

    Args:
      sampler: how the rollout draws tokens.
      samples_per_prompt: G, the episodes sampled from each prompt.

    Returns:
      The RolloutConfig.
    """
    r = self.config.rollout
    return rollout.RolloutConfig(
      num_attempts=r.num_attempts,
      max_attempt_len=r.max_attempt_len,
      sampler=sampler,
      num_micro_batches=r.num_micro_batches,
      samples_per_prompt=samples_per_prompt,
    )

  def rollout_fn(
    self, sampler: sampling.SamplerConfig, samples_per_prompt: int = 1
  ):
    """The jitted rollout (rollout.make_rollout_fn) that samples each prompt
    `samples_per_prompt` times with `sampler`; one per pair, so that jit's
    cache keeps its compilations.

    Returns:
      `fn(params, prompt_tokens_up, prompt_valid_up, rng) -> Episode`.
    """
    key = (sampler, samples_per_prompt)
    if key not in self._rollout_fns:
      self._rollout_fns[key] = rollout.make_rollout_fn(
        self.decode_model,
        self.instruction_ids,
        self.tokenizer.stop_ids,
        self.tokenizer.pad_id,
        self.rollout_config(sampler, samples_per_prompt),
        mesh=self.mesh,
        param_shardings=self.param_shardings,
        decode_shardings=self.decode_shardings,
        batch_axes=dict(self.rules)["batch"],
      )
    return self._rollout_fns[key]

  def pack_fn(self, pack, row_len: int):
    """`pack` (packing.pack_episodes or packing.pack_supervised) jitted for
    the whole batch's packed rows of `row_len` slots.

    Returns:
      `fn(*episode_arrays, row_b, offset_b, num_micro_batches) -> Packed`.
    """
    key = (pack, row_len)
    if key not in self._pack_fns:
      cfg = self.config
      self._pack_fns[key] = jax.jit(
        functools.partial(
          pack,
          num_rows=cfg.prompts_per_step * cfg.samples_per_prompt,
          row_len=row_len,
        ),
        out_shardings=self.packed_shardings(),
      )
    return self._pack_fns[key]

  @functools.cached_property
  def reference_fn(self):
    """The reference's scoring (train_step.make_reference_fn), jitted.

    Returns:
      `fn(reference, packed) -> log-probs float32 [R, T]`.
    """
    return jax.jit(
      train_step_lib.make_reference_fn(
        self.model, self.config.num_micro_batches
      ),
      in_shardings=(self.param_shardings, self.packed_shardings()),
      out_shardings=self.batch_sharding(2),
    )

  def train_step(self, objective: Optional[objectives.ObjectiveConfig]):
    """The jitted train step of `objective` (None: the supervised loss), its
    state donated; one per objective.

    Returns:
      `step(state, batch) -> (state, metrics)`, for an RLBatch (an
      SFTBatch with objective None).
    """
    if objective not in self._train_steps:
      t = self.training
      batch = (
        episodes_lib.SFTBatch(None)
        if objective is None
        else episodes_lib.RLBatch(None, None, None)
      )
      self._train_steps[objective] = train_step_lib.jit_train_step(
        train_step_lib.make_train_step(
          self.model,
          t.optimizer,
          t.lr_schedule,
          objective,
          self.config.num_micro_batches,
          self.config.samples_per_prompt,
          t.rollout.max_attempt_len,
          self.config.max_update_ratio,
        ),
        jax.tree.map(lambda x: x.sharding, self.abstract_state()),
        episodes_lib.batch_shardings(
          batch, self.batch_sharding(1), self.replicated
        ),
      )
    return self._train_steps[objective]

  def initial_params(self):
    """config.init's weights on the param shardings, or None (random)."""
    if not self.config.init.path:
      return None
    return loading.load(self.config.init, self.model.cfg, self.param_shardings)

  def base_params(self):
    """The weights training starts from: config.init's, or the random init
    of config.seed (the train state's, train_step.init_state)."""
    params = self.initial_params()
    if params is not None:
      return params
    return jax.jit(self.model.init, out_shardings=self.param_shardings)(
      jax.random.key(self.config.seed)
    )

  def abstract_params(self):
    """The params' shapes, dtypes and shardings, traced, never allocated."""
    return sharding.abstract(
      jax.eval_shape(self.model.init, jax.random.key(0)), self.param_shardings
    )

  def abstract_state(self) -> train_step_lib.TrainState:
    """The TrainState's shapes, dtypes and shardings, traced, never
    allocated."""
    return train_step_lib.abstract_state(
      self.model,
      self.training.optimizer,
      self.param_shardings,
      self.config.seed,
    )

  def abstract_reference(self):
    """The reference's shapes (the params in the compute dtype), dtypes and
    shardings, traced, never allocated."""
    return sharding.abstract(
      jax.eval_shape(self.model.compute_params, self.abstract_params()),
      self.param_shardings,
    )


def build(config: ml_collections.ConfigDict, devices=None) -> Experiment:
  """Everything a mode needs, built from a config: the tokenizer, the task,
  the models with training's and the rollout's rules, the mesh and the param
  shardings. The config is checked first (a mismatched vocabulary, a missing
  checkpoint, a mesh or eval batch that does not fit), so that a bad setting
  fails before any work; the jitted programs are built later, on first use.

  Args:
    config: the experiment's config (configs/).
    devices: the devices of the mesh (None: all), for tests that compare
      meshes of different sizes in one process.

  Returns:
    The Experiment.
  """
  # A Hugging Face checkpoint brings its architecture and tokenizer.
  tok = tokenizer_lib.Tokenizer(
    config.tokenizer_path
    or loading.tokenizer_path(config.init)
    or tokenizer_lib.DEMO_MODEL_PATH
  )
  model_cfg = presets.build_config(
    config.model, loading.architecture(config.init)
  )
  if model_cfg.vocab_size < tok.vocab_size:
    raise ValueError(
      f"the model's vocab_size {model_cfg.vocab_size} is smaller than the "
      f"tokenizer's {tok.vocab_size} ({tok.path}); set "
      "config.model.vocab_size or use the matching tokenizer."
    )
  if config.init.path:  # A missing checkpoint fails before any work starts.
    loading.check(config.init)
  task = tasks.make(config.task, config.rewards.allow_unisolated)
  mesh = sharding.make_mesh(config.mesh_shape, devices)
  episodes_lib.check_split(
    config.eval.batch_size,
    1,
    batch_shards(mesh, tuple(config.sharding_rules)),
    f"config.eval.batch_size={config.eval.batch_size}, on the mesh "
    f"{dict(mesh.shape)}",
  )
  profile = tuple(config.profile_steps)
  if profile and not (len(profile) == 2 and 1 <= profile[0] <= profile[1]):
    raise ValueError(
      f"config.profile_steps={profile}: give (first, last) "
      "training steps, 1 <= first <= last, or () for none."
    )
  # Read from the checkpoint (Orbax logs as it reads), so after the checks
  # of the config alone: a bad flag stays a one-line error.
  model_cfg = dataclasses.replace(
    model_cfg,
    param_dtype=loading.param_dtype(config.model.param_dtype, config.init),
  )
  rules = tuple(config.sharding_rules)
  decode_rules = sharding.override(rules, config.rollout.decode_rules)
  kernels = tpu_attention.platform_kernels(mesh)
  model, decode_model = (
    transformer.Transformer(
      model_cfg, shard=sharding.ActivationSharding(mesh, r), kernels=kernels
    )
    for r in (rules, decode_rules)
  )
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  axes = transformer.param_axes(model_cfg)
  param_shardings = sharding.tree_shardings(axes, shapes, mesh, rules)
  decode_shardings = sharding.tree_shardings(axes, shapes, mesh, decode_rules)
  return Experiment(
    config=config,
    tokenizer=tok,
    task=task,
    model=model,
    mesh=mesh,
    param_shardings=param_shardings,
    decode_model=decode_model,
    decode_shardings=decode_shardings,
    instruction_ids=tok.next_turn(config.instruction or task.instruction),
  )


def check_workdir(workdir: str) -> None:
  """The workdir is a directory, or can be made one, and takes files."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(
      f"--workdir={workdir} is a file, not a directory; pass "
      "a directory (it is created if missing)."
    )
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise ValueError(
      f"--workdir={workdir} cannot be written "
      f"({e.strerror or e}); pass a directory this user can "
      "write."
    ) from None


def batch_shards(mesh, rules) -> int:
  """How many ways `rules` split the batch over `mesh`."""
  axes = dict(rules)["batch"]
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return int(np.prod([mesh.shape[a] for a in axes]))
