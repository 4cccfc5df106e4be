"""Builds what every mode needs from a config: tokenizer, task, model, mesh,
sharded params and the jitted rollout. Data flows one way from here:
config -> data -> rollout -> rewards -> objectives -> update."""

import dataclasses
import functools
import os
import tempfile
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from score_jax import multihost
from score_jax import objectives
from score_jax import packing
from score_jax import rollout
from score_jax import sampling
from score_jax import schedule as schedule_lib
from score_jax import sharding
from score_jax import tasks
from score_jax import tokenizer as tokenizer_lib
from score_jax import train_step as train_step_lib
from score_jax.models import loading
from score_jax.models import presets
from score_jax.models import tpu_attention
from score_jax.models import transformer
from score_jax.tasks import base


@dataclasses.dataclass(frozen=True)
class Training:
  """The typed training settings, built once from the config
  (`Experiment.training`): what the trainer runs and --mode=aot compiles."""
  phases: tuple[schedule_lib.Phase, ...]
  total_steps: int
  optimizer: Any    # optax.GradientTransformation
  lr_schedule: Any  # step -> learning rate
  sampler: sampling.SamplerConfig
  rollout: rollout.RolloutConfig
  objective: objectives.ObjectiveConfig  # config.objective, as Stage II

  def phase_objective(self, phase: schedule_lib.Phase
                      ) -> Optional[objectives.ObjectiveConfig]:
    """The RL objective of `phase`; None for a supervised one."""
    if phase.name == "sft" or phase.name in schedule_lib.SAMPLED_SFT:
      return None
    alpha = self.objective.alpha if phase.alpha is None else phase.alpha
    return dataclasses.replace(self.objective, stage=phase.name, alpha=alpha)


