"""How long the devices sit idle in a training step, as the host sees it.

JAX dispatches programs asynchronously and a device runs them one after
another. A thread per dispatched program notes when its outputs are ready;
the devices are idle from a program's end until the host dispatches the
next one, when that comes later (the host was decoding, grading, writing
logs), and from the step's start until its first program. The sum of those
gaps is the step's idle time (metrics.jsonl `device_idle_s`).
"""

import threading
import time
from typing import Any

import jax


class DeviceTimeline:
  """`begin()` at a step's start, `dispatched(outputs)` right after each
  program's call, `idle_seconds()` once the step's last outputs are on the
  host."""

  def __init__(self):
    self._start = time.perf_counter()
    self._programs = []  # [dispatch time, ready time (set by its thread)]
    self._threads = []

  def begin(self) -> None:
    """Starts a step: its idle time counts from now."""
    self._start = time.perf_counter()
    self._programs, self._threads = [], []

  def dispatched(self, outputs: Any) -> None:
    """Notes a program dispatched now; a thread notes when `outputs` (its
    outputs, any pytree of arrays) are ready."""
    record = [time.perf_counter(), None]
    self._programs.append(record)

    def wait():
      jax.block_until_ready(outputs)
      record[1] = time.perf_counter()

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    self._threads.append(thread)

  def idle_seconds(self) -> float:
    """The step's idle seconds so far (waits for what it dispatched)."""
    for thread in self._threads:
      thread.join()
    idle, free_at = 0.0, self._start
    for dispatch, ready in self._programs:
      idle += max(0.0, dispatch - free_at)
      free_at = max(free_at, ready)
    return idle
