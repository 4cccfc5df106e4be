"""Orbax checkpoints of a run: train state, reference params, data position,
config.

Saves are asynchronous and atomic (Orbax writes into a temporary directory and
renames it when complete), so a run killed mid-save leaves the previous
checkpoint intact. Kept: the latest `max_to_keep` and the one with the highest
training reward (the paper's selection rule).

Restore order (each step needs the one before):
  1. the config, to refuse a workdir that holds a different experiment;
  2. the train state (step, params, optimizer state, rng) onto the shardings
     of the current mesh, which may differ from the mesh that saved it;
  3. the reference params, onto the same shardings as the policy params;
  4. the data iterator position, so the resumed run sees the same prompts.
"""

import json
import os
from typing import Any, Optional, Sequence

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

# What must match to evaluate a checkpoint: what decides the params' meaning.
EVAL_COMPARED = ("model", "tokenizer_path")
# Fields (dotted paths) that may differ between a run and its resumption or
# evaluation: how it runs, not what it computes (the layout and the memory
# knobs, which a run that ran out of memory must be able to change), and the
# instruction, so that a checkpoint can be evaluated under another, as the
# Self-Refine baseline does.
_RESUMABLE_DIFFERENCES = ("mesh_shape", "sharding_rules", "num_micro_batches",
                          "rewards", "eval", "log_every", "checkpoint",
                          "instruction", "rollout.decode_rules",
                          "rollout.num_micro_batches")


class Checkpointer:

  def __init__(self, directory: str, max_to_keep: int = 3):
    policy = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(n=max_to_keep),
        checkpoint_managers.BestN(
            get_metric_fn=_train_reward, n=1,
            keep_checkpoints_without_metrics=False),
    ])
    self._manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(
            preservation_policy=policy, enable_async_checkpointing=True,
            best_fn=_train_reward, best_mode="max",
            cleanup_tmp_directories=True))
    # The manager removes unfinished saves in a background thread that its
    # close() does not wait for; an error before the first save would end
    # the interpreter under that thread (a traceback after the one-line
    # error). Waiting here costs one directory listing.
    await_cleanup = getattr(self._manager,
                            "_maybe_await_cleanup_tmp_directory", None)
    if await_cleanup is not None:
      await_cleanup()

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def best_step(self) -> Optional[int]:
    return self._manager.best_step()

  def all_steps(self):
    return self._manager.all_steps()

  @property
  def directory(self):
    return self._manager.directory

  def save(self, step: int, state: Any, reference: Any, data_state: dict,
           config_json: str, train_reward: Optional[float]) -> None:
    metrics = None if train_reward is None else {"train_reward": train_reward}
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        reference=ocp.args.StandardSave(reference),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(json.loads(config_json))), metrics=metrics)

  def restore(self, step: int, abstract_state: Any, abstract_reference: Any,
              config_json: str, compared: Optional[Sequence[str]] = None):
    """(state, reference, data_state) of `step`, in the order documented
    above. The config fields `compared` (default: all that decide what a run
    computes) must equal the saved ones."""
    saved = self._manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))["config"]
    _check_same_experiment(saved, json.loads(config_json), self.directory,
                           compared)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        reference=ocp.args.StandardRestore(abstract_reference),
        data=ocp.args.JsonRestore()))
    return restored["state"], restored["reference"], restored["data"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  # A context manager, so that an error mid-run still ends Orbax's threads
  # before the interpreter shuts down.
  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def resolve_step(checkpointer: Checkpointer, which: str) -> Optional[int]:
  """The step `which` names: "latest", "best" (by training reward), a step
  number, or "base" (the initial weights: None)."""
  if which == "base":
    return None
  steps = list(checkpointer.all_steps())
  step = {"latest": checkpointer.latest_step,
          "best": checkpointer.best_step}.get(which, lambda: None)()
  if step is None and which.isdigit() and int(which) in steps:
    step = int(which)
  if step is None:
    raise ValueError(
        f"--checkpoint={which}: no such checkpoint in "
        f"{checkpointer.directory} (steps {steps}); use latest, best, base "
        "or one of the steps.")
  return step


def _train_reward(metrics: dict) -> float:
  return metrics["train_reward"]


def abstract(tree: Any, shardings: Any) -> Any:
  """Shape/dtype/sharding placeholders to restore `tree`'s structure onto."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree, shardings)


def _check_same_experiment(saved: dict, current: dict, directory,
                           compared: Optional[Sequence[str]]) -> None:
  if compared is not None:
    saved = {k: saved.get(k) for k in compared}
    current = {k: current.get(k) for k in compared}
  differing = _differing(saved, current)
  if differing:
    raise ValueError(
        f"{directory} holds checkpoints of a different experiment (config "
        f"fields {differing} differ); use a new --workdir, or the config that "
        "wrote them.")


def _differing(saved: Any, current: Any, prefix: str = "") -> list[str]:
  """The dotted paths where two configs differ, outside
  _RESUMABLE_DIFFERENCES. A field missing on one side equals None, so that
  a field added to the configs later (left unset) does not orphan older
  checkpoints."""
  if isinstance(saved, dict) and isinstance(current, dict):
    return [path for k in sorted(set(saved) | set(current))
            if (f"{prefix}{k}") not in _RESUMABLE_DIFFERENCES
            for path in _differing(saved.get(k), current.get(k),
                                   f"{prefix}{k}.")]
  return [] if saved == current else [prefix.rstrip(".")]
