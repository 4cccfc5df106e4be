"""Checkpoint retention (latest N + best by training reward), restoring onto
another mesh, and refusing a workdir of a different experiment."""

import errno
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from score_jax import checkpoints, integrity, sharding


def _tree(mesh, spec, value):
  x = jnp.arange(64, dtype=jnp.float32).reshape(8, 8) * value
  return {
    "w": jax.device_put(x, NamedSharding(mesh, spec)),
    "step": jnp.asarray(int(value), jnp.int32),
  }


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
    2,
    sharding.abstract(target, shardings),
    sharding.abstract(target, shardings),
    config,
  )
  np.testing.assert_array_equal(
    np.asarray(state["w"]), np.arange(64).reshape(8, 8) * 2
  )
  assert state["w"].sharding.mesh.size == 1
  assert data == {"epoch": 0, "offset": 2}

  other = json.dumps({"seed": 1, "model": {"preset": "test"}})
  with pytest.raises(ValueError, match=r"different experiment.*\['seed'\]"):
    reopened.restore(
      2,
      sharding.abstract(target, shardings),
      sharding.abstract(target, shardings),
      other,
    )
  # A field added to the configs later and left unset (None) still matches.
  newer = json.dumps({"seed": 0, "model": {"preset": "test", "new": None}})
  reopened.restore(
    2,
    sharding.abstract(target, shardings),
    sharding.abstract(target, shardings),
    newer,
  )


def test_evaluation_restores_only_the_params_of_any_run_of_the_model(tmp_path):
  mesh8 = sharding.make_mesh((1, 8, 1))
  config = json.dumps({"seed": 0, "model": {"preset": "test"}})
  ckpt = checkpoints.Checkpointer(str(tmp_path))
  for step in (2, 4):
    params = _tree(mesh8, P("fsdp", None), step)
    state = {"params": params, "opt_state": _tree(mesh8, P(), 7)}
    ckpt.save(step, state, params, {"offset": step}, config, None)
  ckpt.close()

  mesh1 = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  target = _tree(mesh1, P(), 0)
  abstract = sharding.abstract(
    target, jax.tree.map(lambda x: x.sharding, target)
  )
  # Evaluation compares only what decides the params' meaning.
  other = json.dumps({"seed": 1, "model": {"preset": "test"}})
  step, params = checkpoints.restore_params(str(tmp_path), "2", abstract, other)
  assert step == 2 and params["w"].sharding.mesh.size == 1
  np.testing.assert_array_equal(
    np.asarray(params["w"]), np.arange(64).reshape(8, 8) * 2
  )
  assert (
    checkpoints.restore_params(str(tmp_path), "latest", abstract, config)[0]
    == 4
  )
  with pytest.raises(ValueError, match=r"\['model.preset'\]"):
    checkpoints.restore_params(
      str(tmp_path),
      "2",
      abstract,
      json.dumps({"seed": 0, "model": {"preset": "demo"}}),
    )
  # A damaged requested checkpoint is refused, not replaced by another.
  _truncate(_largest_file(tmp_path / "4"))
  with pytest.raises(
    checkpoints.CheckpointError,
    match="checkpoint 4 .* is "
    "damaged: .* differs from its checksum; use another "
    "checkpoint.",
  ):
    checkpoints.restore_params(str(tmp_path), "latest", abstract, config)


# -- faults: damaged, incomplete and stray checkpoints; failed saves --------

CONFIG = json.dumps({"seed": 0, "model": {"preset": "test"}})


def _saved(directory, steps=(2, 4)):
  """A checkpointer holding `steps` of a small tree, each complete."""
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  ckpt = checkpoints.Checkpointer(str(directory), max_to_keep=5)
  for step in steps:
    state = _tree(mesh, P(), step)
    ckpt.save(step, state, state, {"epoch": 0, "offset": step}, CONFIG, None)
  ckpt.wait()
  return ckpt, _tree(mesh, P(), 0)


def _largest_file(step_dir):
  """The train state's largest data file."""
  return max(
    (p for p in (step_dir / "state").rglob("*") if p.is_file()),
    key=lambda p: p.stat().st_size,
  )


def _truncate(path):
  path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _random_bytes(path):
  data = bytearray(path.read_bytes())
  data[:4096] = np.random.default_rng(0).bytes(min(4096, len(data)))
  path.write_bytes(bytes(data))


