"""The transformer against a float64 NumPy reference, the KV cache, causality,
padding invariance, and a golden one-step training test. (Parity with the
Hugging Face reference implementation: test_hf_parity.py.)"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from score_jax import objectives
from score_jax.models import presets
from score_jax.models import transformer as tf

GEMMA1 = presets.build_config({"preset": "test"})
# Every Gemma 2 option on, with a window shorter than the test sequences.
GEMMA2 = dataclasses.replace(
  GEMMA1,
  attn_logit_softcap=5.0,
  final_logit_softcap=3.0,
  sliding_window=3,
  alternate_local_global=True,
  post_norms=True,
  query_pre_attn_scalar=16.0,
)
# Every Llama 3 / Qwen2 option on; the RoPE wavelengths (6, 63, 628, 6283)
# fall in all three regions of Llama 3's scaling.
LLAMA_QWEN = dataclasses.replace(
  GEMMA1,
  mlp_activation="silu",
  tie_embeddings=False,
  scale_embeddings=False,
  norm_one_plus_scale=False,
  qkv_bias=True,
  norm_eps=1e-5,
  rope_scale_factor=8.0,
  rope_low_freq_factor=1.0,
  rope_high_freq_factor=4.0,
  rope_original_max_len=64,
)
ALL = pytest.mark.parametrize(
  "cfg", [GEMMA1, GEMMA2, LLAMA_QWEN], ids=["gemma1", "gemma2", "llama_qwen"]
)


def _random_params(cfg, seed=0):
  """Params with non-constant norm scales and biases, so that every one of
  them is exercised."""
  params = tf.Transformer(cfg).init(jax.random.key(seed))
  paths, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(paths))
  leaves = [
    x + 0.1 * jax.random.normal(k, x.shape)
    if x.ndim <= 2 or "bias" in jax.tree_util.keystr(path)
    else x
    for (path, x), k in zip(paths, keys)
  ]
  return jax.tree.unflatten(treedef, leaves)


def _reference_forward(cfg, params, tokens, valid):
  """A loop-per-head float64 NumPy implementation of the same architecture."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  B, T = tokens.shape
  pos = np.maximum(np.cumsum(valid, axis=1) - 1, 0)

  def norm(x, scale):
    return (
      x
      / np.sqrt(np.mean(x**2, -1, keepdims=True) + cfg.norm_eps)
      * (1 + scale if cfg.norm_one_plus_scale else scale)
    )

  def llama3_scaled(freq):  # Llama 3.1's reference code, one frequency
    wavelen = 2 * np.pi / freq
    old_len = cfg.rope_original_max_len
    if wavelen < old_len / cfg.rope_high_freq_factor:
      return freq
    if wavelen > old_len / cfg.rope_low_freq_factor:
      return freq / cfg.rope_scale_factor
    smooth = (old_len / wavelen - cfg.rope_low_freq_factor) / (
      cfg.rope_high_freq_factor - cfg.rope_low_freq_factor
    )
    return (1 - smooth) * freq / cfg.rope_scale_factor + smooth * freq

  def rope(x, positions):
    half = x.shape[-1] // 2
    inv_freq = 1.0 / cfg.rope_base ** (np.arange(half) * 2.0 / x.shape[-1])
    if cfg.rope_scale_factor is not None:
      inv_freq = np.array([llama3_scaled(f) for f in inv_freq])
    ang = positions[:, None] * inv_freq[None]
    a, b = x[..., :half], x[..., half:]
    return np.concatenate(
      [a * np.cos(ang) - b * np.sin(ang), b * np.cos(ang) + a * np.sin(ang)], -1
    )

  def cap(x, c):
    return x if c is None else c * np.tanh(x / c)

  gelu = lambda x: (
    0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
  )
  silu = lambda x: x / (1 + np.exp(-x))
  activation = {"gelu": gelu, "silu": silu}[cfg.mlp_activation]
  bias = lambda lp, name, head: lp[name][head] if cfg.qkv_bias else 0.0
  output_embedding = (
    p["embedding"] if cfg.tie_embeddings else p["output_embedding"]
  )
  out = np.zeros((B, T, cfg.vocab_size))
  for b in range(B):
    x = p["embedding"][tokens[b]] * (
      np.sqrt(cfg.d_model) if cfg.scale_embeddings else 1.0
    )
    for l in range(cfg.num_layers):
      lp = {k: v[l] for k, v in p["layers"].items()}
      local = cfg.sliding_window is not None and (
        not cfg.alternate_local_global or l % 2 == 0
      )
      h = norm(x, lp["attn_norm"])
      attn = np.zeros_like(x)
      for n in range(cfg.num_heads):
        kv = n // (cfg.num_heads // cfg.num_kv_heads)
        q = (
          rope(h @ lp["q"][:, n] + bias(lp, "q_bias", n), pos[b])
          * (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
        )
        k = rope(h @ lp["k"][:, kv] + bias(lp, "k_bias", kv), pos[b])
        # Padding slots never contribute (their rows may be NaN below).
        v = np.where(
          valid[b][:, None], h @ lp["v"][:, kv] + bias(lp, "v_bias", kv), 0.0
        )
        scores = cap(q @ k.T, cfg.attn_logit_softcap)
        for t in range(T):
          for s in range(T):
            allowed = s <= t and valid[b, s]
            if local:
              allowed = allowed and pos[b, t] - pos[b, s] < cfg.sliding_window
            if not allowed:
              scores[t, s] = -np.inf
        with np.errstate(invalid="ignore"):  # fully masked padding rows
          w = np.exp(scores - scores.max(-1, keepdims=True))
        w = np.nan_to_num(w / w.sum(-1, keepdims=True))
        attn += (w @ v) @ lp["o"][n]
      if cfg.post_norms:
        attn = norm(attn, lp["post_attn_norm"])
      x = x + attn
      h = norm(x, lp["mlp_norm"])
      mlp = (activation(h @ lp["gate"]) * (h @ lp["up"])) @ lp["down"]
      if cfg.post_norms:
        mlp = norm(mlp, lp["post_mlp_norm"])
      x = x + mlp
    out[b] = cap(
      norm(x, p["final_norm"]) @ output_embedding.T, cfg.final_logit_softcap
    )
  return out


def _forward(cfg, params, tokens, valid):
  model = tf.Transformer(cfg)
  logits = model.apply(
    params,
    jnp.asarray(tokens),
    tf.positions_from_mask(jnp.asarray(valid)),
    tf.episode_ids(jnp.asarray(valid)),
  )
  return np.asarray(logits)


def _batch(cfg, B=2, T=9, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.vocab_size, (B, T))
  valid = np.ones((B, T), bool)
  valid[1, :3] = False  # a left-padded row
  return tokens, valid


@ALL
@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "loop"])
def test_forward_matches_float64_reference(cfg, scan_layers):
  cfg = dataclasses.replace(cfg, scan_layers=scan_layers)
  params = _random_params(cfg)
  tokens, valid = _batch(cfg)
  expected = _reference_forward(cfg, params, tokens, valid)
  np.testing.assert_allclose(
    _forward(cfg, params, tokens, valid)[valid],
    expected[valid],
    atol=2e-4,
    rtol=2e-4,
  )


