"""Timing of jitted functions, and the machine's limits measured in the same
run.

The limits are the roofline that the benchmarks compare against: memory
bandwidth (bytes read per second by a jitted reduction or matrix-vector product
over an array much larger than any cache) and the dense matmul rate (FLOP/s of a
jitted square matmul), both on the default device. They are peaks, so they take
the fastest of several calls (other work on the machine only ever slows a call
down); benchmark timings take the median.
"""

import os
import platform
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import jaxlib
from absl import logging


def compile_and_time(fn: Callable, *args, repeats: int) -> tuple[dict, Any]:
  """Compiles `jax.jit(fn)` for `args`, makes one warm-up call, then times
  `repeats` calls to completion. Compilation never counts in the timings.

  Returns ({median_s, all_s, compile_s}, the last call's output).
  """
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - start
  output = jax.block_until_ready(compiled(*args))
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    output = jax.block_until_ready(compiled(*args))
    seconds.append(time.perf_counter() - start)
  return {
    "median_s": statistics.median(seconds),
    "all_s": seconds,
    "compile_s": compile_s,
  }, output


def memory_bandwidth(num_bytes: int = 2**29, repeats: int = 10) -> dict:
  """Bytes read per second from a float32 array of `num_bytes` (keep it far
  above the last-level cache): the faster of a jitted sum and a jitted
  matrix-vector product (the kernel of a batch-1 decode step), each at its
  fastest call."""
  x = jnp.ones((num_bytes // 4,), jnp.float32)
  matrix = x.reshape(-1, 4096)
  vector = jnp.ones((4096,), jnp.float32)
  rates = {}
  for name, fn, args in (
    ("sum", jnp.sum, (x,)),
    ("matvec", jnp.matmul, (matrix, vector)),
  ):
    timing, _ = compile_and_time(fn, *args, repeats=repeats)
    rates[name] = x.nbytes / min(timing["all_s"])
  return {
    "bytes_per_s": max(rates.values()),
    "by_kernel": rates,
    "array_bytes": x.nbytes,
    "method": "bytes read / fastest s, the faster of a jitted sum and a "
    "jitted [n, 4096] @ [4096] over a float32 array",
  }


def matmul_rate(
  dtype: str = "float32",
  max_size: int = 16_384,
  min_seconds: float = 0.5,
  repeats: int = 5,
) -> dict:
  """The best FLOP/s of jitted [n, n] @ [n, n] matmuls in `dtype`, doubling n
  from 1024 until one call takes `min_seconds` (small sizes underuse big
  devices; a roofline wants the peak that is reachable)."""
  best: dict[str, Any] = {"flops_per_s": 0.0}
  size = 1024
  while size <= max_size:
    a = jnp.ones((size, size), dtype)
    timing, _ = compile_and_time(jnp.matmul, a, a, repeats=repeats)
    rate = 2 * size**3 / min(timing["all_s"])
    if rate > best["flops_per_s"]:
      best = {"flops_per_s": rate, "size": size, "dtype": dtype}
    if timing["median_s"] >= min_seconds:
      break
    size *= 2
  best["method"] = (
    "jitted square matmul at default precision, 2 n^3 / "
    "fastest s, best over n = 1024, 2048, ..."
  )
  return best


def describe(command: str) -> dict:
  """The device, software and command line, for the results file."""
  devices = jax.devices()
  return {
    "command": command,
    "platform": devices[0].platform,
    "device_kind": devices[0].device_kind,
    "devices": [str(d) for d in devices],
    "devices_used": 1,
    "cpu_count": os.cpu_count(),
    # Other processes share the machine: its load explains noisy timings.
    "load_average_1m": os.getloadavg()[0],
    "processor": platform.processor() or platform.machine(),
    "jax_version": jax.__version__,
    "jaxlib_version": jaxlib.__version__,
    "python_version": platform.python_version(),
  }


def limits(dtype, quick: bool) -> dict:
  """Memory bandwidth and matmul rate, measured now, as benchmarks report
  them."""
  measured = {
    "memory": memory_bandwidth(num_bytes=2**26 if quick else 2**29),
    "matmul": matmul_rate(dtype, max_size=1024 if quick else 16_384),
  }
  logging.info(
    "memory %.1f GB/s, matmul %.1f GFLOP/s",
    measured["memory"]["bytes_per_s"] / 1e9,
    measured["matmul"]["flops_per_s"] / 1e9,
  )
  return measured


def print_targets(targets: dict) -> None:
  """One line per target: {preset: {name: {value, target, met}}}."""
  for preset, checks in targets.items():
    for name, check in checks.items():
      print(
        f"target {preset} {name}: {check['value']:.2f} "
        f"({check['target']}) {'met' if check['met'] else 'MISSED'}"
      )
