"""Hugging Face config.json <-> TransformerConfig fields.

A model directory's config.json decides the architecture: `model_type` picks
the family (gemma, gemma2, llama, qwen2) and its fields give the shapes and
options; fields it leaves out take the values transformers gives them. `to_hf`
writes the config.json of exported params, in the layout released
checkpoints use (top-level rope_theta / rope_scaling), which transformers
4.x and 5.x both read.
"""

import json
import os
from typing import Any, Optional

from score_jax.models.transformer import TransformerConfig

SUPPORTED_MODEL_TYPES = ("gemma", "gemma2", "llama", "qwen2")
_ARCHITECTURES = {
  "gemma": "GemmaForCausalLM",
  "gemma2": "Gemma2ForCausalLM",
  "llama": "LlamaForCausalLM",
  "qwen2": "Qwen2ForCausalLM",
}
# What transformers assumes when config.json has no max_position_embeddings.
_DEFAULT_CONTEXT_LEN = {
  "gemma": 8192,
  "gemma2": 8192,
  "llama": 2048,
  "qwen2": 32768,
}


def read(model_dir: str) -> dict:
  """The parsed config.json of a Hugging Face model directory."""
  path = os.path.join(model_dir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"{model_dir!r} has no config.json; config.init.path must be a Hugging "
      "Face model directory (config.json and *.safetensors)."
    )
  with open(path) as f:
    return json.load(f)


def architecture(hf: dict, where: str = "config.json") -> dict[str, Any]:
  """The TransformerConfig fields of a config.json's architecture: shapes
  and options, not dtypes nor how the model runs (remat, scan_layers, the
  chunk and block lengths). A family or option the transformer lacks is a
  ValueError.

  Args:
    hf: the parsed config.json (`read`).
    where: what errors call it.

  Returns:
    TransformerConfig field name -> value.
  """
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(
      f"{where}: model_type {model_type!r} is not supported; "
      f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}."
    )
  num_heads = hf["num_attention_heads"]
  context_len = int(
    hf.get("max_position_embeddings") or _DEFAULT_CONTEXT_LEN[model_type]
  )
  fields = dict(
    vocab_size=hf["vocab_size"],
    num_layers=hf["num_hidden_layers"],
    d_model=hf["hidden_size"],
    num_heads=num_heads,
    num_kv_heads=hf.get("num_key_value_heads") or num_heads,
    head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
    mlp_dim=hf["intermediate_size"],
    norm_eps=float(hf["rms_norm_eps"]),
    context_len=context_len,
    **_rope(hf, context_len, where),
  )
  activation = hf.get("hidden_activation") or hf.get("hidden_act")
  if model_type in ("gemma", "gemma2"):
    # Gemma's releases say "gelu" but mean the tanh approximation (as
    # transformers also reads it).
    _require(
      activation in (None, "gelu", "gelu_pytorch_tanh"),
      where,
      f"hidden activation {activation!r}",
    )
    fields.update(
      mlp_activation="gelu", tie_embeddings=hf.get("tie_word_embeddings", True)
    )
  else:
    _require(activation == "silu", where, f"hidden_act {activation!r}")
    _require(
      not hf.get("attention_bias") and not hf.get("mlp_bias"),
      where,
      "attention_bias / mlp_bias",
    )
    _require(not hf.get("use_sliding_window"), where, "use_sliding_window")
    fields.update(
      mlp_activation="silu",
      scale_embeddings=False,
      norm_one_plus_scale=False,
      qkv_bias=model_type == "qwen2",
      tie_embeddings=hf.get("tie_word_embeddings", False),
    )
  if model_type == "gemma2":
    window = hf.get("sliding_window")
    alternating = [
      "sliding_attention" if i % 2 == 0 else "full_attention"
      for i in range(fields["num_layers"])
    ]
    _require(
      window and hf.get("layer_types", alternating) == alternating,
      where,
      "a layer pattern other than alternating local/global",
    )
    fields.update(
      attn_logit_softcap=hf.get("attn_logit_softcapping"),
      final_logit_softcap=hf.get("final_logit_softcapping"),
      sliding_window=window,
      alternate_local_global=True,
      post_norms=True,
      query_pre_attn_scalar=float(hf["query_pre_attn_scalar"]),
    )
  return fields


def _rope(hf: dict, context_len: int, where: str) -> dict[str, Any]:
  """RoPE fields, with the defaults transformers fills in for the ones a
  config.json leaves out."""
  # transformers 5 writes "rope_parameters"; the released checkpoints have
  # top-level "rope_theta" and "rope_scaling".
  params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  theta = params.get("rope_theta", hf.get("rope_theta", 10_000.0))
  rope_type = params.get("rope_type", params.get("type", "default"))
  partial = params.get(
    "partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)
  )
  _require(partial == 1.0, where, f"partial_rotary_factor {partial}")
  fields = dict(rope_base=float(theta))
  if rope_type == "default":
    return fields
  if rope_type == "dynamic":
    raise ValueError(
      f"{where}: rope_type 'dynamic' is not supported (its frequencies "
      "change with the length generated so far, which a KV cache cannot "
      "follow); up to max_position_embeddings it is the plain RoPE you get "
      "by removing rope_scaling from config.json."
    )
  _require(
    rope_type in ("linear", "llama3", "yarn"), where, f"rope_type {rope_type!r}"
  )
  original = int(params.get("original_max_position_embeddings") or context_len)
  factor = params.get("factor") or context_len / original
  fields.update(rope_scaling_type=rope_type, rope_scale_factor=float(factor))
  if rope_type != "linear":
    fields["rope_original_max_len"] = original
  if rope_type == "llama3":
    fields.update(
      rope_low_freq_factor=float(params["low_freq_factor"]),
      rope_high_freq_factor=float(params["high_freq_factor"]),
    )
  elif rope_type == "yarn":
    _require(params.get("truncate", True), where, "yarn with truncate false")
    # DeepSeek's form of the attention factor.
    _require(
      not (params.get("mscale") and params.get("mscale_all_dim")),
      where,
      "yarn with mscale",
    )
    attention_factor = params.get("attention_factor")
    fields.update(
      rope_beta_fast=float(params.get("beta_fast") or 32.0),
      rope_beta_slow=float(params.get("beta_slow") or 1.0),
      rope_attention_factor=(
        None if attention_factor is None else float(attention_factor)
      ),
    )
  return fields


