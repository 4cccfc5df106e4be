"""The data side of a step, all on the host: which problems a step sees,
their prompts padded into buckets, the texts of sampled attempts, and the
episodes that supervised phases imitate.

  PromptIterator      a step's problems, reshuffled each epoch, resumable
  training_examples   the train split without over-long prompts
  eval_batches        evaluation's problems in batches of one shape
  prompt_arrays       first turns -> left-padded token arrays on the mesh
  attempt_texts       an episode's attempts as text, for rewards and logs
  demonstrations      the task's demonstrations as episodes to imitate
  star_batch          STaR's filtered traces
  pair_batch          Pair-SFT's (wrong attempt, correct attempt) pairs

Shape legend (docs/design.md): B episodes, U prompts, G samples per
prompt, A attempts, S slots of an episode, P prompt slots.
"""

import bisect
import dataclasses
from typing import Iterator, Sequence

import jax
import numpy as np
from absl import logging

from score_jax import episodes as episodes_lib
from score_jax import multihost
from score_jax import tokenizer as tokenizer_lib
from score_jax.tasks import base

DEFAULT_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048)


@dataclasses.dataclass
class PromptIterator:
  """Batches of example indices, reshuffled each epoch, resumable exactly.

  The whole position is (epoch, offset); each epoch's order is a pure
  function of (seed, epoch), so restoring those two numbers resumes the
  same stream.

  Attributes:
    num_examples: the examples to draw from.
    batch_size: the indices a batch holds.
    seed: the shuffles' seed.
    epoch: the current pass over the examples.
    offset: the next batch's start in this epoch's order.
  """

  num_examples: int
  batch_size: int
  seed: int
  epoch: int = 0
  offset: int = 0

  def __post_init__(self):
    if self.num_examples < self.batch_size:
      raise ValueError(
        f"the training split has {self.num_examples} examples, "
        f"fewer than one batch of {self.batch_size} prompts."
      )

  def _order(self) -> np.ndarray:
    return np.random.default_rng((self.seed, self.epoch)).permutation(
      self.num_examples
    )

  def next(self) -> np.ndarray:
    """The next batch: `batch_size` indices (int64), none repeated."""
    if self.offset + self.batch_size > self.num_examples:
      self.epoch, self.offset = self.epoch + 1, 0
    indices = self._order()[self.offset : self.offset + self.batch_size]
    self.offset += self.batch_size
    return indices

  def state(self) -> dict:
    """The position, for a checkpoint: {"epoch": int, "offset": int}."""
    return {"epoch": self.epoch, "offset": self.offset}

  def restore(self, state: dict) -> None:
    """Resumes at the position `state()` returned."""
    self.epoch, self.offset = int(state["epoch"]), int(state["offset"])


def prompt_bucket(buckets: Sequence[int], max_prompt_len: int) -> int:
  """The bucket of training's longest prompts (the train step's memory is
  sized by it).

  Args:
    buckets: config.rollout.prompt_buckets.
    max_prompt_len: config.rollout.max_prompt_len (0: the largest bucket).

  Returns:
    The smallest bucket that holds `max_prompt_len` tokens.
  """
  limit = max_prompt_len or max(buckets)
  fitting = [b for b in buckets if b >= limit]
  if not fitting:
    raise ValueError(
      f"config.rollout.max_prompt_len={limit} is longer than "
      f"the largest prompt bucket {max(buckets)}; add a bucket "
      "to config.rollout.prompt_buckets."
    )
  return min(fitting)


def training_examples(
  task: base.Task, tokenizer: tokenizer_lib.Tokenizer, max_prompt_len: int
) -> list[base.Example]:
  """The train split without the problems whose first turn is longer than
  `max_prompt_len` tokens (how many were dropped is logged).

  Args:
    task: the problems.
    tokenizer: turns a problem into its first turn's tokens.
    max_prompt_len: the longest prompt training samples.

  Returns:
    The examples kept, in the split's order.
  """
  examples = task.examples("train")
  kept = [
    e
    for e in examples
    if len(tokenizer.first_turn(task.format_problem(e))) <= max_prompt_len
  ]
  if len(kept) < len(examples):
    logging.info(
      "dropped %d of %d training problems whose prompt is "
      "longer than %d tokens",
      len(examples) - len(kept),
      len(examples),
      max_prompt_len,
    )
  if not kept:
    raise ValueError(
      f"every training problem's prompt is longer than "
      f"{max_prompt_len} tokens; raise "
      "config.rollout.max_prompt_len."
    )
  return kept


