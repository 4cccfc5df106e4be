"""README "Results": every method of the comparison on the CPU demo, then the
report. Each method is a run of score_jax.main in ROOT/<method>; a finished
run is skipped and an interrupted one resumes, so rerunning continues.

  python -m scripts.demo_results --root=/tmp/score_results [--variant=quick]

Methods: Base and Self-Refine (prompting only: the base model evaluated, the
second with a Self-Refine-style instruction), STaR (3 iterations), Pair-SFT,
SCoRe, and the ablations without Stage I, without reward shaping, and
single-turn. Every trained method gets the same step budget as SCoRe.
"""

import os
import subprocess
import sys

from absl import app
from absl import flags

_ROOT = flags.DEFINE_string("root", None, "Where the runs go.", required=True)
_VARIANT = flags.DEFINE_string("variant", "", "configs/demo.py's argument.")

SELF_REFINE_INSTRUCTION = (
    "Review your previous solution line by line and find any mistakes. "
    "Then, based on what you found, write an improved solution.")

# method -> (mode, --checkpoint, config overrides)
METHODS = {
    "base": ("eval", "base", {}),
    "self_refine": ("eval", "base", {"instruction": SELF_REFINE_INSTRUCTION,
                                     "eval.label": "Self-Refine"}),
    "star": ("train", None, {"schedule": "star", "cycles": 3}),
    "pair_sft": ("train", None, {"schedule": "pair_sft"}),
    "score": ("train", None, {}),
    "no_stage1": ("train", None, {"schedule": "no_stage1"}),
    "no_shaping": ("train", None, {"schedule": "no_shaping"}),
    "single_turn": ("train", None, {"schedule": "single_turn"}),
}


def command(method: str, root: str, variant: str) -> list[str]:
  mode, checkpoint, overrides = METHODS[method]
  config = "configs/demo.py" + (f":{variant}" if variant else "")
  args = [sys.executable, "-m", "score_jax.main", f"--config={config}",
          f"--workdir={os.path.join(root, method)}", f"--mode={mode}",
          "--config.eval.base=False"]
  if checkpoint:
    args.append(f"--checkpoint={checkpoint}")
  return args + [f"--config.{k}={v}" for k, v in overrides.items()]


def _done(method: str, root: str) -> bool:
  eval_dir = os.path.join(root, method, "eval")
  return os.path.isdir(eval_dir) and bool(os.listdir(eval_dir))


def main(argv):
  del argv
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for method in METHODS:
    if _done(method, _ROOT.value):
      print(f"{method}: done, skipped")
      continue
    print(f"{method}: running", flush=True)
    subprocess.run(command(method, _ROOT.value, _VARIANT.value), cwd=repo,
                   check=True)
  subprocess.run([sys.executable, "-m", "score_jax.report", _ROOT.value],
                 cwd=repo, check=True)


if __name__ == "__main__":
  app.run(main)
