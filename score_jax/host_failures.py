"""A failing host ends a multi-host training run within a bounded time, with
one line naming the process and the last complete checkpoint.

Every process of a run does the same steps, in lockstep: when one dies or
hangs, the others wait for it, in a collective or at a barrier, forever.
JAX's coordination service watches its processes' heartbeats: when one
stops (killed, out of memory, stopped), it ends every other process, after
its heartbeat timeout, with a fatal error of its own. A process that hangs
(a reward pool or storage that stops answering, a deadlock) still beats.
So, on top of it (through the same service):

  * a per-step barrier: the training loop calls `HostWatch.check` at its
    two checks a step (after the rollout, after the update); every process
    waits there for all the others, at most config.hosts.step_timeout_s.
    One that does not come in time is named (HostFailed, which main prints
    as one line).
  * a heartbeat of our own, faster than JAX's (whose timeout is set to
    twice ours, see sharding.initialize_distributed): a thread of each
    process publishes a count every few seconds, and another watches the
    others' counts; one that stops changing for
    config.hosts.heartbeat_timeout_s names its process, and ends this one
    at once (os._exit: its main thread may be stuck in a collective that
    never returns). The same thread ends a process whose own main thread
    has not reached a check in twice the step timeout (stuck in a
    collective, or hung itself).

The coordination service runs in process 0: when process 0 is killed, JAX
ends the others at once with its own error ("the leader task ... died"),
before any of this can speak; when it is stopped, the others' exchanges
with the service stop, which names it. A stopped process stays stopped:
launch/run.py kills whatever still holds the TPU before the rerun.
"""

import contextlib
import os
import sys
import threading
import time
from typing import Callable, Optional

import jax
from absl import logging
from jax._src import distributed

# The status of a run ended by another process's failure.
EXIT_STATUS = 1
_KEY = "score_jax/hosts/"


class HostFailed(RuntimeError):
  """Another process (or this one) died or hung; the message names it."""


def end(message: str) -> None:
  """Prints `message` as the run's last line and ends this process at
  once: exiting as usual would first wait at JAX's shutdown barrier for
  the process that failed, for minutes."""
  logging.error("%s", message)
  print(f"score_jax: error: {message}", file=sys.stderr, flush=True)
  logging.flush()
  os._exit(EXIT_STATUS)


def _client():
  """JAX's client of its coordination service (as Orbax reaches it: jax
  exposes no public handle)."""
  return distributed.global_state.client


