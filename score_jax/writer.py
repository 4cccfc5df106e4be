"""Per-step metrics to TensorBoard event files, a JSONL file, and a progress bar."""

import json
import os

import numpy as np
import tensorboardX
import tqdm


class MetricsWriter:
  """Writes WORKDIR/metrics.jsonl and WORKDIR/tensorboard/ (on process 0)."""

  def __init__(self, workdir: str, total_steps: int, initial_step: int,
               enabled: bool = True):
    self._enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))
    self._bar = tqdm.tqdm(total=total_steps, initial=initial_step,
                          dynamic_ncols=True, desc="train")

  def write(self, step: int, phase: str, host: dict, device: dict, tokens: int,
            step_s: float) -> dict:
    record = {"step": step, "phase": phase, "step_s": step_s,
              "train_tokens_per_s": tokens / step_s, **host}
    for name, value in device.items():
      value = np.asarray(value)
      if value.ndim == 0:
        record[name] = float(value)
      else:  # per-attempt vectors: name_t1, name_t2, ...
        base = name.removesuffix("_per_attempt")
        record.update({f"{base}_t{i + 1}": float(v)
                       for i, v in enumerate(value)})
    if self._enabled:
      self._jsonl.write(json.dumps(record) + "\n")
      self._jsonl.flush()
      for name, value in record.items():
        if isinstance(value, (int, float)) and name != "step":
          self._tb.add_scalar(name, value, step)
      shown = {k: record[k] for k in ("loss", "reward_t1", "reward_t2",
                                      "delta") if k in record}
      self._bar.set_postfix({"phase": phase, **{k: f"{v:.3f}"
                                                for k, v in shown.items()}})
      self._bar.update(1)
    return record

  def close(self) -> None:
    if self._enabled:
      self._jsonl.close()
      self._tb.close()
      self._bar.close()
