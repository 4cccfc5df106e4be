"""Orbax checkpoints of a run: train state, reference params, data position,
config.

Saves are asynchronous and atomic: Orbax writes a step in place and commits
it with a marker file (commit_success.txt), no directory rename, which is
what Orbax advises for Cloud Storage and Cloud Storage FUSE, where a
directory rename copies each file (neither atomic nor fast). Once a save is
committed, each process writes its integrity record of the files it wrote
(integrity.py), in the background while training goes on. A checkpoint
that misses a record (an unfinished save), or whose files differ from them,
is damaged: every process checks its share, the processes agree, training
resumes from the newest checkpoint intact on all of them, and process 0
moves the damaged ones aside (to WORKDIR/damaged_checkpoints/, never
deleted) while the others wait. A save that failed (disk full,
permissions) is reported at the next step boundary and stops the run.
Kept: the latest `max_to_keep` and the best: by validation accuracy at the
last attempt, where the run measured it (config.eval.every_steps), else by
training reward (the paper's selection rule); and the latest checkpoint,
whatever saved it. A save on a preemption notice (`preemption=True`) is
kept only while it is the latest: it never evicts another, and never
counts for the best.

Restore order (each step needs the one before):
  0. the integrity records, to refuse damaged files before reading any;
  1. the config, to refuse a workdir that holds a different experiment;
  2. the train state (step, params, optimizer state, rng) onto the shardings
     of the current mesh, which may differ from the mesh that saved it;
  3. the reference params, onto the same shardings as the policy params;
  4. the data iterator position (and what the choice of the best needs
     since the last scheduled save), so the resumed run sees the same
     prompts.
Evaluation (restore_params) takes steps 0 and 1, comparing only
EVAL_COMPARED, then reads the policy params alone from the train state.
A checkpoint written before integrity records existed is adopted with
`adopt` (main's --mode=adopt): a complete restore checked, then a record.
"""

import concurrent.futures
import contextlib
import dataclasses
import json
import os
import shutil
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers

from score_jax import integrity, multihost

