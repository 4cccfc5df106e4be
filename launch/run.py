r"""Runs score_jax.main on every worker of a TPU slice, through preemptions.

  python launch/run.py --name=score --zone=us-west4-a \
      --accelerator-type=v5litepod-16 --config=configs/score_math.py \
      --workdir=gs://BUCKET/score_math --max-restarts=5 \
      -- --config.task.data_dir=/path/on/the/workers

Each step is one printed command (--dry-run prints them and runs none):
  1. pack the code (git's tracked and untracked, not ignored, files) and copy
     it to every worker;
  2. install it with the `tpu` extra into a virtual environment (uv brings a
     Python that jax supports: the TPU images ship 3.10), and bubblewrap,
     the sandbox that code rewards run model-written programs in (the job
     does not run as root, so without it they refuse to start); for a gs://
     workdir, also Cloud Storage FUSE;
  3. free the TPU devices: kill the processes that still hold them (a
     previous run) and remove libtpu's lock file;
  4. for a gs:// workdir, mount the bucket at /gcs/BUCKET on every worker,
     so that checkpoints, metrics and evaluations go straight to Cloud
     Storage (and data, tokenizers and weights kept in the bucket can be
     passed as /gcs/BUCKET/... paths);
  5. run `python -m score_jax.main --multihost` on all workers at once; each
     appends its output to $HOME/score_jax_logs/process_<index>.log, and
     process 0 also prints to this terminal. A preemption notice (SIGTERM
     to every process of the worker) reaches score_jax.main, which saves
     and exits with status 75, while the shell and the log's `tee` outlive
     it: the log keeps its last lines and the job keeps its exit status.

Flags after `--` go to score_jax.main (--config.x=y, --checkpoint=best).
--skip-setup starts at step 3 (the code is already there).

Restarts: a preempted job (it exited with status 75, having saved; or the
slice was found preempted, or gone) runs again however often; a job that
failed otherwise runs again up to --max-restarts=N times. If the slice was
preempted (or is gone), it is deleted, created again (--accelerator-type is
needed) and set up from step 1 first. The job resumes from the last
checkpoint in its workdir; only a gs:// workdir survives a slice that was
created again, a local one resumes on the same VMs only.
"""

import shlex
from typing import Optional

import tpu_vm

# score_jax.main's exit status after saving on a preemption notice
# (score_jax/preemption.py; this script imports nothing of score_jax).
PREEMPTED = 75

INSTALL_GCSFUSE = (
  'command -v gcsfuse >/dev/null || { echo "deb [signed-by=/usr/share/'
  "keyrings/cloud.google.asc] https://packages.cloud.google.com/apt "
  'gcsfuse-$(lsb_release -c -s) main" | sudo tee /etc/apt/sources.list.d/'
  "gcsfuse.list >/dev/null && curl -fsSL https://packages.cloud.google.com/"
  "apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc "
  ">/dev/null && sudo apt-get update -q && sudo apt-get install -y -q "
  "gcsfuse; }"
)
# The code sandbox's isolating backend for a user who is not root
# (score_jax/tasks/sandbox.py); the lock timeout waits out the apt run of a
# freshly booted VM.
_APT = "sudo apt-get -q -o DPkg::Lock::Timeout=600"
INSTALL_BUBBLEWRAP = (
  f"command -v bwrap >/dev/null || {{ {_APT} update && "
  f"{_APT} install -y bubblewrap; }}"
)
# /dev/accel* on v4 and v5p, /dev/vfio/* on v5e and v6e.
FREE_DEVICES = (
  "sudo lsof -t /dev/accel* /dev/vfio/[0-9]* 2>/dev/null | "
  "sort -u | xargs -r sudo kill -9; "
  "sudo rm -f /tmp/libtpu_lockfile"
)


