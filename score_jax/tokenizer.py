"""Tokenizers and the chat turns of a self-correction episode.

Two backends behind one interface: SentencePiece (a .model file: Gemma, the
demo) and Hugging Face `tokenizers` (a tokenizer.json: Llama 3, Qwen2.5).

The turns come from a Jinja chat template, rendered as transformers'
`apply_chat_template` renders it (chat_template.py): the checkpoint's own
(chat_template.jinja or tokenizer_config.json beside the tokenizer) when it
has one, else the built-in template of the chat format whose marker tokens
the vocabulary has (x the problem, y1 and y2 the attempts, i the
instruction):

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

The special tokens likewise come from the checkpoint's files first
(tokenizer_config.json's bos/eos/pad_token, generation_config.json's ids),
then from the format. An attempt ends at any stop id: the token that closes
the model's turn in the template, the eos token, and every
generation_config.json eos_token_id (Llama 3.1's <|eom_id|> among them).

The rollout tokenizes the prompt and the instruction turn once and works on
ids from then on.
"""

import dataclasses
import io
import json
import os
import re
import shutil
from typing import Iterable, Optional, Sequence

import sentencepiece as spm
import tokenizers

from score_jax import chat_template

START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
DEMO_MODEL_PATH = os.path.join(
  os.path.dirname(__file__), "assets", "arithmetic.model"
)
# Beside a tokenizer: the files of a Hugging Face checkpoint read here.
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
_CHAT_TEMPLATE_FILE = "chat_template.jinja"
# Copied on export as they are (tools read them).
_SIDECARS = ("special_tokens_map.json",)
# The special tokens transformers passes to a chat template by name.
_SPECIAL_TOKEN_NAMES = (
  "bos_token",
  "eos_token",
  "unk_token",
  "sep_token",
  "pad_token",
  "cls_token",
  "mask_token",
)


@dataclasses.dataclass(frozen=True)
class TurnFormat:
  """A built-in chat format: the marker tokens that identify it in a
  vocabulary, its chat template (the family's turns, without the system
  turns a release's own template may add), and the names of its special
  tokens in tokenizer.json vocabularies (SentencePiece models carry their
  own ids)."""

  name: str
  markers: tuple[str, ...]
  chat_template: str
  bos: Optional[str]
  eos: str
  pad: tuple[str, ...]  # the first one the vocabulary has


# Each turn is an opening marker and role, the content and the closing
# marker; the model's turn is left open at the end.
TURN_FORMATS = (
  TurnFormat(
    "gemma",
    (START_OF_TURN, END_OF_TURN),
    r"{{ bos_token }}{% for message in messages %}"
    r"{% set role = 'model' if message['role'] == 'assistant' "
    r"else message['role'] %}"
    r"{{ '<start_of_turn>' + role + '\n' + message['content'] + "
    r"'<end_of_turn>\n' }}{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}"
    r"{% endif %}",
    bos="<bos>",
    eos="<eos>",
    pad=("<pad>",),
  ),
  TurnFormat(
    "llama3",
    ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    r"{{ bos_token }}{% for message in messages %}"
    r"{{ '<|start_header_id|>' + message['role'] + "
    r"'<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    r"{% endfor %}{% if add_generation_prompt %}"
    r"{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    r"{% endif %}",
    bos="<|begin_of_text|>",
    eos="<|end_of_text|>",
    # Llama 3 has no pad token; 3.1 reserves one, 3.0 pads with eos.
    pad=("<|finetune_right_pad_id|>", "<|end_of_text|>"),
  ),
  TurnFormat(
    "chatml",
    ("<|im_start|>", "<|im_end|>"),
    r"{% for message in messages %}"
    r"{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    r"+ '<|im_end|>\n' }}{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    r"{% endif %}",
    bos=None,
    eos="<|endoftext|>",
    pad=("<|endoftext|>",),
  ),
)