# What must match to evaluate a checkpoint: what decides the params' meaning.
EVAL_COMPARED = ("model", "tokenizer_path")
# Fields (dotted paths) that may differ between a run and its resumption or
# evaluation: how it runs, not what it computes (the layout and the memory
# knobs, which a run that ran out of memory must be able to change), and the
# instruction, so that a checkpoint can be evaluated under another, as the
# Self-Refine baseline does.
_RESUMABLE_DIFFERENCES = (
  "mesh_shape",
  "sharding_rules",
  "num_micro_batches",
  "rewards",
  "eval",
  "log_every",
  "checkpoint",
  "hosts",
  "optimizer",
  "max_update_ratio",
  "max_consecutive_nonfinite",
  "profile_steps",
  "instruction",
  "rollout.decode_rules",
  "overlap_grading",
  "rollout.num_micro_batches",
)
# Of those, the ones a resumed run notes when they differ: the remedy for a
# run stopped by skipped steps (a lower learning rate, tighter clipping).
_NOTED_DIFFERENCES = ("optimizer", "max_update_ratio")
# The metrics of a save on a preemption notice: it is never the best.
_PREEMPTION = {"preemption": True}


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used or written; the message says why."""


class _Manager(ocp.CheckpointManager):
  """Orbax's manager, told by the Checkpointer whether a save is the one of
  a preemption notice (which Orbax logs and times as such). Orbax would
  otherwise ask JAX's preemption sync point itself, with the step number;
  the training loop asks it at its own checks (preemption.py), and a second
  sequence of numbers would derail the agreement between processes."""

  preempted = False

  def reached_preemption(self, step: int) -> bool:
    del step
    return self.preempted


@dataclasses.dataclass
class _Retention(checkpoint_managers.PreservationPolicy):
  """The latest `max_to_keep` scheduled checkpoints, the best of them (see
  _selection) and the latest checkpoint: a preemption's save is kept while
  it is where a rerun resumes, and evicts nothing."""

  max_to_keep: int

  def should_preserve(self, checkpoints, *, context) -> list[bool]:
    del context
    scheduled = [
      i for i, c in enumerate(checkpoints) if c.metrics != _PREEMPTION
    ]
    kept = set(scheduled[-self.max_to_keep :]) | {len(checkpoints) - 1}
    ranked = [i for i in scheduled if checkpoints[i].metrics is not None]
    if ranked:
      kept.add(
        max(
          ranked,
          key=lambda i: (
            _selection(checkpoints[i].metrics),
            checkpoints[i].step,
          ),
        )
      )
    return [i in kept for i in range(len(checkpoints))]


class Checkpointer:
  def __init__(self, directory: str, max_to_keep: int = 3):
    self._manager = _Manager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(
        preservation_policy=_Retention(max_to_keep),
        enable_async_checkpointing=True,
        best_fn=_selection,
        best_mode="max",
        cleanup_tmp_directories=True,
        # Checkpoints saved by rename, without a marker, stay readable.
        atomicity_options=ocp.options.AtomicityOptions(
          mode=ocp.options.AtomicityMode.COMMIT_FILE,
          allow_legacy_atomic_rename=True,
        ),
      ),
    )
    # The manager removes unfinished saves in a background thread that its
    # close() does not wait for; an error before the first save would end
    # the interpreter under that thread (a traceback after the one-line
    # error). Waiting here costs one directory listing.
    await_cleanup = getattr(
      self._manager, "_maybe_await_cleanup_tmp_directory", None
    )
    if await_cleanup is not None:
      await_cleanup()
    # The step being saved in the background.
    self._pending: Optional[int] = None
    # (step, future) of the integrity record being written in the
    # background, once its save is committed.
    self._recording: Optional[tuple[int, concurrent.futures.Future]] = None
    self._recorder = concurrent.futures.ThreadPoolExecutor(1)
    # Steps that every process found intact: a resume checks the latest
    # (intact_latest), then restores it, and hashing every file of a large
    # checkpoint twice would double the I/O of starting.
    self._intact = set()
    # The newest step known complete here (resumed from, or recorded).
    self._complete: Optional[int] = None

  def latest_step(self) -> Optional[int]:
    """The newest checkpoint's step, or None if there is none."""
    return self._manager.latest_step()

  def best_step(self) -> Optional[int]:
    """The best checkpoint's step (_selection), or None if none measured."""
    step = self._manager.best_step()
    # Ranked last, a preemption's save comes out only when no other has
    # metrics: then nothing was measured.
    if step is not None and self._manager.metrics(step) == _PREEMPTION:
      return None
    return step

  def all_steps(self):
    """The steps of the checkpoints in the directory."""
    return self._manager.all_steps()

  @property
  def directory(self):
    """The directory that holds the checkpoints, one a step."""
    return self._manager.directory

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(
    self,
    step: int,
    state: Any,
    reference: Any,
    data_state: dict,
    config_json: str,
    train_reward: Optional[float],
    val_accuracy: Optional[float] = None,
    preemption: bool = False,
  ) -> None:
    """Starts saving `step` in the background, once the previous save is
    done (`check`). A `preemption` save (of a step not saved already) is
    never the best, and is kept only while it is the latest.

    Args:
      step: the step the checkpoint is named by.
      state: the train state.
      reference: the reference params.
      data_state: the data position and what the loop resumes with, as
        JSON-able values.
      config_json: the run's config as JSON, to compare on restore.
      train_reward: the training reward since the last scheduled save,
        which chooses the best when nothing is validated (None: not
        measured).
      val_accuracy: the validation accuracy, which chooses the best where
        measured (None: not measured).
      preemption: whether this is the save of a preemption notice; of a
        step already saved, it does nothing.

    Raises:
      CheckpointError: this save or the previous one failed.
    """
    self.check(wait=True)
    if preemption and step in self.all_steps():
      return
    metrics = (
      _PREEMPTION
      if preemption
      else {
        k: v
        for k, v in (
          ("train_reward", train_reward),
          ("val_accuracy", val_accuracy),
        )
        if v is not None
      }
      or None
    )
    self._manager.preempted = preemption
    try:
      self._manager.save(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          reference=ocp.args.StandardSave(reference),
          data=ocp.args.JsonSave(data_state),
          config=ocp.args.JsonSave(json.loads(config_json)),
        ),
        metrics=metrics,
      )
    except OSError as e:
      raise self._save_failed(step, e) from e
    self._pending = step

  def check(self, wait: bool = False) -> None:
    """Raises CheckpointError if the last save failed; once it is
    committed, writes this process's integrity record of it in the
    background. Without `wait`, returns at once while either is still
    running (a step boundary's check); with it, returns once both are
    done."""
    if self._pending is not None and (
      wait or not self._manager.is_saving_in_progress()
    ):
      step, self._pending = self._pending, None
      try:
        self._manager.wait_until_finished()
      except Exception as e:  # Orbax re-raises whatever the writers raised.
        raise self._save_failed(step, e) from e
      self._recording = (
        step,
        self._recorder.submit(integrity.write, self._step_dir(step)),
      )
    if self._recording is not None and (wait or self._recording[1].done()):
      (step, future), self._recording = self._recording, None
      try:
        future.result()
      except OSError as e:
        raise self._save_failed(step, e) from e
      self._complete = step

  def last_complete(self) -> str:
    """The newest checkpoint this process knows complete, in words."""
    if self._complete is None:
      return "there is no complete checkpoint yet (a rerun starts afresh)"
    return (
      f"the last complete checkpoint is step {self._complete} in "
      f"{self.directory}"
    )

  def _save_failed(self, step: int, error: BaseException) -> CheckpointError:
    previous = [s for s in self.all_steps() if s < step]
    kept = (
      f"checkpoint {previous[-1]} is intact"
      if previous
      else "no earlier checkpoint"
    )
    return CheckpointError(
      f"saving checkpoint {step} in {self.directory} failed ({error}); "
      f"{kept}: free disk space or fix permissions, then rerun to resume."
    )

  def damage(self, step: int) -> Optional[str]:
    """Why checkpoint `step` is not intact, or None if it is: the same
    answer on every process (each checks its share of the files; a
    collective, which every process calls)."""
    if step in self._intact:
      return None
    reason = multihost.first_text(integrity.damage(self._step_dir(step)))
    if reason is None:
      self._intact.add(step)
    return reason

  def intact_latest(self) -> Optional[int]:
    """The newest intact checkpoint (None: there is none, start afresh),
    the same on every process. Each newer, damaged one is moved aside by
    process 0, while the others wait, and named in one log line; with
    checkpoints but none intact, raises CheckpointError (nothing moved)."""
    damaged = []
    for step in sorted(self.all_steps(), reverse=True):
      reason = self.damage(step)
      if reason is None:
        if damaged:
          self._set_aside(damaged, step)
        self._complete = step
        return step
      damaged.append((step, reason))
    if damaged:
      raise CheckpointError(
        f"no intact checkpoint in {self.directory}: "
        + "; ".join(f"{s}: {why}" for s, why in damaged)
        + "; use a new --workdir, or restore the files from a backup."
      )
    return None

  def _set_aside(self, damaged: list[tuple[int, str]], intact: int) -> None:
    """Moves the `damaged` checkpoints ((step, why)) to
    WORKDIR/damaged_checkpoints/ (process 0 does, the others wait), each
    named in one log line."""
    aside = os.path.join(os.path.dirname(self.directory), "damaged_checkpoints")
    targets = []
    for step, _ in damaged:
      target, n = os.path.join(aside, str(step)), 1
      while os.path.exists(target) or target in targets:
        target, n = os.path.join(aside, f"{step}.{n}"), n + 1
      targets.append(target)
    # Every process names the same targets before any is taken.
    multihost.sync(f"score_jax: setting aside checkpoints before {intact}")
    for (step, why), target in zip(damaged, targets):
      if multihost.is_writer():
        os.makedirs(aside, exist_ok=True)
        shutil.move(self._step_dir(step), target)
      logging.warning(
        "checkpoint %d in %s is damaged: %s; moved to %s, "
        "resuming from step %d",
        step,
        self.directory,
        why,
        target,
        intact,
      )
    multihost.sync(f"score_jax: set aside checkpoints before {intact}")
    self._manager.reload()

  def restore(
    self,
    step: int,
    abstract_state: Any,
    abstract_reference: Any,
    config_json: str,
  ):
    """Checkpoint `step`, restored in the order documented above, to resume
    a run: every config field that decides what a run computes must equal
    the saved one.

    Args:
      step: the checkpoint's step.
      abstract_state: the train state's shapes, dtypes and shardings, to
        restore onto (the current mesh's).
      abstract_reference: the reference's, likewise.
      config_json: the current run's config as JSON.

    Returns:
      (state, reference, data_state), data_state the dict `save` was given.

    Raises:
      CheckpointError: the checkpoint is damaged or cannot be restored.
      ValueError: it holds a different experiment.
    """
    self._verify(step, config_json, None)
    return self._restore_training(step, abstract_state, abstract_reference)

  def _restore_training(
    self, step: int, abstract_state: Any, abstract_reference: Any
  ):
    restored = self._restore(
      step,
      state=ocp.args.StandardRestore(abstract_state),
      reference=ocp.args.StandardRestore(abstract_reference),
      data=ocp.args.JsonRestore(),
    )
    return restored["state"], restored["reference"], restored["data"]

  def restore_params(
    self, step: int, abstract_params: Any, config_json: str
  ) -> Any:
    """The policy params of `step`, from any run of the same model
    (EVAL_COMPARED); the rest of the train state is never read.

    Args:
      step: the checkpoint's step.
      abstract_params: the params' shapes, dtypes and shardings, to restore
        onto.
      config_json: the current run's config as JSON.

    Returns:
      The params, laid out as `abstract_params`.

    Raises:
      CheckpointError: the checkpoint is damaged or cannot be restored.
      ValueError: it holds another model.
    """
    self._verify(step, config_json, EVAL_COMPARED)
    target = {"params": abstract_params}
    return self._restore(
      step,
      state=ocp.args.PyTreeRestore(
        item=target,
        partial_restore=True,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      ),
    )["state"]["params"]

  def adopt(
    self,
    step: int,
    abstract_state: Any,
    abstract_reference: Any,
    config_json: str,
  ) -> str:
    """Writes the integrity record of checkpoint `step`, saved before
    records existed, once it restores completely: the config of the same
    experiment, every array of the shape and dtype this run expects, every
    floating-point value finite. Process 0 hashes every file, once.

    Args:
      step: the checkpoint's step.
      abstract_state: the train state's shapes, dtypes and shardings.
      abstract_reference: the reference's.
      config_json: the current run's config as JSON.

    Returns:
      What it checked, for a log line.

    Raises:
      CheckpointError: the checkpoint has a record already, or fails a
        check (nothing is written).
      ValueError: it holds a different experiment.
    """
    if integrity.has_records(self._step_dir(step)):
      raise CheckpointError(
        f"checkpoint {step} in {self.directory} has an integrity record "
        "already: a rerun checks it, there is nothing to adopt."
      )
    self._check_config(step, config_json, None)
    for item, abstract in (
      ("state", abstract_state),
      ("reference", abstract_reference),
    ):
      with ocp.StandardCheckpointer() as reader:
        saved = reader.metadata(os.path.join(self._step_dir(step), item))
      _check_layout(
        item, saved.item_metadata.tree, abstract, self._step_dir(step)
      )
    state, reference, _ = self._restore_training(
      step, abstract_state, abstract_reference
    )
    arrays = jax.tree.leaves((state, reference))
    nonfinite = [
      jax.tree_util.keystr(path)
      for path, x in jax.tree_util.tree_flatten_with_path((state, reference))[0]
      if jnp.issubdtype(x.dtype, jnp.floating)
      and not bool(jnp.isfinite(x).all())
    ]
    if nonfinite:
      raise CheckpointError(
        f"checkpoint {step} in {self.directory} holds values that are not "
        f"finite in {nonfinite[:3]}; resume from an earlier checkpoint "
        "(move this one aside)."
      )
    if multihost.is_writer():
      integrity.write(self._step_dir(step), every_file=True)
    multihost.sync(f"score_jax: adopted {step}")
    return (
      f"{len(arrays)} arrays of the expected shapes, "
      f"{sum(int(np.prod(x.shape)) for x in arrays)} values, all "
      "finite"
    )

  def _verify(
    self, step: int, config_json: str, compared: Optional[Sequence[str]]
  ) -> None:
    """Steps 0 and 1 of the restore order: intact files, and the same
    experiment (the config fields `compared`; None: all)."""
    reason = self.damage(step)
    if reason is not None:
      raise CheckpointError(
        f"checkpoint {step} in {self.directory} is damaged: {reason}; "
        "use another checkpoint."
      )
    self._check_config(step, config_json, compared)

  def _check_config(
    self, step: int, config_json: str, compared: Optional[Sequence[str]]
  ) -> None:
    saved = self._restore(step, config=ocp.args.JsonRestore())["config"]
    _check_same_experiment(
      saved, json.loads(config_json), self.directory, compared
    )

  def _restore(self, step: int, **items):
    """Orbax's restore of `items`; its errors (files that match their
    record but not what this run expects) as one CheckpointError line."""
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**items))
    except json.JSONDecodeError as e:
      item = "config" if "config" in items else "data"
      raise CheckpointError(
        f"{os.path.join(self._step_dir(step), item, 'metadata')}: not "
        f"valid JSON ({e.msg}); use another checkpoint."
      ) from e
    except (ValueError, KeyError, TypeError, OSError) as e:
      gist = (str(e).splitlines() or [type(e).__name__])[0]
      raise CheckpointError(
        f"checkpoint {step} in {self.directory} cannot be restored "
        f"({gist}); use another checkpoint."
      ) from e

  def wait(self) -> None:
    """Returns once the last save and its integrity record are written."""
    self.check(wait=True)

  def close(self) -> None:
    """Waits for the last save (its failure is `wait`'s to report), then
    ends the background threads."""
    # A run ended by an error still records its last complete save (its own
    # failure is reported by wait(), which a run that ends well calls).
    with contextlib.suppress(CheckpointError):
      self.check(wait=True)
    self._recorder.shutdown()
    self._manager.close()

  # A context manager, so that an error mid-run still ends Orbax's threads
  # before the interpreter shuts down.
  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def resolve_step(checkpointer: Checkpointer, which: str) -> Optional[int]:
  """The step of a checkpoint named on the command line.

  Args:
    checkpointer: the run's checkpoints.
    which: "latest", "best" (see _selection), a step number, or "base"
      (the initial weights).

  Returns:
    The step, or None for "base".

  Raises:
    ValueError: there is no such checkpoint.
  """
  if which == "base":
    return None
  steps = list(checkpointer.all_steps())
  step = {
    "latest": checkpointer.latest_step,
    "best": checkpointer.best_step,
  }.get(which, lambda: None)()
  if step is None and which.isdigit() and int(which) in steps:
    step = int(which)
  if step is None:
    raise ValueError(
      f"--checkpoint={which}: no such checkpoint in "
      f"{checkpointer.directory} (steps {steps}); use latest, best, base "
      "or one of the steps."
    )
  return step