def worker_workdir(workdir: str) -> tuple[str, Optional[str]]:
  """The workdir as the job sees it on the workers, and the bucket to mount
  for a gs:// one."""
  if workdir.startswith("gs://"):
    bucket, _, path = workdir[len("gs://") :].partition("/")
    if not bucket:
      raise ValueError(f"--workdir={workdir}: name a bucket, gs://BUCKET/DIR.")
    return f"{tpu_vm.GCS_MOUNTS}/{bucket}/{path}".rstrip("/"), bucket
  if not workdir.startswith("/"):
    raise ValueError(
      f"--workdir={workdir}: use gs://BUCKET/DIR, or an "
      "absolute path on the workers (single-host slices)."
    )
  return workdir, None


def setup_commands(tpu: tpu_vm.Slice, gcs: bool) -> list[list[str]]:
  tarball = f"/tmp/score_jax-{tpu.name}.tar.gz"
  install = [
    "set -e",
    f"rm -rf {tpu_vm.CODE_DIR}",
    f"mkdir -p {tpu_vm.CODE_DIR}",
    f"tar -xzf $HOME/score_jax.tar.gz -C {tpu_vm.CODE_DIR}",
    "export PATH=$HOME/.local/bin:$PATH",
    "command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh"
    " | sh",
    f"[ -x {tpu_vm.VENV_PYTHON} ] || uv venv --python 3.11 "
    f"{tpu_vm.VENV_PYTHON.removesuffix('/bin/python')}",
    f"cd {tpu_vm.CODE_DIR}",
    f"uv pip install --python {tpu_vm.VENV_PYTHON} -e '.[tpu]'",
    INSTALL_BUBBLEWRAP,
  ] + ([INSTALL_GCSFUSE] if gcs else [])
  return [
    [
      "bash",
      "-c",
      "git ls-files -z --cached --others --exclude-standard | "
      f"tar --null -T - -czf {shlex.quote(tarball)}",
    ],
    tpu.scp(tarball, "score_jax.tar.gz"),
    tpu.ssh("; ".join(install)),
  ]


def mount_command(bucket: str) -> str:
  # --rename-dir-limit lets process 0 move a damaged checkpoint aside (saves
  # rename nothing: Orbax commits them with a marker file).
  mount = f"{tpu_vm.GCS_MOUNTS}/{bucket}"
  return (
    f"mountpoint -q {mount} || {{ sudo mkdir -p {mount} && sudo chown "
    f"$(id -u):$(id -g) {mount} && gcsfuse --implicit-dirs "
    f"--rename-dir-limit=200000 {bucket} {mount}; }}"
  )


def job_command(
  config: str, workdir: str, mode: str, main_flags: list[str]
) -> str:
  """score_jax.main on one worker, its output appended to the log named by
  the worker's process index (and shown here for process 0)."""
  main = f"{tpu_vm.VENV_PYTHON} -m score_jax.main " + shlex.join(
    [
      f"--config={config}",
      f"--workdir={workdir}",
      f"--mode={mode}",
      "--multihost",
      *main_flags,
    ]
  )
  return "; ".join(
    [
      f"I={tpu_vm.PROCESS_INDEX}",
      f"mkdir -p {tpu_vm.LOG_DIR}",
      "OUT=/dev/null",
      'if [ "$I" = 0 ]; then OUT=/dev/stdout; fi',
      f"cd {tpu_vm.CODE_DIR}",
      logged(main, f"{tpu_vm.LOG_DIR}/process_$I.log", "$OUT"),
    ]
  )


def logged(command: str, log: str, out: str) -> str:
  """Bash that runs `command` with its output appended to `log` and copied
  to `out`, and exits with its status. A SIGTERM or SIGINT to the whole
  process group (a preemption, Ctrl-C) is for `command` alone: the shell
  waits for it (a trap, which its children do not inherit) and `tee`
  ignores both, so the log gets every line `command` writes until it
  exits; `tee -p` goes on writing the log if `out` (the ssh session) is
  gone."""
  return (
    f"set -o pipefail; trap : TERM INT; {command} 2>&1 | "
    f"(trap '' TERM INT && exec tee -p -a {log}) > {out}"
  )