@pytest.mark.parametrize(
  "damage, reason",
  [
    (lambda d: _truncate(_largest_file(d / "4")), "differs from its checksum"),
    (
      lambda d: _random_bytes(_largest_file(d / "4")),
      "differs from its checksum",
    ),
    (
      lambda d: (d / "4" / "data" / "metadata").write_text("{not json"),
      "data/metadata differs from its checksum",
    ),
    (
      lambda d: (d / "4" / integrity.RECORD).unlink(),
      "has no integrity record",
    ),
    (lambda d: (d / "10").mkdir(), "has no integrity record"),
  ],
)
def test_a_damaged_latest_checkpoint_falls_back_to_an_intact_one(
  tmp_path, caplog, damage, reason
):
  directory = tmp_path / "checkpoints"
  ckpt, _ = _saved(directory)
  ckpt.close()
  damage(directory)
  reopened = checkpoints.Checkpointer(str(directory), max_to_keep=5)
  bad = 10 if (directory / "10").exists() else 4
  assert reopened.latest_step() == bad
  with caplog.at_level("WARNING"):
    intact = reopened.intact_latest()
  # One line naming it and where it went; it is kept, not deleted.
  assert intact == (4 if bad == 10 else 2), caplog.text
  lines = [
    r.getMessage()
    for r in caplog.records  # Ours, not Orbax's.
    if r.filename == "checkpoints.py"
  ]
  assert len(lines) == 1 and f"checkpoint {bad} in {directory}" in lines[0]
  assert reason in lines[0] and "\n" not in lines[0]
  assert (tmp_path / "damaged_checkpoints" / str(bad)).is_dir()
  assert reopened.latest_step() == intact
  reopened.close()


def test_no_intact_checkpoint_stops_in_one_line(tmp_path):
  directory = tmp_path / "checkpoints"
  ckpt, target = _saved(directory)
  for step in (2, 4):
    _truncate(_largest_file(directory / str(step)))
  with pytest.raises(
    checkpoints.CheckpointError,
    match=r"no intact checkpoint in .*4: .* differs",
  ) as e:
    ckpt.intact_latest()
  assert "\n" not in str(e.value)
  assert sorted(p.name for p in directory.iterdir()) == ["2", "4"]
  # Restoring one by name (evaluation) refuses it in one line too.
  with pytest.raises(
    checkpoints.CheckpointError,
    match=r"checkpoint 2 in .* is damaged: .*differs",
  ):
    _restore(ckpt, 2, target)
  ckpt.close()


def test_bad_json_that_matches_its_record_names_the_file(tmp_path):
  directory = tmp_path / "checkpoints"
  ckpt, target = _saved(directory, steps=(2,))
  (directory / "2" / "data" / "metadata").write_text("{not json")
  (directory / "2" / integrity.RECORD).write_text(
    json.dumps({"sha256": integrity.checksums(str(directory / "2"))})
  )
  with pytest.raises(
    checkpoints.CheckpointError,
    match=rf"{directory}/2/data/metadata: not valid JSON",
  ):
    _restore(ckpt, 2, target)
  ckpt.close()


def _restore(ckpt, step, target):
  """Restores `step` onto `target`'s layout, for state and reference."""
  layout = sharding.abstract(target, jax.tree.map(lambda x: x.sharding, target))
  return ckpt.restore(step, layout, layout, CONFIG)


def _failing_json_save(monkeypatch, asynchronous):
  """Orbax's JSON writer failing as on a full disk, in the save call or in
  the background thread that finishes an asynchronous save."""
  from orbax.checkpoint._src.futures import future
  from orbax.checkpoint._src.handlers import json_checkpoint_handler

  full = OSError(errno.ENOSPC, "No space left on device")

  async def fail():
    raise full

  async def async_save(self, directory, item=None, args=None):
    if not asynchronous:
      raise full
    return [future.CommitFutureAwaitingContractedSignals(fail(), name="x")]

  monkeypatch.setattr(
    json_checkpoint_handler.JsonCheckpointHandler, "async_save", async_save
  )


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_failed_save_stops_with_the_previous_checkpoint_intact(
  tmp_path, monkeypatch, asynchronous
):
  directory = tmp_path / "checkpoints"
  ckpt, target = _saved(directory, steps=(2,))
  _failing_json_save(monkeypatch, asynchronous)
  with pytest.raises(
    checkpoints.CheckpointError,
    match=r"saving checkpoint 4 in .* failed \(.*No space "
    r"left on device\); checkpoint 2 is intact: free disk "
    "space",
  ) as e:
    ckpt.save(4, target, target, {}, CONFIG, None)
    ckpt.check(wait=True)  # At the next step boundary.
  assert "\n" not in str(e.value)
  monkeypatch.undo()
  assert ckpt.intact_latest() == 2 and ckpt.damage(2) is None
  ckpt.close()


