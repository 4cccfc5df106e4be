"""Scores a batch of responses in worker processes with a hard time limit.

The trainer calls `RewardPool.score` once per step. Rewards run untrusted model
output through sympy or a Python interpreter, so every call gets a wall-clock
limit that cannot be ignored: a call that runs past it has its worker killed
(SIGKILL) and replaced, and scores 0. A call that raises, or that kills its
worker (segfault, os._exit, out of memory), also scores 0. The parent only
waits on pipes with a deadline, so it never hangs on a reward and never dies
from one.

Workers are forked once and stay alive between calls; the parent feeds them
chunks of the batch and each worker reports item by item, so the parent knows
when the current item started and can enforce its deadline. Forking keeps
start-up cheap (the reward function and its imports are inherited, never
pickled) and is also how a killed worker is replaced. A forked child has only
the thread that forked it, so the reward function must not rely on the
parent's other threads, nor call into JAX.
"""

import collections
import dataclasses
import faulthandler
import math
import os
import signal
import time
import warnings
import weakref
from multiprocessing import connection
from typing import Any, Callable, Optional, Sequence

import numpy as np
from absl import logging

from score_jax.tasks import base

try:
  import resource
except ImportError:  # Not POSIX: workers run without a memory limit.
  resource = None

RewardFn = Callable[[str, Any], float]

# Chunks per worker per batch: small enough that a slow chunk does not leave
# other workers idle, large enough that pickling overhead stays negligible.
_CHUNKS_PER_WORKER = 4
_REAP_WAIT_S = 1.0
# What a worker reports in place of an error for a `base.Rejected` response.
_REJECTED = "rejected"


@dataclasses.dataclass
class RewardResult:
  """Rewards of one batch, in input order, and how many calls failed."""

  rewards: np.ndarray  # float32 [n]; 0 where a call failed.
  num_timeouts: int
  num_errors: int
  num_rejected: int = 0  # Responses the task refused to grade (Rejected).

  @property
  def num_failed(self) -> int:
    """Calls that scored 0 without being graded."""
    return self.num_timeouts + self.num_errors + self.num_rejected


@dataclasses.dataclass
class _Worker:
  """A forked worker process and what it still owes the parent."""

  pid: int
  conn: connection.Connection
  # Items (index, response, answer_key) sent but not yet reported, in order.
  outstanding: collections.deque = dataclasses.field(
    default_factory=collections.deque
  )
  # When the item at the head of `outstanding` runs out of time.
  deadline: float = math.inf