def restore_params(
  directory: str, which: str, abstract_params: Any, config_json: str
) -> tuple[int, Any]:
  """The policy params of a checkpoint, for evaluation: a damaged one is
  refused, not replaced by another.

  Args:
    directory: the checkpoints' directory.
    which: "latest", "best" or a step number (`resolve_step`).
    abstract_params: the params' shapes, dtypes and shardings, to restore
      onto.
    config_json: the current run's config as JSON; its EVAL_COMPARED
      fields must equal the saved ones.

  Returns:
    (the step, the policy params).
  """
  with Checkpointer(directory) as checkpointer:
    step = resolve_step(checkpointer, which)
    return step, checkpointer.restore_params(step, abstract_params, config_json)


def _check_layout(item: str, saved: Any, expected: Any, directory: str):
  """Raises CheckpointError unless the arrays of `item` in a checkpoint
  (Orbax's metadata tree) have the shapes and dtypes this run expects."""
  flat_saved, flat_expected = _by_path(saved), _by_path(expected)
  if flat_saved.keys() != flat_expected.keys():
    differing = sorted(flat_saved.keys() ^ flat_expected.keys())
    raise CheckpointError(
      f"{directory}: its {item} and this config's differ in arrays "
      f"{differing[:3]}; use the config that wrote it."
    )
  for name, x in flat_expected.items():
    got = flat_saved[name]
    if tuple(got.shape) != tuple(x.shape) or np.dtype(got.dtype) != x.dtype:
      raise CheckpointError(
        f"{directory}: {item}{name} is {got.dtype}{list(got.shape)}, this "
        f"config expects {x.dtype}{list(x.shape)}; use the config that "
        "wrote it."
      )


