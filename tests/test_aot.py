"""--mode=aot: the rollout and the train step compiled for a device set
without running them, their memory per device, and TPU slice names."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import demo
from score_jax import aot
from score_jax import experiment
from score_jax import sharding
from score_jax import train_step as train_step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
FLAGS = ["--config.model.num_layers=1", "--config.model.d_model=32",
         "--config.model.mlp_dim=64", "--config.model.head_dim=16",
         "--config.rollout.max_attempt_len=10", "--config.init.path=",
         "--config.prompts_per_step=4", "--config.samples_per_prompt=2"]


def _config():
  config = demo.get_config("quick")
  config.init.path = ""
  config.model.update(num_layers=1, d_model=32, mlp_dim=64, head_dim=16)
  config.rollout.max_attempt_len = 10
  config.prompts_per_step, config.samples_per_prompt = 4, 2
  return config


def _bytes(tree):
  return sum(sharding.bytes_per_device(x) for x in jax.tree.leaves(tree))


def _check_accounting(report, config, devices):
  """The compiled programs' arguments are exactly the sharded state,
  reference and batch (or params and prompts) counted from real arrays."""
  exp = experiment.build(config, devices)
  optimizer, _ = train_step_lib.make_optimizer(config.optimizer, 10)
  state, _ = train_step_lib.init_state(exp.model, optimizer,
                                       exp.param_shardings, config.seed)
  shards = exp.batch_shards
  rows, slots, attempts = report["episodes_per_step"], report[
      "episode_len"], config.rollout.num_attempts
  # tokens int32, valid bool, attempt_mask bool, log-probs f32, rewards f32.
  batch = rows // shards * (4 * slots + slots + attempts * slots + 4 * slots
                            + 4 * attempts)
  prompts = rows // shards * report["prompt_len"] * (4 + 1)
  key = 8  # A threefry key: two uint32.
  step, rollout = report["train_step"], report["rollout"]
  assert step["arguments"] == _bytes(state) + _bytes(state.params) + batch
  assert rollout["arguments"] == _bytes(state.params) + prompts + key
  # The state is donated: the new one is written over it.
  assert step["aliased"] == _bytes(state)
  assert report["peak_bytes_per_device"] == max(
      step["total"], rollout["total"] + _bytes(state.opt_state)
      + _bytes(state.params))
  return _bytes(state)


def test_aot_mode_compiles_for_the_local_devices_and_reports_memory(
    tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "score_jax.main", "--config=configs/demo.py:quick",
       "--mode=aot", f"--workdir={tmp_path}", *FLAGS],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
          "--xla_force_host_platform_device_count=2 "
          "--xla_backend_optimization_level=0")))
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  assert lines[0].startswith("local: 2 x cpu on 1 host(s), mesh {'data': 1, "
                             "'fsdp': 2, 'tensor': 1}")
  assert lines[1].split()[0] == "rollout" and lines[2].split()[0] == (
      "train_step")
  assert lines[3].startswith("  peak per device ")
  report = json.loads((tmp_path / "aot" / "local.json").read_text())
  for name in ("rollout", "train_step"):
    assert report[name]["temporaries"] > 0
  state_bytes = _check_accounting(report, _config(), jax.devices()[:2])
  # Sharded over fsdp=2, a device holds about half the state.
  assert state_bytes < 0.6 * report["params"] * 4 * 3


@pytest.mark.parametrize("name, expected", [
    ("v5e-16", ("v5e:4x4", {})),
    ("v5litepod-8", ("v5e:2x4", {"chips_per_host_bounds": (2, 4, 1)})),
    ("v6e-4", ("v6e:2x2", {"chips_per_host_bounds": (2, 2, 1)})),
    ("v4-32", ("v4:2x2x4", {"chip_config_name": "megacore"})),
    ("v5p-128", ("v5:4x4x4", {"chip_config_name": "megacore"})),
    ("v5e:8x8", ("v5e:8x8", {})),
])
def test_slice_names(name, expected):
  assert aot.topology_options(name) == expected


@pytest.mark.parametrize("name", ["v5e-12", "v4-6", "tpu", "v5e-16x"])
def test_unknown_slice_names(name):
  with pytest.raises(ValueError, match=f"--topology={name}: "):
    aot.topology_options(name)


@pytest.mark.skipif(HAS_LIBTPU, reason="libtpu is installed")
def test_without_libtpu_the_error_says_what_to_install(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "score_jax.main", "--config=configs/demo.py",
       "--mode=aot", "--topology=v5e-16", f"--workdir={tmp_path}", *FLAGS],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode != 0
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith("score_jax: error: --topology=v5e-16: ")
  assert "pip install -e '.[tpu]'" in lines[0]


@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (pip install "
                    "-e '.[tpu]'); no TPU needed")
def test_compiles_for_a_tpu_slice_without_one():
  devices = aot.tpu_devices("v5e-16")
  config = _config()
  config.prompts_per_step = 8  # 16 episodes: one a device.
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
  params = sum(np.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
               for x, s in zip(jax.tree.leaves(shapes),
                               jax.tree.leaves(exp.param_shardings)))
  assert report["rollout"]["arguments"] > params
  assert report["train_step"]["aliased"] > 3 * params
