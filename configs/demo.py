r"""The CPU demo: SCoRe on the bundled arithmetic task with a tiny model.

Command:
  python -m score_jax.main --config=configs/demo.py --workdir=/tmp/score_demo
  python -m score_jax.main --config=configs/demo.py:quick --workdir=/tmp/q

Pipeline: start from the shipped base model (score_jax/assets/demo_base, made
by `python -m scripts.make_demo_base` with the `:base` variant below: a
supervised warm start on two-attempt episodes whose attempts are drawn
independently with realistic slips, so the base model is imperfect and its
second attempt is no better than its first), evaluate it (the Base row), run
SCoRe Stage I then Stage II, evaluate the result with greedy decoding on both
attempts, and write WORKDIR/report.html.

Variants (the argument after the colon):
  (none)  the demo: 400 RL steps of 64 episodes, 1000 test problems.
          Expected runtime on 2 CPU cores: about 10 minutes (measured 9m11s
          for training and evaluation).
  quick   every stage, a few steps each.     Expected runtime: under 3 min.
  base    the base model's supervised run (scripts/make_demo_base.py,
          measured 18m40s).
Expected result: WORKDIR/eval/0/metrics.json (Base: Acc@t1 0.866, Acc@t2
0.860 measured) and WORKDIR/eval/400/metrics.json (SCoRe: Acc@t1 0.870,
Acc@t2 0.867 measured; the self-correction gain the paper reports does not
appear at this scale, see README "Results").
"""

import os

from configs import common

BASE_PARAMS = os.path.normpath(os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "score_jax", "assets",
    "demo_base"))


def get_config(arg=None):
  config = common.base_config()
  config.task.levels = (0,)
  config.task.num_train = 20_000
  config.task.num_validation = 500
  config.task.num_test = 1_000
  config.task.demonstration_error_rate = 0.3

  config.model.preset = "demo"
  config.rollout.max_attempt_len = 64
  config.rollout.prompt_buckets = (32,)
  config.rewards.num_workers = 2

  config.init.path = BASE_PARAMS
  config.schedule = "score"
  # Tuned on the validation split (README "Results" lists what was tried).
  config.stage1_steps = 150
  config.stage2_steps = 250
  config.prompts_per_step = 16
  config.samples_per_prompt = 4
  config.optimizer.learning_rate = 1e-4
  config.optimizer.warmup_steps = 10
  config.objective.beta1 = 0.01
  config.objective.beta2 = 0.1
  config.checkpoint.every_steps = 50
  config.eval.base = True
  config.eval.num_examples = 1000
  config.eval.batch_size = 200
  if arg == "quick":
    config.stage1_steps = 4
    config.stage2_steps = 4
    config.checkpoint.every_steps = 4
    config.eval.num_examples = 64
    config.eval.batch_size = 64
  elif arg == "base":
    config.init.path = ""
    config.sft.steps = 2000
    config.sft.max_len = 176
    config.sft.learning_rate = 3e-3
    config.stage1_steps = 0
    config.stage2_steps = 0
    config.checkpoint.every_steps = 250
    config.eval.base = False
  elif arg is not None:
    raise ValueError(f"configs/demo.py takes no argument, 'quick' or 'base', "
                     f"not {arg!r}.")
  return config


def sweep(arg=None):
  """Stage II's reward-shaping bonus alpha (0 is the paper's "no shaping"
  ablation): python launch/sweep.py configs/demo.py --workdir=DIR"""
  del arg
  return [{"objective.alpha": alpha} for alpha in (0.0, 1.0, 10.0)]
