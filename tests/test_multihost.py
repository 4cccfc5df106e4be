"""Multi-host training: two processes joined by jax.distributed on localhost,
two CPU devices each, train exactly as one process with the same four
devices; each process loads only its own prompts. Preempted (SIGTERM to a
worker's whole process group, as launch/run.py starts it) at any point of a
step, both save the same step and stop; a damaged or half-written
checkpoint is set aside by one, both fall back to the same one; a process
killed or stopped ends the other in one line; and rerun each time, the run
ends exactly as one never stopped.

Run as a script, this file is one worker of such a run (see `_start`).
"""

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 2
# Cheaper CPU compiles; every run of the comparison uses the same flags.
FAST_COMPILE = (
  "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)


def _config(steps: int = 2):
  """The tiny run as Stage I alone, `steps` steps over every device."""
  from tests import runs

  return runs.tiny_config(
    **{
      "mesh_shape": (1, -1, 1),
      "schedule": "stage1",
      "stage1_steps": steps,
      "sft.steps": 0,
      "checkpoint.max_to_keep": 3,
      "optimizer.learning_rate": 1e-2,
      # A hung or dead process is named within seconds here.
      "hosts.step_timeout_s": 60.0,
      "hosts.heartbeat_timeout_s": 8.0,
    }
  )


def _sender(notice: str):
  """(where, call, send) of a NOTICE, "<where>:<call>:<signal>:<whom>":
  <whom> is "group", this worker's process group (as a VM's shutdown or
  Ctrl-C), or "self". Having sent it, `send` lets 2 s pass, as the half of
  a real step would: JAX's notifier looks for SIGTERM once a second, and
  these steps take a fraction of one, so that without the pause the save
  would land a few checks later than the next, wherever the machine's load
  puts it."""
  where, call, name, whom = notice.split(":")
  signum = signal.Signals[name]

  def send():
    if whom == "group":
      os.killpg(os.getpgrp(), signum)
    else:
      os.kill(os.getpid(), signum)
    time.sleep(2)

  return where, int(call), send


def _worker(workdir: str) -> None:
  """One process of a run: train (signalling as $NOTICE says), then write
  its prompts and (process 0) the final params. Ends as score_jax.main
  does: status 75 once saved on a preemption notice, a line for a failed
  process."""
  import jax

  from score_jax import (
    experiment,
    host_failures,
    multihost,
    preemption,
    sharding,
    train,
  )
  from tests import runs

  config = _config(int(os.environ["STEPS"]))
  sharding.initialize_distributed(
    int(os.environ["JAX_NUM_PROCESSES"]) > 1, config.hosts.heartbeat_timeout_s
  )
  assert jax.device_count() == DEVICES
  exp = experiment.build(config)
  flag = f"{workdir}.grade_and_notify.{jax.process_index()}"
  notice = os.environ["NOTICE"]
  where, call, send = _sender(notice) if notice else (None, 0, None)
  exp.task = runs.parity_task(exp.task, flag, send)
  trainer = train.Trainer(exp, workdir)
  if notice:
    runs.notify_on(trainer, where, call, flag, send)
  try:
    state = trainer.run()
  except preemption.Preempted as e:
    print(f"score_jax: {e}", file=sys.stderr, flush=True)
    sys.exit(preemption.EXIT_STATUS)
  except host_failures.HostFailed as e:
    host_failures.end(str(e))
  with open(
    os.path.join(workdir, f"prompts_{jax.process_index()}.json"), "w"
  ) as f:
    json.dump(trainer.own_prompts.tolist(), f)
  params = multihost.all_rows(state.params)
  if multihost.is_writer():
    np.savez(
      os.path.join(workdir, "params.npz"),
      **{
        jax.tree_util.keystr(k): v
        for k, v in jax.tree_util.tree_flatten_with_path(params)[0]
      },
    )


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch_run():
  spec = importlib.util.spec_from_file_location(
    "launch_run", os.path.join(REPO, "launch", "run.py")
  )
  sys.path.insert(0, os.path.join(REPO, "launch"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _start(
  workdir, num_processes: int, steps: int = 2, notices: dict = None
) -> list:
  """The processes of a run, each in a process group of its own with its
  shell, its log's `tee` and its reward workers, as launch/run.py starts
  them; `notices`: {process index: NOTICE}."""
  logged = _launch_run().logged
  port = _free_port()
  procs = []
  for process_id in range(num_processes):
    if os.path.exists(f"{workdir}.{process_id}.log"):  # This run's only.
      os.remove(f"{workdir}.{process_id}.log")
    env = dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      PYTHONPATH=REPO,
      STEPS=str(steps),
      NOTICE=(notices or {}).get(process_id, ""),
      XLA_FLAGS=(
        f"--xla_force_host_platform_device_count="
        f"{DEVICES // num_processes} {FAST_COMPILE}"
      ),
      JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
      JAX_NUM_PROCESSES=str(num_processes),
      JAX_PROCESS_ID=str(process_id),
    )
    command = f"{sys.executable} {__file__} {workdir}"
    procs.append(
      subprocess.Popen(
        [
          "bash",
          "-c",
          logged(command, f"{workdir}.{process_id}.log", "/dev/null"),
        ],
        cwd=REPO,
        env=env,
        start_new_session=True,
      )
    )
  return procs


def _log(workdir, process_id: int) -> str:
  with open(f"{workdir}.{process_id}.log", encoding="utf-8") as f:
    return f.read()


def test_two_processes_train_like_one(tmp_path, runs):
  one, two = tmp_path / "one_process", tmp_path / "two_processes"
  procs = _start(one, 1) + _start(two, 2)
  for i, proc in enumerate(procs):
    # The log is read once its process ended: its tee may not have begun.
    status = proc.wait(timeout=600)
    log = _log(one, 0) if i == 0 else _log(two, i - 1)
    assert status == 0, log[-3000:]

  # Each process loaded its own half of every step's prompts.
  halves = [
    json.loads((two / f"prompts_{i}.json").read_text()) for i in range(2)
  ]
  assert sorted(halves[0] + halves[1]) == [0, 1, 2, 3]
  assert len(halves[0]) == len(halves[1]) == 2

  # The same steps, metrics (reduced over both processes' rows, written
  # once) and final params.
  metrics_one, metrics_two = runs.rows(one), runs.rows(two)
  assert [m["step"] for m in metrics_two] == [1, 2]
  for m1, m2 in zip(metrics_one, metrics_two):
    assert m1.keys() == m2.keys()
    for key, value in m1.items():
      if isinstance(value, str):
        assert m2[key] == value
      else:
        np.testing.assert_allclose(
          m2[key], value, rtol=1e-5, atol=1e-6, err_msg=key
        )
  assert all(m["grad_norm"] > 0 for m in metrics_one)
  assert 0 < metrics_one[0]["reward_t2"] < 1
  params_one, params_two = (
    np.load(one / "params.npz"),
    np.load(two / "params.npz"),
  )
  assert params_one.files == params_two.files
  for name in params_one.files:
    np.testing.assert_allclose(
      params_two[name], params_one[name], rtol=1e-5, atol=1e-6, err_msg=name
    )
  # Each process recorded the checksums of the files it wrote.
  checkpoint = two / "checkpoints" / "2"
  for record in ("integrity.json", "integrity.process_1.json"):
    files = json.loads((checkpoint / record).read_text())["sha256"]
    assert files and all(
      ("process_1" in name) == record.endswith("process_1.json")
      for name in files
    )


def _saved_step(workdir, process_id: int) -> int:
  (step,) = re.findall(
    r"preempted: checkpoint (\d+) in", _log(workdir, process_id)
  )
  return int(step)


def _finished_steps(runs, workdir) -> int:
  return runs.rows(workdir)[-1]["step"]


def test_preempted_killed_and_stopped_two_process_runs_end_as_one_never_stopped(
  tmp_path, runs
):
  import jax

  from score_jax import experiment, train

  steps = 8
  straight, stopped = tmp_path / "straight", tmp_path / "stopped"
  baseline = _start(straight, 2, steps)

  # SIGTERM to one worker's process group, in turn mid-rollout, mid-grading,
  # mid-save and mid-update: both processes save the same step, the last
  # one both finished, and exit with launch/run.py's "preempted" status.
  # (A checkpoint every 2 steps; each run resumes where the last stopped.)
  for notices, saved in (
    ({1: "rollout:2:SIGTERM:group"}, 1),  # Step 2 is redone.
    ({0: "grading:2:SIGTERM:group"}, 2),  # Step 3 is redone.
    ({1: "save:1:SIGTERM:group"}, 4),  # Saving 4, after step 4.
    ({0: "update:1:SIGTERM:group"}, 5),
  ):  # Step 5 is finished.
    procs = _start(stopped, 2, steps, notices)
    codes = [proc.wait(timeout=600) for proc in procs]
    assert codes == [75, 75], (
      notices,
      _log(stopped, 0)[-3000:],
      _log(stopped, 1)[-3000:],
    )
    # (In the log: its tee outlived the notice.)
    assert [_saved_step(stopped, i) for i in range(2)] == [saved] * 2, notices
    assert _finished_steps(runs, stopped) == saved, notices

  # process 1's share of the latest checkpoint damaged: process 0 sets it
  # aside, both resume from the one before. Then process 1 stops (SIGSTOP)
  # mid-step: process 0 names it and exits.
  latest = max(int(p.name) for p in (stopped / "checkpoints").iterdir())
  shard = max(
    (stopped / "checkpoints" / str(latest) / "state" / "ocdbt.process_1").rglob(
      "d/*"
    ),
    key=lambda p: p.stat().st_size,
  )
  shard.write_bytes(shard.read_bytes()[:-1])
  procs = _start(stopped, 2, steps, {1: "rollout:1:SIGSTOP:self"})
  assert procs[0].wait(timeout=600) == 1, _log(stopped, 0)[-3000:]
  os.killpg(procs[1].pid, signal.SIGKILL)
  procs[1].wait()
  resumed = [
    re.findall(
      rf"checkpoint {latest} in .* is damaged: .*"
      r"ocdbt.process_1/d/.* differs from its checksum; "
      r"moved to .*damaged_checkpoints/\d+, resuming from "
      r"step (\d+)",
      _log(stopped, i),
    )
    for i in range(2)
  ]
  assert resumed[0] == resumed[1] and len(resumed[0]) == 1, resumed
  assert (tmp_path / "stopped" / "damaged_checkpoints" / str(latest)).is_dir()
  (line,) = [
    l
    for l in _log(stopped, 0).splitlines()
    if l.startswith("score_jax: error:")
  ]
  step = int(resumed[0][0])
  assert re.fullmatch(
    rf"score_jax: error: process 1 stopped during step "
    rf"{step + 1} \(no heartbeat for \d+ s: killed, out of "
    rf"memory, or stopped\); the last complete checkpoint is "
    rf"step {step} in .*; rerun to resume\.",
    line,
  ), line

  # The latest checkpoint misses process 1's record (it did not finish
  # it): unfinished, set aside. Then process 1 is killed (SIGKILL)
  # mid-update: process 0 names it and exits.
  latest = max(int(p.name) for p in (stopped / "checkpoints").iterdir())
  (stopped / "checkpoints" / str(latest) / "integrity.process_1.json").unlink()
  procs = _start(stopped, 2, steps, {1: "update:1:SIGKILL:self"})
  # (The shell of process 1 reports its kill: 128 + 9.)
  assert [p.wait(timeout=600) for p in procs] == [1, 137], _log(stopped, 0)[
    -3000:
  ]
  resumed = [
    re.findall(
      rf"checkpoint {latest} in .* is damaged: it has no "
      r"integrity record of process 1 .*, resuming from "
      r"step (\d+)",
      _log(stopped, i),
    )
    for i in range(2)
  ]
  assert resumed[0] == resumed[1] and len(resumed[0]) == 1, resumed
  step = int(resumed[0][0])
  assert re.search(
    rf"score_jax: error: process 1 stopped during step "
    rf"{step + 1} .*the last complete checkpoint is step "
    rf"{step} ",
    _log(stopped, 0),
  )

  # Rerun to the end: as if never stopped.
  procs = _start(stopped, 2, steps)
  for proc in baseline + procs:
    assert proc.wait(timeout=600) == 0, _log(stopped, 0)[-3000:]
  exp = experiment.build(_config(steps), jax.devices()[:1])
  (state, data, kept, best), (state_0, data_0, kept_0, best_0) = (
    runs.final(train.Trainer(exp, str(stopped))),
    runs.final(train.Trainer(exp, str(straight))),
  )
  jax.tree.map(np.testing.assert_array_equal, state, state_0)
  assert data == data_0 and int(state.step) == steps
  assert runs.rows(stopped) == runs.rows(straight)
  assert (kept, best) == (kept_0, best_0) and best is not None


# Two processes at the checks of step 5; process 1 hangs (its threads, its
# heartbeat, go on) before the second.
_HUNG = """
import sys, time
import jax
from score_jax import host_failures, sharding
sharding.initialize_distributed(True, 2.0)
with host_failures.HostWatch(3.0, 2.0, lambda: "LAST") as watch:
  watch.starting(4)
  watch.check(5, "rollout")
  if jax.process_index() == 1:
    time.sleep(60)
  try:
    watch.check(5, "update")
  except host_failures.HostFailed as e:
    host_failures.end(str(e))
"""


def test_a_hung_process_is_named_at_the_per_step_barrier():
  port = _free_port()
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", _HUNG],
      cwd=REPO,
      stderr=subprocess.PIPE,
      text=True,
      env=dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=REPO,
        JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
        JAX_NUM_PROCESSES="2",
        JAX_PROCESS_ID=str(i),
      ),
    )
    for i in range(2)
  ]
  start = time.monotonic()
  errors = [proc.communicate(timeout=120)[1] for proc in procs]
  # Both stopped well before process 1 would have woken up.
  assert time.monotonic() - start < 40, errors
  assert [proc.returncode for proc in procs][0] == 1, errors[0]
  assert procs[1].returncode != 0
  lines = [l for l in errors[0].splitlines() if l.startswith("score_jax:")]
  assert lines == [
    "score_jax: error: process 1 did not reach step 5's update within 3 s "
    "of the others (hung: a reward pool or storage that stopped "
    "answering?); LAST; rerun to resume."
  ], errors[0]


if __name__ == "__main__":
  # A worker needs no torch, which tensorboardX imports when it is installed
  # (seconds per process).
  sys.modules["torch"] = None
  _worker(sys.argv[1])
