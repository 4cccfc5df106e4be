"""What the tests of stopped and resumed training runs share: a task whose
reward moves the params, and what a run leaves that must not depend on
whether it was stopped (metrics rows less timings, the final train state,
the data position, the checkpoints kept and the best)."""

import json
import os

import jax

# Timings differ between runs; everything else must not.
TIMING = ("step_s", "rollout_s", "train_tokens_per_s", "generated_tokens_per_s",
          "device_idle_s")


class ParityTask:
  """A task (arithmetic) with a reward that a random model earns half the
  time (the parity of the response's length), so that the policy gradient
  is not zero. While the file `flag` exists, the first reward call (in a
  reward worker) removes it and calls `notify()`: something that happens
  mid-grading."""

  def __init__(self, task, flag=None, notify=None):
    self._task, self._flag, self._notify = task, flag, notify

  def __getattr__(self, name):
    return getattr(self._task, name)

  def reward(self, response, reference):
    del reference
    if self._flag is not None:
      try:
        os.unlink(self._flag)
        self._notify()
      except FileNotFoundError:
        pass
    return float(len(response) % 2)


def notify_on(trainer, where: str, call: int, flag: str, send) -> None:
  """Makes the `call`-th rollout, update or scheduled save of `trainer`'s
  next run call `send()` once it has started (JAX dispatches
  asynchronously: the device is still at work), or with where="grading"
  create the file `flag` after the `call`-th rollout, so that its grading
  notifies (see ParityTask)."""
  calls = []

  def counted(fn):
    def wrapped(*args, **kwargs):
      out = fn(*args, **kwargs)
      calls.append(where)
      if len(calls) == call:
        if where == "grading":
          open(flag, "w").close()
        else:
          send()
      return out
    return wrapped

  if where in ("rollout", "grading"):
    trainer.rollout_fn = counted(trainer.rollout_fn)
  elif where == "update":
    step_fn = trainer._step_fn  # The jitted step of each phase.
    trainer._step_fn = lambda phase, batch: counted(step_fn(phase, batch))
  else:
    open_checkpointer = trainer.checkpointer

    def checkpointer():
      opened = open_checkpointer()
      save = opened.save
      opened.save = lambda *a, **k: (save(*a, **k) if k.get("preemption")
                                     else counted(save)(*a, **k))
      return opened
    trainer.checkpointer = checkpointer


def rows(workdir):
  """The rows of WORKDIR/metrics.jsonl less their timings."""
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in f]


def final(trainer):
  """(train state, data state, kept steps, best step) of the latest
  checkpoint in `trainer`'s workdir, on the host."""
  with trainer.checkpointer() as checkpointer:
    step = checkpointer.latest_step()
    state, _ = trainer.initial_state(checkpointer, step)
    _, _, data = checkpointer.restore(
        step, trainer.abstract_state, trainer.exp.abstract_reference(),
        trainer.exp.config.to_json_best_effort())
    return (jax.device_get(state), data, checkpointer.all_steps(),
            checkpointer.best_step())
