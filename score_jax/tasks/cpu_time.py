"""A CPU-time limit for a block of Python code.

Grading a MATH answer runs sympy, whose cost varies wildly with the input; a
limit on it must not depend on how busy the machine is, or the same answer
would score 1 on an idle machine and 0 under load. This limit counts the CPU
time of the calling thread, which other processes cannot consume.

It interrupts Python code only (a signal handler runs between bytecodes), so
a single long C call, such as a huge integer power, overruns it: the
wall-clock kill of `rewards.RewardPool` stays the backstop for those.
"""

import contextlib
import signal
import threading
import time


class CpuTimeExceeded(BaseException):
  """Raised inside a `cpu_time_limit` block that used up its CPU time.

  A BaseException, like KeyboardInterrupt, so that the `except Exception`
  clauses of the libraries it interrupts (sympy, math-verify) let it through.
  """


@contextlib.contextmanager
def cpu_time_limit(seconds: float):
  """Raises CpuTimeExceeded in the block once it has used `seconds` of CPU.

  Counts the CPU time (user and system) of the calling thread. Must be entered
  from the main thread, where Python runs signal handlers, and not nested.
  """
  if not seconds > 0:
    raise ValueError(f"cpu_time_limit needs seconds > 0, got {seconds}.")
  if threading.current_thread() is not threading.main_thread():
    raise ValueError(
      "cpu_time_limit works in the main thread only (it uses "
      "a signal); call it there or grade without a limit."
    )
  deadline = time.thread_time() + seconds
  # The handler may run late, after the block has ended (Python runs it at
  # the next bytecode): it must then neither raise nor re-arm the timer.
  active = True

  def on_timer(signum, frame):
    del signum, frame
    if not active:
      return
    # ITIMER_PROF counts the CPU time of the whole process; other threads
    # (e.g. JAX's in a trainer process) may have used part of it, so wait on
    # until this thread has used its own share.
    left = deadline - time.thread_time()
    if left > 0:
      signal.setitimer(signal.ITIMER_PROF, left)
      return
    raise CpuTimeExceeded(f"used over {seconds:g} s of CPU time")

  previous_handler = signal.signal(signal.SIGPROF, on_timer)
  signal.setitimer(signal.ITIMER_PROF, seconds)
  try:
    yield
  finally:
    active = False
    signal.setitimer(signal.ITIMER_PROF, 0)
    # A SIGPROF generated just before the timer stopped may still be on its
    # way to one of the process's threads; its default action would end the
    # process, so it is ignored rather than left to the default.
    signal.signal(
      signal.SIGPROF,
      signal.SIG_IGN
      if previous_handler == signal.SIG_DFL
      else previous_handler,
    )
