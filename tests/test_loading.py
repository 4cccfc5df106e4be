"""Loading released weights: the Gemma release layout, Hugging Face
directories through the experiment, the params' dtype, reads limited to each
device's block, export back to safetensors (reloaded by transformers), and
one-line errors."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import transformers
from safetensors import safe_open
from safetensors.numpy import save_file

from configs import common, demo
from score_jax import experiment
from score_jax import tokenizer as tokenizer_lib
from score_jax.models import hf, hf_config, loading, presets
from score_jax.models import transformer as tf
from tests import hf_fixtures as fx


def init(path, fmt):
  return ml_collections.ConfigDict(dict(path=str(path), format=fmt))


def write_gemma_layout(hf_dir, out, nested: bool, dtype=np.float32) -> None:
  """The HF fixture's weights in the Gemma release layout, written from the
  published shapes (independently of the loader): flat keys such as
  'transformer/layer_0/attn/q_einsum' -> {'w': ...}, or the gemma library's
  nested form; stored as `dtype`."""
  cfg = fx.fixture_config(os.path.basename(hf_dir))
  t = fx.hf_tensors(hf_dir)
  N, K, H, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_model
  heads = lambda w, n: w.reshape(n, H, D).transpose(0, 2, 1)  # [n, D, H]
  modules = {
    "embedder": {"input_embedding": t["model.embed_tokens.weight"]},
    "final_norm": {"scale": t["model.norm.weight"]},
  }
  for l in range(cfg.num_layers):
    w = lambda name, l=l: t[f"model.layers.{l}.{name}.weight"]
    q = heads(w("self_attn.q_proj"), N)
    k, v = heads(w("self_attn.k_proj"), K), heads(w("self_attn.v_proj"), K)
    layer = {
      "attn/attn_vec_einsum": {
        "w": w("self_attn.o_proj").reshape(D, N, H).transpose(1, 2, 0)
      },
      "mlp/linear": {"w": w("mlp.down_proj").T},
      "pre_attention_norm": {"scale": w("input_layernorm")},
    }
    if K == N:
      layer["attn/qkv_einsum"] = {"w": np.stack([q, k, v])}
    else:
      layer["attn/q_einsum"] = {"w": q}
      layer["attn/kv_einsum"] = {"w": np.stack([k, v])}
    gate, up = w("mlp.gate_proj"), w("mlp.up_proj")  # [F, D]
    if cfg.post_norms:  # Gemma 2: transposed gating, four norms
      layer["mlp/gating_einsum"] = {"w": np.stack([gate, up])}
      layer["pre_ffw_norm"] = {"scale": w("pre_feedforward_layernorm")}
      layer["post_attention_norm"] = {"scale": w("post_attention_layernorm")}
      layer["post_ffw_norm"] = {"scale": w("post_feedforward_layernorm")}
    else:
      layer["mlp/gating_einsum"] = {"w": np.stack([gate.T, up.T])}
      layer["pre_ffw_norm"] = {"scale": w("post_attention_layernorm")}
    modules.update(
      {f"layer_{l}/{name}": value for name, value in layer.items()}
    )
  if nested:
    tree = {}
    for name, leaves in modules.items():
      *parents, last = name.split("/")
      node = tree
      for part in parents:
        node = node.setdefault(part, {})
      # The library keeps the MLP weights bare, without "w".
      node[last] = leaves["w"] if "mlp" in parents else leaves
  else:
    tree = {f"transformer/{name}": leaves for name, leaves in modules.items()}
  tree = jax.tree.map(lambda x: x.astype(dtype), tree)
  with ocp.PyTreeCheckpointer() as checkpointer:
    checkpointer.save(os.path.abspath(out), tree)


@pytest.mark.parametrize("name,nested", [("gemma", False), ("gemma2", True)])
def test_gemma_release_layout_gives_the_reference_logits(
  tmp_path, name, nested
):
  write_gemma_layout(fx.fixture_dir(name), tmp_path / "ckpt", nested)
  cfg = fx.fixture_config(name)
  shardings = fx.mesh_shardings(cfg)
  params = loading.load(init(tmp_path / "ckpt", "gemma"), cfg, shardings)
  assert jax.tree.map(lambda x: x.sharding, params) == shardings
  diff = fx.max_logit_diff(name, cfg, params)
  print(f"{name} (Gemma layout): max abs logit diff {diff:.2e}")
  assert diff < fx.MAX_LOGIT_DIFF


def test_hf_reads_only_each_devices_block(monkeypatch):
  """No host materialises a whole sharded tensor: with the params split 8
  ways over fsdp, every read is an eighth of its tensor or less."""
  reads = []
  original = hf.Layout.read

  def recording_read(layout, tensor, index):
    block = original(layout, tensor, index)
    reads.append((layout.name(0), block.size, np.prod(layout.hf_shape)))
    return block

  monkeypatch.setattr(hf.Layout, "read", recording_read)
  cfg = fx.fixture_config("llama3")
  hf.load(fx.fixture_dir("llama3"), cfg, fx.mesh_shardings(cfg, (1, 8, 1)))
  assert {name for name, _, _ in reads} >= {
    "model.embed_tokens.weight",
    "lm_head.weight",
    "model.layers.0.self_attn.q_proj.weight",
  }
  for name, size, full in reads:
    assert size <= full // 8, (name, size, full)


def test_export_round_trip(tmp_path):
  """Exported safetensors hold the same tensors under the same names as
  the checkpoint they were loaded from, config.json describes the same
  model, and they load back to the same params, also when split into
  several files and in bfloat16."""
  for name in fx.ARCHITECTURES:
    cfg = fx.fixture_config(name)
    shardings = fx.mesh_shardings(cfg)
    params = hf.load(fx.fixture_dir(name), cfg, shardings)
    out = tmp_path / name
    hf.save(
      str(out),
      params,
      cfg,
      tokenizer=tokenizer_lib.Tokenizer(fx.fixture_dir(name)),
      max_shard_bytes=100_000,
    )
    original, exported = (
      fx.hf_tensors(fx.fixture_dir(name)),
      fx.hf_tensors(out),
    )
    assert sorted(exported) == sorted(original)
    for key in original:
      np.testing.assert_array_equal(exported[key], original[key], key)
    assert hf_config.architecture(hf_config.read(str(out))) == (
      hf_config.architecture(hf_config.read(fx.fixture_dir(name)))
    )
    assert os.path.isfile(out / "model.safetensors.index.json")
    assert tokenizer_lib.Tokenizer(str(out)).vocab_size == (
      tokenizer_lib.Tokenizer(fx.fixture_dir(name)).vocab_size
    )
  bf16 = fx.fixture_config("qwen2", param_dtype="bfloat16")
  shardings = fx.mesh_shardings(bf16)
  params = hf.load(fx.fixture_dir("qwen2"), bf16, shardings)
  hf.save(str(tmp_path / "bf16"), params, bf16)
  with safe_open(
    str(tmp_path / "bf16" / "model.safetensors"), framework="numpy"
  ) as f:
    assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
  again = hf.load(str(tmp_path / "bf16"), bf16, shardings)
  jax.tree.map(
    np.testing.assert_array_equal, jax.device_get(again), jax.device_get(params)
  )


def _as_transformers_reads(model_dir) -> dict:
  """The model config transformers builds from a directory, less what does
  not change its forward pass (the token ids are checked on their own), with
  the fields written under two names (activation) or derivable (head_dim)
  in one form."""
  config = transformers.AutoConfig.from_pretrained(model_dir).to_dict()
  for key in (
    "_name_or_path",
    "transformers_version",
    "initializer_range",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
  ):
    config.pop(key)
  config["hidden_act"] = (
    config.pop("hidden_activation", None) or config["hidden_act"]
  )
  config["head_dim"] = (
    config.get("head_dim")
    or config["hidden_size"] // config["num_attention_heads"]
  )
  return config


@pytest.mark.parametrize("name", fx.ARCHITECTURES)
def test_transformers_reloads_the_export(tmp_path, name):
  """transformers reads the export as the model it wrote: the same model
  config from config.json (max_position_embeddings and RoPE scaling
  included) over the same tensors (test_export_round_trip), hence the
  logits in expected.npz, which it computed from them (run by
  `scripts/make_hf_fixtures.py --check`, which needs torch). Its
  generation config stops on our stop ids, and its tokenizer gives our
  prompts through the chat template we export."""
  cfg = fx.fixture_config(name)
  params = hf.load(fx.fixture_dir(name), cfg, fx.mesh_shardings(cfg))
  tok = tokenizer_lib.Tokenizer(fx.fixture_dir(name))
  out = str(tmp_path / "export")
  hf.save(out, params, cfg, tokenizer=tok)
  assert _as_transformers_reads(out) == _as_transformers_reads(
    fx.fixture_dir(name)
  )
  assert (
    hf_config.read(out)["max_position_embeddings"]
    == hf_config.read(fx.fixture_dir(name))["max_position_embeddings"]
  )
  generation = transformers.GenerationConfig.from_pretrained(out)
  assert generation.eos_token_id == list(tok.stop_ids)
  assert (generation.bos_token_id, generation.pad_token_id) == (
    tok.bos_id,
    tok.pad_id,
  )
  reloaded, exported = (
    transformers.AutoTokenizer.from_pretrained(out),
    tokenizer_lib.Tokenizer(out),
  )
  problem, instruction = "Compute 2 + 3.", "Check it."
  messages = [{"role": "user", "content": problem}]
  assert (
    exported.first_turn(problem)
    == tok.first_turn(problem)
    == (
      reloaded.apply_chat_template(messages, add_generation_prompt=True)[
        "input_ids"
      ]
    )
  )
  assert exported.next_turn(instruction) == tok.next_turn(instruction)
  assert exported.stop_ids == tok.stop_ids


def _bfloat16_copy(source, out, config_dtype="bfloat16"):
  """A Hugging Face directory with the source's tensors in bfloat16."""
  shutil.copytree(source, out)
  tensors = fx.hf_tensors(out)
  save_file(
    {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()},
    str(out / "model.safetensors"),
    metadata={"format": "pt"},
  )
  config = hf_config.read(str(out))
  config["dtype"] = config_dtype
  (out / "config.json").write_text(json.dumps(config))
  return tensors


