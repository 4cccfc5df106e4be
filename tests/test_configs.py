"""Every experiment config loads, documents itself, imports no trainer code,
and names only fields its task and model accept."""

import ast
import dataclasses
import glob
import importlib
import inspect
import os

import pytest

from score_jax import tasks
from score_jax.models import presets, transformer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
  os.path.basename(p)[:-3]
  for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
  if not os.path.basename(p).startswith(("_", "common"))
)


def test_there_are_experiment_configs():
  assert {"demo", "score_math", "score_code"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config(name):
  path = os.path.join(REPO, "configs", f"{name}.py")
  tree = ast.parse(open(path).read())
  doc = ast.get_docstring(tree)
  assert doc and "python -m score_jax.main" in doc and "--workdir" in doc
  assert "runtime" in doc.lower() and "expected result" in doc.lower()
  for node in ast.walk(tree):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      modules = (
        [a.name for a in node.names]
        if isinstance(node, ast.Import)
        else [node.module or ""]
      )
      assert not any(m.startswith("score_jax") for m in modules), modules

  config = importlib.import_module(f"configs.{name}").get_config()
  presets.build_config(config.model)  # known preset and fields
  task_fields = dict(config.task)
  cls = tasks._TASKS[task_fields.pop("name")].split(":")
  task_cls = getattr(importlib.import_module(cls[0]), cls[1])
  assert set(task_fields) <= set(inspect.signature(task_cls).parameters)


def test_every_model_field_can_be_set_to_the_presets_value():
  """config.model's typed fields accept each TransformerConfig value (a
  FieldReference refuses a value of another type) and build the same
  config."""
  from configs import common

  config = common.base_config()
  expected = presets.build_config({"preset": "gemma2-2b"})
  for field in dataclasses.fields(transformer.TransformerConfig):
    value = getattr(expected, field.name)
    if value is not None:
      setattr(config.model, field.name, value)
  config.model.preset = "demo"  # Every field is set, so the preset is moot.
  assert presets.build_config(config.model) == expected
