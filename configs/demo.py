r"""The CPU demo: the bundled arithmetic task and a ~3M-parameter model.

Command:
  python -m score_jax.main --config=configs/demo.py --workdir=/tmp/score_demo
  python -m score_jax.main --config=configs/demo.py:quick --workdir=/tmp/q

Expected runtime on 2 CPU cores: about 1 minute (`:quick` about 20 seconds).
Expected result: the two-attempt evaluation of the (still untrained) demo model
on held-out arithmetic problems, written to WORKDIR/eval/<step>/: accuracy near
0 on both attempts, since no training stage exists yet, plus the transcripts.
"""

from configs import common


def get_config(arg=None):
  config = common.base_config()
  config.task.levels = (1, 2, 3, 4)
  config.task.num_train = 20_000
  config.task.num_validation = 500
  config.task.num_test = 1_000
  config.rollout.max_attempt_len = 80
  config.eval.num_examples = 256
  if arg == "quick":
    config.eval.num_examples = 32
    config.eval.batch_size = 32
  elif arg is not None:
    raise ValueError(f"configs/demo.py takes no argument or 'quick', not "
                     f"{arg!r}.")
  return config
