"""README "Results": every method of the comparison on the CPU demo, then the
report, then README's "Results" section. Each method is a run of
score_jax.main in ROOT/<method>; a finished run is skipped and an interrupted
one resumes, so rerunning continues.

  python -m scripts.demo_results --root=/tmp/score_results [--variant=quick] \
      [--jobs=2]

With --jobs=N, N runs go at once, each logging to ROOT/<method>.log (on 2 CPU
cores 2 jobs finish the comparison in about 3/4 of the time of one).

README.md's block between the `results:begin` and `results:end` markers gets
ROOT/results.md (the report's table), how often each method's attempt 1
works the problem right and SCoRe's lead over it (`working_table`) and the
SCoRe run's training chart,
copied to docs/demo_score_training.svg (--noupdate_readme leaves both).

Methods: Base and Self-Refine (prompting only: the base model evaluated, the
second with a Self-Refine-style instruction), STaR (3 iterations), Pair-SFT,
SCoRe, and the ablations without Stage I, without reward shaping, and
single-turn. Every trained method gets the same step budget as SCoRe.
"""

import os
import shutil
import subprocess
import sys
import time
from typing import Optional

import numpy as np
from absl import app, flags

from score_jax import files
from score_jax.report import runs as runs_lib
from score_jax.report import stats
from score_jax.report import table as table_lib
from score_jax.tasks import arithmetic

_ROOT = flags.DEFINE_string("root", None, "Where the runs go.", required=True)
_VARIANT = flags.DEFINE_string("variant", "", "configs/demo.py's argument.")
_JOBS = flags.DEFINE_integer("jobs", 1, "How many runs go at once.")
_UPDATE_README = flags.DEFINE_bool(
  "update_readme", True, "Write the table and the chart into README.md."
)

README_BEGIN = "<!-- results:begin -->"
README_END = "<!-- results:end -->"
SELF_REFINE_INSTRUCTION = (
  "Review your previous solution line by line and find any mistakes. "
  "Then, based on what you found, write an improved solution."
)

# Inference-time scaling curves (eval/<step>/scaling.json) of these methods.
SCALING = {"eval.scaling_num_examples": 100}
# method -> (mode, --checkpoint, config overrides)
METHODS: dict[str, tuple[str, Optional[str], dict]] = {
  "base": ("eval", "base", SCALING),
  "self_refine": (
    "eval",
    "base",
    {"instruction": SELF_REFINE_INSTRUCTION, "eval.label": "Self-Refine"},
  ),
  "star": ("train", None, {"schedule": "star", "cycles": 3}),
  "pair_sft": ("train", None, {"schedule": "pair_sft"}),
  "score": ("train", None, SCALING),
  "no_stage1": ("train", None, {"schedule": "no_stage1"}),
  "no_shaping": ("train", None, {"schedule": "no_shaping"}),
  "single_turn": ("train", None, {"schedule": "single_turn"}),
}


def command(method: str, root: str, variant: str) -> list[str]:
  mode, checkpoint, overrides = METHODS[method]
  config = "configs/demo.py" + (f":{variant}" if variant else "")
  args = [
    sys.executable,
    "-m",
    "score_jax.main",
    f"--config={config}",
    f"--workdir={os.path.join(root, method)}",
    f"--mode={mode}",
    "--config.eval.base=False",
  ]
  if checkpoint:
    args.append(f"--checkpoint={checkpoint}")
  return args + [f"--config.{k}={v}" for k, v in overrides.items()]


def _done(method: str, root: str) -> bool:
  eval_dir = os.path.join(root, method, "eval")
  return os.path.isdir(eval_dir) and bool(os.listdir(eval_dir))


def run_all(
  commands: dict[str, list[str]], cwd: str, jobs: int, log_dir: str
) -> None:
  """Runs `commands` (name -> argv), `jobs` at a time, in order. With more
  than one job each writes to log_dir/<name>.log, else to the console. A
  failed run stops the others (they resume on the next call)."""
  pending, running = list(commands), {}
  try:
    while pending or running:
      while pending and len(running) < jobs:
        name = pending.pop(0)
        print(f"{name}: running", flush=True)
        log = (
          open(os.path.join(log_dir, f"{name}.log"), "w") if jobs > 1 else None
        )
        running[name] = (
          subprocess.Popen(
            commands[name],
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT if log else None,
          ),
          log,
        )
      time.sleep(0.2)
      for name, (process, log) in list(running.items()):
        if process.poll() is None:
          continue
        del running[name]
        if log:
          log.close()
        if process.returncode:
          where = f"; see {log.name}" if log else ""
          raise SystemExit(
            f"demo_results: error: {name} exited with "
            f"{process.returncode}{where}. Fix it and rerun: "
            "finished runs are skipped."
          )
        print(f"{name}: done", flush=True)
  finally:
    for process, _ in running.values():
      process.terminate()
      process.wait()


