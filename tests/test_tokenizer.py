"""Tokenizers: round trips, special ids, the built-in turn formats (Gemma
through SentencePiece; Llama 3 and Qwen's ChatML through tokenizer.json),
checkpoints' own chat templates and stop ids against transformers'
apply_chat_template, training and loading by path."""

import json
import os
import shutil

import pytest
import tokenizers
import transformers

from score_jax import tokenizer
from score_jax.tasks import arithmetic
from tests import hf_fixtures


@pytest.fixture(scope="module")
def tok():
  return tokenizer.Tokenizer()


def test_bundled_model_conventions(tok):
  assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
  assert tok.vocab_size == 512
  assert set(tok.stop_ids) == {tok.eos_id, tok.end_of_turn_id}


def test_round_trip_keeps_whitespace_and_newlines(tok):
  for text in [
    "Compute 347 + 285.\n347 + 200 = 547\n",
    "  two  spaces\n\n",
    "x = -7/2, é ∑ 中",
  ]:
    assert tok.decode(tok.encode(text)) == text


def test_digits_are_single_tokens(tok):
  ids = tok.encode("90817")
  assert len(ids) == 5 and tok.decode(ids[2:3]) == "8"


def test_turn_format(tok):
  prompt = tok.first_turn("Compute 2 + 3.")
  assert prompt[0] == tok.bos_id
  assert prompt.count(tok.token_id(tokenizer.START_OF_TURN)) == 2
  assert prompt.count(tok.end_of_turn_id) == 1
  text = tok.decode_all(prompt[1:])
  assert text == (
    "<start_of_turn>user\nCompute 2 + 3.<end_of_turn>\n<start_of_turn>model\n"
  )
  following = tok.decode_all(tok.next_turn("Check it."))
  assert following == (
    "\n<start_of_turn>user\nCheck it.<end_of_turn>\n<start_of_turn>model\n"
  )


def test_decode_drops_padding_and_turn_ends(tok):
  ids = tok.encode("12") + [tok.end_of_turn_id, tok.pad_id, tok.pad_id]
  assert tok.decode(ids) == "12"


def test_train_and_load_by_path(tmp_path):
  path = str(tmp_path / "spm" / "t.model")
  texts = list(arithmetic.corpus_text(300, seed=1))
  tokenizer.train(texts, path, vocab_size=320)
  tok = tokenizer.Tokenizer(path)
  assert tok.vocab_size == 320
  assert tok.decode(tok.encode(texts[0])) == texts[0]


def test_bad_paths_are_one_line_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.tokenizer_path"):
    tokenizer.Tokenizer(str(tmp_path / "missing.model"))
  junk = tmp_path / "junk.model"
  junk.write_text("not a model")
  with pytest.raises(ValueError, match="not a SentencePiece model"):
    tokenizer.Tokenizer(str(junk))


# One episode as each chat template renders it (x, y1, instruction, y2).
_EPISODES = {
  "llama3": (
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
    "Compute 2 + 3.<|eot_id|><|start_header_id|>assistant"
    "<|end_header_id|>\n\n2 + 3 = 6<|eot_id|><|start_header_id|>"
    "user<|end_header_id|>\n\nCheck it.<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n2 + 3 = 5"
    "<|eot_id|>"
  ),
  "qwen2": (
    "<|im_start|>user\nCompute 2 + 3.<|im_end|>\n<|im_start|>"
    "assistant\n2 + 3 = 6<|im_end|>\n<|im_start|>user\nCheck it."
    "<|im_end|>\n<|im_start|>assistant\n2 + 3 = 5<|im_end|>"
  ),
}


@pytest.mark.parametrize(
  "name,fmt,bos,end_of_turn",
  [
    ("llama3", "llama3", "<|begin_of_text|>", "<|eot_id|>"),
    ("qwen2", "chatml", None, "<|im_end|>"),
  ],
)
def test_tokenizer_json_turn_formats(tmp_path, name, fmt, bos, end_of_turn):
  """A tokenizer.json without the checkpoint's files beside it gives the
  family's built-in chat format, and the episode's ids are those of the
  template's text tokenized whole."""
  shutil.copy(
    os.path.join(hf_fixtures.fixture_dir(name), "tokenizer.json"), tmp_path
  )
  tok = tokenizer.Tokenizer(str(tmp_path))
  reference = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
  assert tok.format.name == fmt and tok.chat.source == tok.format.chat_template
  assert tok.bos_id == (bos and reference.token_to_id(bos))
  assert tok.end_of_turn_id == reference.token_to_id(end_of_turn)
  assert tok.stop_ids == (
    tok.end_of_turn_id,
    reference.token_to_id(tok.format.eos),
  )
  assert (
    tok.encode("12 + 3")
    == reference.encode("12 + 3", add_special_tokens=False).ids
  )  # no BOS from post-processing
  episode = (
    tok.first_turn("Compute 2 + 3.")
    + tok.encode("2 + 3 = 6")
    + [tok.end_of_turn_id]
    + tok.next_turn("Check it.")
    + tok.encode("2 + 3 = 5")
    + [tok.end_of_turn_id]
  )
  assert tok.decode_all(episode) == _EPISODES[name]
  assert (
    episode == reference.encode(_EPISODES[name], add_special_tokens=False).ids
  )
  assert (
    tok.decode(tok.encode("Compute 2 + 3.") + list(tok.stop_ids) + [tok.pad_id])
    == "Compute 2 + 3."
  )


