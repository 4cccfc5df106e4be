"""Two-attempt evaluation with greedy decoding, as the paper evaluates.

Writes WORKDIR/eval/<step>/metrics.json and transcripts.jsonl (prompt, each
attempt, extracted answers, rewards) atomically; the validation evaluations
during training write WORKDIR/validation/<step>/ instead, which the report
(reading eval/) never mistakes for test results.
"""

import json
import os
from typing import Any, Optional

import jax
import numpy as np
from absl import logging

from score_jax import (
  checkpoints,
  data,
  files,
  generate,
  metrics,
  multihost,
  sampling,
)
from score_jax import experiment as experiment_lib
from score_jax.tasks import rewards as rewards_lib

GREEDY = sampling.SamplerConfig(temperature=0.0)


def restore(exp: experiment_lib.Experiment, workdir: str, which: str):
  """The params --checkpoint=`which` names, to evaluate.

  Args:
    exp: the experiment (its base params, params layout and config).
    workdir: the run's directory; its checkpoints/ are read.
    which: "base" for the initial weights (step 0), else latest, best or a
      step of the run's checkpoints, of which only the params are read (a
      damaged one is refused).

  Returns:
    (step, params).
  """
  if which == "base":
    return 0, exp.base_params()
  return checkpoints.restore_params(
    os.path.join(workdir, "checkpoints"),
    which,
    exp.abstract_params(),
    exp.config.to_json_best_effort(),
  )


def evaluate(
  exp: experiment_lib.Experiment,
  params,
  step: int,
  workdir: str,
  pool: rewards_lib.RewardPool,
  split: Optional[str] = None,
  directory: str = "eval",
) -> dict:
  """Greedy episodes of the first config.eval.num_examples problems of
  `split` (0: all), graded and scored with the paper's metrics; the writer
  process writes metrics.json and transcripts.jsonl into
  `workdir`/`directory`/`step`/.

  Args:
    exp: the experiment (task, rollout, config.eval); two attempts or more.
    params: the params to evaluate.
    step: the training step they are from, naming the output directory.
    workdir: the run's directory.
    pool: the reward workers.
    split: the task's split to evaluate (None: config.eval.split).
    directory: the folder under `workdir`: "eval" for test results,
      "validation" for the evaluations during training.

  Returns:
    The metrics: metrics.self_correction's of attempts 1 and 2,
    accuracy_t3... of later attempts, the mean edit_distance_ratio of the
    first and last attempts, failed_reward_calls, step, split,
    num_examples and config.eval.label if set.
  """
  cfg = exp.config.eval
  split = split or cfg.split
  examples = exp.task.examples(split)
  if cfg.num_examples:
    examples = examples[: cfg.num_examples]
  rollout_fn = exp.rollout_fn(GREEDY)
  num_attempts = exp.config.rollout.num_attempts
  rewards = [[] for _ in range(num_attempts)]
  failed_calls = 0
  edit_ratios, transcripts = [], []
  for batch, real in data.eval_batches(examples, cfg.batch_size):
    graded = generate.generate_and_grade(
      exp,
      rollout_fn,
      params,
      batch,
      jax.random.key(0),
      pool,
      every_row=True,
      num_real=real,
    )
    for i in range(num_attempts):
      rewards[i].extend(graded.rewards_ba[:, i].tolist())
    failed_calls += graded.num_failed
    for example, row, row_lengths in zip(
      batch, graded.texts_ba, graded.episode.lengths_ba
    ):
      edit_ratios.append(metrics.edit_distance_ratio(row[0], row[-1]))
      transcripts.append(
        {
          "problem": example.problem,
          # The answer key, under the name the report and older runs use.
          "reference": str(example.answer_key),
          "attempts": row,
          "answers": [exp.task.extract_answer(t) for t in row],
          "lengths": row_lengths.tolist(),
        }
      )
  for i, transcript in enumerate(transcripts):
    transcript["rewards"] = [r[i] for r in rewards]

  result: dict[str, Any] = dict(metrics.self_correction(rewards[0], rewards[1]))
  for i in range(2, num_attempts):
    result[f"accuracy_t{i + 1}"] = float(np.mean(rewards[i]))
  result.update(
    step=step,
    split=split,
    num_examples=len(examples),
    edit_distance_ratio=float(np.mean(edit_ratios)),
    failed_reward_calls=failed_calls,
  )
  if cfg.label:
    result["label"] = cfg.label
  if multihost.is_writer():  # Every process holds the same result.
    out_dir = os.path.join(workdir, directory, str(step))
    files.write_atomic(
      os.path.join(out_dir, "metrics.json"), json.dumps(result, indent=2) + "\n"
    )
    files.write_atomic(
      os.path.join(out_dir, "transcripts.jsonl"),
      "".join(json.dumps(t) + "\n" for t in transcripts),
    )
  logging.info("eval step %d: %s", step, result)
  for t in transcripts[: cfg.num_transcripts_logged]:
    logging.info("transcript: %s", json.dumps(t, indent=1))
  return result