def main(argv):
  del argv
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  commands = {}
  for method in METHODS:
    if _done(method, _ROOT.value):
      print(f"{method}: done, skipped")
    else:
      commands[method] = command(method, _ROOT.value, _VARIANT.value)
  os.makedirs(_ROOT.value, exist_ok=True)
  run_all(commands, repo, _JOBS.value, _ROOT.value)
  subprocess.run(
    [sys.executable, "-m", "score_jax.report", _ROOT.value],
    cwd=repo,
    check=True,
  )
  if _UPDATE_README.value:
    update_readme(repo, _ROOT.value, _VARIANT.value)


def _working_value(response: str):
  """The value attempt 1's working ends at: its last line's right-hand side
  (the answer-first format states the answer, then works the problem)."""
  lines = response.strip().split("\n")
  return (
    arithmetic.parse_answer(lines[-1].rpartition("=")[2])
    if len(lines) > 1
    else None
  )


def working_table(root: str) -> str:
  """Per method, from its last evaluation's transcripts: how often attempt
  1's working ends at the right value, how often attempt 2 is right when it
  does (on the demo's task attempt 2 can only take its answer from that
  working, so the first caps every method's Accuracy@t2), and SCoRe's
  Accuracy@t2 minus the method's, paired over the problems both evaluated,
  with its 95% interval."""
  transcripts = {}
  for method in METHODS:
    run = os.path.join(root, method)
    evaluations = (
      runs_lib.read_run(run).evaluations if os.path.isdir(run) else []
    )
    if evaluations and evaluations[-1].transcripts:
      transcripts[method] = evaluations[-1].transcripts
  score_t2 = {
    t["problem"]: t["rewards"][1] for t in transcripts.get("score", [])
  }
  lines = [
    "| method | attempt 1's working right | attempt 2 right when it "
    "is | SCoRe's Accuracy@t2 minus the method's | n |",
    "|---|---|---|---|---|",
  ]
  for method, ts in transcripts.items():
    right = [
      _working_value(t["attempts"][0])
      == arithmetic.parse_answer(str(t["reference"]))
      for t in ts
    ]
    read = [t["rewards"][1] == 1.0 for t, r in zip(ts, right) if r]
    pairs = [
      (t["rewards"][1], score_t2[t["problem"]])
      for t in ts
      if t["problem"] in score_t2
    ]
    versus = (
      "—"
      if method == "score" or not pairs
      else table_lib.markdown_cell(
        stats.paired_difference(*np.asarray(pairs, np.float64).T), True
      )
    )
    lines.append(
      f"| {method} | {100 * np.mean(right):.1f} | "
      f"{100 * np.mean(read) if read else float('nan'):.1f} | "
      f"{versus} | {len(ts)} |"
    )
  return "\n".join(lines) + "\n"


def update_readme(repo: str, root: str, variant: str) -> None:
  """README's results block: the report's table, the working table and the
  SCoRe chart."""
  with open(os.path.join(root, "results.md"), encoding="utf-8") as f:
    table = f.read()
  table += "\n" + working_table(root)
  chart = os.path.join(root, "plots", "score_training.svg")
  shutil.copyfile(chart, os.path.join(repo, "docs", "demo_score_training.svg"))
  command = "python -m scripts.demo_results --root=DIR" + (
    f" --variant={variant}" if variant else ""
  )
  block = (
    f"{README_BEGIN}\n_Written by `{command}`._\n\n{table}\n"
    "![Training reward of attempts 1 and 2 during SCoRe's Stage I and "
    "Stage II](docs/demo_score_training.svg)\n" + README_END
  )
  path = os.path.join(repo, "README.md")
  with open(path, encoding="utf-8") as f:
    readme = f.read()
  start, end = readme.find(README_BEGIN), readme.find(README_END)
  if start < 0 or end < start:
    raise SystemExit(
      f"demo_results: error: {path} has no {README_BEGIN} ... "
      f"{README_END} block; add one where the results go."
    )
  files.write_atomic(
    path, readme[:start] + block + readme[end + len(README_END) :]
  )
  print(f"updated {path}")


if __name__ == "__main__":
  app.run(main)
