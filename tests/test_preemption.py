"""A preemption notice (SIGTERM or Ctrl-C) on one process: training saves
the step every finished update reached, and stops; resumed, it ends as a
run that was never stopped. A second Ctrl-C stops at once."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from score_jax import checkpoints, experiment, preemption, train

# 2 supervised, 2 Stage I and 4 Stage II steps on one device; a checkpoint
# every 2, one kept besides the best.
OVERRIDES = {
  "stage2_steps": 4,
  "mesh_shape": (1, 1, 1),
  "checkpoint.max_to_keep": 1,
}


def _trainer(runs, workdir, flag):
  """A trainer whose first reward call, while `flag` exists, sends SIGTERM
  to it (from the reward worker): mid-grading."""
  exp = experiment.build(runs.tiny_config(**OVERRIDES), jax.devices()[:1])
  exp.task = runs.parity_task(
    exp.task, str(flag), lambda: os.kill(os.getppid(), signal.SIGTERM)
  )
  return train.Trainer(exp, str(workdir))


def test_a_preempted_run_resumes_as_if_never_stopped(tmp_path, runs):
  flag = tmp_path / "grade_and_signal"
  _trainer(runs, tmp_path / "straight", flag).run()

  stopped = tmp_path / "stopped"
  # (where, the how-many-th of this run's calls, the signal) in turn; each
  # run resumes where the last stopped. Steps 1-2 are supervised (no
  # rollout), so the first rollout is step 3's.
  for where, call, signum, saved in [
    ("rollout", 1, signal.SIGTERM, 2),  # Step 3 is redone.
    ("grading", 2, signal.SIGTERM, 3),  # Step 3 is finished, 4 redone.
    ("update", 1, signal.SIGINT, 4),  # Step 4 is finished.
    ("save", 1, signal.SIGTERM, 6),
  ]:  # Saving 6, after step 6.
    trainer = _trainer(runs, stopped, flag)
    runs.notify_on(
      trainer,
      where,
      call,
      str(flag),
      lambda signum=signum: os.kill(os.getpid(), signum),
    )
    with pytest.raises(preemption.Preempted) as stop:
      trainer.run()
    assert stop.value.step == saved, where
    # Every finished step is in the checkpoint: no more, no fewer.
    assert runs.rows(stopped)[-1]["step"] == saved, where
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  _trainer(runs, stopped, flag).run()

  (state, data, steps, best), (state_0, data_0, steps_0, best_0) = (
    runs.final(_trainer(runs, stopped, flag)),
    runs.final(_trainer(runs, tmp_path / "straight", flag)),
  )
  jax.tree.map(np.testing.assert_array_equal, state, state_0)
  assert data == data_0 and data["epoch"] + data["offset"] > 0
  assert runs.rows(stopped) == runs.rows(tmp_path / "straight")
  # The same checkpoints kept (the latest, the best), the preemptions' gone.
  assert (steps, best) == (steps_0, best_0)
  assert steps == sorted({8, best}) and best is not None


def test_a_preemptions_save_evicts_nothing_and_is_never_the_best(tmp_path):
  from jax.sharding import PartitionSpec as P

  from score_jax import sharding

  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  tree = {
    "w": jax.device_put(
      np.ones((4, 4), np.float32), jax.sharding.NamedSharding(mesh, P())
    )
  }
  config = json.dumps({"seed": 0})
  ckpt = checkpoints.Checkpointer(str(tmp_path), max_to_keep=1)
  ckpt.save(3, tree, tree, {}, config, None, preemption=True)
  ckpt.wait()
  assert ckpt.best_step() is None  # Nothing measured.
  for step, reward in ((4, 0.9), (6, 0.1)):
    ckpt.save(step, tree, tree, {}, config, reward)
  ckpt.save(7, tree, tree, {}, config, None, preemption=True)
  ckpt.save(7, tree, tree, {}, config, None, preemption=True)  # Saved: no-op.
  ckpt.wait()
  # Kept: the best (4), the latest scheduled (6), the latest (7).
  assert ckpt.all_steps() == [4, 6, 7] and ckpt.best_step() == 4
  ckpt.save(8, tree, tree, {}, config, 0.2)
  ckpt.wait()
  assert ckpt.all_steps() == [4, 8] and ckpt.best_step() == 4
  ckpt.close()


_TWO_CTRL_C = """
import os, signal, sys, time
from score_jax import preemption
with preemption.Notice() as notice:
  os.kill(os.getpid(), signal.SIGINT)
  time.sleep(0.1)
  print(notice.reached(), flush=True)
  os.kill(os.getpid(), signal.SIGINT)
  time.sleep(5)
  print("not stopped", flush=True)
"""


def test_a_second_ctrl_c_stops_at_once(repo):
  done = subprocess.run(
    [sys.executable, "-c", _TWO_CTRL_C],
    cwd=repo,
    capture_output=True,
    text=True,
    timeout=120,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert done.returncode == -signal.SIGINT, done.stderr
  assert done.stdout == "True\n"
  assert "SIGINT: saving at the next check" in done.stderr
