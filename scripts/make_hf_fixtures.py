r"""Writes the Hugging Face parity fixtures in tests/fixtures/hf/ with the
reference implementation (transformers on PyTorch, CPU, float32).

  pip install -e '.[fixtures]'
  python -m scripts.make_hf_fixtures           # regenerate (then commit)
  python -m scripts.make_hf_fixtures --only=qwen2,llama3   # some of them
  python -m scripts.make_hf_fixtures --check   # re-verify the committed ones

For each architecture a directory holds a small randomly initialised model
written by `save_pretrained` (config.json and safetensors; llama3's split
into several files with an index, as large releases are), a tokenizer of the
family's kind (a SentencePiece tokenizer.model for Gemma, a tokenizer.json
for Llama 3 and Qwen) and expected.npz: a padded batch (tokens, mask),
transformers' logits for it, a prompt and transformers' greedy continuation
of it. The Llama and Qwen directories also hold a Llama 3.1-style and a
Qwen2.5-style tokenizer_config.json (chat template, special tokens) and
generation_config.json (several eos ids); the Gemma ones have neither, so the
built-in turn format applies. tests/test_hf_parity.py compares score_jax
against these without torch.

--check regenerates nothing: it reloads each committed model with the
installed transformers and compares with expected.npz (did the reference
change?), runs score_jax's loader on it, and exports score_jax's params back
to safetensors and loads that export with transformers (can other tools
serve what we write?). Takes about a minute.
"""

import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np
import tokenizers
import torch
import transformers
from absl import app, flags
from transformers.models.qwen2 import tokenization_qwen2

from score_jax import tokenizer as tokenizer_lib
from score_jax.tasks import arithmetic

_CHECK = flags.DEFINE_bool("check", False, "Re-verify instead of writing.")
_ONLY = flags.DEFINE_list(
  "only", None, "Fixtures to write or check (default: all)."
)
_OUT = flags.DEFINE_string(
  "out",
  os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "hf"),
  "Fixture directory.",
)

_SHAPES = dict(
  hidden_size=64,
  intermediate_size=96,
  num_hidden_layers=2,
  num_attention_heads=4,
  initializer_range=0.1,
)
# The RoPE-scaling fixtures test one thing each and are kept smaller.
_SMALL = dict(
  _SHAPES,
  hidden_size=32,
  intermediate_size=48,
  num_attention_heads=2,
  head_dim=16,
)
# Each family with its own options set away from the defaults where a
# mistake would otherwise go unseen (head_dim != hidden / heads, a window
# shorter than the batch, small caps, llama3 RoPE scaling, MHA vs GQA), and
# the other RoPE scalings on top of the plain families: linear, and yarn
# whose ramp (frequency index 2 to 6 of 8 with these lengths) and attention
# factor both matter. name: (config class, shapes, options, tokenizer kind).
_MODELS: dict[str, tuple[Any, dict, dict, str]] = {
  "gemma": (
    transformers.GemmaConfig,
    _SHAPES,
    dict(vocab_size=384, num_key_value_heads=4, head_dim=16),
    "gemma",
  ),
  "gemma2": (
    transformers.Gemma2Config,
    _SHAPES,
    dict(
      vocab_size=384,
      num_key_value_heads=2,
      head_dim=24,
      query_pre_attn_scalar=32,
      sliding_window=4,
      attn_logit_softcapping=5.0,
      final_logit_softcapping=2.0,
    ),
    "gemma",
  ),
  "llama3": (
    transformers.LlamaConfig,
    _SHAPES,
    dict(
      vocab_size=384,
      num_key_value_heads=2,
      rms_norm_eps=1e-5,
      tie_word_embeddings=False,
      rope_scaling=dict(
        rope_type="llama3",
        rope_theta=500_000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=64,
      ),
    ),
    "llama3",
  ),
  "qwen2": (
    transformers.Qwen2Config,
    _SHAPES,
    dict(
      vocab_size=384,
      num_key_value_heads=2,
      tie_word_embeddings=True,
      rope_theta=1_000_000.0,
    ),
    "qwen2",
  ),
  "llama3_linear": (
    transformers.LlamaConfig,
    _SMALL,
    dict(
      vocab_size=384,
      num_key_value_heads=2,
      tie_word_embeddings=True,
      rope_scaling=dict(rope_type="linear", rope_theta=10_000.0, factor=4.0),
    ),
    "llama3",
  ),
  "qwen2_yarn": (
    transformers.Qwen2Config,
    _SMALL,
    dict(
      vocab_size=384,
      num_key_value_heads=1,
      tie_word_embeddings=True,
      max_position_embeddings=8192,
      rope_scaling=dict(
        rope_type="yarn",
        rope_theta=10_000.0,
        factor=4.0,
        original_max_position_embeddings=2048,
      ),
    ),
    "qwen2",
  ),
}
_SPECIAL_TOKENS = {
  "llama3": [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|finetune_right_pad_id|>",
  ],
  "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
}
# Chat templates in the style of the releases' (written here, not copied):
# Llama 3.1's dated system turn, trimmed contents and <|eot_id|>; Qwen2.5's
# default system prompt.
_CHAT_TEMPLATES = {
  "llama3": r"""{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{{- system_message + "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
""",
  "qwen2": r"""{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- else %}
    {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'system' and loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
""",
}
# Special tokens as the releases name them: tokenizer_config.json's, and
# generation_config.json's ids (Llama 3.1 stops on three tokens).
_TOKENIZER_CONFIGS = {
  "llama3": dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"),
  "qwen2": dict(
    bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
  ),
}
_GENERATION_CONFIGS = {
  "llama3": dict(
    bos_token_id="<|begin_of_text|>",
    eos_token_id=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
  ),
  "qwen2": dict(
    bos_token_id="<|endoftext|>",
    pad_token_id="<|endoftext|>",
    eos_token_id=["<|im_end|>", "<|endoftext|>"],
  ),
}
_BATCH, _LENGTH, _PADDING = 2, 12, 3
_PROMPT_LENGTH, _CONTINUATION = 5, 8


