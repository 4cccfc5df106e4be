"""SentencePiece tokenizer and the Gemma turn format of a self-correction episode.

An episode is laid out as Gemma's chat template:
  <bos><start_of_turn>user\n{problem}<end_of_turn>\n<start_of_turn>model\n
  {attempt 1}<end_of_turn>
  \n<start_of_turn>user\n{instruction}<end_of_turn>\n<start_of_turn>model\n
  {attempt 2}<end_of_turn>
The rollout tokenizes the prompt and the instruction turn once and works on ids
from then on. Turn markers are inserted by id, not by matching text, so any
SentencePiece model that has the two marker pieces works (Gemma's does; so does
the demo model this module trains).
"""

import io
import os
from typing import Iterable, Sequence

import sentencepiece as spm

START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
DEMO_MODEL_PATH = os.path.join(os.path.dirname(__file__), "assets",
                               "arithmetic.model")


class Tokenizer:
  """Encode/decode text and build the ids of the episode's turns."""

  def __init__(self, path: str = DEMO_MODEL_PATH):
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f"tokenizer model {path!r} not found; set config.tokenizer_path to a "
          "SentencePiece .model file (e.g. Gemma's tokenizer.model).")
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.Load(path)
    except (OSError, RuntimeError) as e:
      raise ValueError(f"{path!r} is not a SentencePiece model ({e}); point "
                       "config.tokenizer_path at a .model file.") from None
    self.path = path
    self.start_of_turn_id = self._marker_id(START_OF_TURN)
    self.end_of_turn_id = self._marker_id(END_OF_TURN)

  def _marker_id(self, piece: str) -> int:
    piece_id = self._sp.PieceToId(piece)
    if piece_id == self._sp.unk_id():
      raise ValueError(f"tokenizer {self.path!r} has no {piece} piece; the "
                       "turn format needs Gemma-style turn markers.")
    return piece_id

  @property
  def vocab_size(self) -> int:
    return self._sp.GetPieceSize()

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def stop_ids(self) -> tuple[int, int]:
    """Tokens that end an attempt."""
    return (self.end_of_turn_id, self.eos_id)

  def encode(self, text: str) -> list[int]:
    return self._sp.EncodeAsIds(text)

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`, leaving out padding and the tokens that end a turn."""
    skip = {self.pad_id, *self.stop_ids}
    return self._sp.DecodeIds([int(i) for i in ids if int(i) not in skip])

  def _user_turn(self, text: str) -> list[int]:
    return ([self.start_of_turn_id] + self.encode("user\n" + text)
            + [self.end_of_turn_id] + self.encode("\n")
            + [self.start_of_turn_id] + self.encode("model\n"))

  def first_turn(self, problem: str) -> list[int]:
    """The prompt: BOS and the user turn with the problem, opening the model turn."""
    return [self.bos_id] + self._user_turn(problem)

  def next_turn(self, instruction: str) -> list[int]:
    """What follows an attempt: the instruction turn, opening the model turn."""
    return self.encode("\n") + self._user_turn(instruction)


def train(sentences: Iterable[str], output_path: str, vocab_size: int,
          user_symbols: Sequence[str] = ()) -> None:
  """Trains a byte-fallback BPE SentencePiece model with Gemma's conventions.

  pad/eos/bos/unk = 0/1/2/3 as in Gemma, whitespace and newlines kept verbatim,
  digits split one per token (so numbers are learnable by a small model).
  """
  model = io.BytesIO()
  spm.SentencePieceTrainer.Train(
      sentence_iterator=iter(sentences), model_writer=model,
      vocab_size=vocab_size, hard_vocab_limit=False, model_type="bpe",
      pad_id=0, eos_id=1, bos_id=2, unk_id=3,
      user_defined_symbols=[START_OF_TURN, END_OF_TURN, "\n", *user_symbols],
      normalization_rule_name="identity", remove_extra_whitespaces=False,
      add_dummy_prefix=False, byte_fallback=True, split_digits=True,
      character_coverage=1.0, allow_whitespace_only_pieces=True,
      max_sentence_length=1 << 20, num_threads=2, minloglevel=2)
  os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
  tmp_path = output_path + ".tmp"
  with open(tmp_path, "wb") as f:
    f.write(model.getvalue())
  os.replace(tmp_path, output_path)