class _SentencePiece:
  def __init__(self, path: str):
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.Load(path)
    except (OSError, RuntimeError) as e:
      raise ValueError(
        f"{path!r} is not a SentencePiece model ({e}); point "
        "config.tokenizer_path at a .model file."
      ) from None
    self.vocab_size = self._sp.GetPieceSize()
    # A model without a pad piece (id -1) pads with eos, which ends every
    # attempt anyway and so never stands for text.
    eos, pad, bos = self._sp.eos_id(), self._sp.pad_id(), self._sp.bos_id()
    self.special_ids = dict(
      bos=bos if bos >= 0 else None, eos=eos, pad=pad if pad >= 0 else eos
    )
    # SentencePiece never reads control pieces (<s>, </s>, <pad>, ...) in
    # text, where a rendered chat template writes them; they are split off
    # first, as transformers does.
    self._control = {
      self._sp.IdToPiece(i): i
      for i in range(self.vocab_size)
      if self._sp.IsControl(i) or self._sp.IsUnknown(i)
    }
    self._control_re = re.compile(
      "("
      + "|".join(map(re.escape, sorted(self._control, key=len, reverse=True)))
      + ")"
    )

  def token_id(self, piece: str) -> Optional[int]:
    piece_id = self._sp.PieceToId(piece)
    return None if piece_id == self._sp.unk_id() else piece_id

  def piece(self, token_id: int) -> str:
    return self._sp.IdToPiece(token_id)

  def encode(self, text: str) -> list[int]:
    return self._sp.EncodeAsIds(text)

  def encode_markup(self, text: str) -> list[int]:
    ids = []
    for part in self._control_re.split(text):
      if part in self._control:
        ids.append(self._control[part])
      elif part:
        ids += self.encode(part)
    return ids

  def decode(self, ids: list[int]) -> str:
    return self._sp.DecodeIds(ids)


class _HFTokenizers:
  def __init__(self, path: str):
    try:
      self._tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the library raises bare Exceptions
      raise ValueError(
        f"{path!r} is not a tokenizer.json ({e}); point "
        "config.tokenizer_path at one."
      ) from None
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.special_ids = None  # named by the checkpoint's files or the format

  def token_id(self, piece: str) -> Optional[int]:
    return self._tok.token_to_id(piece)

  def piece(self, token_id: int) -> str:
    return self._tok.id_to_token(token_id)

  def encode(self, text: str) -> list[int]:
    # No BOS from the post-processor: the chat template writes it.
    return self._tok.encode(text, add_special_tokens=False).ids

  # Added tokens written out in text are read as those tokens.
  encode_markup = encode

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
      "config.tokenizer_path to the tokenizer file."
    )
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"tokenizer {path!r} not found; set config.tokenizer_path to a "
      "SentencePiece .model file (e.g. Gemma's tokenizer.model), a "
      "tokenizer.json, or a model directory that holds one."
    )
  return path


def _read_json(directory: str, name: str) -> dict:
  """A JSON file beside the tokenizer, or {} if there is none."""
  path = os.path.join(directory, name)
  if not os.path.isfile(path):
    return {}
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(
      f"{path}: not valid JSON ({e}); fix or remove it."
    ) from None


def _own_chat_template(
  directory: str, config: dict
) -> tuple[Optional[str], str]:
  """The checkpoint's chat template and the file it is in (transformers
  reads chat_template.jinja first)."""
  path = os.path.join(directory, _CHAT_TEMPLATE_FILE)
  if os.path.isfile(path):
    with open(path) as f:
      return f.read(), path
  template = config.get("chat_template")
  if isinstance(template, list):  # named templates; "default" is the chat's
    template = {t.get("name"): t.get("template") for t in template}.get(
      "default"
    )
  return template, os.path.join(directory, TOKENIZER_CONFIG)


def _token_text(value) -> Optional[str]:
  """A tokenizer_config.json special token: a string or an AddedToken
  dict."""
  return value.get("content") if isinstance(value, dict) else value


def _id_list(value) -> list[int]:
  """generation_config.json's eos_token_id: an int or a list of them."""
  if value is None:
    return []
  return [int(v) for v in (value if isinstance(value, list) else [value])]


