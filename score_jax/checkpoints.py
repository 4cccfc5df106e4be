"""Orbax checkpoints of a run: train state, reference params, data position,
config.

Saves are asynchronous and atomic (Orbax writes into a temporary directory and
renames it when complete), so a run killed mid-save leaves the previous
checkpoint intact. Once a save is complete, its integrity record
(integrity.json: the sha256 of every file) is written into it, atomically;
a checkpoint without one, or whose files differ from it, is damaged: training
resumes from the newest intact one and moves the damaged ones aside (to
WORKDIR/damaged_checkpoints/, never deleted). A save that failed (disk full,
permissions) is reported at the next step boundary and stops the run.
Kept: the latest `max_to_keep` and the best: by validation accuracy at the
last attempt, where the run measured it (config.eval.every_steps), else by
training reward (the paper's selection rule).

Restore order (each step needs the one before):
  0. the integrity record, to refuse damaged files before reading any;
  1. the config, to refuse a workdir that holds a different experiment;
  2. the train state (step, params, optimizer state, rng) onto the shardings
     of the current mesh, which may differ from the mesh that saved it;
  3. the reference params, onto the same shardings as the policy params;
  4. the data iterator position, so the resumed run sees the same prompts.
Evaluation (restore_params) takes steps 0 and 1, comparing only
EVAL_COMPARED, then reads the policy params alone from the train state.
"""

import contextlib
import hashlib
import json
import os
import shutil
from typing import Any, Optional, Sequence

import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers

from score_jax import files
from score_jax import multihost

INTEGRITY = "integrity.json"

# What must match to evaluate a checkpoint: what decides the params' meaning.
EVAL_COMPARED = ("model", "tokenizer_path")
# Fields (dotted paths) that may differ between a run and its resumption or
# evaluation: how it runs, not what it computes (the layout and the memory
# knobs, which a run that ran out of memory must be able to change), and the
# instruction, so that a checkpoint can be evaluated under another, as the
# Self-Refine baseline does.
_RESUMABLE_DIFFERENCES = ("mesh_shape", "sharding_rules", "num_micro_batches",
                          "rewards", "eval", "log_every", "checkpoint",
                          "optimizer", "max_update_ratio",
                          "max_consecutive_nonfinite", "profile_steps",
                          "instruction", "rollout.decode_rules", "overlap_grading",
                          "rollout.num_micro_batches")