def test_params_keep_the_checkpoint_dtype_unless_the_config_sets_one(tmp_path):
  bf16_dir = tmp_path / "bf16"
  tensors = _bfloat16_copy(fx.fixture_dir("qwen2"), bf16_dir)
  kept = experiment.build(hf_config_dict(**{"init.path": str(bf16_dir)}))
  assert kept.model.cfg.param_dtype == "bfloat16"
  params = kept.initial_params()
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("bfloat16")}
  loading.save(str(tmp_path / "params_bf16"), params)
  cast = experiment.build(
    hf_config_dict(
      **{"init.path": str(bf16_dir), "model.param_dtype": "float32"}
    )
  )
  params = cast.initial_params()
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}
  np.testing.assert_array_equal(
    np.asarray(params["embedding"]),
    tensors["model.embed_tokens.weight"]
    .astype(ml_dtypes.bfloat16)
    .astype(np.float32),
  )
  # The same for the Orbax formats, from their metadata; float32 without
  # a checkpoint.
  write_gemma_layout(
    fx.fixture_dir("gemma"),
    tmp_path / "gemma_bf16",
    nested=False,
    dtype=ml_dtypes.bfloat16,
  )
  assert (
    loading.param_dtype(None, init(tmp_path / "gemma_bf16", "gemma"))
    == "bfloat16"
  )
  assert (
    loading.param_dtype(None, init(tmp_path / "params_bf16", "params"))
    == "bfloat16"
  )
  assert (
    loading.param_dtype(None, init(demo.BASE_PARAMS, "params")) == "float32"
  )
  assert loading.param_dtype(None, init("", "params")) == "float32"
  assert loading.param_dtype("float16", init(bf16_dir, "hf")) == "float16"


