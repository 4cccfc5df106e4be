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
  """Builds the task `config.task` names, importing its module only now so
  that a task's dependencies load only when it is used.

  Args:
    task_config: `config.task`, a `name` ("arithmetic", "math", "code") and
      the task class's constructor arguments.
    allow_unisolated: config.rewards.allow_unisolated, passed to the tasks
      whose rewards run model-written code (without an isolating sandbox
      backend they refuse to be built unless it is True).

  Returns:
    The task.

  Raises:
    ValueError: for an unknown name or a field its constructor does not take.
  """
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
