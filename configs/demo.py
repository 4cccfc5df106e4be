r"""The CPU demo: SCoRe on the bundled arithmetic task with a tiny model.

Command:
  python -m score_jax.main --config=configs/demo.py --workdir=/tmp/score_demo
  python -m score_jax.main --config=configs/demo.py:quick --workdir=/tmp/q

Pipeline: start from the shipped base model (score_jax/assets/demo_base, made
by `python -m scripts.make_demo_base --workdir=/tmp/demo_base` with the `:base`
variant below), evaluate
it (the Base row), run SCoRe Stage I then Stage II, evaluate the result with
greedy decoding on both attempts, and write WORKDIR/report.html.

The task states answers first (`task.answer_first`): a response opens with
its final answer, the one graded, and then works the problem. The base model's
supervised warm start is on two-attempt episodes with realistic slips in both
the stated answer and the working, independently, whose second attempt
repeats the first 80% of the time (`task.demonstration_repeat_rate`). So the
base model is imperfect (a tiny model guesses an answer before working it out
badly) and its unprompted second attempt repeats its first, as the paper's
base models do, while its working is often right: a first attempt whose
working contradicts its answer holds what a second attempt needs to correct
it, and learning to read it is what SCoRe has to teach.

Variants (the argument after the colon):
  (none)  the demo: 400 RL steps of 64 episodes, 1000 test problems.
          Expected runtime on 2 CPU cores: 25 to 50 minutes (24m45s
          measured, the 400 steps at about 3 s each: 0.5 s the rollout,
          the rest the train step; plus two evaluations of 1000
          problems).
  quick   every stage, a few steps each.     Expected runtime: 1 to 4 min
          (1m15s to 1m48s measured).
  base    the base model's supervised run (scripts/make_demo_base.py,
          measured 22m10s).
Expected result: WORKDIR/eval/0/metrics.json (Base: Acc@t1 0.096, Acc@t2
0.098 measured) and WORKDIR/eval/400/metrics.json (SCoRe: Acc@t1 0.080,
Acc@t2 0.752 measured; README "Results" has the comparison and its
intervals).
"""

import os

from configs import common

BASE_PARAMS = os.path.normpath(
  os.path.join(
    os.path.dirname(os.path.abspath(__file__)),
    "..",
    "score_jax",
    "assets",
    "demo_base",
  )
)


def get_config(arg=None):
  config = common.base_config()
  config.task.levels = (0,)
  config.task.num_train = 20_000
  config.task.num_validation = 500
  config.task.num_test = 1_000
  config.task.demonstration_error_rate = 0.3
  config.task.demonstration_repeat_rate = 0.8
  config.task.answer_first = True

  config.model.preset = "demo"
  config.rollout.max_attempt_len = 64
  config.rollout.prompt_buckets = (32,)
  config.rewards.num_workers = 2

  config.init.path = BASE_PARAMS
  config.schedule = "score"
  # Chosen on the validation split (docs/demo.md lists what was tried).
  # What limits attempt 2 here is attempt 1's working: attempt 2 takes its
  # answer from it. With the paper's gamma = 0 nothing rewards that working
  # (attempt 1 is graded on the answer it states before working), so only
  # the KL holds it: Adam's b2 = 0.99 and a cosine decay keep Stage II's
  # larger shaped advantages from moving it, and beta2 = 1.0 holds it in
  # Stage I. gamma = 1 credits attempt 1 with attempt 2's plain reward, which
  # rewards right working, and beta1 = 0.05 (half the KL) lets it improve.
  config.stage1_steps = 150
  config.stage2_steps = 250
  config.prompts_per_step = 16
  config.samples_per_prompt = 4
  config.optimizer.learning_rate = 1e-4
  config.optimizer.warmup_steps = 10
  config.optimizer.b2 = 0.99
  config.optimizer.schedule = "cosine"
  config.objective.beta1 = 0.05
  config.objective.beta2 = 1.0
  config.objective.gamma = 1.0
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
    config.sft.steps = 1500
    config.sft.max_len = 176
    config.sft.learning_rate = 3e-3
    config.stage1_steps = 0
    config.stage2_steps = 0
    config.checkpoint.every_steps = 250
    config.eval.base = False
  elif arg is not None:
    raise ValueError(
      f"configs/demo.py takes no argument, 'quick' or 'base', not {arg!r}."
    )
  return config


def sweep(arg=None):
  """Stage II's reward-shaping bonus alpha (0 is the paper's "no shaping"
  ablation): python launch/sweep.py configs/demo.py --workdir=DIR"""
  del arg
  return [{"objective.alpha": alpha} for alpha in (0.0, 1.0, 10.0)]