@ALL
def test_kv_cache_segments_equal_full_forward(cfg):
  """Two prompts of 5 and 3 tokens, each prefilled once and shared by two
  rows, then a turn decoded a token a time (rows stopping at different
  lengths) and a turn of 3 tokens at once: the logits after each new token
  equal the full forward pass over that row's real tokens."""
  params = tf.unstack_layers(_random_params(cfg))
  model = tf.Transformer(cfg)
  rng = np.random.default_rng(1)
  prompt_lengths = np.array([5, 3])
  prompts = rng.integers(0, cfg.vocab_size, (2, 6))
  turn = rng.integers(0, cfg.vocab_size, (4, 4))
  turn_lengths = np.array([4, 2, 3, 1])
  instruction = rng.integers(0, cfg.vocab_size, 3)

  def full(row, count):
    """Full-forward logits after the first `count` real tokens of a row."""
    sequence = np.concatenate(
      [
        prompts[row // 2][: prompt_lengths[row // 2]],
        turn[row][: turn_lengths[row]],
        instruction,
      ]
    )
    return _forward(
      cfg, params_stacked, sequence[None, :count], np.ones((1, count), bool)
    )[0, -1]

  params_stacked = _random_params(cfg)
  segments = (
    model.empty_segment(2, 6, rows_per_entry=2),
    model.empty_segment(4, 5),
    model.empty_segment(4, 3),
  )
  logits, prompt = model.prefill(
    params, jnp.asarray(prompts), jnp.asarray(prompt_lengths), segments[0]
  )
  for row in range(2):
    np.testing.assert_allclose(
      logits[row], full(2 * row, prompt_lengths[row]), atol=1e-5, rtol=1e-5
    )
  ends = np.repeat(prompt_lengths, 2)
  segments = (
    prompt,
    dataclasses.replace(segments[1], offsets_e=jnp.asarray(ends, jnp.int32)),
    segments[2],
  )
  for t in range(4):
    logits, segments = model.extend(
      params, jnp.asarray(turn[:, t : t + 1]), segments, 1, t
    )
    segments = (
      segments[0],
      dataclasses.replace(
        segments[1],
        lengths_e=jnp.asarray(np.minimum(turn_lengths, t + 1), jnp.int32),
      ),
      segments[2],
    )
    for row in np.flatnonzero(turn_lengths > t):
      np.testing.assert_allclose(
        logits[row], full(row, ends[row] + t + 1), atol=1e-5, rtol=1e-5
      )
  segments = segments[:2] + (
    dataclasses.replace(segments[2], offsets_e=segments[1].ends_e()),
  )
  logits, _ = model.extend(
    params, jnp.broadcast_to(instruction, (4, 3)), segments, 2, 0
  )
  for row in range(4):
    np.testing.assert_allclose(
      logits[row],
      full(row, ends[row] + turn_lengths[row] + 3),
      atol=1e-5,
      rtol=1e-5,
    )


@pytest.mark.parametrize("remat", [False, True], ids=["plain", "remat"])
def test_unrolled_layers_equal_scanned_layers(remat):
  """Same logits and gradients whether the layers run in a scan or a loop
  (Gemma 2's alternating windows check that each layer gets its own)."""
  tokens, valid = _batch(GEMMA2)

  def loss_and_grads(scan_layers):
    cfg = dataclasses.replace(GEMMA2, scan_layers=scan_layers, remat=remat)
    model = tf.Transformer(cfg)
    valid_ = jnp.asarray(valid)
    loss = lambda p: jnp.sum(
      model.token_log_probs(
        p,
        jnp.asarray(tokens),
        tf.positions_from_mask(valid_),
        tf.episode_ids(valid_),
      )[0]
    )
    return jax.jit(jax.value_and_grad(loss))(_random_params(cfg))

  (scan_loss, scan_grads), (loop_loss, loop_grads) = (
    loss_and_grads(True),
    loss_and_grads(False),
  )
  np.testing.assert_allclose(loop_loss, scan_loss, rtol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
    loop_grads,
    scan_grads,
  )
  assert abs(float(scan_loss)) > 0


@pytest.mark.parametrize("cfg", [GEMMA1, GEMMA2], ids=["gemma1", "gemma2"])
def test_causality(cfg):
  params = _random_params(cfg)
  tokens, valid = _batch(cfg)
  changed = tokens.copy()
  changed[:, 6:] = (changed[:, 6:] + 1) % cfg.vocab_size
  before = _forward(cfg, params, tokens, valid)
  after = _forward(cfg, params, changed, valid)
  # Padding positions have no defined output; compare the real tokens.
  early = valid & (np.arange(valid.shape[1]) < 6)
  np.testing.assert_array_equal(before[early], after[early])
  assert np.abs(before[:, 6:] - after[:, 6:]).max() > 1e-3


@pytest.mark.parametrize("cfg", [GEMMA1, GEMMA2], ids=["gemma1", "gemma2"])
def test_padding_invariance(cfg):
  """A row padded on the left, in the middle or on the right gives the same
  logits at its real tokens as the same row alone without padding."""
  params = _random_params(cfg)
  rng = np.random.default_rng(3)
  row = rng.integers(0, cfg.vocab_size, 6)
  alone = _forward(cfg, params, row[None], np.ones((1, 6), bool))[0]
  layouts = {
    "left": [0, 0, 0, 1, 1, 1, 1, 1, 1],
    "middle": [1, 1, 0, 0, 0, 1, 1, 1, 1],
    "right": [1, 1, 1, 1, 1, 1, 0, 0, 0],
  }
  for name, layout in layouts.items():
    valid = np.array(layout, bool)[None]
    padded = np.zeros((1, 9), np.int64)
    padded[valid] = row
    logits = _forward(cfg, params, padded, valid)[0][valid[0]]
    np.testing.assert_allclose(
      logits, alone, atol=1e-5, rtol=1e-5, err_msg=name
    )


# Loss of the "test" preset after one Adam step on fixed data (f32, CPU).
# Update it only after an intended change to the model's numerics, the init,
# or the SFT loss, never to make a failing test pass: a changed value without
# such a change means a regression.
GOLDEN_LOSS_AFTER_ONE_STEP = 3.4151840


def test_golden_one_step():
  model = tf.Transformer(GEMMA1)
  params = model.init(jax.random.key(42))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, GEMMA1.vocab_size, (4, 16)))
  positions = jnp.broadcast_to(jnp.arange(16), (4, 16))
  episodes = jnp.zeros((4, 16), jnp.int32)
  weights = objectives.imitation_weights(episodes, positions)
  loss_fn = lambda p: objectives.sft_loss(
    model.token_log_probs(p, tokens, positions, episodes)[0], weights
  )
  opt = optax.adam(1e-2)
  grads = jax.grad(loss_fn)(params)
  updates, _ = opt.update(grads, opt.init(params), params)
  loss = float(loss_fn(optax.apply_updates(params, updates)))
  assert loss == pytest.approx(GOLDEN_LOSS_AFTER_ONE_STEP, rel=1e-5), (
    f"loss after one step is {loss!r}; see the comment above "
    "GOLDEN_LOSS_AFTER_ONE_STEP before updating it"
  )