def recreate(
  tpu: tpu_vm.Slice, runner: tpu_vm.Runner, gcs: bool, ready_timeout_s: float
) -> None:
  """A fresh slice in place of a preempted one, with the code installed."""
  runner.run(tpu.delete())  # May fail: a preempted slice can be gone.
  runner.check(tpu.create())
  runner.wait_until_ready(tpu, ready_timeout_s)
  for command in setup_commands(tpu, gcs):
    runner.check(command)


def run(args, runner: tpu_vm.Runner) -> None:
  tpu = tpu_vm.slice_from(args)
  workdir, bucket = worker_workdir(args.workdir)
  job = job_command(args.config, workdir, args.mode, args.main_flags)
  if args.max_restarts and not args.accelerator_type:
    raise ValueError(
      "--max-restarts recreates a preempted slice: pass its "
      "--accelerator-type too."
    )
  if not args.skip_setup:
    for command in setup_commands(tpu, bucket is not None):
      runner.check(command)
  failures = 0
  while (code := _run_job(tpu, runner, bucket, job)) != 0:
    state = runner.state(tpu)
    preempted = code == PREEMPTED or state not in tpu_vm.READY
    if not preempted:
      failures += 1
    if failures > args.max_restarts:
      raise tpu_vm.CommandFailed(
        f"the job failed {failures} time(s); the logs are in "
        f"{tpu_vm.LOG_DIR} on the workers."
      )
    print(
      f"# the job {'was preempted' if preempted else 'failed'} (exit "
      f"status {code}); slice {tpu.name} is {state or 'gone'}: "
      + (
        "resuming"
        if preempted
        else f"restart {failures} of {args.max_restarts}"
      ),
      flush=True,
    )
    if state not in tpu_vm.READY:
      if not args.accelerator_type:
        raise tpu_vm.CommandFailed(
          f"slice {tpu.name} is {state or 'gone'}: pass --accelerator-type"
          " to create it again, and rerun to resume."
        )
      recreate(tpu, runner, bucket is not None, args.ready_timeout_s)
  if runner.dry_run and args.accelerator_type:
    print(
      f"# if the job is preempted (exit status {PREEMPTED}, or the slice "
      f"is), or fails (up to {args.max_restarts} times): the slice's "
      "state"
    )
    runner.state(tpu)
    print("# if it was preempted: a new slice, set up")
    recreate(tpu, runner, bucket is not None, args.ready_timeout_s)
    print("# then the job again, resuming from its workdir")
    _run_job(tpu, runner, bucket, job)


def _run_job(
  tpu: tpu_vm.Slice, runner: tpu_vm.Runner, bucket: Optional[str], job: str
) -> int:
  """Steps 3 to 5; the job's exit status."""
  runner.check(tpu.ssh(FREE_DEVICES))
  if bucket:
    runner.check(tpu.ssh(mount_command(bucket)))
  return runner.run(tpu.ssh(job))


def parser() -> tpu_vm.Parser:
  p = tpu_vm.Parser(prog="launch/run.py", description=__doc__.split("\n")[0])
  tpu_vm.add_slice_flags(p)
  p.add_argument(
    "--config",
    required=True,
    help="configs/x.py[:arg], relative to the repository root.",
  )
  p.add_argument(
    "--workdir",
    required=True,
    help="gs://BUCKET/DIR, or an absolute path on the workers.",
  )
  p.add_argument("--mode", default="train", choices=["train", "eval", "adopt"])
  p.add_argument(
    "--skip-setup",
    action="store_true",
    help="The code is installed already: start at step 3.",
  )
  p.add_argument(
    "--max-restarts",
    type=int,
    default=0,
    help="Run a failed job again up to this many times (a "
    "preempted one runs again however often, on a recreated "
    "slice if it is gone).",
  )
  p.add_argument(
    "--ready-timeout-s",
    type=float,
    default=3600.0,
    help="How long a recreated slice may take to be ready.",
  )
  return p


if __name__ == "__main__":
  tpu_vm.main(run, parser(), passthrough=True)
