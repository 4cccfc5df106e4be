"""The benchmarks' smoke runs (--quick) write the JSON they promise, with
timings and rooflines that are positive and consistent."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module, output):
  subprocess.run(
    [sys.executable, "-m", module, "--quick", f"--output={output}"],
    cwd=ROOT,
    check=True,
    capture_output=True,
    timeout=300,
  )
  with open(output) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def rollout_report(tmp_path_factory):
  return _run(
    "benchmarks.rollout", tmp_path_factory.mktemp("bench") / "rollout.json"
  )


def test_rollout_benchmark_writes_rooflines(rollout_report):
  limits = rollout_report["machine_limits"]
  assert (
    limits["memory"]["bytes_per_s"]
    == max(limits["memory"]["by_kernel"].values())
    > 0
  )
  assert limits["matmul"]["flops_per_s"] > 0
  (preset,) = rollout_report["presets"].values()
  (step,) = preset["decode_step"]
  assert step["step_s"] > 0
  assert step["step_over_memory_bound"] == pytest.approx(
    step["step_s"] / step["memory_bound_s"]
  )
  assert step["bytes_per_step"] == pytest.approx(
    step["params_bytes"] + step["kv_bytes_at_mean_fill"]
  )
  (roll,) = preset["rollout"]
  assert roll["generated_tokens"] == 2 * 2 * 4  # batch 2, 2 attempts, 4 each
  (no_cache,) = preset["no_cache"]
  assert no_cache["speedup"] == pytest.approx(
    no_cache["rollout_tokens_per_s"] / no_cache["no_cache_tokens_per_s"]
  )
  assert no_cache["speedup_at_roofline"] > 0


def test_train_step_benchmark_writes_flops_and_memory(tmp_path):
  report = _run("benchmarks.train_step", tmp_path / "train_step.json")
  (preset,) = report["presets"].values()
  assert preset["median_s"] > 0
  flops = preset["flops"]
  assert flops["achieved_flops_per_s"] == pytest.approx(
    flops["per_step"]["total"] / preset["median_s"]
  )
  memory = preset["memory"]["analytic"]
  assert memory["total"] == sum(v for k, v in memory.items() if k != "total")
  assert math.isfinite(preset["final_loss"])


def test_checkpoint_hashing_benchmark_projects_the_2b_run(tmp_path):
  report = _run("benchmarks.checkpoint_hashing", tmp_path / "hashing.json")
  hashing = report["hashing"]
  assert hashing["one_thread_bytes_per_s"] > 0
  assert hashing["pool_bytes_per_s"] > 0
  for name, hosts in (("v5e-16", 4), ("v5e-64", 16)):
    p = report["projection"][name]
    # Params and Adam's moments in float32, the reference in bfloat16: 14
    # bytes a parameter, of Gemma 2 2B's 2.6 billion.
    assert p["checkpoint_bytes"] % 14 == 0
    assert 2.5e9 < p["checkpoint_bytes"] / 14 < 2.7e9
    assert p["bytes_per_host"] == p["checkpoint_bytes"] / hosts
    rate = min(
      p["fuse_read_bytes_per_s_assumed"],
      hashing["one_thread_bytes_per_s"] * hashing["pool_threads"],
    )
    assert p["hash_s_per_checkpoint"]["pool"] == pytest.approx(
      p["bytes_per_host"] / rate
    )
    assert p["fraction_of_run"]["pool"] == pytest.approx(
      p["hash_s_per_checkpoint"]["pool"] / (p["every_steps"] * 20.0)
    )
    check = report["targets"][name]["hashing_fraction_of_run"]
    assert check["met"] == (check["value"] <= 0.01)