def declared_dtype(hf: dict) -> Optional[str]:
  """The params dtype config.json names, if it names one."""
  return hf.get("dtype") or hf.get("torch_dtype")


def _require(ok, where: str, what: str) -> None:
  if not ok:
    raise ValueError(
      f"{where}: {what} is not supported by score_jax.models.transformer."
    )


def model_type(cfg: TransformerConfig) -> str:
  """The Hugging Face family whose layout and numerics `cfg` has."""
  gemma_like = (
    cfg.mlp_activation == "gelu"
    and cfg.scale_embeddings
    and cfg.norm_one_plus_scale
    and not cfg.qkv_bias
    and cfg.rope_scale_factor is None
  )
  llama_like = (
    cfg.mlp_activation == "silu"
    and not cfg.scale_embeddings
    and not cfg.norm_one_plus_scale
    and not cfg.post_norms
    and cfg.sliding_window is None
    and cfg.attn_logit_softcap is None
    and cfg.final_logit_softcap is None
    and cfg.query_pre_attn_scalar is None
  )
  if (
    gemma_like
    and cfg.post_norms
    and cfg.alternate_local_global
    and (cfg.sliding_window is not None)
  ):
    return "gemma2"
  if (
    gemma_like
    and not cfg.post_norms
    and cfg.sliding_window is None
    and (cfg.attn_logit_softcap is None and cfg.final_logit_softcap is None)
  ):
    return "gemma"
  if llama_like:
    return "qwen2" if cfg.qkv_bias else "llama"
  raise ValueError(
    "this model config matches none of the Hugging Face "
    f"families {SUPPORTED_MODEL_TYPES}; it cannot be exported "
    "as safetensors."
  )


def to_hf(cfg: TransformerConfig) -> dict:
  """The config.json of `cfg`; `architecture` reads it back to `cfg`."""
  kind = model_type(cfg)
  hf = dict(
    architectures=[_ARCHITECTURES[kind]],
    model_type=kind,
    vocab_size=cfg.vocab_size,
    num_hidden_layers=cfg.num_layers,
    hidden_size=cfg.d_model,
    num_attention_heads=cfg.num_heads,
    num_key_value_heads=cfg.num_kv_heads,
    head_dim=cfg.head_dim,
    intermediate_size=cfg.mlp_dim,
    rms_norm_eps=cfg.norm_eps,
    rope_theta=cfg.rope_base,
    tie_word_embeddings=cfg.tie_embeddings,
    max_position_embeddings=cfg.context_len,
    torch_dtype=cfg.param_dtype,
  )
  if kind.startswith("gemma"):
    hf.update(
      hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh"
    )
  else:
    hf["hidden_act"] = "silu"
  if kind == "llama":  # Qwen2 has its q/k/v biases without a setting
    hf["attention_bias"] = False
  if cfg.rope_scale_factor is not None:
    hf["rope_scaling"] = _rope_scaling(cfg)
  if kind == "gemma2":
    # An int, as the releases write it (transformers 5 checks the type).
    scalar = cfg.query_pre_attn_scalar or cfg.head_dim
    hf.update(
      attn_logit_softcapping=cfg.attn_logit_softcap,
      final_logit_softcapping=cfg.final_logit_softcap,
      sliding_window=cfg.sliding_window,
      query_pre_attn_scalar=int(scalar)
      if float(scalar).is_integer()
      else scalar,
    )
  return hf


def _rope_scaling(cfg: TransformerConfig) -> dict:
  scaling = dict(rope_type=cfg.rope_scaling_type, factor=cfg.rope_scale_factor)
  if cfg.rope_scaling_type == "linear":
    return scaling
  scaling["original_max_position_embeddings"] = cfg.rope_original_max_len
  if cfg.rope_scaling_type == "llama3":
    scaling.update(
      low_freq_factor=cfg.rope_low_freq_factor,
      high_freq_factor=cfg.rope_high_freq_factor,
    )
  else:  # only what differs from YaRN's defaults, as releases write it
    for key, value, default in (
      ("beta_fast", cfg.rope_beta_fast, 32.0),
      ("beta_slow", cfg.rope_beta_slow, 1.0),
      ("attention_factor", cfg.rope_attention_factor, None),
    ):
      if value != default:
        scaling[key] = value
  return scaling
