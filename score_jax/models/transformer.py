"""A Gemma-style decoder-only transformer, pure functions over a params pytree.

Architecture (Gemma): RMSNorm with (1 + scale), rotary position embeddings,
multi-query / grouped-query attention, gated GELU MLP, input embeddings scaled
by sqrt(d_model) and tied to the output projection. Gemma 2 options: attention
and final logit soft-capping, alternating local (sliding-window) and global
layers, and the extra post-attention / post-MLP norms. Llama 3 / Qwen2 options:
SiLU gate, a separate output embedding, unscaled input embeddings, RMSNorm with
a plain scale, q/k/v biases (Qwen2) and RoPE frequency scaling (Llama 3's,
linear, YaRN).

Layers are stacked on a leading axis and run with `lax.scan` for training
and scoring, so compile time does not grow with depth (or unrolled, with
`scan_layers=False`, where that is faster). Decoding runs the
layers as a Python loop over per-layer params (`unstack_layers`, done once per
rollout) and a per-layer KV cache: inside a decode loop a scan would copy every
layer's weights and cache slices on each step, where the loop updates the
cache in place and reads the weights where they lie.

Memory at scale: activations carry logical axis names ("activation_batch",
"activation_heads", ...) and are constrained where they are made, through
the `shard` the model is built with (sharding.ActivationSharding: the
config's rules on the mesh); without constraints XLA follows the params'
fsdp layout and keeps the whole batch on every chip. Scoring
(`token_log_probs`) never materialises [B, T, V] logits: it projects
sequence chunks and keeps, per token, only the chosen token's log-prob and
the entropy. The named scopes (embed, attention, mlp, logits, ...) label the
compiled program's buffers in `--mode=aot`'s memory report.

Shape legend (docs/design.md): B batch rows, T query tokens, S key slots
(as many as the queries without a cache, the cache's with one), L layers, D
d_model, N query heads, K kv heads, Q query heads per kv head (N / K), H
head_dim, F mlp units, V vocab, C tokens of one scoring chunk.
"""

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from score_jax.models import attention, kv_cache

Params = Any

