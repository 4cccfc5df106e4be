"""The STaR and Pair-SFT baselines: their supervised batches, their schedules,
and a run of each through the one training loop."""

import json

import jax
import numpy as np

from score_jax import data, episodes, experiment, schedule, train

# Two 2-attempt episodes per group; slots: prompt 0-2, attempt 1 3-5,
# instruction 6, attempt 2 7-9 (max_attempt_len 3).
PAD = 0


def _episodes(rewards):
  rows = len(rewards)
  tokens = np.full((rows, 10), PAD, np.int32)
  valid = np.zeros((rows, 10), bool)
  mask = np.zeros((rows, 2, 10), bool)
  for b in range(rows):
    tokens[b, 1:3] = [50, 51]  # the prompt, left-padded
    tokens[b, 3:5] = [100 + b, 200 + b]  # attempt 1: 2 tokens
    tokens[b, 6] = 60  # the instruction
    tokens[b, 7:10] = [300 + b, 400 + b, 500 + b]  # attempt 2: 3 tokens
    valid[b, 1:5] = valid[b, 6:10] = True
    mask[b, 0, 3:5] = mask[b, 1, 7:10] = True
  episode = episodes.Episode(
    tokens, valid, mask, np.zeros((rows, 10)), mask.sum(2)
  )
  return episode, np.asarray(rewards, np.float32)


def test_star_keeps_the_correct_last_attempts():
  episode, rewards = _episodes([[0, 1], [1, 0], [1, 1], [0, 0]])
  batch = data.star_batch(episode, rewards)
  np.testing.assert_array_equal(batch.tokens_bs, episode.tokens_bs)
  expected = np.zeros((4, 10), bool)
  expected[[0, 2], 7:10] = True
  np.testing.assert_array_equal(batch.loss_mask_bs, expected)


def test_pair_sft_follows_a_wrong_attempt_with_a_correct_one():
  # Group 1: row 0 wrong, row 1 right first time; group 2: both wrong, no
  # correct attempt anywhere; group 3: row 4 wrong, its only correct attempt
  # is row 5's second.
  episode, rewards = _episodes([[0, 0], [1, 0], [0, 0], [0, 0], [0, 0], [0, 1]])
  batch = data.pair_batch(
    episode,
    rewards,
    samples_per_prompt=2,
    max_attempt_len=3,
    pad_id=PAD,
    seed=0,
  )
  kept = batch.loss_mask_bs.any(1)
  np.testing.assert_array_equal(kept, [True, False, False, False, True, True])
  for b in range(6):  # Prompt, first attempt and instruction never change.
    np.testing.assert_array_equal(
      batch.tokens_bs[b, :7], episode.tokens_bs[b, :7]
    )
  # Row 0: row 1's correct first attempt (2 tokens), then padding.
  np.testing.assert_array_equal(batch.tokens_bs[0, 7:], [101, 201, PAD])
  np.testing.assert_array_equal(batch.valid_bs[0, 7:], [True, True, False])
  np.testing.assert_array_equal(
    batch.loss_mask_bs[0], batch.valid_bs[0] & (np.arange(10) >= 7)
  )
  # Rows 4 and 5 (both first attempts wrong) get row 5's second attempt.
  for b in (4, 5):
    np.testing.assert_array_equal(batch.tokens_bs[b, 7:], [305, 405, 505])
  # Dropped rows keep their episode untouched.
  np.testing.assert_array_equal(batch.tokens_bs[1], episode.tokens_bs[1])


def test_star_iterations_split_the_budget():
  plan = schedule.phases("star", 5, 5, cycles=3, sft_steps=2)
  assert [(p.name, p.steps) for p in plan] == [
    ("sft", 2),
    ("star", 4),
    ("star", 3),
    ("star", 3),
  ]
  assert [(p.name, p.steps) for p in schedule.phases("pair_sft", 5, 5)] == [
    ("pair_sft", 10)
  ]


def _run(runs, tmp_path, **overrides):
  """Trains the tiny config with a reward that a random model earns half
  the time, so that the baselines have episodes to keep."""
  exp = experiment.build(runs.tiny_config(**overrides))
  exp.task = runs.RewardOverride(exp.task, runs.parity)
  trainer = train.Trainer(exp, str(tmp_path))
  trainer.run()
  records = [
    json.loads(line)
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
  ]
  return trainer, records


def test_star_samples_each_iteration_from_its_starting_policy(tmp_path, runs):
  # 2 SFT steps, then 2 STaR iterations of 2 steps; checkpoints every 2.
  trainer, records = _run(runs, tmp_path, schedule="star", cycles=2)
  assert [r["phase"] for r in records] == ["sft"] * 2 + ["star"] * 4
  assert all(0 < r["sft_rows_kept"] < 1 for r in records[2:])
  checkpointer = trainer.checkpointer()
  states = {
    step: trainer.initial_state(checkpointer, step) for step in (2, 4, 6)
  }
  get = jax.device_get
  # Iteration 1 samples from the step-2 policy, iteration 2 from step 4's.
  jax.tree.map(
    np.testing.assert_array_equal, get(states[4][1]), get(states[2][0].params)
  )
  jax.tree.map(
    np.testing.assert_array_equal, get(states[6][1]), get(states[4][0].params)
  )
  assert not np.array_equal(
    get(states[6][0].params)["embedding"], get(states[4][0].params)["embedding"]
  )


def test_pair_sft_trains_on_pairs_from_the_base_model(tmp_path, runs):
  trainer, records = _run(
    runs, tmp_path, schedule="pair_sft", **{"sft.steps": 0}
  )
  assert [r["phase"] for r in records] == ["pair_sft"] * 4
  assert any(r["sft_rows_kept"] > 0 and r["loss"] > 0 for r in records)
  checkpointer = trainer.checkpointer()
  initial = jax.device_get(trainer.exp.model.init(jax.random.key(0)))
  final, reference = trainer.initial_state(checkpointer, 4)
  jax.tree.map(
    np.testing.assert_array_equal, jax.device_get(reference), initial
  )
  assert not np.array_equal(
    jax.device_get(final.params)["embedding"], initial["embedding"]
  )


def test_self_refine_evaluates_under_its_own_instruction(tiny_config):
  """config.instruction replaces the task's instruction between attempts
  (the Self-Refine row: the base model prompted differently)."""
  own = "Review your previous solution line by line and find any mistakes."
  default = experiment.build(tiny_config())
  refine = experiment.build(tiny_config(instruction=own))
  assert refine.instruction_ids == refine.tokenizer.next_turn(own)
  assert default.instruction_ids == default.tokenizer.next_turn(
    default.task.instruction
  )
  assert refine.instruction_ids != default.instruction_ids
  assert own in refine.tokenizer.decode(refine.instruction_ids)