def chat_ids(reference, messages):
  return reference.apply_chat_template(messages, add_generation_prompt=True)[
    "input_ids"
  ]


# Llama 3.1-style (a dated system turn, trimmed contents, <|eom_id|> among
# the stop ids) and Qwen2.5-style (a default system prompt) checkpoints: the
# fixture directories hold their tokenizer_config.json and
# generation_config.json (scripts/make_hf_fixtures.py).
@pytest.mark.parametrize(
  "name,stops,bos,pad",
  [
    (
      "llama3",
      ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"),
      "<|begin_of_text|>",
      "<|finetune_right_pad_id|>",
    ),
    ("qwen2", ("<|im_end|>", "<|endoftext|>"), None, "<|endoftext|>"),
  ],
)
def test_checkpoint_chat_template_gives_apply_chat_template(
  name, stops, bos, pad
):
  """The prompt is what transformers' apply_chat_template gives for the
  first turn, and the prompt, an attempt, its end-of-turn token and the
  next turn are what it gives for the conversation with the attempt and
  the instruction turn; the stop ids are the checkpoint's."""
  path = hf_fixtures.fixture_dir(name)
  tok = tokenizer.Tokenizer(path)
  reference = transformers.AutoTokenizer.from_pretrained(path)
  with open(os.path.join(path, "tokenizer_config.json")) as f:
    assert tok.chat.source == json.load(f)["chat_template"]
  problem, attempt, instruction = (
    " Compute 2 + 3.\n",
    "2 + 3 = 6",
    "Check it.",
  )
  first = tok.first_turn(problem)
  assert first == chat_ids(reference, [{"role": "user", "content": problem}])
  assert first + tok.encode(attempt) + [tok.end_of_turn_id] + tok.next_turn(
    instruction
  ) == chat_ids(
    reference,
    [
      {"role": "user", "content": problem},
      {"role": "assistant", "content": attempt},
      {"role": "user", "content": instruction},
    ],
  )
  assert tok.stop_ids == tuple(tok.token_id(t) for t in stops)
  assert tok.bos_id == (bos and tok.token_id(bos))
  assert tok.pad_id == tok.token_id(pad)
  text = tok.decode_all(first)
  assert (
    "You are Qwen" in text
    if name == "qwen2"
    else "Today Date: 26 Jul 2024" in text
  )


def test_bad_checkpoint_files_are_one_line_errors(tmp_path):
  shutil.copy(
    os.path.join(hf_fixtures.fixture_dir("qwen2"), "tokenizer.json"), tmp_path
  )
  cases = [
    ({"chat_template": "{% for m in messages %}"}, "does not compile"),
    (
      {"chat_template": "{{ raise_exception('no users') }}"},
      "fails on a user/assistant conversation.*no users",
    ),
    # The model's turn ends in plain text, not on a token.
    (
      {
        "chat_template": "{% for m in messages %}{{ m.role }}: "
        "{{ m.content }}\n{% endfor %}assistant: "
      },
      r"closes the model's turn with '\\nuser: .*not start with a marker",
    ),
    # The first turn changes once an answer follows it.
    (
      {
        "chat_template": "{{ messages | length }}{% for m in messages %}"
        "<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"
      },
      "renders an earlier turn differently",
    ),
    ({"eos_token": "<|nope|>"}, "has no <|nope|> token"),
  ]
  for config, match in cases:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match) as raised:
      tokenizer.Tokenizer(str(tmp_path))
    assert "\n" not in str(raised.value), str(raised.value)
  os.remove(tmp_path / "tokenizer_config.json")
  (tmp_path / "generation_config.json").write_text(
    json.dumps({"eos_token_id": [2, 99999]})
  )
  with pytest.raises(ValueError, match=r"eos_token_id \[99999\] is outside"):
    tokenizer.Tokenizer(str(tmp_path))


def test_demo_tokenizer_under_its_own_chat_template(tmp_path):
  """A SentencePiece model with a chat template beside it (as exported)
  reads the control tokens the template writes out (<s>): the ids are the
  built-in format's."""
  builtin = tokenizer.Tokenizer()
  shutil.copy(builtin.path, tmp_path / "tokenizer.model")
  (tmp_path / "tokenizer_config.json").write_text(
    json.dumps(
      dict(bos_token="<s>", chat_template=builtin.format.chat_template)
    )
  )
  own = tokenizer.Tokenizer(str(tmp_path))
  for text in ("Compute 2 + 3.", "<s> and </s> written out"):
    assert own.first_turn(text) == builtin.first_turn(text)
    assert own.next_turn(text) == builtin.next_turn(text)
  assert own.first_turn("x")[0] == builtin.bos_id


def test_model_directory_resolves_to_its_tokenizer(tmp_path):
  gemma = tokenizer.Tokenizer(hf_fixtures.fixture_dir("gemma"))
  assert gemma.path.endswith("tokenizer.model") and gemma.format.name == "gemma"
  with pytest.raises(
    FileNotFoundError, match="no tokenizer.model or tokenizer.json"
  ):
    tokenizer.Tokenizer(str(tmp_path))
  bare = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0}, "a"))
  bare.save(str(tmp_path / "tokenizer.json"))
  with pytest.raises(
    ValueError, match="no turn markers of a known chat format"
  ) as raised:
    tokenizer.Tokenizer(str(tmp_path))
  assert "\n" not in str(raised.value)
