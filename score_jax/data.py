"""Host-side data: a resumable prompt iterator and supervised episodes."""

import dataclasses
from typing import Sequence

import numpy as np

from score_jax import rollout
from score_jax import tokenizer as tokenizer_lib


@dataclasses.dataclass(frozen=True)
class Supervised:
  """Episodes to imitate, in the rollout's layout (host numpy, batch
  first)."""
  tokens_bs: np.ndarray     # int32
  valid_bs: np.ndarray      # bool
  loss_mask_bs: np.ndarray  # bool: the tokens to imitate


@dataclasses.dataclass
class PromptIterator:
  """Batches of example indices, reshuffled each epoch, resumable exactly.

  The whole position is (epoch, offset); each epoch's order is a pure function
  of (seed, epoch), so restoring those two numbers resumes the same stream.
  """
  num_examples: int
  batch_size: int
  seed: int
  epoch: int = 0
  offset: int = 0

  def __post_init__(self):
    if self.num_examples < self.batch_size:
      raise ValueError(f"the training split has {self.num_examples} examples, "
                       f"fewer than one batch of {self.batch_size} prompts.")

  def _order(self) -> np.ndarray:
    return np.random.default_rng((self.seed, self.epoch)).permutation(
        self.num_examples)

  def next(self) -> np.ndarray:
    if self.offset + self.batch_size > self.num_examples:
      self.epoch, self.offset = self.epoch + 1, 0
    indices = self._order()[self.offset:self.offset + self.batch_size]
    self.offset += self.batch_size
    return indices

  def state(self) -> dict:
    return {"epoch": self.epoch, "offset": self.offset}

  def restore(self, state: dict) -> None:
    self.epoch, self.offset = int(state["epoch"]), int(state["offset"])


def supervised_batch(tok: tokenizer_lib.Tokenizer, problems: Sequence[str],
                     attempts: Sequence[Sequence[str]], instruction_ids,
                     length: int) -> Supervised:
  """Episodes laid out as the rollout lays them out (turn markers, stop
  tokens, the instruction between attempts), right-padded to `length`
  slots, with the loss on the attempt tokens (stop tokens included)."""
  tokens = np.full((len(problems), length), tok.pad_id, np.int32)
  valid = np.zeros((len(problems), length), bool)
  loss_mask = np.zeros((len(problems), length), bool)
  lengths = []
  for row, (problem, row_attempts) in enumerate(zip(problems, attempts)):
    ids = list(tok.first_turn(problem))
    mask = [False] * len(ids)
    for i, text in enumerate(row_attempts):
      if i:
        ids += instruction_ids
        mask += [False] * len(instruction_ids)
      attempt = tok.encode(text) + [tok.end_of_turn_id]
      ids += attempt
      mask += [True] * len(attempt)
    lengths.append(len(ids))
    ids, mask = ids[:length], mask[:length]
    tokens[row, :len(ids)] = ids
    valid[row, :len(ids)] = True
    loss_mask[row, :len(mask)] = mask
  if max(lengths) > length:
    raise ValueError(f"a supervised episode has {max(lengths)} tokens, more "
                     f"than config.sft.max_len={length}; raise it.")
  return Supervised(tokens, valid, loss_mask)


def star_batch(episode: rollout.Episode,
               rewards_bn: np.ndarray) -> Supervised:
  """STaR's filtered traces: sampled episodes (a host copy) with the SFT
  loss on the last attempt of each episode whose last attempt is correct
  (the others drop out)."""
  keep_b = np.asarray(rewards_bn)[:, -1] > 0.5
  loss_mask = np.asarray(episode.attempt_mask_bns)[:, -1] & keep_b[:, None]
  return Supervised(np.asarray(episode.tokens_bs),
                             np.asarray(episode.valid_bs), loss_mask)


def pair_batch(episode: rollout.Episode, rewards_bn: np.ndarray,
               samples_per_prompt: int, max_attempt_len: int, pad_id: int,
               seed: int) -> Supervised:
  """Pair-SFT: each wrong first attempt, followed by the instruction and a
  correct attempt at the same problem drawn from its group of
  `samples_per_prompt` episodes, with the SFT loss on that correct attempt.
  Rows with a correct first attempt, or whose group has no correct attempt,
  drop out.

  The correct attempt replaces the row's second attempt in its slots (the
  last `max_attempt_len` of a two-attempt rollout), so the layout and the
  positions are those of a rollout.
  """
  tokens = np.array(episode.tokens_bs)
  valid = np.array(episode.valid_bs)
  attempt_mask = np.asarray(episode.attempt_mask_bns)
  rewards = np.asarray(rewards_bn) > 0.5
  if attempt_mask.shape[1] != 2:
    raise ValueError("pair_sft pairs two attempts; set "
                     "config.rollout.num_attempts=2.")
  second = slice(tokens.shape[1] - max_attempt_len, None)
  loss_mask = np.zeros_like(valid)
  rng = np.random.default_rng(seed)
  for start in range(0, len(tokens), samples_per_prompt):
    group = range(start, start + samples_per_prompt)
    correct = [(b, i) for b in group for i in range(2) if rewards[b, i]]
    for b in group:
      if rewards[b, 0] or not correct:
        continue
      source, attempt = correct[rng.integers(len(correct))]
      ids = tokens[source][attempt_mask[source, attempt]]
      # Views of the row's second-attempt slots.
      row_tokens, row_valid = tokens[b, second], valid[b, second]
      row_tokens[:], row_valid[:] = pad_id, False
      row_tokens[:len(ids)], row_valid[:len(ids)] = ids, True
      loss_mask[b, second][:len(ids)] = True
  return Supervised(tokens, valid, loss_mask)
