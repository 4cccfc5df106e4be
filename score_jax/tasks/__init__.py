"""Task families: problems, prompts and binary rewards, chosen by name."""

import importlib
from typing import Mapping

from score_jax.tasks import base

# name -> "module:class"; imported on demand so a task's dependencies load
# only when it is used.
_TASKS = {
  "arithmetic": "score_jax.tasks.arithmetic:ArithmeticTask",
  "math": "score_jax.tasks.math:MathTask",
  "code": "score_jax.tasks.code:CodeTask",
}
# Tasks whose rewards run model-written code, in the sandbox; they refuse to
# be built without an isolating backend unless allowed.
_RUN_MODEL_CODE = ("code",)


def make(task_config: Mapping, allow_unisolated: bool = False) -> base.Task:
  """`config.task` (a `name` plus constructor arguments) -> a Task.
  `allow_unisolated` is config.rewards.allow_unisolated."""
  kwargs = dict(task_config)
  name = kwargs.pop("name", None)
  if name not in _TASKS:
    raise ValueError(
      f"config.task.name={name!r} is unknown; choose one of {sorted(_TASKS)}."
    )
  if name in _RUN_MODEL_CODE:
    kwargs["allow_unisolated"] = allow_unisolated
  module, cls = _TASKS[name].split(":")
  try:
    return getattr(importlib.import_module(module), cls)(**kwargs)
  except TypeError as e:
    raise ValueError(f"config.task for {name!r} has a bad field: {e}") from None