# jax.nn.gelu's default is the tanh approximation, which Gemma uses.
_ACTIVATIONS = {"gelu": jax.nn.gelu, "silu": jax.nn.silu}
_ROPE_SCALING_TYPES = ("llama3", "linear", "yarn")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Shapes and options of the decoder. Presets live in `presets.py`."""

  vocab_size: int
  num_layers: int
  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_base: float = 10_000.0
  norm_eps: float = 1e-6
  # Gemma 2 options; None / False give Gemma 1.
  attn_logit_softcap: Optional[float] = None
  final_logit_softcap: Optional[float] = None
  sliding_window: Optional[int] = None
  # With a sliding window: True alternates local (even layers) and global
  # (odd layers) as in Gemma 2; False makes every layer local.
  alternate_local_global: bool = False
  post_norms: bool = False
  # Queries are scaled by query_pre_attn_scalar ** -0.5 (None: head_dim).
  query_pre_attn_scalar: Optional[float] = None
  # Llama 3 / Qwen2 options; the defaults give Gemma.
  mlp_activation: str = "gelu"  # "gelu" (tanh approximation) or "silu"
  # False adds a separate output embedding ("output_embedding", [V, D]).
  tie_embeddings: bool = True
  scale_embeddings: bool = True  # Multiply input embeddings by sqrt(d_model).
  # RMSNorm multiplies by (1 + scale) (Gemma) or by scale (Llama, Qwen).
  norm_one_plus_scale: bool = True
  qkv_bias: bool = False  # Biases on the q/k/v projections (Qwen2).
  # RoPE frequency scaling for contexts past the pretraining length; None:
  # off. rope_scaling_type says how the factor stretches the wavelengths
  # (rope_timescale): "llama3" (Llama 3.1), "linear" (position
  # interpolation) or "yarn" (e.g. Qwen2.5 past 32k tokens).
  rope_scale_factor: Optional[float] = None
  rope_scaling_type: str = "llama3"
  rope_low_freq_factor: float = 1.0  # llama3
  rope_high_freq_factor: float = 4.0  # llama3
  rope_original_max_len: int = 8192  # llama3, yarn: the pretraining length
  # yarn: frequencies that turn more than beta_fast times over the original
  # length are kept, fewer than beta_slow times divided by the factor.
  rope_beta_fast: float = 32.0
  rope_beta_slow: float = 1.0
  # yarn: the scale of rotated queries and keys; None: 0.1 ln(factor) + 1.
  rope_attention_factor: Optional[float] = None
  # The context length the model is meant for (config.json's
  # max_position_embeddings). The model does not use it; serving tools size
  # their caches by it.
  context_len: int = 8192
  param_dtype: str = "float32"
  dtype: str = "float32"
  # Rematerialise each layer in the backward pass (saves activation memory).
  remat: bool = False
  # Tokens per chunk when scoring (token_log_probs): the [B, C, V] float32
  # logits of one chunk are the largest buffer of a large-vocabulary step.
  logits_chunk_len: int = 512
  # Training attention runs in query blocks of this many tokens, each
  # against the keys up to its end (attention.self_attention).
  attention_block_len: int = 512
  # Training and scoring run the layers with `lax.scan` (compile time flat in
  # depth) or, when False, as a Python loop, which XLA schedules better: on
  # a CPU the 100m train step is 15% faster (benchmarks/train_step.py). The
  # params are stacked either way.
  scan_layers: bool = True

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"num_heads={self.num_heads} must be a multiple of "
        f"num_kv_heads={self.num_kv_heads}; fix the model config."
      )
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for RoPE.")
    if self.rope_scaling_type not in _ROPE_SCALING_TYPES:
      raise ValueError(
        f"model.rope_scaling_type={self.rope_scaling_type!r}; "
        f"use one of {_ROPE_SCALING_TYPES}."
      )
    if self.mlp_activation not in _ACTIVATIONS:
      raise ValueError(
        f"model.mlp_activation={self.mlp_activation!r}; use "
        f"one of {sorted(_ACTIVATIONS)}."
      )
    for name in ("logits_chunk_len", "attention_block_len"):
      if getattr(self, name) < 1:
        raise ValueError(f"model.{name}={getattr(self, name)} must be >= 1.")
    for name in ("param_dtype", "dtype"):
      # float64 (with jax_enable_x64) serves the tests' references.
      if getattr(self, name) not in (
        "float32",
        "bfloat16",
        "float16",
        "float64",
      ):
        raise ValueError(
          f"model.{name}={getattr(self, name)!r}; use float32, bfloat16 "
          "or float16."
        )

  @property
  def num_params(self) -> int:
    """The number of parameters: the elements of every params array."""
    shapes = jax.eval_shape(lambda: Transformer(self).init(jax.random.key(0)))
    return sum(x.size for x in jax.tree.leaves(shapes))


def param_axes(cfg: TransformerConfig) -> Params:
  """Logical axis names of every parameter, a pytree shaped like the params."""
  layers = {
    "attn_norm": ("layers", "embed"),
    "q": ("layers", "embed", "heads", "head_dim"),
    "k": ("layers", "embed", "kv_heads", "head_dim"),
    "v": ("layers", "embed", "kv_heads", "head_dim"),
    "o": ("layers", "heads", "head_dim", "embed"),
    "mlp_norm": ("layers", "embed"),
    "gate": ("layers", "embed", "mlp"),
    "up": ("layers", "embed", "mlp"),
    "down": ("layers", "mlp", "embed"),
  }
  if cfg.post_norms:
    layers["post_attn_norm"] = ("layers", "embed")
    layers["post_mlp_norm"] = ("layers", "embed")
  if cfg.qkv_bias:
    layers["q_bias"] = ("layers", "heads", "head_dim")
    layers["k_bias"] = ("layers", "kv_heads", "head_dim")
    layers["v_bias"] = ("layers", "kv_heads", "head_dim")
  axes = {
    "embedding": ("vocab", "embed"),
    "layers": layers,
    "final_norm": ("embed",),
  }
  if not cfg.tie_embeddings:
    axes["output_embedding"] = ("vocab", "embed")
  return axes


# Logical axes of activations (the config's rules map them to mesh axes).
BTD = ("activation_batch", "activation_length", "activation_embed")
BTNH = ("activation_batch", "activation_length", "activation_heads", None)
BTKH = ("activation_batch", "activation_length", "activation_kv_heads", None)
BTF = ("activation_batch", "activation_length", "activation_mlp")
# The logits' own batch axis: training without tensor parallelism may
# still split the vocabulary (the tied embedding, the largest weight) over
# tensor for them, and then gathers a chunk's hidden states over it.
BTV = ("activation_logits_batch", "activation_length", "activation_vocab")
BTD_LOGITS = (
  "activation_logits_batch",
  "activation_length",
  "activation_embed",
)

Shard = attention.Shard


def _unsharded(x, axes):
  del axes
  return x


def dense(x, w, in_dims: int = 1, preferred_element_type=None):
  """x [..., *I] @ w [*I, *O] -> [..., *O] for the first `in_dims` axes of
  w, as one 2-D matmul over all tokens. XLA's CPU backend runs the backward
  pass of the equivalent batched einsum ("btd,df->btf") 2.5x slower, as it
  transposes activations for the weight gradient, and copies a weight with
  two input axes ([N, H, D]) into another layout on every decode step.

  Args:
    x: [..., *I], e.g. [B, T, D].
    w: [*I, *O], e.g. [D, F] or, with `in_dims` 2, [N, H, D].
    in_dims: how many leading axes of `w` (I) are contracted.
    preferred_element_type: the product's dtype (None: the inputs').

  Returns:
    [..., *O].
  """
  in_size = math.prod(w.shape[:in_dims])
  y = jax.lax.dot(
    x.reshape(-1, in_size),
    w.reshape(in_size, -1),
    preferred_element_type=preferred_element_type,
  )
  return y.reshape(*x.shape[: x.ndim - in_dims], *w.shape[in_dims:])


def unstack_layers(params: Params) -> Params:
  """Params with the stacked layers split into a tuple of per-layer dicts."""
  layers = params["layers"]
  if isinstance(layers, tuple):
    return params
  num_layers = len(jax.tree.leaves(layers)[0])
  return dict(
    params,
    layers=tuple(
      jax.tree.map(lambda x, i=i: x[i], layers) for i in range(num_layers)
    ),
  )


def rms_norm(x, scale, eps, one_plus_scale=True):
  """RMSNorm over the last axis, computed in float32 (float64 for a
  float64 `x`): x / sqrt(mean(x^2) + eps), times the scale.

  Args:
    x: [..., D], the activations.
    scale: [D], the norm's scale.
    eps: added to the mean square.
    one_plus_scale: multiply by (1 + scale) (Gemma) or by scale (Llama,
      Qwen).

  Returns:
    [..., D] in x's dtype.
  """
  acc = attention.accumulation_dtype(x.dtype)
  x32 = x.astype(acc)
  normed = x32 * jax.lax.rsqrt(
    jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps
  )
  scale = scale.astype(acc)
  return (normed * (1.0 + scale if one_plus_scale else scale)).astype(x.dtype)


def rope_timescale(cfg: TransformerConfig) -> np.ndarray:
  """Per-frequency RoPE wavelength / 2pi ([H / 2], float32), stretched when
  cfg.rope_scale_factor is set, as transformers computes it for each
  rope_scaling_type:
    linear  every wavelength times the factor;
    llama3  wavelengths longer than the original length / low_freq_factor
            times the factor, shorter than / high_freq_factor kept, a
            smooth blend between (Llama 3.1's reference code);
    yarn    frequencies that turn more than beta_fast times over the
            original length kept, fewer than beta_slow times divided by the
            factor, a linear ramp over the frequency index between (YaRN,
            Peng et al. 2023).
  """
  half = cfg.head_dim // 2
  timescale = cfg.rope_base ** (2.0 * np.arange(half) / cfg.head_dim)
  factor = cfg.rope_scale_factor
  if factor is None:
    return timescale.astype(np.float32)
  inv_freq = 1.0 / timescale
  if cfg.rope_scaling_type == "linear":
    inv_freq = inv_freq / factor
  elif cfg.rope_scaling_type == "llama3":
    wavelen = 2 * np.pi * timescale
    low_freq_wavelen = cfg.rope_original_max_len / cfg.rope_low_freq_factor
    high_freq_wavelen = cfg.rope_original_max_len / cfg.rope_high_freq_factor
    smooth = (
      cfg.rope_original_max_len / wavelen - cfg.rope_low_freq_factor
    ) / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    inv_freq = np.where(
      wavelen > low_freq_wavelen,
      inv_freq / factor,
      np.where(wavelen < high_freq_wavelen, inv_freq, blended),
    )
  else:  # yarn

    def index_turning(rotations):  # fractional frequency index
      return (
        cfg.head_dim
        * math.log(cfg.rope_original_max_len / (rotations * 2 * math.pi))
        / (2 * math.log(cfg.rope_base))
      )

    low = max(math.floor(index_turning(cfg.rope_beta_fast)), 0)
    high = min(math.ceil(index_turning(cfg.rope_beta_slow)), cfg.head_dim - 1)
    ramp = np.clip((np.arange(half) - low) / max(high - low, 0.001), 0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
  return (1.0 / inv_freq).astype(np.float32)


def rope_attention_factor(cfg: TransformerConfig) -> float:
  """What YaRN multiplies the rotated queries and keys by (1 otherwise)."""
  if cfg.rope_scale_factor is None or cfg.rope_scaling_type != "yarn":
    return 1.0
  if cfg.rope_attention_factor is not None:
    return cfg.rope_attention_factor
  return (
    0.1 * math.log(cfg.rope_scale_factor) + 1.0
    if (cfg.rope_scale_factor > 1)
    else 1.0
  )


def apply_rope(x_btnh, positions_bt, timescale_h, scale=1.0):
  """Rotary position embeddings: rotates each pair (i, i + H / 2) of the
  head dimension by the angle position / timescale_h[i], and multiplies by
  `scale`; computed in float32 (float64 for a float64 `x_btnh`).

  Args:
    x_btnh: [B, T, N, H] queries, or [B, T, K, H] keys.
    positions_bt: int32 [B, T], the tokens' positions.
    timescale_h: float32 [H / 2], the wavelengths / 2pi (`rope_timescale`).
    scale: YaRN's attention factor (`rope_attention_factor`; 1: none).

  Returns:
    `x_btnh` rotated, its shape and dtype.
  """
  acc = attention.accumulation_dtype(x_btnh.dtype)
  angles_bth = positions_bt[..., None].astype(acc) / timescale_h
  sin = jnp.sin(angles_bth)[:, :, None, :] * scale
  cos = jnp.cos(angles_bth)[:, :, None, :] * scale
  first, second = jnp.split(x_btnh.astype(acc), 2, axis=-1)
  rotated = jnp.concatenate(
    [first * cos - second * sin, second * cos + first * sin], axis=-1
  )
  return rotated.astype(x_btnh.dtype)


@dataclasses.dataclass(frozen=True)
class Transformer:
  """`init(rng) -> params`, `apply(params, ...) -> (logits, cache)` and
  `token_log_probs(params, tokens, valid)`. `shard(x, logical_axes)`
  constrains an activation's sharding (default: none, one device)."""

  cfg: TransformerConfig
  shard: Shard = _unsharded
  # Attention kernels: "xla" (any platform), "tpu" (Pallas kernels,
  # models/tpu_attention.py) or "tpu_interpret" (those, interpreted on the
  # CPU, for tests).
  kernels: str = "xla"

  def init(self, rng) -> Params:
    """Random params from the PRNG key `rng`, in cfg.param_dtype: each
    weight a normal truncated at +-2 times fan_in ** -0.5, norms the
    identity, biases zero; the layers stacked on a leading [L] axis
    (`param_axes` names every axis)."""
    cfg = self.cfg
    L, D, N, K, H, F = (
      cfg.num_layers,
      cfg.d_model,
      cfg.num_heads,
      cfg.num_kv_heads,
      cfg.head_dim,
      cfg.mlp_dim,
    )
    dtype = cfg.param_dtype
    keys = iter(jax.random.split(rng, 8))

    def dense(shape, fan_in):
      return (
        jax.random.truncated_normal(next(keys), -2.0, 2.0, shape) * fan_in**-0.5
      ).astype(dtype)

    def norm_init(shape):  # the identity in either RMSNorm convention
      return (jnp.zeros if cfg.norm_one_plus_scale else jnp.ones)(shape, dtype)

    layers = {
      "attn_norm": norm_init((L, D)),
      "q": dense((L, D, N, H), D),
      "k": dense((L, D, K, H), D),
      "v": dense((L, D, K, H), D),
      "o": dense((L, N, H, D), N * H),
      "mlp_norm": norm_init((L, D)),
      "gate": dense((L, D, F), D),
      "up": dense((L, D, F), D),
      "down": dense((L, F, D), F),
    }
    if cfg.post_norms:
      layers["post_attn_norm"] = norm_init((L, D))
      layers["post_mlp_norm"] = norm_init((L, D))
    if cfg.qkv_bias:
      layers["q_bias"] = jnp.zeros((L, N, H), dtype)
      layers["k_bias"] = jnp.zeros((L, K, H), dtype)
      layers["v_bias"] = jnp.zeros((L, K, H), dtype)
    params = {
      "embedding": dense((cfg.vocab_size, D), D),
      "layers": layers,
      "final_norm": norm_init((D,)),
    }
    if not cfg.tie_embeddings:
      # A key of its own, so the tied (Gemma) init stays what it was.
      params["output_embedding"] = (
        jax.random.truncated_normal(
          jax.random.fold_in(rng, 8), -2.0, 2.0, (cfg.vocab_size, D)
        )
        * D**-0.5
      ).astype(dtype)
    return params

  def empty_segment(
    self, num_entries: int, num_slots: int, rows_per_entry: int = 1
  ) -> kv_cache.Segment:
    """A KV-cache segment with nothing written, in the compute dtype.

    Args:
      num_entries: E, the rows (or prompts, for a shared segment).
      num_slots: S, the slots of each entry.
      rows_per_entry: G, the batch rows that read each entry.

    Returns:
      The kv_cache.Segment: L zero keys and values [E, K, S, H], laid out
      by the model's `shard`.
    """
    cfg = self.cfg
    return kv_cache.empty_segment(
      cfg.num_layers,
      num_entries,
      num_slots,
      cfg.num_kv_heads,
      cfg.head_dim,
      cfg.dtype,
      self.shard,
      rows_per_entry,
    )

  def compute_params(self, params: Params) -> Params:
    """The params as the forward pass uses them: weights in the compute
    dtype, norm scales as stored (they are applied in float32). A frozen
    copy (the reference, the rollout's weights) is kept in this form: the
    same numerics at a fraction of the float32 master's memory."""
    return jax.tree_util.tree_map_with_path(
      lambda path, x: (
        x if "norm" in jax.tree_util.keystr(path) else x.astype(self.cfg.dtype)
      ),
      params,
    )

  def apply(
    self, params, tokens_bt, positions_bt, episodes_bt, logits_at_b=None
  ):
    """Logits for every token, each token attending to the tokens at or
    before it of its own episode.

    Args:
      params: the params, layers stacked (as `init` makes them).
      tokens_bt: int32 [B, T], the token ids.
      positions_bt: int32 [B, T], the tokens' RoPE positions.
      episodes_bt: int32 [B, T], each token's episode id, -1 for padding
        (one episode a row: `episode_ids(valid)`).
      logits_at_b: int32 [B], the one slot of each row to give logits for
        (None: every slot).

    Returns:
      float32 logits [B, T, V], or [B, 1, V] with `logits_at_b`.
    """
    x_btd = self._trunk(params, tokens_bt, positions_bt, episodes_bt)
    if logits_at_b is not None:
      x_btd = jnp.take_along_axis(x_btd, logits_at_b[:, None, None], axis=1)
    return self._logits(params, x_btd)

  def prefill(
    self, params, tokens_ut, lengths_u, segment: kv_cache.Segment
  ) -> tuple[jax.Array, kv_cache.Segment]:
    """Runs U prompts and writes their keys and values into the empty
    `segment`, from slot 0 at positions 0 .. T - 1.

    Args:
      params: the params, layers unstacked (`unstack_layers`).
      tokens_ut: int32 [U, T], the prompts, left-aligned.
      lengths_u: int32 [U], each prompt's real tokens (its first ones), at
        least 1.
      segment: an empty kv_cache.Segment of at least T slots, one entry per
        prompt.

    Returns:
      (float32 logits [U, V] after each prompt's last token, the segment
      with offsets 0 and lengths `lengths_u`).
    """
    T = tokens_ut.shape[1]
    positions_ut = jnp.broadcast_to(
      jnp.arange(T, dtype=jnp.int32), tokens_ut.shape
    )
    episodes_ut = jnp.where(positions_ut < lengths_u[:, None], 0, -1)
    x_utd = self._embed(params, tokens_ut)
    for layer, (p, window) in enumerate(
      zip(params["layers"], self._layer_windows())
    ):

      def attend(q, k, v, layer=layer, window=window):
        nonlocal segment
        segment = kv_cache.write(segment, layer, 0, k, v)
        return self._self_attention(q, k, v, episodes_ut, positions_ut, window)

      x_utd = self._block(p, x_utd, positions_ut, attend)
    segment = dataclasses.replace(
      segment, offsets_e=jnp.zeros_like(lengths_u), lengths_e=lengths_u
    )
    last_u1d = jnp.take_along_axis(x_utd, (lengths_u - 1)[:, None, None], 1)
    return self._logits(params, last_u1d)[:, 0], segment

  def extend(
    self, params, tokens_bt, segments: tuple, index: int, slot, active_b=None
  ) -> tuple[jax.Array, tuple]:
    """Runs T new tokens per row, written at slots slot .. slot + T - 1 of
    `segments[index]` (a turn: one entry per row) at the positions that
    follow its offsets, attending to those and to what the segments before
    it hold. The segment's lengths are the caller's to set (rows that
    stopped write slots past their length, which stay unseen).

    Args:
      params: the params, layers unstacked (`unstack_layers`).
      tokens_bt: int32 [B, T], the new tokens.
      segments: the cache, a tuple of kv_cache.Segments.
      index: the segment the new tokens are written to; the ones after it
        are neither read nor changed.
      slot: the slot of the first new token, an int or an int32 scalar.
      active_b: bool [B], the rows whose logits are needed (None: every
        row); the TPU kernels read less of the cache for the others.

    Returns:
      (float32 logits [B, V] after each row's last new token, the cache
      with the new keys and values written).
    """
    T = tokens_bt.shape[1]
    current = segments[index]
    positions_bt = (
      current.offsets_e[:, None] + slot + jnp.arange(T, dtype=jnp.int32)
    )
    # The current segment as the new tokens see it: written up to them.
    seen = list(segments[: index + 1])
    seen[index] = dataclasses.replace(
      current, lengths_e=jnp.full_like(current.lengths_e, slot + T)
    )
    x_btd = self._embed(params, tokens_bt)
    for layer, (p, window) in enumerate(
      zip(params["layers"], self._layer_windows())
    ):

      def attend(q, k, v, layer=layer, window=window):
        seen[index] = kv_cache.write(seen[index], layer, slot, k, v)
        return attention.segment_attention(
          q,
          positions_bt,
          seen,
          layer,
          window,
          self.cfg.attn_logit_softcap,
          self.shard,
          self.kernels,
          active_b,
        )

      x_btd = self._block(p, x_btd, positions_bt, attend)
    written = dataclasses.replace(seen[index], lengths_e=current.lengths_e)
    segments = segments[:index] + (written,) + segments[index + 1 :]
    return self._logits(params, x_btd[:, -1:])[:, 0], segments

  def token_log_probs(self, params, tokens_bt, positions_bt, episodes_bt):
    """log p(token t | the tokens before it in its episode) and the entropy
    of that next-token distribution, both [B, T] float32; 0 at an episode's
    first token and on padding. Rows hold episodes as `apply` takes them
    (episodes.Packed: several a row, back to back).

    The logits are made one chunk of `logits_chunk_len` tokens at a time
    and rematerialised in the backward pass, so no [B, T, V] array exists;
    the vocabulary stays sharded and each token's log-prob is its logit
    minus the logsumexp.

    Args:
      params: the params, layers stacked (as `init` makes them).
      tokens_bt: int32 [B, T], the token ids.
      positions_bt: int32 [B, T], the tokens' RoPE positions.
      episodes_bt: int32 [B, T], each token's episode id, -1 for padding.

    Returns:
      (log-probs, entropies), each float32 [B, T].
    """
    x_btd = self._trunk(params, tokens_bt, positions_bt, episodes_bt)
    B, T = tokens_bt.shape
    scored = T - 1  # Predictions from slots 0 .. T-2.
    num_chunks = -(-scored // self.cfg.logits_chunk_len)
    chunk = -(-scored // num_chunks)
    chunk += -chunk % 8  # TPU tiles
    pad = num_chunks * chunk - scored
    to_chunks = lambda a: jnp.moveaxis(
      jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)).reshape(
        B, num_chunks, chunk, *a.shape[2:]
      ),
      1,
      0,
    )
    head = {
      k: params[k]
      for k in ("final_norm", "embedding", "output_embedding")
      if k in params
    }

    @jax.checkpoint
    def score_chunk(head, x_bcd, targets_bc):
      with jax.named_scope("log_probs"):
        logits_bcv = self._logits(head, x_bcd)
        lse_bc = jax.nn.logsumexp(logits_bcv, axis=-1)
        picked_bc = (
          jnp.take_along_axis(logits_bcv, targets_bc[..., None], axis=-1)[
            ..., 0
          ]
          - lse_bc
        )
        logits_bcv = jax.lax.stop_gradient(logits_bcv)
        probs_bcv = jnp.exp(
          logits_bcv - jax.lax.stop_gradient(lse_bc)[..., None]
        )
        entropy_bc = jax.lax.stop_gradient(lse_bc) - jnp.sum(
          probs_bcv * logits_bcv, axis=-1
        )
      return picked_bc, entropy_bc

    _, (picked_nbc, entropy_nbc) = jax.lax.scan(
      lambda carry, xs: (carry, score_chunk(head, *xs)),
      None,
      (to_chunks(x_btd[:, : T - 1]), to_chunks(tokens_bt[:, 1:])),
    )
    # Slot t is predicted from slot t - 1 when both hold the same episode.
    predicted_bt = jnp.pad(
      (episodes_bt[:, 1:] == episodes_bt[:, :-1]) & (episodes_bt[:, 1:] >= 0),
      ((0, 0), (1, 0)),
    )
    unchunk = lambda a: jnp.where(
      predicted_bt,
      jnp.pad(
        jnp.moveaxis(a, 0, 1).reshape(B, -1)[:, :scored], ((0, 0), (1, 0))
      ),
      0.0,
    )
    return unchunk(picked_nbc), unchunk(entropy_nbc)

  def _embed(self, params, tokens_bt):
    cfg = self.cfg
    with jax.named_scope("embed"):
      embedding = params["embedding"].astype(cfg.dtype)
      x_btd = embedding[tokens_bt]
      if cfg.scale_embeddings:
        x_btd = x_btd * jnp.sqrt(float(cfg.d_model)).astype(cfg.dtype)
      return self.shard(x_btd, BTD)

  def _trunk(self, params, tokens_bt, positions_bt, episodes_bt):
    """Embedding and layers over T tokens that attend to each other (see
    `apply`): the last layer's output [B, T, D] (before the final norm)."""
    cfg = self.cfg
    x_btd = self._embed(params, tokens_bt)

    def layer(x_btd, inputs):
      p, window = inputs
      attend = lambda q, k, v: self._self_attention(
        q, k, v, episodes_bt, positions_bt, window
      )
      return self._block(p, x_btd, positions_bt, attend), None

    if cfg.remat:
      layer = jax.checkpoint(layer)
    if cfg.scan_layers:
      x_btd, _ = jax.lax.scan(
        layer,
        x_btd,
        (params["layers"], jnp.asarray(self._layer_windows(), jnp.int32)),
      )
    else:
      for p, window in zip(
        unstack_layers(params)["layers"], self._layer_windows()
      ):
        x_btd, _ = layer(x_btd, (p, window))
    return x_btd

  def _self_attention(
    self, q_btnh, k_btkh, v_btkh, episodes_bt, positions_bt, window
  ):
    return attention.self_attention(
      q_btnh,
      k_btkh,
      v_btkh,
      episodes_bt,
      positions_bt,
      window,
      self.cfg.attn_logit_softcap,
      self.shard,
      self.cfg.attention_block_len,
      self.kernels,
      self.cfg.sliding_window,
    )

  def _logits(self, params, x_btd):
    """The final norm and the output projection: [B, T, V] float32."""
    cfg = self.cfg
    with jax.named_scope("logits"):
      x_btd = self._norm(self.shard(x_btd, BTD_LOGITS), params["final_norm"])
      output_embedding = (
        params["embedding"]
        if cfg.tie_embeddings
        else params["output_embedding"]
      ).astype(cfg.dtype)
      logits_btv = dense(
        x_btd,
        output_embedding.T,
        preferred_element_type=attention.accumulation_dtype(cfg.dtype),
      )
      return self.shard(
        attention.softcap(logits_btv, cfg.final_logit_softcap), BTV
      )

  def _layer_windows(self) -> list[int]:
    """Per-layer attention window in positions (a huge value means global)."""
    cfg = self.cfg
    unlimited = int(jnp.iinfo(jnp.int32).max)
    if cfg.sliding_window is None:
      return [unlimited] * cfg.num_layers
    return [
      cfg.sliding_window
      if not cfg.alternate_local_global or i % 2 == 0
      else unlimited
      for i in range(cfg.num_layers)
    ]

  def _norm(self, x, scale):
    return rms_norm(x, scale, self.cfg.norm_eps, self.cfg.norm_one_plus_scale)

  def _block(self, p, x_btd, positions_bt, attend):
    """One layer. `attend(q_btnh, k_btkh, v_btkh) -> [B, T, N, H]` is the
    attention over the keys the caller's layout allows (the new tokens'
    own, or a KV cache's), given the rotated, scaled queries and keys."""
    cfg = self.cfg
    cast = lambda name: p[name].astype(cfg.dtype)
    shard = self.shard

    with jax.named_scope("attention"):
      h_btd = self._norm(x_btd, p["attn_norm"])
      q_btnh = shard(dense(h_btd, cast("q")), BTNH)
      k_btkh = shard(dense(h_btd, cast("k")), BTKH)
      v_btkh = shard(dense(h_btd, cast("v")), BTKH)
      if cfg.qkv_bias:
        q_btnh = q_btnh + cast("q_bias")
        k_btkh = k_btkh + cast("k_bias")
        v_btkh = v_btkh + cast("v_bias")
      timescale_h = rope_timescale(cfg)
      rope_scale = rope_attention_factor(cfg)
      q_btnh = apply_rope(q_btnh, positions_bt, timescale_h, rope_scale)
      k_btkh = apply_rope(k_btkh, positions_bt, timescale_h, rope_scale)
      scalar = cfg.query_pre_attn_scalar or cfg.head_dim
      q_btnh = q_btnh * jnp.asarray(scalar**-0.5, cfg.dtype)
      attn_btd = dense(attend(q_btnh, k_btkh, v_btkh), cast("o"), in_dims=2)
      if cfg.post_norms:
        attn_btd = self._norm(attn_btd, p["post_attn_norm"])
      x_btd = shard(x_btd + attn_btd, BTD)

    with jax.named_scope("mlp"):
      h_btd = self._norm(x_btd, p["mlp_norm"])
      activation = _ACTIVATIONS[cfg.mlp_activation]
      gate_btf = shard(activation(dense(h_btd, cast("gate"))), BTF)
      up_btf = shard(dense(h_btd, cast("up")), BTF)
      mlp_btd = dense(gate_btf * up_btf, cast("down"))
      if cfg.post_norms:
        mlp_btd = self._norm(mlp_btd, p["post_mlp_norm"])
      return shard(x_btd + mlp_btd, BTD)


def episode_ids(valid_bt):
  """The episode ids of rows that each hold one episode with padding (False
  in `valid_bt`) anywhere: 0 for its tokens, -1 for padding."""
  return jnp.where(valid_bt, 0, -1).astype(jnp.int32)


def positions_from_mask(valid_bt):
  """Positions that count only valid tokens, so padding does not shift RoPE."""
  return jnp.maximum(jnp.cumsum(valid_bt.astype(jnp.int32), axis=-1) - 1, 0)