def _by_path(tree: Any) -> dict[str, Any]:
  """The leaves of `tree` by path, written as dict keys whatever the node
  (Orbax's metadata has dicts where the train state has attributes)."""

  def key(entry):
    for name in ("key", "name", "idx"):
      if hasattr(entry, name):
        return f"[{getattr(entry, name)!r}]"
    return str(entry)

  return {
    "".join(map(key, path)): leaf
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _selection(metrics: dict) -> tuple[int, float]:
  """The rank of a checkpoint: a validated one above any other (accuracy on
  held-out problems is what a chosen checkpoint should maximise), then by
  the value measured."""
  if "val_accuracy" in metrics:
    return 1, metrics["val_accuracy"]
  if "train_reward" in metrics:
    return 0, metrics["train_reward"]
  return -1, 0.0  # A preemption's save, below any measured one.


def _check_same_experiment(
  saved: dict, current: dict, directory, compared: Optional[Sequence[str]]
) -> None:
  if compared is not None:
    saved = {k: saved.get(k) for k in compared}
    current = {k: current.get(k) for k in compared}
  differing = _differing(saved, current)
  noted = [
    p
    for p in _differing(saved, current, resumable=())
    if p.split(".")[0] in _NOTED_DIFFERENCES
  ]
  if noted and not differing:
    logging.warning(
      "resuming with config fields %s changed from the checkpoint's in %s",
      noted,
      directory,
    )
  if differing:
    raise ValueError(
      f"{directory} holds checkpoints of a different experiment (config "
      f"fields {differing} differ); use a new --workdir, or the config that "
      "wrote them."
    )


def _differing(
  saved: Any,
  current: Any,
  prefix: str = "",
  resumable: Sequence[str] = _RESUMABLE_DIFFERENCES,
) -> list[str]:
  """The dotted paths where two configs differ, outside
  _RESUMABLE_DIFFERENCES. A field missing on one side equals None, so that
  a field added to the configs later (left unset) does not orphan older
  checkpoints."""
  if isinstance(saved, dict) and isinstance(current, dict):
    return [
      path
      for k in sorted(set(saved) | set(current))
      if (f"{prefix}{k}") not in resumable
      for path in _differing(
        saved.get(k), current.get(k), f"{prefix}{k}.", resumable
      )
    ]
  return [] if saved == current else [prefix.rstrip(".")]