# Of those, the ones a resumed run notes when they differ: the remedy for a
# run stopped by skipped steps (a lower learning rate, tighter clipping).
_NOTED_DIFFERENCES = ("optimizer", "max_update_ratio")


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used or written; the message says why."""


class Checkpointer:

  def __init__(self, directory: str, max_to_keep: int = 3):
    policy = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(n=max_to_keep),
        checkpoint_managers.BestN(
            get_metric_fn=_selection, n=1,
            keep_checkpoints_without_metrics=False),
    ])
    self._manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(
            preservation_policy=policy, enable_async_checkpointing=True,
            best_fn=_selection, best_mode="max",
            cleanup_tmp_directories=True))
    # The manager removes unfinished saves in a background thread that its
    # close() does not wait for; an error before the first save would end
    # the interpreter under that thread (a traceback after the one-line
    # error). Waiting here costs one directory listing.
    await_cleanup = getattr(self._manager,
                            "_maybe_await_cleanup_tmp_directory", None)
    if await_cleanup is not None:
      await_cleanup()
    self._pending = None  # The step being saved in the background.
    # Steps whose files this process found intact: a resume checks the
    # latest (intact_latest), then restores it, and hashing every file of a
    # large checkpoint twice would double the I/O of starting.
    self._intact = set()

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def best_step(self) -> Optional[int]:
    return self._manager.best_step()

  def all_steps(self):
    return self._manager.all_steps()

  @property
  def directory(self):
    return self._manager.directory

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, state: Any, reference: Any, data_state: dict,
           config_json: str, train_reward: Optional[float],
           val_accuracy: Optional[float] = None) -> None:
    """Starts saving `step`; the best is chosen by `val_accuracy` and
    `train_reward` (None: not measured), see _selection."""
    self.check(wait=True)
    metrics = {k: v for k, v in (("train_reward", train_reward),
                                 ("val_accuracy", val_accuracy))
               if v is not None} or None
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          reference=ocp.args.StandardSave(reference),
          data=ocp.args.JsonSave(data_state),
          config=ocp.args.JsonSave(json.loads(config_json))),
                         metrics=metrics)
    except OSError as e:
      raise self._save_failed(step, e) from e
    self._pending = step

  def check(self, wait: bool = False) -> None:
    """Raises CheckpointError if the last save failed; once it is complete,
    writes its integrity record. Without `wait`, returns at once while the
    save is still running (a step boundary's check)."""
    if self._pending is None or (
        not wait and self._manager.is_saving_in_progress()):
      return
    step, self._pending = self._pending, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # Orbax re-raises whatever the writers raised.
      raise self._save_failed(step, e) from e
    if multihost.is_writer() and os.path.isdir(self._step_dir(step)):
      files.write_atomic(os.path.join(self._step_dir(step), INTEGRITY),
                         json.dumps({"sha256": _checksums(
                             self._step_dir(step))}))

  def _save_failed(self, step: int, error: BaseException) -> CheckpointError:
    previous = [s for s in self.all_steps() if s < step]
    kept = (f"checkpoint {previous[-1]} is intact" if previous
            else "no earlier checkpoint")
    return CheckpointError(
        f"saving checkpoint {step} in {self.directory} failed ({error}); "
        f"{kept}: free disk space or fix permissions, then rerun to resume.")

  def damage(self, step: int) -> Optional[str]:
    """Why checkpoint `step` is not intact, or None if it is."""
    if step in self._intact:
      return None
    directory = self._step_dir(step)
    record = os.path.join(directory, INTEGRITY)
    try:
      with open(record, encoding="utf-8") as f:
        expected = json.load(f)["sha256"]
    except FileNotFoundError:
      return "it has no integrity record (an empty or unfinished save)"
    except (OSError, ValueError, KeyError, TypeError) as e:
      return f"its integrity record {record} is unreadable ({e})"
    actual = _checksums(directory)
    for name, digest in sorted(expected.items()):
      if name not in actual:
        return f"{os.path.join(directory, name)} is missing"
      if actual[name] != digest:
        return f"{os.path.join(directory, name)} differs from its checksum"
    self._intact.add(step)
    return None

  def intact_latest(self) -> Optional[int]:
    """The newest intact checkpoint (None: there is none, start afresh).
    Each newer, damaged one is moved aside and named in one log line; with
    checkpoints but none intact, raises CheckpointError (nothing moved)."""
    damaged = []
    for step in sorted(self.all_steps(), reverse=True):
      reason = self.damage(step)
      if reason is None:
        for bad, why in damaged:
          logging.warning("checkpoint %d in %s is damaged: %s; moved to %s, "
                          "resuming from step %d", bad, self.directory, why,
                          self._set_aside(bad), step)
        if damaged:
          self._manager.reload()
        return step
      damaged.append((step, reason))
    if damaged:
      raise CheckpointError(
          f"no intact checkpoint in {self.directory}: "
          + "; ".join(f"{s}: {why}" for s, why in damaged)
          + "; use a new --workdir, or restore the files from a backup.")
    return None

  def _set_aside(self, step: int) -> str:
    """Moves checkpoint `step` to WORKDIR/damaged_checkpoints/; its path."""
    aside = os.path.join(os.path.dirname(self.directory),
                         "damaged_checkpoints")
    target, n = os.path.join(aside, str(step)), 1
    while os.path.exists(target):
      target, n = os.path.join(aside, f"{step}.{n}"), n + 1
    if multihost.is_writer():
      os.makedirs(aside, exist_ok=True)
      shutil.move(self._step_dir(step), target)
    return target

  def restore(self, step: int, abstract_state: Any, abstract_reference: Any,
              config_json: str):
    """(state, reference, data_state) of `step`, in the order documented
    above, to resume a run: every config field that decides what a run
    computes must equal the saved one."""
    self._verify(step, config_json, None)
    restored = self._restore(
        step, state=ocp.args.StandardRestore(abstract_state),
        reference=ocp.args.StandardRestore(abstract_reference),
        data=ocp.args.JsonRestore())
    return restored["state"], restored["reference"], restored["data"]

  def restore_params(self, step: int, abstract_params: Any,
                     config_json: str) -> Any:
    """The policy params of `step`, from any run of the same model
    (EVAL_COMPARED); the rest of the train state is never read."""
    self._verify(step, config_json, EVAL_COMPARED)
    target = {"params": abstract_params}
    return self._restore(step, state=ocp.args.PyTreeRestore(
        item=target, partial_restore=True,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
    ))["state"]["params"]

  def _verify(self, step: int, config_json: str,
              compared: Optional[Sequence[str]]) -> None:
    """Steps 0 and 1 of the restore order: intact files, and the same
    experiment (the config fields `compared`; None: all)."""
    reason = self.damage(step)
    if reason is not None:
      raise CheckpointError(
          f"checkpoint {step} in {self.directory} is damaged: {reason}; "
          "use another checkpoint.")
    saved = self._restore(step, config=ocp.args.JsonRestore())["config"]
    _check_same_experiment(saved, json.loads(config_json), self.directory,
                           compared)

  def _restore(self, step: int, **items):
    """Orbax's restore of `items`; its errors (files that match their
    record but not what this run expects) as one CheckpointError line."""
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**items))
    except json.JSONDecodeError as e:
      item = "config" if "config" in items else "data"
      raise CheckpointError(
          f"{os.path.join(self._step_dir(step), item, 'metadata')}: not "
          f"valid JSON ({e.msg}); use another checkpoint.") from e
    except (ValueError, KeyError, TypeError, OSError) as e:
      gist = (str(e).splitlines() or [type(e).__name__])[0]
      raise CheckpointError(
          f"checkpoint {step} in {self.directory} cannot be restored "
          f"({gist}); use another checkpoint.") from e

  def wait(self) -> None:
    self.check(wait=True)

  def close(self) -> None:
    # A run ended by an error still records its last complete save (its own
    # failure is reported by wait(), which a run that ends well calls).
    with contextlib.suppress(CheckpointError):
      self.check(wait=True)
    self._manager.close()

  # A context manager, so that an error mid-run still ends Orbax's threads
  # before the interpreter shuts down.
  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def resolve_step(checkpointer: Checkpointer, which: str) -> Optional[int]:
  """The step `which` names: "latest", "best" (see _selection), a step
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


def restore_params(directory: str, which: str, abstract_params: Any,
                   config_json: str) -> tuple[int, Any]:
  """(step, policy params) of checkpoint `which` (latest, best or a step;
  see resolve_step) in `directory`, for evaluation: a damaged one is
  refused, not replaced by another."""
  with Checkpointer(directory) as checkpointer:
    step = resolve_step(checkpointer, which)
    return step, checkpointer.restore_params(step, abstract_params,
                                             config_json)


def _checksums(directory: str) -> dict[str, str]:
  """sha256 of every file under `directory` but the record, by relative
  path."""
  sums = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      relative = os.path.relpath(path, directory)
      if relative == INTEGRITY or relative.startswith(f"{INTEGRITY}."):
        continue
      digest = hashlib.sha256()
      with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
          digest.update(block)
      sums[relative] = digest.hexdigest()
  return sums


def _selection(metrics: dict) -> tuple[int, float]:
  """The rank of a checkpoint: a validated one above any other (accuracy on
  held-out problems is what a chosen checkpoint should maximise), then by
  the value measured."""
  if "val_accuracy" in metrics:
    return 1, metrics["val_accuracy"]
  return 0, metrics["train_reward"]


def _check_same_experiment(saved: dict, current: dict, directory,
                           compared: Optional[Sequence[str]]) -> None:
  if compared is not None:
    saved = {k: saved.get(k) for k in compared}
    current = {k: current.get(k) for k in compared}
  differing = _differing(saved, current)
  noted = [p for p in _differing(saved, current, resumable=()) if
           p.split(".")[0] in _NOTED_DIFFERENCES]
  if noted and not differing:
    logging.warning("resuming with config fields %s changed from the "
                    "checkpoint's in %s", noted, directory)
  if differing:
    raise ValueError(
        f"{directory} holds checkpoints of a different experiment (config "
        f"fields {differing} differ); use a new --workdir, or the config that "
        "wrote them.")


def _differing(saved: Any, current: Any, prefix: str = "",
               resumable: Sequence[str] = _RESUMABLE_DIFFERENCES,
               ) -> list[str]:
  """The dotted paths where two configs differ, outside
  _RESUMABLE_DIFFERENCES. A field missing on one side equals None, so that
  a field added to the configs later (left unset) does not orphan older
  checkpoints."""
  if isinstance(saved, dict) and isinstance(current, dict):
    return [path for k in sorted(set(saved) | set(current))
            if (f"{prefix}{k}") not in resumable
            for path in _differing(saved.get(k), current.get(k),
                                   f"{prefix}{k}.", resumable)]
  return [] if saved == current else [prefix.rstrip(".")]