def test_dtype_conflicts_are_one_line_errors(tmp_path):
  _bfloat16_copy(fx.fixture_dir("qwen2"), tmp_path / "says_f32", "float32")
  one_line_error(
    ValueError,
    "config.json says dtype float32 but its tensors "
    "are bfloat16; set config.model.param_dtype",
    experiment.build,
    hf_config_dict(**{"init.path": str(tmp_path / "says_f32")}),
  )
  mixed = tmp_path / "mixed"
  shutil.copytree(fx.fixture_dir("qwen2"), mixed)
  tensors = fx.hf_tensors(mixed)
  tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.float16)
  save_file(tensors, str(mixed / "model.safetensors"))
  one_line_error(
    ValueError,
    r"several dtypes \(float16, float32\); set "
    "config.model.param_dtype",
    loading.param_dtype,
    None,
    init(mixed, "hf"),
  )
  assert loading.param_dtype("float32", init(mixed, "hf")) == "float32"


def hf_config_dict(**overrides):
  config = common.base_config()
  config.init.format = "hf"
  config.mesh_shape = (1, -1, 1)
  config.eval.batch_size = 8
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def test_experiment_takes_architecture_and_tokenizer_from_the_hf_dir():
  exp = experiment.build(
    hf_config_dict(
      **{"init.path": fx.fixture_dir("qwen2"), "model.remat": True}
    )
  )
  assert exp.tokenizer.format.name == "chatml"
  assert exp.model.cfg == fx.fixture_config("qwen2", remat=True)
  params = exp.initial_params()
  np.testing.assert_array_equal(
    np.asarray(params["embedding"]),
    fx.hf_tensors(fx.fixture_dir("qwen2"))["model.embed_tokens.weight"],
  )


