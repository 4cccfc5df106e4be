"""--mode=aot: the rollout and the train step compiled for a device set
without running them, their memory per device, and TPU slice names."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from score_jax import aot, experiment, hlo_analysis, sharding
from score_jax import train_step as train_step_lib

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def _bytes(tree):
  return sum(sharding.bytes_per_device(x) for x in jax.tree.leaves(tree))


def _check_accounting(report, config, devices):
  """The compiled programs' arguments are exactly the sharded state,
  reference and batch (or params and prompts) counted from real arrays."""
  exp = experiment.build(config, devices)
  optimizer, _ = train_step_lib.make_optimizer(config.optimizer, 10)
  state, _ = train_step_lib.init_state(
    exp.model, optimizer, exp.param_shardings, config.seed
  )
  shards = exp.batch_shards
  rows, attempts = report["episodes_per_step"], config.rollout.num_attempts
  L = exp.row_len
  # Packed rows: tokens, episode ids, positions, roles int32 and the
  # sampler's log-probs f32; the reference's log-probs f32, the rewards f32
  # and the micro-batch count (an int32 on every device).
  batch = rows // shards * (5 * 4 * L + 4 * L + 4 * attempts) + 4
  # The reference reads tokens, positions and episode ids (jit drops the
  # rest).
  packed = rows // shards * 3 * 4 * L + 4
  prompts = (
    rows
    // exp.training.rollout.samples_per_prompt
    // shards
    * report["prompt_len"]
    * (4 + 1)
  )
  key = 8  # A threefry key: two uint32.
  step, rollout = report["train_step"], report["rollout"]
  reference = report["reference"]
  assert step["arguments"] == _bytes(state) + batch
  assert rollout["arguments"] == _bytes(state.params) + prompts + key
  assert reference["arguments"] == _bytes(state.params) + packed
  # The state is donated: the new one is written over it.
  assert step["aliased"] == _bytes(state)
  assert report["peak_bytes_per_device"] == max(
    step["total"],
    rollout["total"] + _bytes(state.opt_state) + _bytes(state.params),
    reference["total"] + _bytes(state.params) + _bytes(state.opt_state),
  )
  return _bytes(state)


def test_aot_mode_compiles_for_the_local_devices_and_reports_memory(
  tmp_path, repo, tiny_config, tiny_flags
):
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "score_jax.main",
      "--config=configs/demo.py:quick",
      "--mode=aot",
      f"--workdir={tmp_path}",
      *tiny_flags(),
    ],
    cwd=repo,
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      XLA_FLAGS=(
        "--xla_force_host_platform_device_count=2 "
        "--xla_backend_optimization_level=0"
      ),
    ),
  )
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  assert lines[0].startswith(
    "local: 2 x cpu on 1 host(s), mesh {'data': 1, 'fsdp': 2, 'tensor': 1}"
  )
  assert lines[1].startswith("  state per device: params ")
  programs = [
    line.split()[0]
    for line in lines
    if line.startswith("  ") and not line.startswith("   ")
  ]
  assert programs == ["state", "rollout", "reference", "train_step", "peak"], (
    lines
  )
  report = json.loads((tmp_path / "aot" / "local.json").read_text())
  for name in ("rollout", "reference", "train_step"):
    assert report[name]["temporaries"] > 0
    # The largest buffers, each named by what made it.
    buffers = report[name]["largest_buffers"]
    assert len(buffers) == 10 and all(b["label"] for b in buffers)
    assert buffers == sorted(buffers, key=lambda b: -b["bytes"])
  # The step's largest buffers hold the chunked logits, of one chunk.
  assert any(
    b["label"].startswith(("logits", "log_probs"))
    for b in report["train_step"]["largest_buffers"]
  )
  state_bytes = _check_accounting(report, tiny_config(), jax.devices()[:2])
  # Sharded over fsdp=2, a device holds about half the state.
  assert state_bytes < 0.6 * report["params"] * 4 * 3


def test_argument_labels_skip_the_arguments_jit_drops(tmp_path):
  """An argument the program never reads is not a parameter of it: the
  labels follow the kept ones."""

  def f(state, unused, batch):
    return state["w"] @ batch, state["b"]

  args = (
    {"b": np.ones(7, np.float32), "w": np.ones((64, 32), np.float32)},
    np.ones(1000, np.float32),
    np.ones((32, 16), np.float32),
  )
  lowered = jax.jit(f).lower(*args)
  compiled = lowered.compile(compiler_options={"xla_dump_to": str(tmp_path)})
  labels = aot._argument_labels(
    lowered, aot._leaf_names(state=args[0], unused=args[1], batch=args[2])
  )
  assert labels == {0: "state/b", 1: "state/w", 2: "batch"}
  assignment = next(tmp_path.glob("*buffer-assignment.txt")).read_text()
  arguments = {
    b.label: b.bytes
    for b in hlo_analysis.largest_buffers(
      assignment, compiled.as_text(), argument_labels=labels
    )
    if b.kind == "argument"
  }
  assert arguments == {
    "state/w": 64 * 32 * 4,
    "batch": 32 * 16 * 4,
    "state/b": 7 * 4,
  }


@pytest.mark.parametrize(
  "name, expected",
  [
    ("v5e-16", ("v5e:4x4", {})),
    ("v5litepod-8", ("v5e:2x4", {"chips_per_host_bounds": (2, 4, 1)})),
    ("v6e-4", ("v6e:2x2", {"chips_per_host_bounds": (2, 2, 1)})),
    ("v4-32", ("v4:2x2x4", {"chip_config_name": "megacore"})),
    ("v5p-128", ("v5:4x4x4", {"chip_config_name": "megacore"})),
    ("v5e:8x8", ("v5e:8x8", {})),
  ],
)
def test_slice_names(name, expected):
  assert aot.topology_options(name) == expected


@pytest.mark.parametrize("name", ["v5e-12", "v4-6", "tpu", "v5e-16x"])
def test_unknown_slice_names(name):
  with pytest.raises(ValueError, match=f"--topology={name}: "):
    aot.topology_options(name)


@pytest.mark.skipif(HAS_LIBTPU, reason="libtpu is installed")
def test_without_libtpu_the_error_says_what_to_install(
  tmp_path, repo, tiny_flags
):
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "score_jax.main",
      "--config=configs/demo.py",
      "--mode=aot",
      "--topology=v5e-16",
      f"--workdir={tmp_path}",
      *tiny_flags(),
    ],
    cwd=repo,
    capture_output=True,
    text=True,
    timeout=120,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert result.returncode != 0
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith("score_jax: error: --topology=v5e-16: ")
  assert "pip install -e '.[tpu]'" in lines[0]


@pytest.mark.skipif(
  not HAS_LIBTPU, reason="needs libtpu (pip install -e '.[tpu]'); no TPU needed"
)
def test_a_held_libtpu_names_its_holder(tmp_path, repo, tiny_flags):
  env = {
    k: v for k, v in os.environ.items() if k != "ALLOW_MULTIPLE_LIBTPU_LOAD"
  }
  holder = subprocess.Popen(
    [
      sys.executable,
      "-c",
      "import sys, time; from score_jax import aot; "
      "aot.tpu_devices('v5e-4'); print('ready', flush=True); time.sleep(120)",
    ],
    cwd=repo,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.DEVNULL,
    text=True,
  )
  try:
    assert holder.stdout.readline().strip() == "ready"
    result = subprocess.run(
      [
        sys.executable,
        "-m",
        "score_jax.main",
        "--config=configs/demo.py",
        "--mode=aot",
        "--topology=v5e-4",
        f"--workdir={tmp_path}",
        *tiny_flags(),
      ],
      cwd=repo,
      capture_output=True,
      text=True,
      timeout=120,
      env=env,
    )
  finally:
    holder.kill()
    holder.wait()
  lines = result.stderr.strip().splitlines()
  assert result.returncode != 0 and len(lines) == 1, result.stderr[-2000:]
  assert "libtpu is in use by another process" in lines[0]
  assert f"pid {holder.pid} (" in lines[0]
  assert "ALLOW_MULTIPLE_LIBTPU_LOAD=1" in lines[0]


@pytest.mark.skipif(
  not HAS_LIBTPU, reason="needs libtpu (pip install -e '.[tpu]'); no TPU needed"
)
def test_compiles_for_a_tpu_slice_without_one(tiny_config):
  devices = aot.tpu_devices("v5e-16")
  config = tiny_config()
  config.prompts_per_step = 8  # 16 episodes: one a device.
  config.eval.batch_size = 16
  report = aot.compile_programs(config, devices)
  assert (report["devices"], report["processes"]) == (16, 4)
  assert report["device_kind"] == "TPU v5 lite"
  assert report["mesh"] == {"data": 1, "fsdp": 16, "tensor": 1}
  assert report["hbm_bytes_per_device"] == 16 * aot.GIB
  assert report["peak_bytes_per_device"] < report["hbm_bytes_per_device"]
  # The TPU program reads the shards of the params a v5e-16 device holds
  # (padded to the TPU's tiles) and writes the new state over the old.
  exp = experiment.build(config, devices)
  shapes = jax.eval_shape(exp.model.init, jax.random.key(0))
  params = sum(
    np.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
    for x, s in zip(
      jax.tree.leaves(shapes), jax.tree.leaves(exp.param_shardings)
    )
  )
  assert report["rollout"]["arguments"] > params
  assert report["train_step"]["aliased"] > 3 * params
  # The projection: each decode loop of the worst case runs to the cap
  # (the demo's task is not MATH: no typical workload); the 2x latencies
  # and ICI cost more.
  [worst] = report["projection"]["workloads"]
  assert worst["name"] == "worst"
  assert worst["decode_trips"] == config.rollout.max_attempt_len
  one, two = worst["scales"]["1x"], worst["scales"]["2x"]
  assert 0 < one["step_seconds"] < two["step_seconds"]
  assert 0 < one["train_mfu"] <= 1 and 0 < one["rollout_hbm_share"] <= 1


def _at_depth(report: dict, config, layers: int) -> dict:
  """The peak per device of `report`'s programs (compiled at
  config.model.num_layers layers) at `layers` layers: each added layer adds
  its state (params, Adam moments, reference), the train step's gradient
  accumulator for it and its saved input twice (a rematerialised layer
  keeps only its input; the full 26-layer compile holds two such stacks,
  the scan's and the backward pass's copy), and the rollout's decode copy
  of its weights and its KV cache."""
  exp = experiment.build(config, aot.tpu_devices(report["topology"]))
  shapes = jax.eval_shape(exp.model.init, jax.random.key(0))
  per_layer = lambda shardings, bytes_per_element: (
    sum(
      np.prod(s.shard_shape(x.shape)) * bytes_per_element
      for x, s in zip(
        jax.tree.leaves(shapes["layers"]), jax.tree.leaves(shardings["layers"])
      )
    )
    / (config.model.num_layers)
  )
  compute = np.dtype(config.model.dtype).itemsize
  params = per_layer(exp.param_shardings, 4)
  reference = per_layer(exp.param_shardings, compute)
  cfg, model = config, exp.model.cfg
  shards, slots = exp.batch_shards, report["episode_len"]
  rows = cfg.prompts_per_step * cfg.samples_per_prompt
  saved_input = (
    rows // cfg.num_micro_batches // shards * slots * model.d_model * compute
  )
  tensor = exp.mesh.shape["tensor"]
  kv_cache = (
    rows
    // cfg.rollout.num_micro_batches
    // shards
    * slots
    * 2
    * max(model.num_kv_heads // tensor, 1)
    * model.head_dim
    * compute
  )
  added = layers - config.model.num_layers
  step = report["train_step"]["total"] + added * (
    params * 3 + reference + params * 2 + 2 * saved_input
  )
  rollout = report["rollout"]["total"] + added * (
    params + per_layer(exp.decode_shardings, compute) + kv_cache
  )
  resident = sum(
    report["resident_bytes_per_device"][k] for k in ("opt_state", "reference")
  ) + added * (params * 2 + reference)
  return {"train_step": step, "rollout_with_resident": rollout + resident}


@pytest.mark.skipif(
  not HAS_LIBTPU, reason="needs libtpu (pip install -e '.[tpu]'); no TPU needed"
)
def test_gemma2_2b_fits_its_v5e_slice():
  """The flagship config with Gemma 2 2B's real widths, vocabulary, attempt
  lengths and batch per device, compiled for v5e-16 at 2 of its 26 layers:
  both programs fit, extrapolated to 26 layers they stay within 85% of
  HBM, and no logits or attention buffer holds more than a device's share
  of the batch."""
  from configs import score_math_gemma2_2b

  config = score_math_gemma2_2b.get_config("gemma,v5e-16")
  assert config.model.num_layers is None  # The preset's 26.
  config.model.num_layers = 2
  report = dict(
    topology="v5e-16", **aot.compile_programs(config, aot.tpu_devices("v5e-16"))
  )
  hbm = report["hbm_bytes_per_device"]
  assert report["peak_bytes_per_device"] <= aot.FIT_FRACTION * hbm
  full = _at_depth(report, config, 26)
  assert max(full.values()) <= aot.FIT_FRACTION * hbm, {
    k: v / aot.GIB for k, v in full.items()
  }
  # A device's share: the micro-batch's rows over the batch shards, the
  # vocabulary and the heads over the tensor axis.
  tensor = report["mesh"]["tensor"]
  rows = config.prompts_per_step * config.samples_per_prompt
  share = (
    rows
    // config.num_micro_batches
    // (report["mesh"]["data"] * report["mesh"]["fsdp"])
  )
  chunk = config.model.logits_chunk_len or 512
  logits_share = share * (chunk + 8) * (256_128 // tensor) * 4
  slots = report["episode_len"]
  scores_share = share * (8 // tensor) * slots * slots * 4
  checked = 0
  for b in report["train_step"]["largest_buffers"]:
    dims = [int(d) for d in re.findall(r"\d+", b["shape"].split("[")[1])]
    # Logits (a vocabulary shard wide; the embedding's gradient is as wide
    # but d_model long) and attention scores (slots by slots).
    if 256_128 // tensor in dims and 2304 not in dims:
      assert b["bytes"] <= logits_share, b
      checked += 1
    if dims.count(slots) == 2:
      assert b["bytes"] <= scores_share, b
  assert checked  # The chunk's logits are among the largest buffers.
  for w in report["projection"]["workloads"]:
    assert w["scales"]["1x"]["step_seconds"] > 0


def test_buffers_are_reported_when_the_persistent_cache_holds_the_program(
  tmp_path, repo, tiny_flags
):
  """A second --mode=aot run with JAX's persistent compilation cache on,
  which by then holds both programs, still compiles them and reports their
  largest buffers (a cached executable comes without XLA's dump)."""
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cache"),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    XLA_FLAGS="--xla_force_host_platform_device_count=2",
  )
  for run in range(2):
    workdir = tmp_path / str(run)
    result = subprocess.run(
      [
        sys.executable,
        "-m",
        "score_jax.main",
        "--config=configs/demo.py:quick",
        "--mode=aot",
        f"--workdir={workdir}",
        *tiny_flags(),
      ],
      cwd=repo,
      capture_output=True,
      text=True,
      timeout=300,
      env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
  assert os.listdir(tmp_path / "cache")
  report = json.loads((workdir / "aot" / "local.json").read_text())
  for name in ("rollout", "train_step"):
    assert report[name]["largest_buffers"], name
