"""Tokenizers and the chat-turn format of a self-correction episode.

Two backends behind one interface: SentencePiece (a .model file: Gemma, the
demo) and Hugging Face `tokenizers` (a tokenizer.json: Llama 3, Qwen2.5). The
turn format follows the markers the vocabulary has (x the problem, y1 and y2
the attempts, i the instruction):

  gemma   <bos><start_of_turn>user\n{x}<end_of_turn>\n<start_of_turn>model\n
          {y1}<end_of_turn>\n<start_of_turn>user\n{i}<end_of_turn>\n
          <start_of_turn>model\n{y2}<end_of_turn>
  llama3  <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{x}
          <|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n{y1}
          <|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{i}<|eot_id|>
          <|start_header_id|>assistant<|end_header_id|>\n\n{y2}<|eot_id|>
  chatml  <|im_start|>user\n{x}<|im_end|>\n<|im_start|>assistant\n{y1}
          <|im_end|>\n<|im_start|>user\n{i}<|im_end|>\n<|im_start|>assistant\n
          {y2}<|im_end|>   (Qwen; no system turn, no BOS)

The rollout tokenizes the prompt and the instruction turn once and works on ids
from then on. Markers are inserted by id, not by matching text, so any
tokenizer that has one format's marker tokens works (Gemma's does; so does the
demo model this module trains).
"""

import dataclasses
import io
import os
from typing import Iterable, Optional, Sequence

import sentencepiece as spm
import tokenizers

START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
DEMO_MODEL_PATH = os.path.join(os.path.dirname(__file__), "assets",
                               "arithmetic.model")


@dataclasses.dataclass(frozen=True)
class TurnFormat:
  """A chat template as data: a user turn that opens the model's turn.

  `user_turn` segments are marker tokens (inserted by id) or text ("{text}"
  is the turn's content); `between` follows an attempt's end-of-turn token.
  bos / eos / pad name the tokens for tokenizer.json vocabularies
  (SentencePiece models carry their own ids).
  """
  name: str
  end_of_turn: str
  markers: tuple[str, ...]
  user_turn: tuple[str, ...]
  between: str
  bos: Optional[str]
  eos: str
  pad: tuple[str, ...]  # the first one the vocabulary has


TURN_FORMATS = (
    TurnFormat("gemma", END_OF_TURN, (START_OF_TURN, END_OF_TURN),
               (START_OF_TURN, "user\n{text}", END_OF_TURN, "\n",
                START_OF_TURN, "model\n"),
               between="\n", bos="<bos>", eos="<eos>", pad=("<pad>",)),
    TurnFormat("llama3", "<|eot_id|>",
               ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
               ("<|start_header_id|>", "user", "<|end_header_id|>",
                "\n\n{text}", "<|eot_id|>", "<|start_header_id|>", "assistant",
                "<|end_header_id|>", "\n\n"),
               between="", bos="<|begin_of_text|>", eos="<|end_of_text|>",
               # Llama 3 has no pad token; 3.1 reserves one, 3.0 pads with eos.
               pad=("<|finetune_right_pad_id|>", "<|end_of_text|>")),
    TurnFormat("chatml", "<|im_end|>", ("<|im_start|>", "<|im_end|>"),
               ("<|im_start|>", "user\n{text}", "<|im_end|>", "\n",
                "<|im_start|>", "assistant\n"),
               between="\n", bos=None, eos="<|endoftext|>",
               pad=("<|endoftext|>",)),
)


class _SentencePiece:
  def __init__(self, path: str):
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.Load(path)
    except (OSError, RuntimeError) as e:
      raise ValueError(f"{path!r} is not a SentencePiece model ({e}); point "
                       "config.tokenizer_path at a .model file.") from None
    self.vocab_size = self._sp.GetPieceSize()
    # A model without a pad piece (id -1) pads with eos, which ends every
    # attempt anyway and so never stands for text.
    eos, pad, bos = self._sp.eos_id(), self._sp.pad_id(), self._sp.bos_id()
    self.special_ids = dict(bos=bos if bos >= 0 else None, eos=eos,
                            pad=pad if pad >= 0 else eos)

  def token_id(self, piece: str) -> Optional[int]:
    piece_id = self._sp.PieceToId(piece)
    return None if piece_id == self._sp.unk_id() else piece_id

  def encode(self, text: str) -> list[int]:
    return self._sp.EncodeAsIds(text)

  def decode(self, ids: list[int]) -> str:
    return self._sp.DecodeIds(ids)


