"""Makes the demo's base model: supervised training on the arithmetic task's
demonstrations (configs/demo.py:base), then its params written where
configs/demo.py starts from.

  python -m scripts.make_demo_base --workdir=/tmp/demo_base \
      [--output=score_jax/assets/demo_base]

The result is committed as score_jax/assets/demo_base; rerun this after
changing the task, the tokenizer or the demo model. Its training is resumable
like any run: rerun with the same --workdir to continue after an interruption.
"""

import os
import sys

from absl import app, flags

from configs import demo
from score_jax import experiment, train
from score_jax.models import loading

_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Where the training run goes.", required=True
)
_OUTPUT = flags.DEFINE_string(
  "output", demo.BASE_PARAMS, "Where the params are written; must not exist."
)


def main(argv):
  del argv
  if os.path.exists(_OUTPUT.value):
    sys.exit(
      f"make_demo_base: error: {_OUTPUT.value} exists; remove it to "
      "replace the base model, or give another --output."
    )
  exp = experiment.build(demo.get_config("base"))
  state, _ = train.train(exp, _WORKDIR.value)
  loading.save(_OUTPUT.value, state.params)
  print(f"wrote {_OUTPUT.value}: the params after step {int(state.step)}")


if __name__ == "__main__":
  app.run(main)
