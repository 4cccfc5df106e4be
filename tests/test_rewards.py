"""Tests for RewardPool: order, hard time limits, crashes, recovery, cleanup."""

import ctypes
import os
import time

import numpy as np
import pytest

from score_jax.tasks import rewards


def _weighted_length(response, reference):
  return len(response) * reference


def _misbehave(response, reference):
  """Behaves like `_weighted_length` unless the response names a failure."""
  if response == "sleep":
    time.sleep(60)
  elif response == "raise":
    raise ValueError("bad answer")
  elif response == "exit":
    os._exit(3)
  elif response == "segfault":
    ctypes.string_at(0)
  elif response == "sys.exit":
    raise SystemExit(1)
  elif response == "allocate":
    bytearray(1 << 30)  # Over the pool's 256 MiB limit.
  return _weighted_length(response, reference)


def _assert_reaped(pids):
  for pid in pids:
    with pytest.raises(ProcessLookupError):
      os.kill(pid, 0)


def test_rewards_in_input_order():
  responses = [f"answer {'x' * i}" for i in range(300)]
  references = [i % 5 for i in range(300)]
  with rewards.RewardPool(_weighted_length, num_workers=2) as pool:
    result = pool.score(responses, references)
  expected = [_weighted_length(r, w) for r, w in zip(responses, references)]
  assert result.rewards.dtype == np.float32
  assert result.rewards.shape == (300,)
  np.testing.assert_array_equal(result.rewards, expected)
  assert (result.num_timeouts, result.num_errors) == (0, 0)


def test_timeout_scores_zero_and_others_still_score():
  responses = ["a", "bb", "sleep", "ccc", "sleep", "dddd"] * 3
  references = [1.0] * len(responses)
  with rewards.RewardPool(_misbehave, num_workers=2, timeout_s=0.5) as pool:
    pids_before = pool.worker_pids
    start = time.monotonic()
    result = pool.score(responses, references)
    elapsed = time.monotonic() - start
    expected = [0.0 if r == "sleep" else len(r) for r in responses]
    np.testing.assert_array_equal(result.rewards, expected)
    assert result.num_timeouts == responses.count("sleep")
    assert result.num_errors == 0
    # Six 0.5 s timeouts over two workers, far below one 60 s sleep.
    assert elapsed < 10
    # Killed workers were replaced and reaped; the pool keeps working.
    assert set(pool.worker_pids).isdisjoint(pids_before)
    _assert_reaped(pids_before)
    again = pool.score(["xyz"] * 10, [2] * 10)
    np.testing.assert_array_equal(again.rewards, [6.0] * 10)


@pytest.mark.parametrize(
    "failure", ["raise", "exit", "segfault", "sys.exit", "allocate"])
def test_failures_are_counted_as_errors(failure):
  responses = ["ok", failure, "fine", failure, "good"]
  with rewards.RewardPool(
      _misbehave, num_workers=2, timeout_s=10, memory_limit_mb=256) as pool:
    result = pool.score(responses, [1] * len(responses))
    np.testing.assert_array_equal(result.rewards, [2, 0, 4, 0, 4])
    assert (result.num_timeouts, result.num_errors) == (0, 2)
    again = pool.score(["abc", "de"], [1, 1])
    np.testing.assert_array_equal(again.rewards, [3, 2])


def test_close_leaves_no_processes():
  pool = rewards.RewardPool(_weighted_length, num_workers=3)
  pids = pool.worker_pids
  assert len(pids) == 3
  for pid in pids:
    os.kill(pid, 0)  # Alive.
  pool.close()
  pool.close()
  _assert_reaped(pids)
  with pytest.raises(RuntimeError, match="after close"):
    pool.score(["a"], [1])


def test_bad_arguments():
  with pytest.raises(ValueError, match="num_workers"):
    rewards.RewardPool(_weighted_length, num_workers=0)
  with rewards.RewardPool(_weighted_length, num_workers=1) as pool:
    with pytest.raises(ValueError, match="one reference per response"):
      pool.score(["a", "b"], [1])
    empty = pool.score([], [])
    assert empty.rewards.shape == (0,)


def test_batch_of_cheap_rewards_is_fast():
  responses = [f"The answer is {i}" for i in range(512)]
  with rewards.RewardPool(_weighted_length, num_workers=2) as pool:
    pool.score(responses[:8], [1] * 8)
    start = time.monotonic()
    result = pool.score(responses, [1] * 512)
    elapsed = time.monotonic() - start
  np.testing.assert_array_equal(result.rewards, [len(r) for r in responses])
  # Typically ~10 ms; the bound leaves room for a loaded test machine.
  assert elapsed < 2.0