class _HFTokenizers:
  def __init__(self, path: str):
    try:
      self._tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the library raises bare Exceptions
      raise ValueError(f"{path!r} is not a tokenizer.json ({e}); point "
                       "config.tokenizer_path at one.") from None
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.special_ids = None  # named by the turn format

  def token_id(self, piece: str) -> Optional[int]:
    return self._tok.token_to_id(piece)

  def encode(self, text: str) -> list[int]:
    # No BOS from the post-processor: first_turn adds it where it belongs.
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: list[int]) -> str:
    return self._tok.decode(ids, skip_special_tokens=False)


def _resolve(path: str) -> str:
  """A model directory -> its tokenizer.model, else its tokenizer.json."""
  if os.path.isdir(path):
    for name in ("tokenizer.model", "tokenizer.json"):
      if os.path.isfile(os.path.join(path, name)):
        return os.path.join(path, name)
    raise FileNotFoundError(
        f"{path!r} has no tokenizer.model or tokenizer.json; set "
        "config.tokenizer_path to the tokenizer file.")
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"tokenizer {path!r} not found; set config.tokenizer_path to a "
        "SentencePiece .model file (e.g. Gemma's tokenizer.model), a "
        "tokenizer.json, or a model directory that holds one.")
  return path


class Tokenizer:
  """Encode/decode text and build the ids of the episode's turns."""

  def __init__(self, path: str = DEMO_MODEL_PATH):
    self.path = _resolve(path)
    self._backend = (_HFTokenizers(self.path) if self.path.endswith(".json")
                     else _SentencePiece(self.path))
    self.format = self._find_format()
    self.end_of_turn_id = self._backend.token_id(self.format.end_of_turn)
    ids = self._backend.special_ids or dict(
        bos=self.format.bos and self._required(self.format.bos),
        eos=self._required(self.format.eos),
        pad=next((i for i in map(self._backend.token_id, self.format.pad)
                  if i is not None), None))
    self.bos_id: Optional[int] = ids["bos"]
    self.eos_id: int = ids["eos"]
    self.pad_id: int = ids["pad"]
    if self.pad_id is None:
      raise ValueError(f"tokenizer {self.path!r} has none of the pad tokens "
                       f"{self.format.pad}; use the model's own tokenizer.")

  def _find_format(self) -> TurnFormat:
    for fmt in TURN_FORMATS:
      if all(self._backend.token_id(m) is not None for m in fmt.markers):
        return fmt
    raise ValueError(
        f"tokenizer {self.path!r} has no turn markers of a known chat format "
        f"({', '.join(f'{f.name}: {f.markers}' for f in TURN_FORMATS)}).")

  def _required(self, piece: str) -> int:
    piece_id = self._backend.token_id(piece)
    if piece_id is None:
      raise ValueError(f"tokenizer {self.path!r} has no {piece} token, which "
                       f"the {self.format.name} turn format needs.")
    return piece_id

  @property
  def vocab_size(self) -> int:
    return self._backend.vocab_size

  @property
  def stop_ids(self) -> tuple[int, int]:
    """Tokens that end an attempt."""
    return (self.end_of_turn_id, self.eos_id)

  def token_id(self, piece: str) -> Optional[int]:
    """The id of a (special) token, or None if the vocabulary lacks it."""
    return self._backend.token_id(piece)

  def encode(self, text: str) -> list[int]:
    return self._backend.encode(text)

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`, leaving out padding and the tokens that end a turn."""
    skip = {self.pad_id, *self.stop_ids}
    return self._backend.decode([int(i) for i in ids if int(i) not in skip])

  def decode_all(self, ids: Iterable[int]) -> str:
    """Text of `ids` with every token, markers included."""
    return self._backend.decode([int(i) for i in ids])

  def _user_turn(self, text: str) -> list[int]:
    ids = []
    for segment in self.format.user_turn:
      if segment in self.format.markers:
        ids.append(self._backend.token_id(segment))
      else:
        ids += self.encode(segment.format(text=text))
    return ids

  def first_turn(self, problem: str) -> list[int]:
    """The prompt: BOS (if the format has one) and the user turn with the
    problem, opening the model turn."""
    bos = [] if self.bos_id is None else [self.bos_id]
    return bos + self._user_turn(problem)

  def next_turn(self, instruction: str) -> list[int]:
    """What follows an attempt: the instruction turn, opening the model turn."""
    return self.encode(self.format.between) + self._user_turn(instruction)


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
