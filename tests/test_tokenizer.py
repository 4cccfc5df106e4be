"""The SentencePiece wrapper: round trips, special ids, the turn format, and
training and loading a model by path."""

import pytest

from score_jax import tokenizer
from score_jax.tasks import arithmetic


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
  assert prompt.count(tok.start_of_turn_id) == 2
  assert prompt.count(tok.end_of_turn_id) == 1
  text = tok._sp.DecodeIds(prompt[1:])
  assert text == ("<start_of_turn>user\nCompute 2 + 3.<end_of_turn>\n"
                  "<start_of_turn>model\n")
  following = tok._sp.DecodeIds(tok.next_turn("Check it."))
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