def one_line_error(error_type, match, fn, *args):
  with pytest.raises(error_type, match=match) as raised:
    fn(*args)
  assert "\n" not in str(raised.value), str(raised.value)


def test_errors_are_one_clear_line(tmp_path):
  cfg = fx.fixture_config("gemma")
  shardings = fx.mesh_shardings(cfg, (1, 1, 1))
  gemma_dir = fx.fixture_dir("gemma")
  # Wrong paths and formats.
  one_line_error(
    FileNotFoundError,
    "is not a directory",
    loading.load,
    init(tmp_path / "nope", "hf"),
    cfg,
    shardings,
  )
  one_line_error(
    ValueError,
    "format='safetensors' is unknown",
    loading.load,
    init(gemma_dir, "safetensors"),
    cfg,
    shardings,
  )
  one_line_error(
    FileNotFoundError,
    "has no config.json",
    loading.architecture,
    init(tmp_path, "hf"),
  )
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral"}))
  one_line_error(
    ValueError,
    "model_type 'mistral' is not supported",
    loading.architecture,
    init(tmp_path, "hf"),
  )
  one_line_error(
    FileNotFoundError,
    "neither model.safetensors",
    loading.load,
    init(tmp_path, "hf"),
    cfg,
    shardings,
  )
  # A missing tensor.
  broken = tmp_path / "broken"
  shutil.copytree(gemma_dir, broken)
  tensors = fx.hf_tensors(broken)
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, str(broken / "model.safetensors"))
  one_line_error(
    ValueError,
    "no tensor 'model.layers.1.mlp.up_proj.weight'",
    loading.load,
    init(broken, "hf"),
    cfg,
    shardings,
  )
  # Shapes that do not match the config (a field set against config.json).
  wider = fx.fixture_config("gemma", mlp_dim=128)
  one_line_error(
    ValueError,
    r"'model.layers.0.mlp.down_proj.weight' has "
    r"shape \(64, 96\), the model config expects \(64, 128\)",
    loading.load,
    init(gemma_dir, "hf"),
    wider,
    fx.mesh_shardings(wider, (1, 1, 1)),
  )
  # A Gemma-layout checkpoint against another preset.
  write_gemma_layout(gemma_dir, tmp_path / "gemma_ckpt", nested=False)
  test_preset = presets.build_config({"preset": "test"})
  one_line_error(
    ValueError,
    "no tensor 'layer_0/attn/q_einsum/w'.*choose the preset",
    loading.load,
    init(tmp_path / "gemma_ckpt", "gemma"),
    test_preset,
    fx.mesh_shardings(test_preset, (1, 1, 1)),
  )
  bigger_vocab = fx.fixture_config("gemma", vocab_size=400)
  one_line_error(
    ValueError,
    r"embedder/input_embedding has shape \(384, 64\), "
    r"config.model expects \(400, 64\); choose the preset",
    loading.load,
    init(tmp_path / "gemma_ckpt", "gemma"),
    bigger_vocab,
    fx.mesh_shardings(bigger_vocab, (1, 1, 1)),
  )
  # RoPE scalings the transformer does not have.
  llama = hf_config.read(fx.fixture_dir("llama3"))
  for scaling, match in [
    (
      dict(rope_type="dynamic", factor=2.0),
      "rope_type 'dynamic' is not "
      "supported .* removing rope_scaling from config.json",
    ),
    (
      dict(rope_type="longrope", factor=2.0),
      "rope_type 'longrope' is not supported",
    ),
    (
      dict(rope_type="yarn", factor=4.0, truncate=False),
      "yarn with truncate false is not supported",
    ),
    (
      dict(rope_type="yarn", factor=4.0, mscale=1.0, mscale_all_dim=1.0),
      "yarn with mscale is not supported",
    ),
    (
      dict(rope_type="default", partial_rotary_factor=0.5),
      "partial_rotary_factor 0.5 is not supported",
    ),
  ]:
    one_line_error(
      ValueError,
      match,
      hf_config.architecture,
      dict(llama, rope_parameters=scaling),
    )
  # A tokenizer whose vocabulary does not fit the embedding.
  one_line_error(
    ValueError,
    "vocab_size 384 is smaller than the tokenizer's 512",
    experiment.build,
    hf_config_dict(
      **{
        "init.path": gemma_dir,
        "tokenizer_path": tokenizer_lib.DEMO_MODEL_PATH,
      }
    ),
  )


