"""Multi-host training: two processes joined by jax.distributed on localhost,
two CPU devices each, train exactly as one process with the same four
devices; each process loads only its own prompts.

Run as a script, this file is one worker of such a run (see `_start`).
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 2
# Cheaper CPU compiles; every run of the comparison uses the same flags.
FAST_COMPILE = ("--xla_backend_optimization_level=0 "
                "--xla_llvm_disable_expensive_passes=true")
# Timings differ between runs; everything else must not.
TIMING = ("step_s", "rollout_s", "train_tokens_per_s", "generated_tokens_per_s",
          "device_idle_s")


def _config():
  from configs import demo
  config = demo.get_config("quick")
  config.init.path = ""
  config.model.update(num_layers=1, d_model=32, mlp_dim=64, head_dim=16)
  config.rollout.max_attempt_len = 10
  config.task.num_train = 200
  config.mesh_shape = (1, -1, 1)
  config.schedule = "stage1"
  config.stage1_steps = 2
  config.sft.steps = 0
  config.prompts_per_step = 4
  config.samples_per_prompt = 2
  config.checkpoint.every_steps = 2
  config.rewards.num_workers = 1
  config.optimizer.learning_rate = 1e-2
  return config


class _LengthParityTask:
  """The arithmetic task with a reward that a random model earns half the
  time (the parity of the response's length), so that the policy gradient
  is not zero."""

  def __init__(self, task):
    self._task = task

  def __getattr__(self, name):
    return getattr(self._task, name)

  def reward(self, response, reference):
    del reference
    return float(len(response) % 2)


def _worker(workdir: str) -> None:
  """One process of a run: train, then write its prompts and (process 0)
  the final params."""
  import jax
  from score_jax import experiment, multihost, sharding, train
  sharding.initialize_distributed(int(os.environ["JAX_NUM_PROCESSES"]) > 1)
  assert jax.device_count() == DEVICES
  exp = experiment.build(_config())
  exp.task = _LengthParityTask(exp.task)
  trainer = train.Trainer(exp, workdir)
  state = trainer.run()
  with open(os.path.join(workdir, f"prompts_{jax.process_index()}.json"),
            "w") as f:
    json.dump(trainer.own_prompts.tolist(), f)
  params = multihost.all_rows(state.params)
  if multihost.is_writer():
    np.savez(os.path.join(workdir, "params.npz"),
             **{jax.tree_util.keystr(k): v for k, v in
                jax.tree_util.tree_flatten_with_path(params)[0]})


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(workdir, num_processes: int, port: int) -> list:
  procs = []
  for process_id in range(num_processes):
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
        XLA_FLAGS=(f"--xla_force_host_platform_device_count="
                   f"{DEVICES // num_processes} {FAST_COMPILE}"),
        JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
        JAX_NUM_PROCESSES=str(num_processes), JAX_PROCESS_ID=str(process_id))
    log = open(f"{workdir}.{process_id}.log", "w")
    procs.append(subprocess.Popen(
        [sys.executable, __file__, str(workdir)], cwd=REPO, env=env,
        stdout=log, stderr=subprocess.STDOUT))
  return procs


def _metrics(workdir):
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
          for line in lines]


def test_two_processes_train_like_one(tmp_path):
  one, two = tmp_path / "one_process", tmp_path / "two_processes"
  procs = _start(one, 1, _free_port()) + _start(two, 2, _free_port())
  for i, proc in enumerate(procs):
    log = f"{one}.0.log" if i == 0 else f"{two}.{i - 1}.log"
    assert proc.wait(timeout=600) == 0, open(log).read()[-3000:]

  # Each process loaded its own half of every step's prompts.
  halves = [json.loads((two / f"prompts_{i}.json").read_text())
            for i in range(2)]
  assert sorted(halves[0] + halves[1]) == [0, 1, 2, 3]
  assert len(halves[0]) == len(halves[1]) == 2

  # The same steps, metrics (reduced over both processes' rows, written
  # once) and final params.
  metrics_one, metrics_two = _metrics(one), _metrics(two)
  assert [m["step"] for m in metrics_two] == [1, 2]
  for m1, m2 in zip(metrics_one, metrics_two):
    assert m1.keys() == m2.keys()
    for key, value in m1.items():
      if isinstance(value, str):
        assert m2[key] == value
      else:
        np.testing.assert_allclose(m2[key], value, rtol=1e-5, atol=1e-6,
                                   err_msg=key)
  assert all(m["grad_norm"] > 0 for m in metrics_one)
  assert 0 < metrics_one[0]["reward_t2"] < 1
  params_one, params_two = np.load(one / "params.npz"), np.load(
      two / "params.npz")
  assert params_one.files == params_two.files
  for name in params_one.files:
    np.testing.assert_allclose(params_two[name], params_one[name], rtol=1e-5,
                               atol=1e-6, err_msg=name)
  assert (two / "checkpoints" / "2").is_dir()


def test_local_rows_and_global_arrays_in_one_process():
  """The row bookkeeping on one process with 8 devices, where every row is
  local: blocks of rows replicated over `tensor` count once, in arrays of
  any rank (the attempt masks are [B, N, S])."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec
  from score_jax import multihost
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
  rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  x = np.arange(8 * 3).reshape(8, 3)
  np.testing.assert_array_equal(
      multihost.local_rows(multihost.to_global(x, rows)), x)
  masks = np.arange(8 * 2 * 3).reshape(8, 2, 3)
  np.testing.assert_array_equal(
      multihost.local_rows(multihost.to_global(masks, rows)), masks)
  assert multihost.process_rows(rows, 8).tolist() == list(range(8))
  assert multihost.process_groups(rows, 4, 2).tolist() == [0, 1, 2, 3]
  assert multihost.own(list("abcdefgh"), rows) == list("abcdefgh")
  rewards, failures = multihost.gather((np.ones((8, 2)), 3))
  assert rewards.shape == (8, 2) and failures.tolist() == [3]


if __name__ == "__main__":
  # A worker needs no torch, which tensorboardX imports when it is installed
  # (seconds per process).
  sys.modules["torch"] = None
  _worker(sys.argv[1])
