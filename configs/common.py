"""Defaults shared by the experiment configs (plain data; of the trainer only
the config dataclasses are imported, whose fields config.model and
config.objective mirror).

An experiment config starts from `base_config()` and changes what it needs.
Every field exists here so that `--config.x.y=value` can override it and a
misspelled field is an error.
"""

import dataclasses
import typing

import ml_collections

from score_jax import objectives
from score_jax.models import transformer

# Logical axis -> mesh axes. Data parallel over data x fsdp, ZeRO-3 parameter
# sharding over fsdp, Megatron tensor parallelism over tensor. The
# activation_* axes are the activations' (transformer.py constrains them where
# they are made): the batch over data x fsdp, heads, mlp units and the
# vocabulary over tensor, the residual stream's d_model not split.
SHARDING_RULES = (
  ("batch", ("data", "fsdp")),
  ("embed", "fsdp"),
  ("vocab", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("mlp", "tensor"),
  ("head_dim", None),
  ("layers", None),
  ("activation_batch", ("data", "fsdp")),
  ("activation_logits_batch", ("data", "fsdp")),
  ("activation_length", None),
  ("activation_embed", None),
  ("activation_heads", "tensor"),
  ("activation_kv_heads", "tensor"),
  ("activation_mlp", "tensor"),
  ("activation_vocab", "tensor"),
)
# The rollout replaces these rules, for its copy of the params (compute
# dtype) and its activations: the weights not split over fsdp, so that no
# decode step gathers them; tensor parallel as in training.
DECODE_RULES = (("embed", None),)
# Training without tensor parallelism in the layers: the batch and the
# params split over every device (ZeRO-3 over data x fsdp x tensor), so
# that no layer all-reduces its activations; the weights are gathered once
# a micro-batch instead, behind the compute. Only the vocabulary stays
# split over tensor: the logits of a chunk of tokens would otherwise read
# the whole tied embedding. Decoding splits heads, MLP units and the
# vocabulary over tensor (TENSOR_PARALLEL_DECODE), where a step's batch is
# too small to hide a weight gather.
FSDP_RULES = (
  ("batch", ("data", "fsdp", "tensor")),
  ("embed", ("fsdp", "tensor")),
  ("vocab", "tensor"),
  ("heads", None),
  ("kv_heads", None),
  ("mlp", None),
  ("head_dim", None),
  ("layers", None),
  ("activation_batch", ("data", "fsdp", "tensor")),
  ("activation_logits_batch", ("data", "fsdp")),
  ("activation_length", None),
  ("activation_embed", None),
  ("activation_heads", None),
  ("activation_kv_heads", None),
  ("activation_mlp", None),
  ("activation_vocab", "tensor"),
)
TENSOR_PARALLEL_DECODE = tuple(
  {**dict(SHARDING_RULES), **dict(DECODE_RULES)}.items()
)


def placeholder(field_type):
  """A typed field left unset (None) until a flag or a config sets it."""
  return ml_collections.FieldReference(None, field_type=field_type)


def _model_fields() -> dict:
  """TransformerConfig's fields and their types; Optional[X] becomes X, since
  every config.model field is optional (None takes the preset's value)."""
  hints = typing.get_type_hints(transformer.TransformerConfig)
  return {
    f.name: next(
      t
      for t in typing.get_args(hints[f.name]) or (hints[f.name],)
      if t is not type(None)
    )
    for f in dataclasses.fields(transformer.TransformerConfig)
  }


MODEL_FIELDS = _model_fields()


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # The problems: a task name and its constructor's arguments.
  c.task = ml_collections.ConfigDict(dict(name="arithmetic"))
  # The instruction between attempts; "" is the task's (the paper's). The
  # Self-Refine baseline evaluates the base model with its own instruction.
  c.instruction = ""
  # "" means the one in config.init's Hugging Face directory, else the bundled
  # demo tokenizer; or a SentencePiece .model, a tokenizer.json or a
  # directory with one of them.
  c.tokenizer_path = ""

  # A preset from score_jax/models/presets.py; every other field left None
  # takes the preset's value, and a value set here or by a flag overrides it.
  # param_dtype left None keeps the dtype config.init's checkpoint stores
  # (float32 from random init); training needs float32 master weights.
  c.model = ml_collections.ConfigDict(
    dict(
      preset="demo",
      **{
        name: placeholder(field_type)
        for name, field_type in MODEL_FIELDS.items()
      },
    )
  )

  # The weights to start from; "" starts from random init. Formats (params,
  # gemma, hf): score_jax/models/loading.py. With "hf" the directory's
  # config.json replaces config.model's preset.
  c.init = ml_collections.ConfigDict(dict(path="", format="params"))

  # (data, fsdp, tensor); -1 takes the remaining devices.
  c.mesh_shape = (1, -1, 1)
  c.sharding_rules = SHARDING_RULES

  c.rollout = ml_collections.ConfigDict(
    dict(
      num_attempts=2,
      max_attempt_len=128,
      temperature=1.0,  # The paper samples at 1.0 for training.
      top_k=0,
      top_p=1.0,
      prompt_buckets=(32, 64, 128, 256, 512, 1024, 2048),
      # Training drops problems whose prompt is longer (as verl's
      # filter_overlong_prompts); 0: the largest bucket. Evaluation takes
      # any bucket. The train step's memory is sized by this bucket.
      max_prompt_len=0,
      # Sample a step's episodes in this many rounds: the KV cache holds
      # 1 / num_micro_batches of them (score_jax/rollout.py).
      num_micro_batches=1,
      decode_rules=DECODE_RULES,
    )
  )

  c.rewards = ml_collections.ConfigDict(
    dict(
      num_workers=2,
      timeout_s=5.0,
      # UNSAFE when True: where no isolating sandbox backend works
      # (bubblewrap, or the namespaces backend as root), code rewards then
      # run model-written code on "rlimits", which isolates nothing: the
      # code can read, change and delete your files and reach the network.
      # False refuses to start there, naming what to install.
      allow_unisolated=False,
    )
  )

  # The stage schedule (score_jax/schedule.py): score, stage1, stage2,
  # interleaved, no_stage1, no_shaping, single_turn. The split of steps
  # between the stages is unspecified in the paper.
  c.schedule = "score"
  c.stage1_steps = 100
  c.stage2_steps = 400
  c.cycles = 1  # Stage I / Stage II cycles of the interleaved schedule.
  # The reference: "base" (the initial model) or "stage1" (the Stage I result,
  # taken when Stage II starts).
  c.reference = "base"
  # A supervised warm start on the task's demonstrations (0: none).
  c.sft = ml_collections.ConfigDict(
    dict(steps=0, max_len=256, learning_rate=1e-3)
  )

  # While the host grades a step's episodes, the devices compute the
  # reference's log-probs of them, which need no reward; False waits for
  # them first (the same numbers, for comparing).
  c.overlap_grading = True

  c.prompts_per_step = 16
  c.samples_per_prompt = 4  # K, for the leave-one-out baseline.
  c.num_micro_batches = 1  # Gradient accumulation.

  # ObjectiveConfig's fields and defaults (the paper's; score_jax/
  # objectives.py), but the stage, which the schedule sets per phase.
  c.objective = ml_collections.ConfigDict(
    {
      f.name: f.default
      for f in dataclasses.fields(objectives.ObjectiveConfig)
      if f.name != "stage"
    }
  )
  c.optimizer = ml_collections.ConfigDict(
    dict(
      name="adam",
      learning_rate=5e-6,
      warmup_steps=0,
      schedule="constant",
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.0,
      grad_clip=1.0,
    )
  )
  # A step is skipped when anything it computes is not finite or its update
  # is larger than this times the params' norm (Adam moves each weight by
  # about the learning rate: 1e-4 of a norm, far below 1); this many skips
  # in a row stop the run.
  c.max_update_ratio = 1.0
  c.max_consecutive_nonfinite = 10
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=50, max_to_keep=3))
  # Multi-host runs (score_jax/host_failures.py): a process that does not
  # reach a step's check (after its rollout, after its update) within
  # step_timeout_s of the others is named as hung; one whose heartbeat
  # stops for heartbeat_timeout_s as dead or stopped; either ends the run.
  c.hosts = ml_collections.ConfigDict(
    dict(step_timeout_s=1800.0, heartbeat_timeout_s=60.0)
  )
  # A jax.profiler trace of the training steps (first, last), numbered as in
  # metrics.jsonl, into WORKDIR/profile/ (TensorBoard's profile plugin);
  # () traces none. Start after step 1, which compiles.
  c.profile_steps = ()

  c.eval = ml_collections.ConfigDict(
    dict(
      split="test",
      num_examples=1000,  # 0: the whole split.
      batch_size=64,
      num_transcripts_logged=3,
      # The row name in reports ("" : from the workdir's name).
      label="",
      # Also evaluate the initial weights (the "Base" row) before training.
      base=False,
      # Inference-time scaling (eval/<step>/scaling.json); 0 problems: off.
      scaling_num_examples=0,
      scaling_samples=(2, 4, 8, 16, 32),
      scaling_temperature=0.7,
      # During training, every this many steps and at the last one, evaluate
      # validation_split as above into WORKDIR/validation/<step>/ and
      # metrics.jsonl's val/* keys; --checkpoint=best then picks the
      # checkpoint of the highest val/accuracy at the last attempt. 0: off.
      every_steps=0,
      validation_split="validation",
    )
  )
  return c
