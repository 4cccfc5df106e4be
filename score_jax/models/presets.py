"""Named model sizes, and building a TransformerConfig from a config section.

The Gemma shapes are the published ones (gemma-2b, gemma-7b: Gemma 1; gemma2-2b:
Gemma 2 with soft-capping, alternating 4096-token sliding-window and global
layers, and post norms). The small presets are for tests, the CPU demo and the
benchmarks; their vocabulary is set from the tokenizer at build time.
"""

import dataclasses
from typing import Mapping, Optional

from score_jax.models.transformer import TransformerConfig

_GEMMA_VOCAB = 256_128

PRESETS: Mapping[str, dict] = {
  # Tests: a few thousand parameters, every code path (GQA, both norms).
  "test": dict(
    vocab_size=64,
    num_layers=2,
    d_model=32,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=64,
  ),
  # The CPU demo model (~0.8M parameters with the demo tokenizer).
  "demo": dict(
    vocab_size=512,
    num_layers=3,
    d_model=128,
    num_heads=4,
    num_kv_heads=1,
    head_dim=32,
    mlp_dim=512,
  ),
  # Benchmark sizes with a 32k vocabulary: about 25M and 100M parameters
  # outside the embedding (39M and 128M with its 16M and 25M).
  "25m": dict(
    vocab_size=32_000,
    num_layers=6,
    d_model=512,
    num_heads=8,
    num_kv_heads=1,
    head_dim=64,
    mlp_dim=2048,
  ),
  "100m": dict(
    vocab_size=32_000,
    num_layers=12,
    d_model=768,
    num_heads=12,
    num_kv_heads=4,
    head_dim=64,
    mlp_dim=3072,
  ),
  "gemma-2b": dict(
    vocab_size=_GEMMA_VOCAB,
    num_layers=18,
    d_model=2048,
    num_heads=8,
    num_kv_heads=1,
    head_dim=256,
    mlp_dim=16384,
  ),
  "gemma-7b": dict(
    vocab_size=_GEMMA_VOCAB,
    num_layers=28,
    d_model=3072,
    num_heads=16,
    num_kv_heads=16,
    head_dim=256,
    mlp_dim=24576,
  ),
  # Llama 3 8B (Meta-Llama-3-8B's config.json); the Hugging Face
  # directory's own config.json replaces it when training from it.
  "llama3-8b": dict(
    vocab_size=128_256,
    num_layers=32,
    d_model=4096,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    mlp_dim=14_336,
    rope_base=500_000.0,
    norm_eps=1e-5,
    mlp_activation="silu",
    tie_embeddings=False,
    scale_embeddings=False,
    norm_one_plus_scale=False,
    context_len=8192,
  ),
  "gemma2-2b": dict(
    vocab_size=_GEMMA_VOCAB,
    num_layers=26,
    d_model=2304,
    num_heads=8,
    num_kv_heads=4,
    head_dim=256,
    mlp_dim=9216,
    attn_logit_softcap=50.0,
    final_logit_softcap=30.0,
    sliding_window=4096,
    alternate_local_global=True,
    post_norms=True,
    query_pre_attn_scalar=256.0,
  ),
}


def build_config(
  model_section: Mapping, architecture: Optional[Mapping] = None
) -> TransformerConfig:
  """`config.model` (a `preset` name plus field overrides) -> TransformerConfig.

  Fields that are None keep the preset's value. `architecture` (the fields a
  checkpoint's own config gives, e.g. a Hugging Face config.json) takes the
  preset's place when given.

  Args:
    model_section: config.model: `preset` (ignored with `architecture`) and
      TransformerConfig fields.
    architecture: TransformerConfig fields that replace the preset's (None:
      the preset decides).

  Returns:
    The TransformerConfig: the preset's or `architecture`'s fields, with
    the overrides set.
  """
  fields = {k: v for k, v in dict(model_section).items() if v is not None}
  name = fields.pop("preset", None)
  if architecture is None and name not in PRESETS:
    raise ValueError(
      f"config.model.preset={name!r} is unknown; choose one of "
      f"{sorted(PRESETS)}."
    )
  valid = {f.name for f in dataclasses.fields(TransformerConfig)}
  unknown = sorted(set(fields) - valid)
  if unknown:
    raise ValueError(
      f"config.model has unknown fields {unknown}; valid fields "
      f"are {sorted(valid)}."
    )
  base = PRESETS[name] if architecture is None else architecture
  return TransformerConfig(**{**base, **fields})
