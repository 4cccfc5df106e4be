"""Stage schedules as data: a list of phases, each an objective and a length.

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
"""

import dataclasses
from typing import Optional

SCHEDULES = ("score", "stage1", "stage2", "interleaved", "no_stage1",
             "no_shaping", "single_turn", "star", "pair_sft")
# Phases that fine-tune on episodes sampled from the reference params.
SAMPLED_SFT = ("star", "pair_sft")


@dataclasses.dataclass(frozen=True)
class Phase:
  name: str  # "sft", an objective stage (objectives.STAGES) or SAMPLED_SFT
  steps: int
  alpha: Optional[float] = None  # overrides config.objective.alpha


def phases(schedule: str, stage1_steps: int, stage2_steps: int, cycles: int = 1,
           sft_steps: int = 0) -> list[Phase]:
  if schedule not in SCHEDULES:
    raise ValueError(f"config.schedule={schedule!r} is unknown; choose one of "
                     f"{SCHEDULES}.")
  if min(stage1_steps, stage2_steps, sft_steps) < 0 or cycles < 1:
    raise ValueError("step counts must be >= 0 and config.cycles >= 1.")
  total = stage1_steps + stage2_steps
  rl = {
      "score": [Phase("stage1", stage1_steps), Phase("stage2", stage2_steps)],
      "stage1": [Phase("stage1", stage1_steps)],
      "stage2": [Phase("stage2", stage2_steps)],
      "interleaved": [
          Phase(name, steps // cycles + (c < steps % cycles))
          for c in range(cycles)
          for name, steps in (("stage1", stage1_steps),
                              ("stage2", stage2_steps))],
      "no_stage1": [Phase("stage2", total)],
      "no_shaping": [Phase("stage1", stage1_steps),
                     Phase("stage2", stage2_steps, alpha=0.0)],
      "single_turn": [Phase("single_turn", total)],
      "star": [Phase("star", total // cycles + (c < total % cycles))
               for c in range(cycles)],
      "pair_sft": [Phase("pair_sft", total)],
  }[schedule]
  plan = [Phase("sft", sft_steps)] + rl
  return [p for p in plan if p.steps > 0]


def locate(plan: list[Phase], step: int) -> tuple[int, Phase]:
  """The phase index and phase that global step `step` (0-based) falls in."""
  start = 0
  for index, phase in enumerate(plan):
    if step < start + phase.steps:
      return index, phase
    start += phase.steps
  raise ValueError(f"step {step} is past the schedule's {start} steps.")