class HostWatch:
  """The per-step barrier and the heartbeat of one process (a context
  manager; does nothing on one process).

  Args:
    step_timeout_s: how long a process waits at a check for the others.
    heartbeat_timeout_s: how long another process's heartbeat may stop.
    last_complete: the last complete checkpoint, in words, for the line.
  """

  def __init__(
    self,
    step_timeout_s: float,
    heartbeat_timeout_s: float,
    last_complete: Callable[[], str],
  ):
    self._step_timeout_s = step_timeout_s
    self._heartbeat_timeout_s = heartbeat_timeout_s
    self._last_complete = last_complete
    self._process, self._count = jax.process_index(), jax.process_count()
    self._checks = 0  # Checks this process reached.
    self._next = (1, "rollout")  # Its next check: (step, where).
    self._checked_at = time.monotonic()
    self._stopped = threading.Event()
    # What this process last heard: each process's (beat, checks, step),
    # and when its beat last changed; when an exchange last succeeded.
    self._heard = {}
    self._changed_at = {}
    self._exchanged_at = time.monotonic()
    self._lock = threading.Lock()
    self._threads = []
    if self._count > 1:
      self._threads = [
        threading.Thread(target=loop, daemon=True, name=name)
        for loop, name in (
          (self._beat, "score_jax-beat"),
          (self._watch, "score_jax-watch"),
        )
      ]
      for thread in self._threads:
        thread.start()

  def starting(self, step: int) -> None:
    """Training goes on after step `step` (0: none done)."""
    self._next, self._checked_at = (step + 1, "rollout"), time.monotonic()

  def check(self, step: int, where: str) -> None:
    """Called by every process at the same point of training step `step`:
    `where` is "rollout" (after it) or "update" (after it); returns once
    every process got there, raises HostFailed if one does not within the
    step timeout."""
    if self._count == 1:
      return
    self._checks += 1
    self._next = (
      (step, "update") if where == "rollout" else (step + 1, "rollout")
    )
    self._checked_at = time.monotonic()
    try:
      _client().wait_at_barrier(
        f"{_KEY}check/{self._checks}", int(self._step_timeout_s * 1000)
      )
    except Exception as e:  # JAX's errors carry no finer type.
      late = self._behind(self._checks) or "some"
      raise HostFailed(
        f"process {late} did not reach step {step}'s {where} within "
        f"{self._step_timeout_s:.0f} s of the others (hung: a reward pool "
        f"or storage that stopped answering?); {self._last_complete()}; "
        "rerun to resume."
      ) from e

  def explain(self) -> Optional[HostFailed]:
    """For an error that a collective raised (on CPU, a peer that died
    breaks its connections at once): waits a little longer than the
    heartbeat timeout for the heartbeat to name a process that stopped;
    None if none did."""
    if self._count == 1:
      return None
    deadline = time.monotonic() + 1.25 * self._heartbeat_timeout_s
    while time.monotonic() < deadline:
      verdict = self._verdict()
      if verdict is not None:
        return HostFailed(verdict)
      time.sleep(self._heartbeat_timeout_s / 8)
    return None

  def close(self) -> None:
    """Stops the heartbeat; the others read this process as done, not
    stopped."""
    self._stopped.set()
    for thread in self._threads:
      # Not forever: a service that stopped answering holds the beat.
      thread.join(timeout=self._heartbeat_timeout_s / 4)

  def __enter__(self) -> "HostWatch":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  # -- the heartbeat ---------------------------------------------------------

  def _beat(self) -> None:
    """Publishes this process's beat and progress, and reads the others'."""
    beat, interval = 0, self._heartbeat_timeout_s / 8
    while not self._stopped.wait(interval):
      beat += 1
      try:
        _client().key_value_set(
          f"{_KEY}beat/{self._process}",
          f"{beat} {self._checks} {self._next[0]}",
          allow_overwrite=True,
        )
        heard = dict(_client().key_value_dir_get(f"{_KEY}beat/"))
      except Exception:  # pylint: disable=broad-except
        continue  # The service did not answer: _watch times it.
      now = time.monotonic()
      with self._lock:
        self._exchanged_at = now
        for key, value in heard.items():
          process = int(key.rsplit("/", 1)[1])
          if self._heard.get(process) != value:
            self._heard[process], self._changed_at[process] = value, now
    with contextlib.suppress(Exception):  # The service is gone: all are.
      _client().key_value_set(
        f"{_KEY}beat/{self._process}", "done", allow_overwrite=True
      )

  def _watch(self) -> None:
    """Ends this process, in one line, once the heartbeat names a failed
    process, or this process's main thread is stuck."""
    while not self._stopped.wait(self._heartbeat_timeout_s / 8):
      verdict = self._verdict()
      stuck_s = time.monotonic() - self._checked_at
      if verdict is None and stuck_s > 2 * self._step_timeout_s:
        step, where = self._next
        verdict = (
          f"process {self._behind(self._checks + 1)} did not reach "
          f"the end of step {step}'s {where} within {stuck_s:.0f} s "
          f"(hung); {self._last_complete()}; rerun to resume."
        )
      if verdict is not None:
        end(verdict)

  def _verdict(self) -> Optional[str]:
    """The line naming a process whose heartbeat stopped, or None."""
    now = time.monotonic()
    with self._lock:
      if now - self._exchanged_at > self._heartbeat_timeout_s:
        return (
          f"process 0 (which runs JAX's coordination service) has not "
          f"answered for {now - self._exchanged_at:.0f} s (stopped, or "
          f"unreachable); {self._last_complete()}; rerun to resume."
        )
      for process, value in sorted(self._heard.items()):
        silent_s = now - self._changed_at[process]
        if value != "done" and silent_s > self._heartbeat_timeout_s:
          step = value.split()[2]
          return (
            f"process {process} stopped during step {step} (no "
            f"heartbeat for {silent_s:.0f} s: killed, out of memory, or "
            f"stopped); {self._last_complete()}; rerun to resume."
          )
    return None

  def _behind(self, checks: int) -> str:
    """The processes that had not reached check number `checks` when last
    heard of, as "1" or "1, 3"."""
    with self._lock:
      late = [
        p
        for p in range(self._count)
        if p != self._process
        and (
          p not in self._heard
          or self._heard[p] == "done"
          or int(self._heard[p].split()[1]) < checks
        )
      ]
    if not late and self._checks < checks:
      late = [self._process]
    return ", ".join(map(str, late))