def check_splits(task: base.Task, eval_config) -> None:
  """Reads the splits evaluation will read during and after training, so
  that a missing or malformed file stops the run before its first step.

  Args:
    task: the problems.
    eval_config: config.eval (its split, and its validation_split when
      every_steps validates during training).
  """
  fields = {"split": eval_config.split}
  if eval_config.every_steps:
    fields["validation_split"] = eval_config.validation_split
  for field, split in fields.items():
    try:
      task.examples(split)
    except (ValueError, OSError) as e:
      raise ValueError(f"config.eval.{field}={split!r}: {e}") from None


def eval_batches(
  examples: Sequence[base.Example], batch_size: int
) -> Iterator[tuple[list[base.Example], int]]:
  """Consecutive batches of `batch_size` examples; the last is filled up by
  repeating its first example, so that every batch has the same (compiled)
  shape.

  Args:
    examples: the problems, in order.
    batch_size: the examples of a batch.

  Yields:
    (the batch, how many of it are real examples).
  """
  for start in range(0, len(examples), batch_size):
    chunk = list(examples[start : start + batch_size])
    real = len(chunk)
    chunk += [chunk[0]] * (batch_size - real)
    yield chunk, real


def pad_prompts(
  prompts: Sequence[Sequence[int]],
  pad_id: int,
  buckets: Sequence[int] = DEFAULT_BUCKETS,
) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token lists to the smallest bucket that holds the longest
  one, so that batches of one bucket reuse one compiled rollout.

  Args:
    prompts: U token lists.
    pad_id: the id of padding slots.
    buckets: the allowed widths, ascending.

  Returns:
    (tokens int32 [U, P], valid bool [U, P]) with P the bucket.
  """
  longest = max(len(p) for p in prompts)
  index = bisect.bisect_left(buckets, longest)
  if index == len(buckets):
    raise ValueError(
      f"a prompt has {longest} tokens, more than the largest "
      f"bucket {buckets[-1]}; raise config.prompt_buckets or "
      "shorten the prompts."
    )
  width = buckets[index]
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  valid = np.zeros((len(prompts), width), bool)
  for row, prompt in enumerate(prompts):
    if len(prompt):
      tokens[row, -len(prompt) :] = prompt
      valid[row, -len(prompt) :] = True
  return tokens, valid


def prompt_arrays(
  task: base.Task,
  tokenizer: tokenizer_lib.Tokenizer,
  examples: Sequence[base.Example],
  buckets: Sequence[int],
  sharding,
) -> tuple[jax.Array, jax.Array]:
  """The first turns of this process's `examples` (its rows of the batch;
  all of them on one host), left-padded to a bucket, as global arrays.

  Every process picks the same bucket, the one for the longest prompt of
  the whole batch.

  Args:
    task: formats each problem's first turn.
    tokenizer: its tokens.
    examples: this process's U examples.
    buckets: config.rollout.prompt_buckets.
    sharding: the batch's layout over the mesh (2-D).

  Returns:
    (tokens int32 [U, P], valid bool [U, P]), global arrays of the whole
    batch's prompts.
  """
  ids = [tokenizer.first_turn(task.format_problem(e)) for e in examples]
  longest = int(multihost.gather(max(len(i) for i in ids)).max())
  tokens, valid = pad_prompts(
    ids, tokenizer.pad_id, [b for b in buckets if b >= longest] or buckets
  )
  return multihost.to_global((tokens, valid), sharding)


def attempt_token_ids(episode: episodes_lib.Episode) -> list[list[np.ndarray]]:
  """Per row, the token ids of each attempt (a host copy of the episode).

  Returns:
    [B][A] int32 arrays.
  """
  tokens = np.asarray(episode.tokens_bs)
  masks = np.asarray(episode.attempt_mask_bas)
  return [
    [tokens[b][mask] for mask in masks[b]] for b in range(tokens.shape[0])
  ]


def attempt_texts(
  tokenizer: tokenizer_lib.Tokenizer, episode: episodes_lib.Episode
) -> list[list[str]]:
  """Per row, the text of each attempt, for rewards and logs.

  Args:
    tokenizer: decodes the tokens.
    episode: the episodes, or a host copy of some rows (`attempt_token_ids`).

  Returns:
    [B][A] strings.
  """
  return [
    [tokenizer.decode(ids) for ids in row] for row in attempt_token_ids(episode)
  ]


def demonstrations(
  tokenizer: tokenizer_lib.Tokenizer,
  problems: Sequence[str],
  attempts: Sequence[Sequence[str]],
  instruction_ids: Sequence[int],
  length: int,
) -> episodes_lib.Supervised:
  """Episodes to imitate, laid out as the rollout lays them out (turn
  markers, stop tokens, the instruction between attempts).

  Args:
    tokenizer: turns the texts into tokens.
    problems: B first turns' texts.
    attempts: [B][A] attempt texts.
    instruction_ids: the instruction turn's token ids.
    length: S, the slots of each episode (right-padded).

  Returns:
    The episodes, with the loss on the attempts' tokens (stop tokens
    included).
  """
  tokens = np.full((len(problems), length), tokenizer.pad_id, np.int32)
  valid = np.zeros((len(problems), length), bool)
  loss_mask = np.zeros((len(problems), length), bool)
  lengths = []
  for row, (problem, row_attempts) in enumerate(zip(problems, attempts)):
    ids = list(tokenizer.first_turn(problem))
    mask = [False] * len(ids)
    for i, text in enumerate(row_attempts):
      if i:
        ids += instruction_ids
        mask += [False] * len(instruction_ids)
      attempt = tokenizer.encode(text) + [tokenizer.end_of_turn_id]
      ids += attempt
      mask += [True] * len(attempt)
    lengths.append(len(ids))
    ids, mask = ids[:length], mask[:length]
    tokens[row, : len(ids)] = ids
    valid[row, : len(ids)] = True
    loss_mask[row, : len(mask)] = mask
  if max(lengths) > length:
    raise ValueError(
      f"a supervised episode has {max(lengths)} tokens, more "
      f"than config.sft.max_len={length}; raise it."
    )
  return episodes_lib.Supervised(tokens, valid, loss_mask)


def star_batch(
  episode: episodes_lib.Episode, rewards_ba: np.ndarray
) -> episodes_lib.Supervised:
  """STaR's filtered traces: the SFT loss on the last attempt of each
  episode whose last attempt is correct (the others drop out).

  Args:
    episode: sampled episodes (a host copy).
    rewards_ba: their rewards [B, A].

  Returns:
    The episodes as they are, with that loss mask.
  """
  keep_b = np.asarray(rewards_ba)[:, -1] > 0.5
  loss_mask = np.asarray(episode.attempt_mask_bas)[:, -1] & keep_b[:, None]
  return episodes_lib.Supervised(
    np.asarray(episode.tokens_bs), np.asarray(episode.valid_bs), loss_mask
  )


def pair_batch(
  episode: episodes_lib.Episode,
  rewards_ba: np.ndarray,
  samples_per_prompt: int,
  max_attempt_len: int,
  pad_id: int,
  seed: int,
) -> episodes_lib.Supervised:
  """Pair-SFT: each wrong first attempt, followed by the instruction and a
  correct attempt at the same problem drawn from its group, with the SFT
  loss on that correct attempt. Rows with a correct first attempt, or
  whose group has no correct attempt, drop out.

  The correct attempt replaces the row's second attempt in its slots (the
  last `max_attempt_len` of a two-attempt rollout), so that the layout and
  the positions are those of a rollout.

  Args:
    episode: sampled two-attempt episodes (a host copy), grouped
      [prompt 0 x G, prompt 1 x G, ...].
    rewards_ba: their rewards [B, 2].
    samples_per_prompt: G.
    max_attempt_len: Y.
    pad_id: the id of padding slots.
    seed: the draw of each row's correct attempt.

  Returns:
    The pairs, with the loss on each row's correct attempt.
  """
  tokens = np.array(episode.tokens_bs)
  valid = np.array(episode.valid_bs)
  attempt_mask = np.asarray(episode.attempt_mask_bas)
  rewards = np.asarray(rewards_ba) > 0.5
  if attempt_mask.shape[1] != 2:
    raise ValueError(
      "pair_sft pairs two attempts; set config.rollout.num_attempts=2."
    )
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
      row_tokens[: len(ids)], row_valid[: len(ids)] = ids, True
      loss_mask[b, second][: len(ids)] = True
  return episodes_lib.Supervised(tokens, valid, loss_mask)
