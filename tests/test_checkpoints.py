"""Checkpoint retention (latest N + best by training reward), restoring onto
another mesh, and refusing a workdir of a different experiment."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from score_jax import checkpoints
from score_jax import sharding


def _tree(mesh, spec, value):
  x = jnp.arange(64, dtype=jnp.float32).reshape(8, 8) * value
  return {"w": jax.device_put(x, NamedSharding(mesh, spec)),
          "step": jnp.asarray(int(value), jnp.int32)}


def test_keeps_latest_and_best_and_restores_onto_another_mesh(tmp_path):
  mesh8 = sharding.make_mesh((1, 8, 1))
  config = json.dumps({"seed": 0, "model": {"preset": "test"}})
  ckpt = checkpoints.Checkpointer(str(tmp_path), max_to_keep=2)
  for step, reward in zip(range(1, 6), [0.1, 0.9, 0.2, 0.3, None]):
    state = _tree(mesh8, P("fsdp", None), step)
    ckpt.save(step, state, state, {"epoch": 0, "offset": step}, config, reward)
  ckpt.wait()
  assert ckpt.all_steps() == [2, 4, 5]
  assert ckpt.best_step() == 2
  ckpt.close()

  mesh1 = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  target = _tree(mesh1, P(), 0)
  shardings = jax.tree.map(lambda x: x.sharding, target)
  reopened = checkpoints.Checkpointer(str(tmp_path), max_to_keep=2)
  state, reference, data = reopened.restore(
      2, checkpoints.abstract(target, shardings),
      checkpoints.abstract(target, shardings), config)
  np.testing.assert_array_equal(np.asarray(state["w"]),
                                np.arange(64).reshape(8, 8) * 2)
  assert state["w"].sharding.mesh.size == 1
  assert data == {"epoch": 0, "offset": 2}

  other = json.dumps({"seed": 1, "model": {"preset": "test"}})
  with pytest.raises(ValueError, match=r"different experiment.*\['seed'\]"):
    reopened.restore(2, checkpoints.abstract(target, shardings),
                     checkpoints.abstract(target, shardings), other)
  # A field added to the configs later and left unset (None) still matches.
  newer = json.dumps({"seed": 0, "model": {"preset": "test", "new": None}})
  reopened.restore(2, checkpoints.abstract(target, shardings),
                   checkpoints.abstract(target, shardings), newer)
  # Evaluation compares only what decides the params' meaning.
  reopened.restore(2, checkpoints.abstract(target, shardings),
                   checkpoints.abstract(target, shardings), other,
                   checkpoints.EVAL_COMPARED)
  with pytest.raises(ValueError, match=r"\['model.preset'\]"):
    reopened.restore(2, checkpoints.abstract(target, shardings),
                     checkpoints.abstract(target, shardings),
                     json.dumps({"seed": 0, "model": {"preset": "demo"}}),
                     checkpoints.EVAL_COMPARED)
