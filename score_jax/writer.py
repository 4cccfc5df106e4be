"""Per-step metrics to TensorBoard event files, a JSONL file, and the
console: a progress bar, and a line for each event (a phase starting, a
checkpoint saved, a validation)."""

import json
import os

import numpy as np
import tensorboardX
import tqdm
from absl import logging

from score_jax import files


class MetricsWriter:
  """Writes WORKDIR/metrics.jsonl, WORKDIR/tensorboard/ and the console (on
  process 0; `enabled` False on the others).

  Args:
    workdir: the run's directory.
    total_steps: the schedule's steps (the bar's length).
    initial_step: the step the run resumes after (0: a fresh run).
    enabled: whether this process writes.
  """

  def __init__(
    self,
    workdir: str,
    total_steps: int,
    initial_step: int,
    enabled: bool = True,
  ):
    self._enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.jsonl")
    _repair(path, initial_step)
    self._jsonl = open(path, "a", encoding="utf-8")
    self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))
    self._bar = tqdm.tqdm(
      total=total_steps, initial=initial_step, dynamic_ncols=True, desc="train"
    )

  def event(self, text: str) -> None:
    """One line on the console, above the progress bar."""
    if self._enabled:
      self._bar.write(text)

  def write(
    self,
    step: int,
    phase: str,
    host: dict,
    device: dict,
    tokens: int,
    step_s: float,
  ) -> dict:
    """Writes step `step`'s metrics row.

    Args:
      step: the step (1-based).
      phase: its phase's name.
      host: the host's metrics (rewards, lengths, timings, validation).
      device: the train step's metrics; a vector per attempt becomes
        name_t1, name_t2, ...
      tokens: the real tokens the train step trained on.
      step_s: the step's seconds.

    Returns:
      The row, as written.
    """
    record = {
      "step": step,
      "phase": phase,
      "step_s": step_s,
      "train_tokens_per_s": tokens / step_s,
      **host,
    }
    for name, value in device.items():
      value = np.asarray(value)
      if value.ndim == 0:
        record[name] = float(value)
      else:  # per-attempt vectors: name_t1, name_t2, ...
        base = name.removesuffix("_per_attempt")
        record.update(
          {f"{base}_t{i + 1}": float(v) for i, v in enumerate(value)}
        )
    if self._enabled:
      self._jsonl.write(json.dumps(record) + "\n")
      self._jsonl.flush()
      for name, value in record.items():
        if isinstance(value, (int, float)) and name != "step":
          self._tb.add_scalar(name, value, step)
      shown = {
        k: record[k]
        for k in ("loss", "reward_t1", "reward_t2", "delta")
        if k in record
      }
      self._bar.set_postfix(
        {"phase": phase, **{k: f"{v:.3f}" for k, v in shown.items()}}
      )
      self._bar.update(1)
    return record

  def close(self) -> None:
    """Flushes and closes the files and the bar."""
    if self._enabled:
      self._jsonl.close()
      self._tb.close()
      self._bar.close()


def _repair(path: str, initial_step: int) -> None:
  """Makes `path` hold the rows of steps up to `initial_step` (where the run
  resumes): a torn last line (a kill mid-write) is dropped, and the rows of
  steps that will be redone, so that they are replaced, not duplicated."""
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8", errors="replace") as f:
    lines = f.read().splitlines(keepends=True)
  if lines and not _is_row(lines[-1]):
    logging.warning(
      "%s: dropped its torn last line %d (%r)", path, len(lines), lines[-1][:80]
    )
    lines = lines[:-1]
  kept = [
    line
    for line in lines
    if not _is_row(line) or json.loads(line)["step"] <= initial_step
  ]
  if len(kept) < len(lines):
    logging.info(
      "%s: dropped %d rows after step %d, which will be redone",
      path,
      len(lines) - len(kept),
      initial_step,
    )
  if kept != lines or (lines and not lines[-1].endswith("\n")):
    files.write_atomic(path, "".join(line.rstrip("\n") + "\n" for line in kept))


def _is_row(line: str) -> bool:
  try:
    row = json.loads(line)
  except ValueError:
    return False
  return isinstance(row, dict) and isinstance(row.get("step"), int)