@dataclasses.dataclass
class Experiment:
  config: ml_collections.ConfigDict
  tokenizer: tokenizer_lib.Tokenizer
  task: base.Task
  model: transformer.Transformer
  mesh: jax.sharding.Mesh
  param_shardings: Any
  # The rollout's model and compute-dtype params: the rules with
  # config.rollout.decode_rules in place of theirs, for the params and the
  # activations.
  decode_model: transformer.Transformer
  decode_shardings: Any
  instruction_ids: list[int]
  # Jitted rollouts by sampler: each compiles once per prompt bucket and is
  # reused by every later evaluation.
  _rollout_fns: dict = dataclasses.field(default_factory=dict, repr=False)

  @property
  def rules(self):
    return tuple(self.config.sharding_rules)

  @property
  def batch_shards(self) -> int:
    """How many ways the batch dimension is split over the mesh."""
    return batch_shards(self.mesh, self.rules)

  def train_prompt_bucket(self) -> int:
    """The prompt bucket of training's longest prompts (the one the train
    step's memory is sized by): the one that holds
    config.rollout.max_prompt_len (0: the largest)."""
    r = self.config.rollout
    limit = r.max_prompt_len or max(r.prompt_buckets)
    fitting = [b for b in r.prompt_buckets if b >= limit]
    if not fitting:
      raise ValueError(f"config.rollout.max_prompt_len={limit} is longer than "
                       f"the largest prompt bucket {max(r.prompt_buckets)}; "
                       "add a bucket to config.rollout.prompt_buckets.")
    return min(fitting)

  def training_examples(self) -> list:
    """The train split without the problems whose prompt is longer than
    config.rollout.max_prompt_len (how many were dropped is logged)."""
    examples = self.task.examples("train")
    limit = self.config.rollout.max_prompt_len or max(
        self.config.rollout.prompt_buckets)
    kept = [e for e in examples if len(self.tokenizer.first_turn(
        self.task.format_problem(e))) <= limit]
    if len(kept) < len(examples):
      logging.info("dropped %d of %d training problems whose prompt is "
                   "longer than %d tokens", len(examples) - len(kept),
                   len(examples), limit)
    if not kept:
      raise ValueError(f"every training problem's prompt is longer than "
                       f"{limit} tokens; raise config.rollout.max_prompt_len.")
    return kept

  def check_micro_batches(self) -> None:
    """A step's episodes split into the train step's and the rollout's
    micro-batches, each a multiple of the batch shards (a row a device)."""
    cfg = self.config
    rows = cfg.prompts_per_step * cfg.samples_per_prompt
    for field, count in (("num_micro_batches", cfg.num_micro_batches),
                         ("rollout.num_micro_batches",
                          cfg.rollout.num_micro_batches)):
      if count < 1 or rows % count or (rows // count) % self.batch_shards:
        raise ValueError(
            f"prompts_per_step x samples_per_prompt = {rows} episodes must "
            f"split into config.{field}={count} micro-batches, each a "
            f"multiple of the {self.batch_shards} batch shards of the mesh "
            f"{dict(self.mesh.shape)}.")

  def batch_sharding(self, ndim: int):
    return sharding.batch_sharding(self.mesh, self.rules, ndim)

  @property
  def replicated(self) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(self.mesh,
                                      jax.sharding.PartitionSpec())

  @functools.cached_property
  def training(self) -> Training:
    cfg = self.config
    phases = tuple(schedule_lib.phases(cfg.schedule, cfg.stage1_steps,
                                       cfg.stage2_steps, cfg.cycles,
                                       cfg.sft.steps))
    total_steps = sum(p.steps for p in phases)
    optimizer, lr_schedule = train_step_lib.make_optimizer(
        cfg.optimizer, total_steps, cfg.sft.steps, cfg.sft.learning_rate)
    sampler = sampling.SamplerConfig(cfg.rollout.temperature,
                                     cfg.rollout.top_k, cfg.rollout.top_p)
    return Training(
        phases=phases, total_steps=total_steps, optimizer=optimizer,
        lr_schedule=lr_schedule, sampler=sampler,
        rollout=self.rollout_config(sampler, self.samples_per_prefill()),
        objective=objectives.ObjectiveConfig(stage="stage2",
                                             **dict(cfg.objective)))

  def train_step_fn(self, objective: Optional[objectives.ObjectiveConfig]):
    """The (unjitted) train step of an objective; None is supervised."""
    t = self.training
    return train_step_lib.make_train_step(
        self.model, t.optimizer, t.lr_schedule, objective,
        self.config.num_micro_batches, self.config.samples_per_prompt,
        t.rollout.max_attempt_len, self.config.max_update_ratio)

  @functools.cached_property
  def row_len(self) -> int:
    """Slots of a packed row: training's longest episode fits one."""
    return packing.row_len(rollout.num_slots(
        self.train_prompt_bucket(), len(self.instruction_ids),
        self.training.rollout))

  def packed_shardings(self) -> packing.Packed:
    return packing.shardings(self.batch_sharding(1), self.replicated)

  @functools.cached_property
  def reference_fn(self):
    """`fn(reference, packed) -> log-probs [R, L]`, jitted
    (train_step.make_reference_fn)."""
    return jax.jit(
        train_step_lib.make_reference_fn(self.model,
                                         self.config.num_micro_batches),
        in_shardings=(self.param_shardings, self.packed_shardings()),
        out_shardings=self.batch_sharding(2))

  def rollout_config(self, sampler=sampling.SamplerConfig(),
                     samples_per_prompt: int = 1):
    r = self.config.rollout
    return rollout.RolloutConfig(num_attempts=r.num_attempts,
                                 max_attempt_len=r.max_attempt_len,
                                 sampler=sampler,
                                 num_micro_batches=r.num_micro_batches,
                                 samples_per_prompt=samples_per_prompt)

  def samples_per_prefill(self) -> int:
    """How many samples of a training prompt one prefill serves: all
    config.samples_per_prompt when the step's prompts split into the
    rollout's micro-batches, each a multiple of the batch shards; else 1
    (each sample is a prompt of its own)."""
    cfg = self.config
    prompts, M = cfg.prompts_per_step, cfg.rollout.num_micro_batches
    if prompts % M or (prompts // M) % self.batch_shards:
      return 1
    return cfg.samples_per_prompt

  def rollout_fn(self, sampler: sampling.SamplerConfig,
                 samples_per_prompt: int = 1):
    """The jitted multi-turn rollout that samples each prompt
    `samples_per_prompt` times with `sampler` (one per pair: jit's cache
    then holds its compilations)."""
    key = (sampler, samples_per_prompt)
    if key not in self._rollout_fns:
      self._rollout_fns[key] = rollout.make_rollout_fn(
          self.decode_model, self.instruction_ids, self.tokenizer.stop_ids,
          self.tokenizer.pad_id,
          self.rollout_config(sampler, samples_per_prompt),
          mesh=self.mesh, param_shardings=self.param_shardings,
          decode_shardings=self.decode_shardings,
          batch_axes=dict(self.rules)["batch"])
    return self._rollout_fns[key]

  def prompts(self, examples: Sequence[base.Example]):
    """Token ids of the first turn of this process's `examples` (its rows of
    the batch: all of them on one host), left-padded to a bucket and
    assembled into global arrays sharded over the batch."""
    ids = [self.tokenizer.first_turn(self.task.format_problem(e))
           for e in examples]
    # Every process must pick the same bucket: the one for the longest
    # prompt of the whole batch.
    longest = int(multihost.gather(max(len(i) for i in ids)).max())
    buckets = self.config.rollout.prompt_buckets
    tokens, valid = rollout.pad_prompts(
        ids, self.tokenizer.pad_id,
        [b for b in buckets if b >= longest] or buckets)
    return multihost.to_global((tokens, valid), self.batch_sharding(2))

  def check_eval_split(self) -> None:
    """Reads the splits that evaluation will read during and after training,
    so that a missing or malformed file stops the run before the first
    step."""
    cfg = self.config.eval
    fields = {"split": cfg.split}
    if cfg.every_steps:
      fields["validation_split"] = cfg.validation_split
    for field, split in fields.items():
      try:
        self.task.examples(split)
      except (ValueError, OSError) as e:
        raise ValueError(f"config.eval.{field}={split!r}: {e}") from None

  def initial_params(self):
    """config.init's weights on the param shardings, or None (random)."""
    if not self.config.init.path:
      return None
    return loading.load(self.config.init, self.model.cfg,
                        self.param_shardings)

  def base_params(self):
    """The weights training starts from: config.init's, or the random init
    of config.seed (the train state's, train_step.init_state)."""
    params = self.initial_params()
    if params is not None:
      return params
    return jax.jit(self.model.init, out_shardings=self.param_shardings)(
        jax.random.key(self.config.seed))

  def abstract_params(self):
    """The params' shapes, dtypes and shardings, traced, never allocated."""
    return sharding.abstract(
        jax.eval_shape(self.model.init, jax.random.key(0)),
        self.param_shardings)

  def abstract_state(self):
    """The TrainState's shapes, dtypes and shardings, traced, never
    allocated."""
    return train_step_lib.abstract_state(
        self.model, self.training.optimizer, self.param_shardings,
        self.config.seed)

  def abstract_reference(self):
    """The reference's shapes (the params in the compute dtype), dtypes and
    shardings, traced, never allocated."""
    return sharding.abstract(
        jax.eval_shape(self.model.compute_params, self.abstract_params()),
        self.param_shardings)

  def attempt_texts(self, episode: rollout.Episode) -> list[list[str]]:
    """Host-side text of every attempt, per row, for rewards and logs."""
    return [[self.tokenizer.decode(ids) for ids in row]
            for row in rollout.attempt_token_ids(episode)]


def build(config: ml_collections.ConfigDict, devices=None) -> Experiment:
  """Everything a mode needs; `devices` (default: all) is for tests that
  compare meshes of different sizes in one process."""
  # A Hugging Face checkpoint brings its architecture and tokenizer.
  tok = tokenizer_lib.Tokenizer(config.tokenizer_path
                                or loading.tokenizer_path(config.init)
                                or tokenizer_lib.DEMO_MODEL_PATH)
  model_cfg = presets.build_config(config.model,
                                   loading.architecture(config.init))
  if model_cfg.vocab_size < tok.vocab_size:
    raise ValueError(
        f"the model's vocab_size {model_cfg.vocab_size} is smaller than the "
        f"tokenizer's {tok.vocab_size} ({tok.path}); set "
        "config.model.vocab_size or use the matching tokenizer.")
  if config.init.path:  # A missing checkpoint fails before any work starts.
    loading.check(config.init)
  task = tasks.make(config.task, config.rewards.allow_unisolated)
  mesh = sharding.make_mesh(config.mesh_shape, devices)
  shards = batch_shards(mesh, tuple(config.sharding_rules))
  if config.eval.batch_size % shards:
    raise ValueError(f"config.eval.batch_size={config.eval.batch_size} must "
                     f"be a multiple of the {shards} batch shards of the "
                     f"mesh {dict(mesh.shape)}.")
  profile = tuple(config.profile_steps)
  if profile and not (len(profile) == 2 and 1 <= profile[0] <= profile[1]):
    raise ValueError(f"config.profile_steps={profile}: give (first, last) "
                     "training steps, 1 <= first <= last, or () for none.")
  # Read from the checkpoint (Orbax logs as it reads), so after the checks
  # of the config alone: a bad flag stays a one-line error.
  model_cfg = dataclasses.replace(model_cfg, param_dtype=loading.param_dtype(
      config.model.param_dtype, config.init))
  rules = tuple(config.sharding_rules)
  decode_rules = sharding.override(rules, config.rollout.decode_rules)
  kernels = tpu_attention.platform_kernels(mesh)
  model, decode_model = (
      transformer.Transformer(model_cfg,
                              shard=sharding.ActivationSharding(mesh, r),
                              kernels=kernels)
      for r in (rules, decode_rules))
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  axes = transformer.param_axes(model_cfg)
  param_shardings = sharding.tree_shardings(axes, shapes, mesh, rules)
  decode_shardings = sharding.tree_shardings(axes, shapes, mesh, decode_rules)
  return Experiment(config=config, tokenizer=tok, task=task, model=model,
                    mesh=mesh, param_shardings=param_shardings,
                    decode_model=decode_model,
                    decode_shardings=decode_shardings,
                    instruction_ids=tok.next_turn(config.instruction
                                                  or task.instruction))


def check_workdir(workdir: str) -> None:
  """The workdir is a directory, or can be made one, and takes files."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"--workdir={workdir} is a file, not a directory; pass "
                     "a directory (it is created if missing).")
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise ValueError(f"--workdir={workdir} cannot be written "
                     f"({e.strerror or e}); pass a directory this user can "
                     "write.") from None


def batches(examples: Sequence[base.Example], batch_size: int):
  """Consecutive batches; the last is filled up by repeating its first
  example so every batch has the same (compiled) shape. Yields
  (batch, number of real examples)."""
  for start in range(0, len(examples), batch_size):
    chunk = list(examples[start:start + batch_size])
    real = len(chunk)
    chunk += [chunk[0]] * (batch_size - real)
    yield chunk, real



def batch_shards(mesh, rules) -> int:
  axes = dict(rules)["batch"]
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return int(np.prod([mesh.shape[a] for a in axes]))
