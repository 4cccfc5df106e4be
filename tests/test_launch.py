"""launch/: the gcloud commands each script prints under --dry-run, the
worker-side shell of a job, restarts after preemption, and sweeps."""

import importlib.util
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
sys.path.insert(0, LAUNCH)
import tpu_vm  # noqa: E402  (launch/ is a directory of scripts)


def _load(script):
  spec = importlib.util.spec_from_file_location(
    f"launch_{script}", os.path.join(LAUNCH, f"{script}.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


launch_run = _load("run")
SLICE = ["--name=score", "--zone=us-west4-a"]


def _dry_run(script, *args):
  """The commands `script` prints under --dry-run, split as a shell would."""
  result = subprocess.run(
    [sys.executable, os.path.join(LAUNCH, script), "--dry-run", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert result.returncode == 0, result.stderr
  return [
    shlex.split(line)
    for line in result.stdout.splitlines()
    if not line.startswith("#")
  ]


def _error(script, *args):
  result = subprocess.run(
    [sys.executable, os.path.join(LAUNCH, script), "--dry-run", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert result.returncode != 0 and not result.stdout
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"launch/{script}: error: ")
  return lines[0]


def _remote(command):
  """The bash that `gcloud ... ssh --command=...` runs on every worker."""
  assert command[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
  assert "--worker=all" in command
  (script,) = [
    a[len("--command=") :] for a in command if a.startswith("--command=")
  ]
  return script


def test_create_a_slice_or_a_queued_resource():
  direct, state = _dry_run(
    "create.py", *SLICE, "--project=proj", "--accelerator-type=v5litepod-16"
  )
  assert direct == [
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    "create",
    "score",
    "--accelerator-type=v5litepod-16",
    "--version=v2-alpha-tpuv5-lite",
    "--zone=us-west4-a",
    "--project=proj",
  ]
  assert state[:6] == [
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    "describe",
    "score",
  ]
  queued, state = _dry_run(
    "create.py",
    *SLICE,
    "--accelerator-type=v4-32",
    "--queued",
    "--spot",
    "--version=my-image",
  )
  assert queued == [
    "gcloud",
    "compute",
    "tpus",
    "queued-resources",
    "create",
    "score",
    "--node-id=score",
    "--accelerator-type=v4-32",
    "--runtime-version=my-image",
    "--spot",
    "--zone=us-west4-a",
  ]
  assert "--format=value(state.state)" in state
  assert _dry_run("delete.py", *SLICE, "--queued") == [
    [
      "gcloud",
      "compute",
      "tpus",
      "queued-resources",
      "delete",
      "score",
      "--force",
      "--quiet",
      "--zone=us-west4-a",
    ]
  ]
  assert "--accelerator-type is required" in _error("create.py", *SLICE)


def test_run_sets_up_frees_mounts_and_runs_on_every_worker():
  commands = _dry_run(
    "run.py",
    *SLICE,
    "--accelerator-type=v5litepod-16",
    "--config=configs/score_math.py",
    "--workdir=gs://bucket/runs/math",
    "--",
    "--config.task.data_dir=/data/math",
    "--config.instruction=a b",
  )
  # Then the commands of a restart after a preemption (see below).
  pack, copy, install, free, mount, job = commands[:6]
  assert pack[:2] == ["bash", "-c"] and "git ls-files" in pack[2]
  tarball = pack[2].split()[-1]
  assert copy == [
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    "scp",
    tarball,
    "score:score_jax.tar.gz",
    "--worker=all",
    "--zone=us-west4-a",
  ]
  for command in (install, free, mount, job):
    assert command[-1] == "--zone=us-west4-a"
  install = _remote(install)
  assert "pip install" in install and "-e '.[tpu]'" in install
  assert "gcsfuse" in install  # A gs:// workdir needs Cloud Storage FUSE.
  # The code sandbox: the job does not run as root.
  assert launch_run.INSTALL_BUBBLEWRAP in install
  free = _remote(free)
  assert "/dev/accel*" in free and "/dev/vfio/" in free
  assert "kill -9" in free and "libtpu_lockfile" in free
  assert "gcsfuse --implicit-dirs" in _remote(mount)
  assert _remote(mount).endswith(" bucket /gcs/bucket; }")
  job = _remote(job)
  main = shlex.split(job.split("; ")[-1])
  assert main[:3] == [
    "$HOME/.venvs/score_jax/bin/python",
    "-m",
    "score_jax.main",
  ]
  assert main[3:9] == [
    "--config=configs/score_math.py",
    "--workdir=/gcs/bucket/runs/math",
    "--mode=train",
    "--multihost",
    "--config.task.data_dir=/data/math",
    "--config.instruction=a b",
  ]
  assert "$HOME/score_jax_logs/process_$I.log" in job
  assert "agent-worker-number" in job


def test_run_with_a_local_workdir_and_no_setup():
  commands = _dry_run(
    "run.py",
    *SLICE,
    "--config=configs/demo.py:quick",
    "--workdir=/tmp/demo",
    "--mode=eval",
    "--skip-setup",
    "--",
    "--checkpoint=best",
  )
  free, job = commands  # No copy, no install, no bucket to mount.
  assert "lsof" in _remote(free)
  main = _remote(job).split("; ")[-1]
  assert (
    "-m score_jax.main --config=configs/demo.py:quick "
    "--workdir=/tmp/demo --mode=eval --multihost --checkpoint=best"
  ) in main


def test_restart_commands_are_printed():
  commands = _dry_run(
    "run.py",
    *SLICE,
    "--accelerator-type=v6e-16",
    "--config=configs/demo.py",
    "--workdir=gs://b/d",
    "--max-restarts=3",
    "--skip-setup",
  )
  verbs = [c[3:5] for c in commands if c[0] == "gcloud"]
  # The job, then: the state, and a new slice set up, then the job again.
  assert (
    verbs
    == [["tpu-vm", "ssh"]] * 3
    + [
      ["tpu-vm", "describe"],
      ["tpu-vm", "delete"],
      ["tpu-vm", "create"],
      ["tpu-vm", "describe"],
      ["tpu-vm", "scp"],
    ]
    + [["tpu-vm", "ssh"]] * 4
  )
  assert "--version=v2-alpha-tpuv6e" in commands[5]


def test_bad_run_flags_are_one_line():
  base = [*SLICE, "--config=configs/demo.py"]
  assert "absolute path" in _error("run.py", *base, "--workdir=rel/dir")
  assert "--accelerator-type too" in _error(
    "run.py", *base, "--workdir=/w", "--max-restarts=1"
  )
  assert "required: --workdir" in _error("run.py", *base)


class _ScriptedRunner(tpu_vm.Runner):
  """Runs nothing: the job exits with the given codes in turn, and the
  slice reports the given states in turn."""

  def __init__(self, job_codes, states):
    super().__init__(dry_run=False, poll_s=0)
    self.job_codes, self.states, self.commands = job_codes, states, []

  def run(self, argv):
    self.commands.append(list(argv))
    is_job = any("score_jax.main" in a for a in argv)
    return self.job_codes.pop(0) if is_job else 0

  def output(self, argv, dry_run_value):
    self.commands.append(list(argv))
    return self.states.pop(0)


def _run_args(max_restarts):
  args = launch_run.parser().parse_args(
    [
      *SLICE,
      "--accelerator-type=v5litepod-16",
      "--skip-setup",
      "--config=configs/demo.py",
      "--workdir=/w",
      f"--max-restarts={max_restarts}",
    ]
  )
  args.main_flags = []
  return args


def _verbs(commands):
  return [
    "job"
    if any("score_jax.main" in a for a in c)
    else "free"
    if any("lsof" in a for a in c)
    else c[4]
    if c[0] == "gcloud"
    else c[0]
    for c in commands
  ]


def test_a_preempted_slice_is_recreated_and_the_job_resumed():
  args = _run_args(2)
  # Preempted once: the state check finds PREEMPTED, then the new slice is
  # CREATING, then READY.
  runner = _ScriptedRunner(
    job_codes=[1, 0], states=["PREEMPTED", "CREATING", "READY"]
  )
  launch_run.run(args, runner)
  assert _verbs(runner.commands) == [
    "free",
    "job",
    "describe",
    "delete",
    "create",
    "describe",
    "describe",
    "bash",
    "scp",
    "ssh",
    "free",
    "job",
  ]
  assert runner.commands[1] == runner.commands[-1]  # The same job, resumed.


def test_a_failed_job_on_a_healthy_slice_is_rerun_then_given_up():
  args = _run_args(1)
  runner = _ScriptedRunner(job_codes=[1, 1], states=["READY", "READY"])
  with pytest.raises(tpu_vm.CommandFailed, match="failed 2 time"):
    launch_run.run(args, runner)
  assert _verbs(runner.commands) == [
    "free",
    "job",
    "describe",
    "free",
    "job",
    "describe",
  ]


def test_a_job_that_saved_on_a_preemption_notice_resumes_uncounted():
  # Exit status 75: saved and stopped. On a healthy slice the job simply
  # runs again, however often, whatever --max-restarts says.
  args = _run_args(0)
  runner = _ScriptedRunner(job_codes=[75, 75, 0], states=["READY", "READY"])
  launch_run.run(args, runner)
  assert _verbs(runner.commands) == ["free", "job", "describe"] * 2 + [
    "free",
    "job",
  ]
  # A slice that is gone is created again, which needs its type.
  args.accelerator_type = None
  runner = _ScriptedRunner(job_codes=[75], states=[None])
  with pytest.raises(
    tpu_vm.CommandFailed, match="slice score is gone: pass --accelerator-type"
  ):
    launch_run.run(args, runner)


def _fake_worker(tmp_path, process_index, exit_code):
  """A HOME and PATH in which the job's shell runs here: `curl` answers the
  process index, and the venv's python prints its arguments."""
  home = tmp_path / f"home{process_index}"
  python = home / ".venvs" / "score_jax" / "bin" / "python"
  python.parent.mkdir(parents=True)
  python.write_text(f'#!/bin/sh\necho "main $*"\nexit {exit_code}\n')
  (home / "score_jax").mkdir()
  bin_dir = tmp_path / f"bin{process_index}"
  bin_dir.mkdir()
  (bin_dir / "curl").write_text(f"#!/bin/sh\necho {process_index}\n")
  for path in (python, bin_dir / "curl"):
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
  return dict(
    os.environ, HOME=str(home), PATH=f"{bin_dir}:{os.environ['PATH']}"
  )


@pytest.mark.parametrize("process_index, exit_code", [(0, 0), (1, 3)])
def test_the_job_logs_by_process_index_and_keeps_its_exit_status(
  tmp_path, process_index, exit_code
):
  job = launch_run.job_command(
    "configs/demo.py", "/w", "train", ["--config.seed=1"]
  )
  env = _fake_worker(tmp_path, process_index, exit_code)
  result = subprocess.run(
    ["bash", "-c", job], env=env, capture_output=True, text=True, timeout=30
  )
  assert result.returncode == exit_code
  log = (
    tmp_path
    / f"home{process_index}"
    / "score_jax_logs"
    / f"process_{process_index}.log"
  ).read_text()
  assert log == (
    "main -m score_jax.main --config=configs/demo.py "
    "--workdir=/w --mode=train --multihost --config.seed=1\n"
  )
  # Only process 0 prints to the launching terminal.
  assert result.stdout == (log if process_index == 0 else "")


def test_a_preemption_notice_keeps_the_jobs_log_and_exit_status(tmp_path):
  """SIGTERM to the job's whole process group (a VM's shutdown): the
  shell waits for main, which saves, and `tee` logs it to the end."""
  job = launch_run.job_command("configs/demo.py", "/w", "train", [])
  env = _fake_worker(tmp_path, 0, 0)
  python = tmp_path / "home0" / ".venvs" / "score_jax" / "bin" / "python"
  python.write_text(  # What score_jax.main does, in miniature.
    f"#!{sys.executable}\nimport signal, sys, time\n"
    "def save(*_):\n  print('saving', flush=True)\n  time.sleep(0.3)\n"
    "  print('saved', flush=True)\n  sys.exit(75)\n"
    "signal.signal(signal.SIGTERM, save)\nprint('started', flush=True)\n"
    "while True:\n  time.sleep(0.05)\n"
  )
  log = tmp_path / "home0" / "score_jax_logs" / "process_0.log"
  worker = subprocess.Popen(
    ["bash", "-c", job],
    env=env,
    stdout=subprocess.PIPE,
    text=True,
    start_new_session=True,
  )
  deadline = time.monotonic() + 30
  while not (log.exists() and "started" in log.read_text()):
    assert time.monotonic() < deadline and worker.poll() is None
    time.sleep(0.05)
  os.killpg(worker.pid, signal.SIGTERM)
  assert worker.wait(timeout=30) == launch_run.PREEMPTED
  assert log.read_text() == "started\nsaving\nsaved\n"
  assert worker.stdout.read() == log.read_text()


def test_every_remote_command_is_valid_bash():
  tpu = tpu_vm.Slice("score", "z", accelerator_type="v5litepod-16")
  scripts = [_remote(c) for c in launch_run.setup_commands(tpu, gcs=True)[2:]]
  scripts += [
    launch_run.FREE_DEVICES,
    launch_run.mount_command("b"),
    launch_run.job_command("c.py", "/gcs/b/x y", "train", ["-x"]),
  ]
  for script in scripts:
    check = subprocess.run(
      ["bash", "-n", "-c", script], capture_output=True, text=True
    )
    assert check.returncode == 0, (script, check.stderr)


@pytest.mark.parametrize("installed", [False, True])
def test_bubblewrap_is_installed_once(tmp_path, installed):
  """The install step against stand-ins for sudo and bwrap: apt-get runs
  only where bwrap is missing, and asks for bubblewrap."""
  log = tmp_path / "sudo.log"
  stand_ins = {"sudo": f'echo "$@" >> {log}', "bwrap": "true"}
  for name in ["sudo"] + (["bwrap"] if installed else []):
    (tmp_path / name).write_text(f"#!/bin/sh\n{stand_ins[name]}\n")
    (tmp_path / name).chmod(0o755)
  result = subprocess.run(
    [shutil.which("bash"), "-c", launch_run.INSTALL_BUBBLEWRAP],
    capture_output=True,
    text=True,
    env={"PATH": str(tmp_path)},
  )
  assert result.returncode == 0, result.stderr
  calls = log.read_text().splitlines() if log.exists() else []
  if installed:
    assert calls == []
  else:
    assert [c.split()[-2:] for c in calls] == [
      ["DPkg::Lock::Timeout=600", "update"],
      ["-y", "bubblewrap"],
    ]
    assert all(c.startswith("apt-get -q") for c in calls)


SWEEP_CONFIG = """
from configs import common

def get_config(arg=None):
  config = common.base_config()
  config.seed = int(arg or 0)
  return config

def sweep(arg=None):
  return [{"objective.alpha": 0.0, "mesh_shape": (1, -1, 1)},
          {"objective.alpha": 10.0, "optimizer.learning_rate": 1e-5}]
"""


def test_sweep_expands_runs_and_prints_their_commands(tmp_path):
  config = tmp_path / "x.py"
  config.write_text(SWEEP_CONFIG)
  local = _dry_run("sweep.py", f"{config}:3", "--workdir=/sweeps/x")
  assert local == [
    [
      sys.executable,
      "-m",
      "score_jax.main",
      f"--config={config}:3",
      "--workdir=/sweeps/x/alpha=0.0-mesh_shape=_1,-1,1_",
      "--config.objective.alpha=0.0",
      "--config.mesh_shape=(1,-1,1)",
    ],
    [
      sys.executable,
      "-m",
      "score_jax.main",
      f"--config={config}:3",
      "--workdir=/sweeps/x/alpha=10.0-learning_rate=1e-05",
      "--config.objective.alpha=10.0",
      "--config.optimizer.learning_rate=1e-05",
    ],
  ]

  on_tpu = _dry_run(
    "sweep.py",
    "configs/demo.py",
    "--workdir=gs://b/s",
    *SLICE,
    "--accelerator-type=v5litepod-16",
    "--",
    "--config.eval.num_examples=10",
  )
  assert [c[1] for c in on_tpu] == ["launch/run.py"] * 3
  for i, command in enumerate(on_tpu):
    assert command[2:5] == [
      "--name=score",
      "--zone=us-west4-a",
      "--accelerator-type=v5litepod-16",
    ]
    assert command[5] == "--config=configs/demo.py"
    assert ("--skip-setup" in command) == (i > 0)  # Set up once.
    assert command[-2:] == [
      f"--config.objective.alpha={[0.0, 1.0, 10.0][i]}",
      "--config.eval.num_examples=10",
    ]
  assert on_tpu[2][6] == "--workdir=gs://b/s/alpha=10.0"


def test_bad_sweeps_are_one_line(tmp_path):
  typo = tmp_path / "typo.py"
  typo.write_text(
    SWEEP_CONFIG.replace('"objective.alpha": 10.0', '"objective.alpah": 10.0')
  )
  assert "run 1: --config.objective.alpah=10.0" in _error(
    "sweep.py", str(typo), "--workdir=/w"
  )
  wrong_type = tmp_path / "wrong_type.py"
  wrong_type.write_text(
    SWEEP_CONFIG.replace('"objective.alpha": 0.0', '"objective.alpha": "zero"')
  )
  assert "run 0: --config.objective.alpha=zero" in _error(
    "sweep.py", str(wrong_type), "--workdir=/w"
  )
  assert "defines no sweep()" in _error(
    "sweep.py", "configs/score_math.py", "--workdir=/w"
  )
  assert "no such config file" in _error(
    "sweep.py", "configs/nope.py", "--workdir=/w"
  )