# Parameter counts published for these releases; their config.json as
# released (rope_theta / rope_scaling at the top level).
_RELEASED = {
  "gemma-2-2b": (
    2_614_341_888,
    dict(
      model_type="gemma2",
      vocab_size=256000,
      num_hidden_layers=26,
      hidden_size=2304,
      num_attention_heads=8,
      num_key_value_heads=4,
      head_dim=256,
      intermediate_size=9216,
      rms_norm_eps=1e-6,
      rope_theta=10000.0,
      hidden_act="gelu_pytorch_tanh",
      hidden_activation="gelu_pytorch_tanh",
      attn_logit_softcapping=50.0,
      final_logit_softcapping=30.0,
      query_pre_attn_scalar=256,
      sliding_window=4096,
    ),
  ),
  "Llama-3.1-8B": (
    8_030_261_248,
    dict(
      model_type="llama",
      vocab_size=128256,
      num_hidden_layers=32,
      hidden_size=4096,
      num_attention_heads=32,
      num_key_value_heads=8,
      intermediate_size=14336,
      rms_norm_eps=1e-5,
      rope_theta=500000.0,
      hidden_act="silu",
      attention_bias=False,
      mlp_bias=False,
      tie_word_embeddings=False,
      rope_scaling=dict(
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
        rope_type="llama3",
      ),
    ),
  ),
  "Qwen2.5-7B": (
    7_615_616_512,
    dict(
      model_type="qwen2",
      vocab_size=152064,
      num_hidden_layers=28,
      hidden_size=3584,
      num_attention_heads=28,
      num_key_value_heads=4,
      intermediate_size=18944,
      rms_norm_eps=1e-6,
      rope_theta=1000000.0,
      hidden_act="silu",
      tie_word_embeddings=False,
      use_sliding_window=False,
      sliding_window=131072,
      max_position_embeddings=32768,
    ),
  ),
}
# Long-context variants as their model cards configure them.
_RELEASED["Llama-3.1-8B"][1]["max_position_embeddings"] = 131072
_RELEASED["Qwen2.5-7B-YaRN"] = (
  _RELEASED["Qwen2.5-7B"][0],
  dict(
    _RELEASED["Qwen2.5-7B"][1],
    rope_scaling=dict(
      factor=4.0, original_max_position_embeddings=32768, type="yarn"
    ),
  ),
)


@pytest.mark.parametrize("name", sorted(_RELEASED))
def test_released_configs_give_the_published_parameter_counts(name):
  count, hf = _RELEASED[name]
  cfg = tf.TransformerConfig(**hf_config.architecture(hf))
  assert cfg.num_params == count
  assert hf_config.architecture(hf_config.to_hf(cfg)) == (
    hf_config.architecture(hf)
  )