class RewardPool:
  """Persistent forked workers that score (response, answer_key) pairs.

  Not thread-safe: call `score` from one thread at a time.
  """

  def __init__(
    self,
    reward_fn: RewardFn,
    num_workers: int = 2,
    timeout_s: float = 5.0,
    memory_limit_mb: Optional[int] = 2048,
  ):
    """Starts `num_workers` workers.

    Args:
      reward_fn: `reward_fn(response, answer_key) -> float`. Inherited by the
        forked workers, so it need not be picklable; a module-level function
        or a bound method of a Task both work.
      num_workers: worker processes (>= 1).
      timeout_s: wall-clock limit of one `reward_fn` call, in seconds.
      memory_limit_mb: address space a worker may add on top of what it
        inherits from the parent; None for no limit. Exceeding it raises
        MemoryError inside the call, which counts as an error.
    """
    if num_workers < 1:
      raise ValueError(f"RewardPool needs num_workers >= 1, got {num_workers}.")
    if not timeout_s > 0:
      raise ValueError(f"RewardPool needs timeout_s > 0, got {timeout_s}.")
    self._reward_fn = reward_fn
    self._timeout_s = float(timeout_s)
    self._memory_limit_bytes = (
      None if memory_limit_mb is None else int(memory_limit_mb) << 20
    )
    self._workers: list[_Worker] = []
    # Kills the workers even if the pool is never closed explicitly.
    self._finalizer = weakref.finalize(self, _stop_workers, self._workers)
    for _ in range(num_workers):
      self._workers.append(self._fork_worker())

  @property
  def worker_pids(self) -> tuple[int, ...]:
    """Process ids of the current workers (they change when one is killed)."""
    return tuple(worker.pid for worker in self._workers)

  def score(
    self, responses: Sequence[str], answer_keys: Sequence[Any]
  ) -> RewardResult:
    """Scores `responses[i]` against `answer_keys[i]` for every i, in the
    workers, each call under the pool's wall-clock limit.

    Args:
      responses: the texts to grade.
      answer_keys: one answer key per response, as `reward_fn` takes it.

    Returns:
      The rewards in input order, 0 where a call timed out, failed or was
      rejected, and the counts of each.

    Raises:
      RuntimeError: after `close()`.
      ValueError: if the two lengths differ.
    """
    if not self._finalizer.alive:
      raise RuntimeError("RewardPool.score called after close().")
    if len(responses) != len(answer_keys):
      raise ValueError(
        f"RewardPool.score got {len(responses)} responses but "
        f"{len(answer_keys)} answer keys; pass one answer key per response."
      )
    num_items = len(responses)
    rewards = np.zeros(num_items, np.float32)
    num_timeouts = num_errors = num_rejected = 0
    first_error = None
    chunk_size = max(
      1, math.ceil(num_items / (_CHUNKS_PER_WORKER * len(self._workers)))
    )
    items = list(zip(range(num_items), responses, answer_keys))
    pending = collections.deque(
      items[start : start + chunk_size]
      for start in range(0, num_items, chunk_size)
    )

    while pending or any(worker.outstanding for worker in self._workers):
      for slot, worker in enumerate(self._workers):
        if pending and not worker.outstanding:
          self._workers[slot] = worker = self._send(slot, pending.popleft())
      busy = [worker for worker in self._workers if worker.outstanding]
      wait_s = max(0.0, min(w.deadline for w in busy) - time.monotonic())
      ready = set(connection.wait([w.conn for w in busy], timeout=wait_s))
      for slot, worker in enumerate(self._workers):
        if worker.conn in ready:
          try:
            while worker.outstanding and worker.conn.poll():
              index, reward, error = worker.conn.recv()
              expected_index = worker.outstanding.popleft()[0]
              assert index == expected_index, (index, expected_index)
              rewards[index] = reward
              if error == _REJECTED:
                num_rejected += 1
              elif error is not None:
                num_errors += 1
                first_error = first_error or error
              worker.deadline = time.monotonic() + self._timeout_s
          except (EOFError, OSError):
            # The worker died inside the call at the head of its queue.
            num_errors += 1
            ending = self._replace(slot, pending)
            first_error = first_error or f"worker process {ending}"
        elif worker.outstanding and time.monotonic() >= worker.deadline:
          num_timeouts += 1
          self._replace(slot, pending)

    if num_errors:
      logging.warning(
        "RewardPool: %d of %d reward calls failed, e.g. %s",
        num_errors,
        num_items,
        first_error,
      )
    return RewardResult(rewards, num_timeouts, num_errors, num_rejected)

  def close(self) -> None:
    """Kills and reaps the workers. Idempotent."""
    self._finalizer()

  def __enter__(self) -> "RewardPool":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def _send(self, slot: int, chunk: list) -> _Worker:
    """Hands `chunk` to the idle worker in `slot`; returns the worker used."""
    worker = self._workers[slot]
    try:
      worker.conn.send(chunk)
    except OSError:  # It died while idle (e.g. the OOM killer): replace it.
      _stop_workers([worker])
      worker = self._workers[slot] = self._fork_worker()
      worker.conn.send(chunk)
    worker.outstanding.extend(chunk)
    worker.deadline = time.monotonic() + self._timeout_s
    return worker

  def _replace(self, slot: int, pending: collections.deque) -> str:
    """Kills the worker in `slot`, drops the item it was running (it scores
    0) and queues the rest of its chunk first. Returns how the worker ended."""
    worker = self._workers[slot]
    (ending,) = _stop_workers([worker])
    worker.outstanding.popleft()
    if worker.outstanding:
      pending.appendleft(list(worker.outstanding))
    self._workers[slot] = self._fork_worker()
    return ending

  def _fork_worker(self) -> _Worker:
    parent_conn, child_conn = connection.Pipe()
    with warnings.catch_warnings():
      # JAX warns on every fork that its threads may deadlock the child. The
      # child never calls into JAX: it only runs the reward function.
      warnings.filterwarnings(
        "ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning
      )
      pid = os.fork()
    if pid == 0:
      exit_code = 1
      try:
        parent_conn.close()
        # Drop the other workers' pipes so that each worker sees EOF (and
        # exits) as soon as the parent is gone.
        for other in self._workers:
          other.conn.close()
        _serve(child_conn, self._reward_fn, self._memory_limit_bytes)
        exit_code = 0
      finally:
        os._exit(exit_code)  # Never run the parent's code or exit handlers.
    child_conn.close()
    return _Worker(pid=pid, conn=parent_conn)


