"""Reward throughput: programs graded per second in the code sandbox, and
MATH answers graded per second, through the trainer's RewardPool.

  python -m benchmarks.rewards        # from the repository root; writes
                                      # benchmarks/results/rewards.json
  python -m benchmarks.rewards --quick --output=/tmp/rewards.json  # smoke

Code: N trivial programs (`def f(): return i`, tested by `assert f() == i`),
each in its own sandboxed process with the default limits, on the backend a
CodeTask picks (the first isolating one that works; "rlimits" where none does:
the programs are the benchmark's own). Math: N responses in the paper's answer
format, graded against references that need sympy (fractions, radicals,
intervals), every call under the pool's wall-clock limit. Both time the median
of several batches after a warm-up batch, with `--workers` worker processes (the
trainer's default, config.rewards.num_workers, is 2). Target (the tasks issue):
50 or more trivial programs per second on 2 cores.
"""

import json
import os
import statistics
import time

from absl import app, flags

from benchmarks import machine
from score_jax import files
from score_jax.tasks import code, rewards
from score_jax.tasks import math as math_task

_DEFAULT_OUTPUT = os.path.join(
  os.path.dirname(__file__), "results", "rewards.json"
)
_OUTPUT = flags.DEFINE_string(
  "output",
  None,
  f"JSON path; default {_DEFAULT_OUTPUT} (with --quick: "
  "rewards_quick.json in the temp directory).",
)
_QUICK = flags.DEFINE_bool("quick", False, "A smoke run: small batches.")
_WORKERS = flags.DEFINE_integer("workers", 2, "Reward worker processes.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed batches per task.")

_MATH_PAIRS = [
  (r"\frac{1}{2}", "0.5"),
  (r"2\sqrt{2}", r"\sqrt{8}"),
  (r"[1, 3)", r"[1,3)"),
  ("x = 4", "4"),
  (r"\frac{3}{4}", "0.7"),
]
_PROGRAMS_TARGET = 50.0


def _rate(pool: rewards.RewardPool, responses, references, repeats: int):
  """Items per second (median over `repeats` batches) and the rewards."""
  pool.score(responses[:8], references[:8])  # Workers start (sandboxes too).
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    result = pool.score(responses, references)
    seconds.append(time.perf_counter() - start)
  return {
    "items_per_s": len(responses) / statistics.median(seconds),
    "batch_size": len(responses),
    "batch_s": seconds,
    "failed_calls": result.num_failed,
  }, result.rewards


def _code(n: int, repeats: int) -> dict:
  task = code.CodeTask(allow_unisolated=True)
  responses = [f"```python\ndef f():\n  return {i}\n```" for i in range(n)]
  references = [
    code.CodeAnswerKey(tests=f"assert f() == {i}") for i in range(n)
  ]
  with rewards.RewardPool(task.reward, _WORKERS.value, 10.0) as pool:
    measured, scores = _rate(pool, responses, references, repeats)
  if scores.tolist() != [1.0] * n:
    raise RuntimeError(
      "a trivial program failed in the sandbox; the "
      "benchmark measures nothing until it passes."
    )
  return {"backend": task.backend, **measured}


def _math(n: int, repeats: int) -> dict:
  task = math_task.MathTask()
  pairs = [_MATH_PAIRS[i % len(_MATH_PAIRS)] for i in range(n)]
  responses = [
    f"Final Answer: The final answer is ${p}$. I hope it is correct."
    for p, _ in pairs
  ]
  with rewards.RewardPool(task.reward, _WORKERS.value, 5.0) as pool:
    measured, scores = _rate(pool, responses, [r for _, r in pairs], repeats)
  measured["mean_reward"] = float(scores.mean())  # 4 of the 5 pairs match.
  return measured


def main(argv):
  del argv
  n = 40 if _QUICK.value else 400
  repeats = 2 if _QUICK.value else _REPEATS.value
  result = machine.describe(
    " ".join(
      ["python -m benchmarks.rewards", *(["--quick"] if _QUICK.value else [])]
    )
  )
  result.update(
    workers=_WORKERS.value, code=_code(n, repeats), math=_math(n // 4, repeats)
  )
  rate = result["code"]["items_per_s"]
  result["targets"] = {
    "code": {
      "programs_per_s": {
        "value": rate,
        "target": f">= {_PROGRAMS_TARGET:g}",
        "met": rate >= _PROGRAMS_TARGET,
      }
    }
  }
  machine.print_targets(result["targets"])
  print(f"math: {result['math']['items_per_s']:.0f} answers/s")
  output = _OUTPUT.value or (
    os.path.join(os.environ.get("TMPDIR", "/tmp"), "rewards_quick.json")
    if _QUICK.value
    else _DEFAULT_OUTPUT
  )
  files.write_atomic(output, json.dumps(result, indent=2) + "\n")
  print(f"wrote {output}")


if __name__ == "__main__":
  app.run(main)
