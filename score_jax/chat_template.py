"""Chat templates (the Jinja source a Hugging Face tokenizer_config.json
holds) rendered as transformers' `apply_chat_template` renders them, and cut
into the two pieces of text a self-correction episode needs:

  first_turn(x)     the conversation up to the model's first turn, for the
                    user turn x (BOS, a default system turn, ... included);
  after_attempt(i)  what follows an attempt, from the token that closes the
                    model's turn to the opening of its next one, with the
                    user turn i between.

The rollout keeps the first turn and the attempt in its KV cache and appends
after_attempt's ids, so rendering the whole conversation must give
first_turn + attempt + after_attempt; `after_attempt` checks that it does.
"""

import datetime
import json
from typing import Mapping

import jinja2
from jinja2 import ext, sandbox

# Stand-ins for the problem and the attempt in the conversation that
# after_attempt cuts its text from.
_PROBLEM = "SCORE_JAX_PROBLEM"
_ATTEMPT = "SCORE_JAX_ATTEMPT"


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(
  x, ensure_ascii=False, indent=None, separators=None, sort_keys=False
):
  # Jinja's own tojson escapes HTML characters; transformers' does not.
  return json.dumps(
    x,
    ensure_ascii=ensure_ascii,
    indent=indent,
    separators=separators,
    sort_keys=sort_keys,
  )


def _environment() -> jinja2.Environment:
  """The sandboxed environment and helpers transformers gives templates."""
  env = sandbox.ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols]
  )
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(
    fmt
  )
  return env


class ChatTemplate:
  """One chat template with its special-token variables (bos_token,
  eos_token, ... as strings). `where` names its source in errors."""

  def __init__(
    self, source: str, special_tokens: Mapping[str, str], where: str
  ):
    self.source = source
    self._special_tokens = dict(special_tokens)
    self._where = where
    try:
      self._template = _environment().from_string(source)
    except jinja2.TemplateError as e:
      raise ValueError(
        f"{where}: the chat template does not compile "
        f"({_one_line(e)}); fix or remove it."
      ) from None

  def render(self, messages: list[dict]) -> str:
    """The text of `messages`, opening the model's next turn."""
    try:
      return self._template.render(
        messages=messages,
        tools=None,
        documents=None,
        add_generation_prompt=True,
        **self._special_tokens,
      )
    except jinja2.TemplateError as e:
      raise ValueError(
        f"{self._where}: the chat template fails on a user/assistant "
        f"conversation ({_one_line(e)})."
      ) from None

  def first_turn(self, problem: str) -> str:
    """The conversation up to the model's first turn, for the user turn
    `problem` (BOS, a default system turn, ... included)."""
    return self.render([_user(problem)])

  def after_attempt(self, instruction: str) -> str:
    """What follows an attempt, from the token that closes the model's turn
    to the opening of its next one, with the user turn `instruction`
    between; raises ValueError if the template renders the earlier turns
    differently once this turn follows (so that first_turn + attempt +
    after_attempt would not be the whole conversation's text)."""
    first = self.first_turn(_PROBLEM) + _ATTEMPT
    text = self.render(
      [_user(_PROBLEM), _assistant(_ATTEMPT), _user(instruction)]
    )
    if not text.startswith(first):
      raise ValueError(
        f"{self._where}: the chat template renders an earlier turn "
        "differently once more turns follow, which an episode extended "
        "turn by turn cannot match; remove the chat template there to use "
        "the built-in turn format."
      )
    return text[len(first) :]


def _user(text: str) -> dict:
  return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
  return {"role": "assistant", "content": text}


def _one_line(error: Exception) -> str:
  return " ".join(str(error).split())
