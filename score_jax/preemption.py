"""Preemption: a notice (SIGTERM, or Ctrl-C) ends training at the next
check, every process at the same one, after saving the state there.

What a Cloud TPU VM gets: a spot (or preemptible) slice that is reclaimed,
like any Compute Engine VM that is stopped or shut down for maintenance,
gets an ACPI soft-off; the guest OS shuts down, which sends SIGTERM to every
process, and about 30 s later (on a spot VM) the VM is gone. A slice is
never restarted: launch/run.py recreates it and reruns the job. What fits
in the 30 s is docs/tpu.md's "Preemption" section.

The training loop asks `reached()` twice a step: after the rollout and its
grading, and after the update (its metrics row written and its scheduled
save started), so that a save starts within one of the two. On one process
the signal handler sets a flag. On several, the notice reaches one process
(or some) at an arbitrary point of its step, and all must save the same
step: JAX's preemption sync point does that (its notifier, started with
jax.distributed, catches SIGTERM in C++; the coordination service then
chooses the first check that every process reaches after the notice), as
MaxText and T5X use it. Its checks are counted per run (1, 2, 3, ...), the
same sequence on every process, so a notice that arrives while the run
starts (before its first check) is honoured at the first one.

Ctrl-C (SIGINT) is a notice too; a second Ctrl-C kills the process at once
(the default action of SIGINT), without saving.
"""

import os
import signal

import jax
from absl import logging
from jax.experimental import multihost_utils

# The status of a run that saved on a preemption notice and stopped
# (sysexits.h's EX_TEMPFAIL): launch/run.py recreates the slice if it is
# gone and reruns the job, which resumes.
EXIT_STATUS = 75


class Preempted(Exception):
  """Training saved checkpoint `step` on a preemption notice and stopped."""

  def __init__(self, step: int, directory: str):
    super().__init__(
      f"preempted: checkpoint {step} in {directory} holds "
      "every finished step; rerun to resume."
    )
    self.step = step


class Notice:
  """Listens for a preemption notice while training runs (a context
  manager: the previous signal handlers come back on exit)."""

  def __init__(self):
    self._notified = False
    self._checks = 0
    self._multihost = jax.process_count() > 1
    handled = [signal.SIGINT] + ([] if self._multihost else [signal.SIGTERM])
    self._previous = {s: signal.getsignal(s) for s in handled}
    for s in handled:
      signal.signal(s, self._on_signal)

  def _on_signal(self, signum, frame) -> None:
    del frame
    logging.warning(
      "%s: saving at the next check, then stopping (a second "
      "Ctrl-C stops at once, without saving)",
      signal.Signals(signum).name,
    )
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.SIG_DFL)
    if self._multihost:
      # JAX's notifier (a C++ handler) listens for SIGTERM only.
      os.kill(os.getpid(), signal.SIGTERM)
    self._notified = True

  def reached(self) -> bool:
    """Whether to save and stop here: on every process the same check
    answers True (once a notice came), the others False."""
    self._checks += 1
    if not self._multihost:
      return self._notified
    return multihost_utils.reached_preemption_sync_point(self._checks)

  def close(self) -> None:
    """Puts back the signal handlers from before (not those installed
    outside Python)."""
    for s, handler in self._previous.items():
      # A handler installed outside Python reads as None: leave it be.
      if handler is not None:
        signal.signal(s, handler)

  def __enter__(self) -> "Notice":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
