"""Tokenizers: round trips, special ids, the turn formats (Gemma through
SentencePiece; Llama 3 and Qwen's ChatML through tokenizer.json), training and
loading by path."""

import os

import pytest
import tokenizers

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
  for text in ["Compute 347 + 285.\n347 + 200 = 547\n",
               "  two  spaces\n\n", "x = -7/2, é ∑ 中"]:
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
  assert text == ("<start_of_turn>user\nCompute 2 + 3.<end_of_turn>\n"
                  "<start_of_turn>model\n")
  following = tok.decode_all(tok.next_turn("Check it."))
  assert following == ("\n<start_of_turn>user\nCheck it.<end_of_turn>\n"
                       "<start_of_turn>model\n")


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
    "llama3": ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
               "Compute 2 + 3.<|eot_id|><|start_header_id|>assistant"
               "<|end_header_id|>\n\n2 + 3 = 6<|eot_id|><|start_header_id|>"
               "user<|end_header_id|>\n\nCheck it.<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n2 + 3 = 5"
               "<|eot_id|>"),
    "qwen2": ("<|im_start|>user\nCompute 2 + 3.<|im_end|>\n<|im_start|>"
              "assistant\n2 + 3 = 6<|im_end|>\n<|im_start|>user\nCheck it."
              "<|im_end|>\n<|im_start|>assistant\n2 + 3 = 5<|im_end|>"),
}


@pytest.mark.parametrize("name,fmt,bos", [("llama3", "llama3",
                                           "<|begin_of_text|>"),
                                          ("qwen2", "chatml", None)])
def test_tokenizer_json_turn_formats(name, fmt, bos):
  """A tokenizer.json directory gives the family's chat format, and the
  episode's ids are those of the template's text tokenized whole."""
  path = hf_fixtures.fixture_dir(name)
  tok = tokenizer.Tokenizer(path)
  reference = tokenizers.Tokenizer.from_file(os.path.join(path,
                                                          "tokenizer.json"))
  assert tok.format.name == fmt
  assert tok.bos_id == (bos and reference.token_to_id(bos))
  assert tok.end_of_turn_id == reference.token_to_id(tok.format.end_of_turn)
  assert tok.encode("12 + 3") == reference.encode(
      "12 + 3", add_special_tokens=False).ids  # no BOS from post-processing
  episode = (tok.first_turn("Compute 2 + 3.") + tok.encode("2 + 3 = 6")
             + [tok.end_of_turn_id] + tok.next_turn("Check it.")
             + tok.encode("2 + 3 = 5") + [tok.end_of_turn_id])
  assert tok.decode_all(episode) == _EPISODES[name]
  assert episode == reference.encode(_EPISODES[name],
                                     add_special_tokens=False).ids
  assert tok.decode(tok.encode("Compute 2 + 3.") + list(tok.stop_ids)
                    + [tok.pad_id]) == "Compute 2 + 3."


def test_model_directory_resolves_to_its_tokenizer(tmp_path):
  gemma = tokenizer.Tokenizer(hf_fixtures.fixture_dir("gemma"))
  assert gemma.path.endswith("tokenizer.model") and gemma.format.name == "gemma"
  with pytest.raises(FileNotFoundError, match="no tokenizer.model or "
                     "tokenizer.json"):
    tokenizer.Tokenizer(str(tmp_path))
  bare = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0}, "a"))
  bare.save(str(tmp_path / "tokenizer.json"))
  with pytest.raises(ValueError, match="no turn markers of a known chat "
                     "format") as raised:
    tokenizer.Tokenizer(str(tmp_path))
  assert "\n" not in str(raised.value)