def _serve(
  conn: connection.Connection,
  reward_fn: RewardFn,
  memory_limit_bytes: Optional[int],
) -> None:
  """A worker's loop: score chunks until the parent goes away."""
  # Ctrl-C and SIGTERM (a preemption notice, sent to the whole process
  # group) are for the parent, which saves and then closes the pool: a
  # batch being graded is graded in full, never cut short into zeros.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  # A crash is reported by the parent (with its signal); a traceback dump
  # per crashed reward call would only flood stderr.
  faulthandler.disable()
  if memory_limit_bytes is not None:
    _limit_address_space(memory_limit_bytes)
  while True:
    try:
      chunk = conn.recv()
    except EOFError:
      return
    for index, response, answer_key in chunk:
      try:
        result = (index, float(reward_fn(response, answer_key)), None)
      except base.Rejected:
        result = (index, 0.0, _REJECTED)
      # Anything the reward does (SystemExit and MemoryError included) must
      # become a scored failure, not a dead worker.
      except BaseException as e:  # pylint: disable=broad-except
        result = (index, 0.0, f"{type(e).__name__}: {e}"[:300])
      conn.send(result)


def _limit_address_space(extra_bytes: int) -> None:
  """Caps this process at its current address space plus `extra_bytes`.

  Relative to the current size because a worker forked from a JAX process
  inherits a large virtual address space it never touches.
  """
  if resource is None:
    return
  try:
    with open("/proc/self/status") as status:
      vm_kb = next(
        int(line.split()[1]) for line in status if line.startswith("VmSize:")
      )
  except (OSError, StopIteration, ValueError):
    return
  _, hard = resource.getrlimit(resource.RLIMIT_AS)
  limit = vm_kb * 1024 + extra_bytes
  if hard != resource.RLIM_INFINITY:
    limit = min(limit, hard)
  resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _stop_workers(workers: Sequence[_Worker]) -> list[str]:
  """SIGKILLs and reaps `workers`; returns how each one ended.

  A worker that had already died keeps its own exit status (a zombie ignores
  the SIGKILL), so the description names the real cause of a crash.
  """
  for worker in workers:
    worker.conn.close()
    try:
      os.kill(worker.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  return [_reap(worker.pid) for worker in workers]


def _reap(pid: int) -> str:
  """Waits (boundedly) for a killed child so that it leaves no zombie."""
  give_up = time.monotonic() + _REAP_WAIT_S
  while True:
    try:
      done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
      return "already reaped"
    if done:
      if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
      return f"exited with code {os.waitstatus_to_exitcode(status)}"
    if time.monotonic() > give_up:
      return "did not exit"
    time.sleep(0.001)