def _texts():
  return list(arithmetic.corpus_text(400, seed=1)) + [arithmetic.INSTRUCTION]


def _write_tokenizer(kind: str, out: str) -> int:
  """A small tokenizer of the family's kind, with the release-style
  tokenizer_config.json and generation_config.json where the family has
  them; returns its vocabulary size."""
  if kind == "gemma":
    path = os.path.join(out, "tokenizer.model")
    tokenizer_lib.train(_texts(), path, vocab_size=330)
    return tokenizer_lib.Tokenizer(path).vocab_size
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(
    add_prefix_space=False
  )
  if kind == "qwen2":  # Qwen's own pipeline, which transformers imposes
    tok.normalizer = tokenizers.normalizers.NFC()
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
      [
        tokenizers.pre_tokenizers.Split(
          tokenizers.Regex(tokenization_qwen2.PRETOKENIZE_REGEX),
          behavior="isolated",
        ),
        tokenizers.pre_tokenizers.ByteLevel(
          add_prefix_space=False, use_regex=False
        ),
      ]
    )
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.train_from_iterator(
    _texts(),
    tokenizers.trainers.BpeTrainer(
      vocab_size=330,
      special_tokens=_SPECIAL_TOKENS[kind],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    ),
  )
  if kind == "llama3":  # Llama 3 adds BOS in its post-processor.
    tok.post_processor = tokenizers.processors.TemplateProcessing(
      single="<|begin_of_text|> $A",
      special_tokens=[
        ("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))
      ],
    )
  tok.save(os.path.join(out, "tokenizer.json"))
  _write_json(
    out,
    tokenizer_lib.TOKENIZER_CONFIG,
    dict(
      tokenizer_class="PreTrainedTokenizerFast",
      chat_template=_CHAT_TEMPLATES[kind],
      **_TOKENIZER_CONFIGS[kind],
    ),
  )
  return tokenizer_lib.Tokenizer(out).vocab_size


def _generation_config(kind: str, out: str) -> dict:
  """The family's generation_config.json ids (token names resolved with the
  fixture's tokenizer), or {} for the Gemma kind."""
  if kind not in _GENERATION_CONFIGS:
    return {}
  tok = tokenizers.Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
  ids = lambda names: (
    [tok.token_to_id(n) for n in names]
    if isinstance(names, list)
    else tok.token_to_id(names)
  )
  return {key: ids(names) for key, names in _GENERATION_CONFIGS[kind].items()}


def _write_json(out: str, name: str, data: dict) -> None:
  with open(os.path.join(out, name), "w") as f:
    json.dump(data, f, indent=2)


def _perturb(model, generator):
  """Noise on the 1-D params (norm scales, biases), which HF initialises to
  constants, so that every one of them matters in the comparison."""
  with torch.no_grad():
    for param in model.parameters():
      if param.ndim == 1:
        param.add_(0.1 * torch.randn(param.shape, generator=generator))


def _inputs(vocab_size: int, rng):
  tokens = rng.integers(0, vocab_size, (_BATCH, _LENGTH))
  mask = np.ones((_BATCH, _LENGTH), np.int64)
  mask[1, :_PADDING] = 0  # a left-padded row
  prompt = rng.integers(0, vocab_size, (_BATCH, _PROMPT_LENGTH))
  return tokens, mask, prompt


def _reference(model, tokens, mask, prompt):
  """transformers' logits of the padded batch and greedy continuation."""
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    logits = model(
      input_ids=torch.tensor(tokens),
      attention_mask=torch.tensor(mask),
      position_ids=torch.tensor(positions),
    ).logits.numpy()
    ids = torch.tensor(prompt)
    smallest_gap = np.inf
    for _ in range(_CONTINUATION):
      last = model(input_ids=ids).logits[:, -1]
      top2 = torch.topk(last, 2).values
      smallest_gap = min(smallest_gap, float((top2[:, 0] - top2[:, 1]).min()))
      ids = torch.cat([ids, last.argmax(-1, keepdim=True)], dim=1)
  return logits, ids[:, _PROMPT_LENGTH:].numpy(), smallest_gap


def _generate(name: str, out: str, seed: int) -> None:
  if os.path.exists(out):
    shutil.rmtree(out)
  os.makedirs(out)
  config_cls, shapes, options, kind = _MODELS[name]
  vocab = _write_tokenizer(kind, out)
  assert vocab <= options["vocab_size"], (name, vocab)
  generation = _generation_config(kind, out)
  config = config_cls(**shapes, **options, **generation)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(
    config, attn_implementation="eager", dtype=torch.float32
  ).eval()
  _perturb(model, torch.Generator().manual_seed(seed))
  model.save_pretrained(
    out, max_shard_size="100KB" if name == "llama3" else "10MB"
  )
  if generation:  # only the ids, as the releases have it
    _write_json(out, tokenizer_lib.GENERATION_CONFIG, generation)
  tokens, mask, prompt = _inputs(
    options["vocab_size"], np.random.default_rng(seed)
  )
  logits, continuation, gap = _reference(model, tokens, mask, prompt)
  # A near tie would let float rounding pick another token.
  assert gap > 1e-3, f"{name}: greedy top-2 gap {gap}; choose another seed"
  np.savez(
    os.path.join(out, "expected.npz"),
    tokens=tokens,
    mask=mask,
    logits=logits.astype(np.float32),
    prompt=prompt,
    continuation=continuation,
  )
  print(f"{name}: wrote {out} ({vocab} tokens, greedy gap {gap:.3g})")


def _check(name: str, out: str) -> None:
  # Imported here: generating fixtures needs no JAX.
  import jax

  from score_jax.models import hf, hf_config, transformer

  expected = np.load(os.path.join(out, "expected.npz"))
  model = transformers.AutoModelForCausalLM.from_pretrained(
    out, attn_implementation="eager", dtype=torch.float32
  ).eval()
  logits, continuation, _ = _reference(
    model, expected["tokens"], expected["mask"], expected["prompt"]
  )
  valid = expected["mask"].astype(bool)
  reference_drift = np.abs(logits - expected["logits"])[valid].max()
  assert reference_drift < 1e-5, (name, reference_drift)
  assert (continuation == expected["continuation"]).all(), name

  cfg = transformer.TransformerConfig(
    **hf_config.architecture(hf_config.read(out))
  )
  shardings = jax.tree.map(
    lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]),
    hf.layouts(cfg),
    is_leaf=lambda x: isinstance(x, hf.Layout),
  )
  params = hf.load(out, cfg, shardings)
  tokens, mask = expected["tokens"], expected["mask"].astype(bool)
  ours = transformer.Transformer(cfg).apply(
    params,
    tokens,
    transformer.positions_from_mask(mask),
    transformer.episode_ids(mask),
  )
  ours_diff = np.abs(np.asarray(ours) - expected["logits"])[valid].max()
  assert ours_diff < 1e-4, (name, ours_diff)

  with tempfile.TemporaryDirectory() as export:
    hf.save(
      os.path.join(export, "model"),
      params,
      cfg,
      tokenizer=tokenizer_lib.Tokenizer(out),
    )
    exported = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.join(export, "model"),
      attn_implementation="eager",
      dtype=torch.float32,
    ).eval()
    logits, _, _ = _reference(
      exported, expected["tokens"], expected["mask"], expected["prompt"]
    )
  export_diff = np.abs(logits - expected["logits"])[valid].max()
  assert export_diff < 1e-5, (name, export_diff)
  print(
    f"{name}: ok (reference drift {reference_drift:.2e}, score_jax "
    f"{ours_diff:.2e}, export through transformers {export_diff:.2e})"
  )


def main(argv):
  del argv
  torch.set_num_threads(1)
  for seed, name in enumerate(_MODELS):
    if _ONLY.value and name not in _ONLY.value:
      continue
    out = os.path.abspath(os.path.join(_OUT.value, name))
    if _CHECK.value:
      _check(name, out)
    else:
      _generate(name, out, seed)


if __name__ == "__main__":
  app.run(main)
