"""Tests for RewardPool: order, hard time limits, crashes, recovery, cleanup."""

import ctypes
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from score_jax.tasks import rewards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
  "failure", ["raise", "exit", "segfault", "sys.exit", "allocate"]
)
def test_failures_are_counted_as_errors(failure):
  responses = ["ok", failure, "fine", failure, "good"]
  with rewards.RewardPool(
    _misbehave, num_workers=2, timeout_s=10, memory_limit_mb=256
  ) as pool:
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
    with pytest.raises(ValueError, match="one answer key per response"):
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


# A process with a pool that grades sandboxed programs; the first reward
# call sends SIGTERM (a preemption notice) to the process group, as a
# Ctrl-C or launch/run.py's worker would, and to every process the run
# started (a VM's shutdown reaches the sandboxes too, which run in sessions
# of their own).
_GRADED_THROUGH_SIGTERM = r"""
import os, signal, sys
from score_jax.tasks import rewards, sandbox

notices = []
BACKEND = sandbox.available_backends()[0]

def children(pid):
  found = []
  for entry in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{entry}/stat") as f:
        if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
          found.append(int(entry))
    except (OSError, ValueError):
      pass
  return found

def notify_everyone():
  os.killpg(os.getpgrp(), signal.SIGTERM)
  stack = children(os.getppid())
  while stack:
    pid = stack.pop()
    stack += children(pid)
    if pid != os.getpid():
      try:
        os.kill(pid, signal.SIGTERM)
      except ProcessLookupError:
        pass

def reward(response, reference):
  if response == "3" and not os.path.exists(sys.argv[1]):
    open(sys.argv[1], "w").close()
    notify_everyone()
  result = sandbox.run_tests(f"x = {response}", f"assert x == {reference}",
                             backend=BACKEND)
  return float(result.passed)

with rewards.RewardPool(reward, num_workers=2, timeout_s=10.0) as pool:
  # The workers' own handling, not the handler they would inherit.
  signal.signal(signal.SIGTERM, lambda *_: notices.append(1))
  pool.score(["0", "0"], [0, 0])  # Every worker has its sandbox running.
  result = pool.score([str(i) for i in range(8)], list(range(8)))
print(len(notices), result.rewards.tolist(), result.num_failed)
"""


def test_a_preemption_notice_never_cuts_grading_short(tmp_path):
  # In a session of its own: the SIGTERM is for it, not for pytest.
  done = subprocess.run(
    [
      sys.executable,
      "-c",
      _GRADED_THROUGH_SIGTERM,
      str(tmp_path / "signalled"),
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    start_new_session=True,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert (tmp_path / "signalled").exists()
  # The parent got the notice; every program was graded, none failed.
  assert done.stdout.splitlines()[-1] == f"1 {[1.0] * 8} 0", done.stderr