def test_best_is_by_validation_accuracy_where_measured(tmp_path):
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  ckpt = checkpoints.Checkpointer(str(tmp_path), max_to_keep=1)
  # Training reward alone: the paper's rule.
  ckpt.save(1, _tree(mesh, P(), 1), _tree(mesh, P(), 1), {}, CONFIG, 0.9)
  ckpt.wait()
  assert ckpt.best_step() == 1
  # Once validated, validation accuracy decides, whatever the reward says.
  for step, reward, accuracy in ((2, 0.1, 0.6), (3, 0.8, 0.4), (4, 0.5, None)):
    state = _tree(mesh, P(), step)
    ckpt.save(step, state, state, {}, CONFIG, reward, accuracy)
  ckpt.wait()
  assert ckpt.best_step() == 2
  assert checkpoints.resolve_step(ckpt, "best") == 2
  assert ckpt.all_steps() == [2, 4]  # The latest and the best are kept.
  ckpt.close()


def _without_records(step_dir):
  """The checkpoint as saved before integrity records existed."""
  for record in step_dir.glob("integrity*.json"):
    record.unlink()


def test_a_checkpoint_saved_before_records_is_adopted_once_it_restores(
  tmp_path,
):
  directory = tmp_path / "checkpoints"
  ckpt, target = _saved(directory, steps=(2, 4))
  for step in (2, 4):
    _without_records(directory / str(step))
  ckpt.close()
  ckpt = checkpoints.Checkpointer(str(directory), max_to_keep=5)
  with pytest.raises(checkpoints.CheckpointError, match="no intact"):
    ckpt.intact_latest()
  layout = sharding.abstract(target, jax.tree.map(lambda x: x.sharding, target))
  # Another experiment's config, or other shapes: refused, nothing written.
  with pytest.raises(ValueError, match="different experiment"):
    ckpt.adopt(4, layout, layout, json.dumps({"seed": 1}))
  wider = jax.ShapeDtypeStruct(
    (8, 9), jnp.float32, sharding=layout["w"].sharding
  )
  with pytest.raises(
    checkpoints.CheckpointError,
    match=r"state\['w'\] is float32\[8, 8\], this config "
    r"expects float32\[8, 9\]",
  ):
    ckpt.adopt(4, {**layout, "w": wider}, layout, CONFIG)
  assert not (directory / "4" / integrity.RECORD).exists()

  # State and reference: each an 8x8 array and a step.
  assert ckpt.adopt(4, layout, layout, CONFIG) == (
    "4 arrays of the expected shapes, 130 values, all finite"
  )
  assert ckpt.intact_latest() == 4
  with pytest.raises(
    checkpoints.CheckpointError, match="has an integrity record already"
  ):
    ckpt.adopt(4, layout, layout, CONFIG)
  ckpt.close()


def test_a_checkpoint_with_values_that_are_not_finite_is_not_adopted(tmp_path):
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  state = _tree(mesh, P(), 1)
  state["w"] = state["w"].at[3, 3].set(jnp.nan)
  ckpt = checkpoints.Checkpointer(str(tmp_path), max_to_keep=5)
  ckpt.save(1, state, _tree(mesh, P(), 1), {}, CONFIG, None)
  ckpt.wait()
  _without_records(tmp_path / "1")
  layout = sharding.abstract(state, jax.tree.map(lambda x: x.sharding, state))
  with pytest.raises(
    checkpoints.CheckpointError, match=r"not finite in \[\"\[0\]\['w'\]\"\]"
  ):
    ckpt.adopt(1, layout, layout, CONFIG)
  assert not (tmp_path / "1" / integrity.RECORD).exists()
  ckpt.close()


def test_a_step_is_written_in_place_and_counts_only_once_recorded(
  tmp_path, monkeypatch
):
  """Cloud Storage FUSE renames a directory file by file (not atomic), so
  no save renames one: a step is written under its own name and committed
  by Orbax's marker, then the records. Files of a step without records
  (a save cut short, or a directory half copied) never count as intact."""
  import os
  import shutil

  renamed = []
  rename = os.rename

  def recording_rename(source, target, *args, **kwargs):
    if os.path.isdir(source):
      renamed.append((source, target))
    return rename(source, target, *args, **kwargs)

  monkeypatch.setattr(os, "rename", recording_rename)
  directory = tmp_path / "checkpoints"
  ckpt, _ = _saved(directory, steps=(2, 4))
  assert not renamed
  assert (directory / "4" / "commit_success.txt").exists()
  monkeypatch.undo()
  # Half of step 4's files under the name of a newer step.
  names = sorted(
    p.relative_to(directory / "4")
    for p in (directory / "4").rglob("*")
    if p.is_file()
  )
  for name in names[: len(names) // 2]:
    (directory / "6" / name).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(directory / "4" / name, directory / "6" / name)
  ckpt.close()
  reopened = checkpoints.Checkpointer(str(directory), max_to_keep=5)
  assert reopened.latest_step() == 6
  assert reopened.intact_latest() == 4
  assert (tmp_path / "damaged_checkpoints" / "6").is_dir()
  reopened.close()