class Tokenizer:
  """Encode/decode text and build the ids of the episode's turns."""

  def __init__(self, path: str = DEMO_MODEL_PATH):
    self.path = _resolve(path)
    self._backend = (
      _HFTokenizers(self.path)
      if self.path.endswith(".json")
      else _SentencePiece(self.path)
    )
    directory = os.path.dirname(self.path)
    self._config = _read_json(directory, TOKENIZER_CONFIG)
    generation = _read_json(directory, GENERATION_CONFIG)
    own_template, where = _own_chat_template(directory, self._config)
    self.format = self._find_format(required=own_template is None)
    self.bos_id, self.eos_id, self.pad_id = self._special_ids(generation)
    if own_template is None:
      where = f"the built-in {self.format.name} turn format"
      variables = {
        name: self._backend.piece(token)
        for name, token in (
          ("bos_token", self.bos_id),
          ("eos_token", self.eos_id),
        )
        if token is not None
      }
    else:  # exactly what transformers passes the template
      variables = {
        name: _token_text(self._config[name])
        for name in _SPECIAL_TOKEN_NAMES
        if self._config.get(name) is not None
      }
    self.chat = chat_template.ChatTemplate(
      own_template or self.format.chat_template, variables, where
    )
    self.end_of_turn_id = self._closing_token(where)
    stops = [
      self.end_of_turn_id,
      self.eos_id,
      *_id_list(generation.get("eos_token_id")),
    ]
    bad = [i for i in stops if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(
        f"{os.path.join(directory, GENERATION_CONFIG)}: "
        f"eos_token_id {bad} is outside the tokenizer's "
        f"{self.vocab_size} tokens; fix the file."
      )
    self.stop_ids: tuple[int, ...] = tuple(dict.fromkeys(stops))

  def _find_format(self, required: bool) -> Optional[TurnFormat]:
    for fmt in TURN_FORMATS:
      if all(self._backend.token_id(m) is not None for m in fmt.markers):
        return fmt
    if not required:
      return None
    raise ValueError(
      f"tokenizer {self.path!r} has no chat template beside it and no turn "
      "markers of a known chat format "
      f"({', '.join(f'{f.name}: {f.markers}' for f in TURN_FORMATS)})."
    )

  def _special_ids(self, generation: dict):
    """bos, eos and pad: named by tokenizer_config.json, else the model's
    own (SentencePiece) or the format's; pad also by generation_config.json,
    and eos when nothing else names one."""
    config, fmt = self._config, self.format
    own = self._backend.special_ids

    def configured(name):
      text = _token_text(config.get(name))
      return None if text is None else self._required(text, TOKENIZER_CONFIG)

    if "bos_token" in config:  # null: the model takes no BOS (Qwen)
      bos = configured("bos_token")
    elif own:
      bos = own["bos"]
    else:
      bos = fmt and fmt.bos and self._required(fmt.bos, "its turn format")
    eos = configured("eos_token")
    if eos is None and own:
      eos = own["eos"]
    elif eos is None and fmt:
      eos = self._required(fmt.eos, "its turn format")
    elif eos is None:
      eos = next(iter(_id_list(generation.get("eos_token_id"))), None)
    if eos is None:
      raise ValueError(
        f"tokenizer {self.path!r}: neither {TOKENIZER_CONFIG} "
        f"nor {GENERATION_CONFIG} names an eos token."
      )
    pad = configured("pad_token")
    if pad is None:
      pad = generation.get("pad_token_id")
    if pad is None and own:
      pad = own["pad"]
    elif pad is None and fmt:
      pad = next(
        (i for i in map(self._backend.token_id, fmt.pad) if i is not None), None
      )
    return bos, eos, eos if pad is None else pad

  def _required(self, piece: str, source: str) -> int:
    piece_id = self._backend.token_id(piece)
    if piece_id is None:
      raise ValueError(
        f"tokenizer {self.path!r} has no {piece} token, which {source} names."
      )
    return piece_id

  def _closing_token(self, where: str) -> int:
    """The token that closes the model's turn in the chat template."""
    text = self.chat.after_attempt("")
    first = self._backend.encode_markup(text)[:1]
    marker = self._backend.piece(first[0]) if first else ""
    if (
      not first
      or not text.startswith(marker)
      or (self._backend.token_id(marker) != first[0])
    ):
      raise ValueError(
        f"{where}: the chat template closes the model's turn "
        f"with {text[:24]!r}, which does not start with a "
        "marker token; an attempt must end on one token."
      )
    return first[0]

  @property
  def vocab_size(self) -> int:
    """V, the number of token ids (added tokens included)."""
    return self._backend.vocab_size

  def token_id(self, piece: str) -> Optional[int]:
    """The id of a (special) token, or None if the vocabulary lacks it."""
    return self._backend.token_id(piece)

  def encode(self, text: str) -> list[int]:
    """The ids of plain `text`, with no BOS or other special tokens added."""
    return self._backend.encode(text)

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`, leaving out padding and the tokens that end a turn."""
    skip = {self.pad_id, *self.stop_ids}
    return self._backend.decode([int(i) for i in ids if int(i) not in skip])

  def decode_all(self, ids: Iterable[int]) -> str:
    """Text of `ids` with every token, markers included."""
    return self._backend.decode([int(i) for i in ids])

  def first_turn(self, problem: str) -> list[int]:
    """The prompt: the conversation up to the model's turn, for the user
    turn with the problem, as `apply_chat_template` gives it."""
    return self._backend.encode_markup(self.chat.first_turn(problem))

  def next_turn(self, instruction: str) -> list[int]:
    """What follows an attempt and the token that closed it: the
    instruction turn, opening the model's turn."""
    return self._backend.encode_markup(self.chat.after_attempt(instruction))[1:]

  def save(self, directory: str) -> None:
    """Writes the tokenizer as Hugging Face tools load it: the tokenizer
    file under its canonical name, the files copied beside it, and
    tokenizer_config.json with the special tokens and the chat template in
    use (the checkpoint's other settings kept)."""
    is_json = self.path.endswith(".json")
    shutil.copy(
      self.path,
      os.path.join(
        directory, "tokenizer.json" if is_json else "tokenizer.model"
      ),
    )
    for name in _SIDECARS:
      source = os.path.join(os.path.dirname(self.path), name)
      if os.path.isfile(source):
        shutil.copy(source, directory)
    piece = lambda i: None if i is None else self._backend.piece(i)
    config = dict(self._config)
    # SentencePiece models here follow Gemma's conventions.
    config.setdefault(
      "tokenizer_class",
      "PreTrainedTokenizerFast" if is_json else "GemmaTokenizer",
    )
    config.update(
      bos_token=piece(self.bos_id),
      eos_token=piece(self.eos_id),
      pad_token=piece(self.pad_id),
      chat_template=self.chat.source,
    )
    with open(os.path.join(directory, TOKENIZER_CONFIG), "w") as f:
      json.dump(config, f, indent=2, ensure_ascii=False)


def train(
  sentences: Iterable[str],
  output_path: str,
  vocab_size: int,
  user_symbols: Sequence[str] = (),
) -> None:
  """Trains a byte-fallback BPE SentencePiece model with Gemma's conventions.

  pad/eos/bos/unk = 0/1/2/3 as in Gemma, whitespace and newlines kept verbatim,
  digits split one per token (so numbers are learnable by a small model).

  Args:
    sentences: the training text, one sentence per item.
    output_path: where the .model file goes (written whole or not at all,
      its directory created if need be).
    vocab_size: the vocabulary size to aim at, a soft limit (the model may
      come out smaller).
    user_symbols: pieces kept as single tokens, besides the Gemma turn
      markers and "\\n", which always are.
  """
  model = io.BytesIO()
  spm.SentencePieceTrainer.Train(
    sentence_iterator=iter(sentences),
    model_writer=model,
    vocab_size=vocab_size,
    hard_vocab_limit=False,
    model_type="bpe",
    pad_id=0,
    eos_id=1,
    bos_id=2,
    unk_id=3,
    user_defined_symbols=[START_OF_TURN, END_OF_TURN, "\n", *user_symbols],
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    byte_fallback=True,
    split_digits=True,
    character_coverage=1.0,
    allow_whitespace_only_pieces=True,
    max_sentence_length=1 << 20,
    num_threads=2,
    minloglevel=2,
  )
  os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
  tmp_path = output_path + ".tmp"
  with open(tmp_path, "wb") as f:
    f.write(model.getvalue())
  os.replace(tmp_path, output_path)
