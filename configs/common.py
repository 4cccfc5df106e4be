"""Defaults shared by the experiment configs (plain data; no trainer imports).

An experiment config starts from `base_config()` and changes what it needs.
Every field exists here so that `--config.x.y=value` can override it and a
misspelled field is an error.
"""

import ml_collections

# Logical axis -> mesh axes. Data parallel over data x fsdp, ZeRO-3 parameter
# sharding over fsdp, Megatron tensor parallelism over tensor.
SHARDING_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
)

# The TransformerConfig fields (tests check that the two lists agree).
MODEL_FIELDS = dict(
    vocab_size=int, num_layers=int, d_model=int, num_heads=int,
    num_kv_heads=int, head_dim=int, mlp_dim=int, rope_base=float,
    norm_eps=float, attn_logit_softcap=float, final_logit_softcap=float,
    sliding_window=int, alternate_local_global=bool, post_norms=bool,
    query_pre_attn_scalar=float, param_dtype=str, dtype=str, remat=bool)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # The problems: a task name and its constructor's arguments.
  c.task = ml_collections.ConfigDict(dict(name="arithmetic"))
  # "" means the bundled demo tokenizer; else a SentencePiece .model path.
  c.tokenizer_path = ""

  # A preset from score_jax/models/presets.py; every other field left None
  # takes the preset's value, and a value set here or by a flag overrides it.
  c.model = ml_collections.ConfigDict(dict(preset="demo", **{
      name: ml_collections.FieldReference(None, field_type=field_type)
      for name, field_type in MODEL_FIELDS.items()}))

  # (data, fsdp, tensor); -1 takes the remaining devices.
  c.mesh_shape = (1, -1, 1)
  c.sharding_rules = SHARDING_RULES

  c.rollout = ml_collections.ConfigDict(dict(
      num_attempts=2,
      max_attempt_len=128,
      temperature=1.0,  # The paper samples at 1.0 for training.
      top_k=0,
      top_p=1.0,
      prompt_buckets=(32, 64, 128, 256, 512, 1024, 2048),
  ))

  c.rewards = ml_collections.ConfigDict(dict(num_workers=2, timeout_s=5.0))

  c.eval = ml_collections.ConfigDict(dict(
      split="test",
      num_examples=1000,  # 0: the whole split.
      batch_size=64,
      num_transcripts_logged=3,
  ))
  return c
