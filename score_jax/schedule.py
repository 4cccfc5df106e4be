"""Stage schedules as data: a list of phases, each saying what its steps do.

  score        Stage I, then Stage II (the paper's method)
  stage1       Stage I only
  stage2       Stage II only
  interleaved  `cycles` repetitions of (Stage I, Stage II), same total steps
  no_stage1    ablation: Stage II for the whole budget
  no_shaping   ablation: Stage I, then Stage II with alpha = 0
  single_turn  ablation: train attempt 1 only, for the whole budget
  star         baseline: `cycles` STaR iterations; each samples episodes from
               the policy as it was when the iteration began and fine-tunes on
               those whose last attempt is correct
  pair_sft     baseline: fine-tune on pairs (a wrong attempt, then a correct
               attempt at the same problem) sampled from the base model
The baselines use the whole budget (stage1_steps + stage2_steps).
A supervised phase of `sft_steps` (the base model's warm start) comes first
when `sft_steps` > 0.

A `Phase` carries everything the training loop needs to run its steps: the
objective (or None: the supervised loss), how a step's batch is made, and
whether the reference becomes the current policy when the phase starts.
The loop reads these fields; nothing in it depends on a phase's name.
"""

import dataclasses
from typing import Optional

from score_jax import objectives

SCHEDULES = (
  "score",
  "stage1",
  "stage2",
  "interleaved",
  "no_stage1",
  "no_shaping",
  "single_turn",
  "star",
  "pair_sft",
)
REFERENCES = ("base", "stage1")
# How a step's batch is made:
#   demonstrations  the task's demonstrations of the step's problems,
#                   imitated (the supervised warm start)
#   rollout         episodes sampled from the policy and graded (RL)
#   star            episodes sampled from the reference; those whose last
#                   attempt is correct are imitated (STaR)
#   pairs           episodes sampled from the reference; each wrong first
#                   attempt paired with a correct attempt at its problem,
#                   which is imitated (Pair-SFT)
BATCHES = ("demonstrations", "rollout", "star", "pairs")


@dataclasses.dataclass(frozen=True)
class Phase:
  """Consecutive training steps that all do the same thing.

  Attributes:
    name: what metrics.jsonl and the report call the phase's steps.
    steps: how many steps it has.
    batch: how a step's batch is made (one of BATCHES).
    objective: the RL objective of its steps; None for the supervised loss.
    refresh_reference: the reference becomes a frozen copy of the policy
      when the phase starts (not when a run resumes inside it: the
      checkpoint holds the reference).
  """

  name: str
  steps: int
  batch: str
  objective: Optional[objectives.ObjectiveConfig] = None
  refresh_reference: bool = False

  def __post_init__(self):
    if self.batch not in BATCHES:
      raise ValueError(
        f"phase {self.name!r}: batch={self.batch!r} is "
        f"unknown; choose one of {BATCHES}."
      )
    if (self.objective is None) != (self.batch != "rollout"):
      raise ValueError(
        f"phase {self.name!r}: an objective goes with "
        "batch='rollout', and only with it."
      )


def phases(
  schedule: str,
  stage1_steps: int,
  stage2_steps: int,
  cycles: int = 1,
  sft_steps: int = 0,
  objective: objectives.ObjectiveConfig = objectives.ObjectiveConfig(),
  reference: str = "base",
) -> list[Phase]:
  """The phases of a schedule (the module docstring lists them).

  Args:
    schedule: config.schedule.
    stage1_steps: config.stage1_steps.
    stage2_steps: config.stage2_steps; the baselines and the one-stage
      ablations take stage1_steps + stage2_steps.
    cycles: Stage I / Stage II cycles of `interleaved`, STaR iterations of
      `star`.
    sft_steps: a supervised warm start's steps, first (0: none).
    objective: config.objective's settings; each RL phase takes them with
      its own stage (and alpha = 0 in no_shaping's Stage II).
    reference: config.reference: "base" keeps the initial model (the
      warm-started one after a warm start); "stage1" takes the policy when
      each Stage II phase starts.

  Returns:
    The phases in order, those of no steps left out.
  """
  if schedule not in SCHEDULES:
    raise ValueError(
      f"config.schedule={schedule!r} is unknown; choose one of {SCHEDULES}."
    )
  if reference not in REFERENCES:
    raise ValueError(
      f"config.reference={reference!r} is unknown; choose one of {REFERENCES}."
    )
  if min(stage1_steps, stage2_steps, sft_steps) < 0 or cycles < 1:
    raise ValueError("step counts must be >= 0 and config.cycles >= 1.")
  total = stage1_steps + stage2_steps

  def rl(stage: str, steps: int, **changes) -> Phase:
    return Phase(
      stage,
      steps,
      "rollout",
      dataclasses.replace(objective, stage=stage, **changes),
      refresh_reference=stage == "stage2" and reference == "stage1",
    )

  def share(steps: int, cycle: int) -> int:  # cycle's part of `steps`
    return steps // cycles + (cycle < steps % cycles)

  plan = {
    "score": [rl("stage1", stage1_steps), rl("stage2", stage2_steps)],
    "stage1": [rl("stage1", stage1_steps)],
    "stage2": [rl("stage2", stage2_steps)],
    "interleaved": [
      rl(stage, share(steps, c))
      for c in range(cycles)
      for stage, steps in (("stage1", stage1_steps), ("stage2", stage2_steps))
    ],
    "no_stage1": [rl("stage2", total)],
    "no_shaping": [
      rl("stage1", stage1_steps),
      rl("stage2", stage2_steps, alpha=0.0),
    ],
    "single_turn": [rl("single_turn", total)],
    # Each iteration samples from the policy of its start.
    "star": [
      Phase("star", share(total, c), "star", refresh_reference=True)
      for c in range(cycles)
    ],
    "pair_sft": [Phase("pair_sft", total, "pairs")],
  }[schedule]
  plan = [p for p in plan if p.steps > 0]
  if sft_steps:
    # The warm-started model is the base: the reference of what follows.
    plan = [Phase("sft", sft_steps, "demonstrations")] + plan
    if len(plan) > 1:
      plan[1] = dataclasses.replace(plan[1], refresh_reference=True)
  return plan


def locate(plan: list[Phase], step: int) -> tuple[Phase, int]:
  """The phase that `step` falls in.

  Args:
    plan: the phases in order (`phases`).
    step: a step, 0-based, over the whole plan.

  Returns:
    (the phase, the step its first step is).

  Raises:
    ValueError: `step` is past the plan's last step.
  """
  start = 0
  for phase in plan:
    if step < start + phase.steps:
      return phase, start
    start += phase.steps
  raise ValueError(f"step {step} is past the schedule's {start} steps.")
