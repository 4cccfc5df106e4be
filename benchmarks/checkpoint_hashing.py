"""Checkpoint integrity: sha256 throughput measured here, and what hashing
costs the Gemma 2 2B config's run, projected.

  python -m benchmarks.checkpoint_hashing     # from the repository root;
                                              # writes benchmarks/results/
                                              # checkpoint_hashing.json
  python -m benchmarks.checkpoint_hashing --quick --output=/tmp/h.json

Measured: files of random bytes (checkpoint-sized: Orbax's OCDBT data files
run to hundreds of MB) hashed as integrity.py hashes a process's files
after a save, by one thread and by its thread pool, the median of a few
rounds. The files were just written, so they are read from the page cache:
this is the hashing rate, not a disk's.

Projected, per slice of configs/score_math_gemma2_2b.py: each process
hashes the files it wrote, its share of the checkpoint (the train state:
float32 params and Adam's two moments; the reference in the compute dtype),
reading them back through Cloud Storage FUSE. A process reads and hashes
at the lower of --fuse_read_gbps (an assumption, since no bucket is
reachable here: Cloud Storage FUSE's own benchmark reads 13 GB/s with 10
jobs on one VM, docs/benchmarks.md of GoogleCloudPlatform/gcsfuse; the
default is an order of magnitude below) and the hashing rate, which is the
one-thread rate times the pool's threads (a TPU VM host has over a hundred
vCPUs) and, at worst, the one-thread rate. Target (the preemption issue):
at most 1% of the run's time at a 20 s step, a checkpoint every
config.checkpoint.every_steps steps. The records are written in the
background while training goes on, so this is an upper bound on what
training waits.
"""

import json
import os
import statistics
import tempfile
import time
from typing import Any

import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import machine
from configs import score_math_gemma2_2b
from score_jax import files, integrity
from score_jax.models import presets

_DEFAULT_OUTPUT = os.path.join(
  os.path.dirname(__file__), "results", "checkpoint_hashing.json"
)
_OUTPUT = flags.DEFINE_string(
  "output",
  None,
  f"JSON path; default {_DEFAULT_OUTPUT} (with --quick: "
  "checkpoint_hashing_quick.json in the temp directory).",
)
_QUICK = flags.DEFINE_bool("quick", False, "A smoke run: small files.")
_FUSE_READ_GBPS = flags.DEFINE_float(
  "fuse_read_gbps",
  1.0,
  "Cloud Storage FUSE read bandwidth of one host "
  "(GB/s) that the projection assumes.",
)
_CONFIG = "configs/score_math_gemma2_2b.py:gemma,{slice}"
# Hosts of each slice the config names (4 v5e chips a host).
_HOSTS = {"v5e-16": 4, "v5e-64": 16}
_STEP_S = 20.0
_TARGET = 0.01


def _rates(directory: str, names: list[str], rounds: int) -> dict:
  """Bytes per second hashing `names`, one file after another (one
  thread) and as integrity.py does (its pool), medians of `rounds`."""
  total = sum(os.path.getsize(os.path.join(directory, n)) for n in names)
  timed = {"one_thread": [], "pool": []}
  for _ in range(rounds):
    start = time.perf_counter()
    one = {n: integrity.sha256(os.path.join(directory, n)) for n in names}
    timed["one_thread"].append(time.perf_counter() - start)
    start = time.perf_counter()
    pooled = integrity.checksums(directory)
    timed["pool"].append(time.perf_counter() - start)
    if pooled != one:
      raise RuntimeError("the pool's checksums differ from one thread's.")
  return {
    "bytes": total,
    "files": len(names),
    "pool_threads": integrity.HASH_THREADS,
    **{
      f"{k}_bytes_per_s": total / statistics.median(v) for k, v in timed.items()
    },
    **{f"{k}_s": v for k, v in timed.items()},
  }


def _checkpoint_bytes(slice_name: str) -> tuple[Any, int]:
  """The config for `slice_name` and the bytes of one of its checkpoints:
  float32 params and Adam's two moments, the reference in the compute
  dtype."""
  config = score_math_gemma2_2b.get_config(f"gemma,{slice_name}")
  model = presets.build_config(config.model)
  per_param = (
    3 * jnp.dtype(model.param_dtype).itemsize + jnp.dtype(model.dtype).itemsize
  )
  return config, model.num_params * per_param


def _projection(one_thread: float, threads: int) -> dict:
  fuse = _FUSE_READ_GBPS.value * 1e9
  slices = {}
  for name, hosts in _HOSTS.items():
    config, total = _checkpoint_bytes(name)
    share = total / hosts
    interval_s = config.checkpoint.every_steps * _STEP_S
    costs = {
      case: share / min(fuse, rate)
      for case, rate in (
        ("pool", one_thread * threads),
        ("one_thread", one_thread),
      )
    }
    slices[name] = {
      "config": _CONFIG.format(slice=name),
      "hosts": hosts,
      "checkpoint_bytes": total,
      "bytes_per_host": share,
      "every_steps": config.checkpoint.every_steps,
      "step_s": _STEP_S,
      "interval_s": interval_s,
      "fuse_read_bytes_per_s_assumed": fuse,
      "hash_s_per_checkpoint": costs,
      "fraction_of_run": {k: v / interval_s for k, v in costs.items()},
      # Before: process 0 read every file of the checkpoint back.
      "process_0_alone_s_per_checkpoint": total / min(fuse, one_thread),
    }
  return slices


def main(argv):
  del argv
  sizes = [4 << 20] * 4 if _QUICK.value else [256 << 20] * 4 + [64 << 20] * 8
  result = machine.describe(
    " ".join(
      [
        "python -m benchmarks.checkpoint_hashing",
        *(["--quick"] if _QUICK.value else []),
      ]
    )
  )
  rng = np.random.default_rng(0)
  with tempfile.TemporaryDirectory() as directory:
    names = []
    for i, size in enumerate(sizes):
      names.append(f"d/{i:03d}")
      os.makedirs(os.path.join(directory, "d"), exist_ok=True)
      with open(os.path.join(directory, names[-1]), "wb") as f:
        f.write(rng.bytes(size))
    result["hashing"] = _rates(directory, names, 2 if _QUICK.value else 5)
  one_thread = result["hashing"]["one_thread_bytes_per_s"]
  result["projection"] = _projection(
    one_thread, result["hashing"]["pool_threads"]
  )
  result["targets"] = {
    name: {
      "hashing_fraction_of_run": {
        "value": p["fraction_of_run"]["pool"],
        "target": f"<= {_TARGET:g}",
        "met": p["fraction_of_run"]["pool"] <= _TARGET,
      }
    }
    for name, p in result["projection"].items()
  }
  print(
    f"sha256: {one_thread / 1e9:.2f} GB/s on one thread, "
    f"{result['hashing']['pool_bytes_per_s'] / 1e9:.2f} GB/s with the "
    f"pool on {os.cpu_count()} cores"
  )
  machine.print_targets(result["targets"])
  output = _OUTPUT.value or (
    os.path.join(
      os.environ.get("TMPDIR", "/tmp"), "checkpoint_hashing_quick.json"
    )
    if _QUICK.value
    else _DEFAULT_OUTPUT
  )
  files.write_atomic(output, json.dumps(result, indent=2) + "\n")
  print(f"wrote {output}")


if __name__ == "__main__":
  app.run(main)
