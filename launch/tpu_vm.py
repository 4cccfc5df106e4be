"""A Cloud TPU VM slice through gcloud: the commands the launch scripts run,
and a runner that runs them or, with --dry-run, only prints them.

Every command is printed before it runs, shell-quoted, so the output of
--dry-run can be pasted into a terminal as is.
"""

import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
import time
from typing import Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# On every worker: the code, its virtual environment and the per-host logs.
CODE_DIR = "$HOME/score_jax"
VENV_PYTHON = "$HOME/.venvs/score_jax/bin/python"
LOG_DIR = "$HOME/score_jax_logs"
GCS_MOUNTS = "/gcs"  # /gcs/BUCKET: a gs:// workdir's bucket, mounted.
# The worker's index in the slice; jax.distributed.initialize() takes the same
# metadata entry as the process index, so log files are named by it.
PROCESS_INDEX = (
  "$(curl -s -H Metadata-Flavor:Google http://metadata.google."
  "internal/computeMetadata/v1/instance/attributes/"
  "agent-worker-number)"
)

# The TPU software image of each generation (gcloud's --version).
RUNTIME_VERSIONS = {
  "v4": "tpu-ubuntu2204-base",
  "v5litepod": "v2-alpha-tpuv5-lite",
  "v5p": "v2-alpha-tpuv5",
  "v6e": "v2-alpha-tpuv6e",
}
# States of a slice that runs jobs, and of one still coming up.
READY = ("READY", "ACTIVE")
PENDING = (
  "CREATING",
  "STARTING",
  "PROVISIONING",
  "ACCEPTED",
  "WAITING_FOR_RESOURCES",
  "REPAIRING",
  "RESTARTING",
)


class Parser(argparse.ArgumentParser):
  """argparse with bad input reported on one line."""

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message}\n")


class CommandFailed(RuntimeError):
  pass


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU VM slice, created directly or through a queued resource of the
  same name (which Cloud TPU fills when capacity frees up)."""

  name: str
  zone: str
  project: Optional[str] = None
  accelerator_type: Optional[str] = None
  version: Optional[str] = None
  queued: bool = False
  spot: bool = False

  def _gcloud(self, *args: str) -> list[str]:
    where = [f"--zone={self.zone}"]
    if self.project:
      where.append(f"--project={self.project}")
    return ["gcloud", "compute", "tpus", *args, *where]

  def create(self) -> list[str]:
    if not self.accelerator_type:
      raise ValueError(
        "--accelerator-type is required to create a slice "
        "(for example v5litepod-16, v4-32, v6e-16)."
      )
    version = self.version or RUNTIME_VERSIONS.get(
      self.accelerator_type.split("-")[0]
    )
    if not version:
      raise ValueError(
        f"no default runtime for {self.accelerator_type}; pass --version."
      )
    spot = ["--spot"] if self.spot else []
    if self.queued:
      return self._gcloud(
        "queued-resources",
        "create",
        self.name,
        f"--node-id={self.name}",
        f"--accelerator-type={self.accelerator_type}",
        f"--runtime-version={version}",
        *spot,
      )
    return self._gcloud(
      "tpu-vm",
      "create",
      self.name,
      f"--accelerator-type={self.accelerator_type}",
      f"--version={version}",
      *spot,
    )

  def describe_state(self) -> list[str]:
    if self.queued:
      return self._gcloud(
        "queued-resources", "describe", self.name, "--format=value(state.state)"
      )
    return self._gcloud(
      "tpu-vm", "describe", self.name, "--format=value(state)"
    )

  def delete(self) -> list[str]:
    if self.queued:  # --force deletes the slice with its request.
      return self._gcloud(
        "queued-resources", "delete", self.name, "--force", "--quiet"
      )
    return self._gcloud("tpu-vm", "delete", self.name, "--quiet")

  def ssh(self, command: str) -> list[str]:
    """Runs `command` (bash) on every worker at once."""
    return self._gcloud(
      "tpu-vm", "ssh", self.name, "--worker=all", f"--command={command}"
    )

  def scp(self, local: str, remote: str) -> list[str]:
    return self._gcloud(
      "tpu-vm", "scp", local, f"{self.name}:{remote}", "--worker=all"
    )


class Runner:
  """Prints each command, then runs it unless dry_run."""

  def __init__(self, dry_run: bool, poll_s: float = 30.0):
    self.dry_run = dry_run
    self.poll_s = poll_s

  def run(self, argv: Sequence[str]) -> int:
    print(shlex.join(argv), flush=True)
    if self.dry_run:
      return 0
    return subprocess.run(list(argv), cwd=REPO).returncode

  def check(self, argv: Sequence[str]) -> None:
    code = self.run(argv)
    if code:
      raise CommandFailed(f"exit status {code}: {shlex.join(argv)}")

  def output(self, argv: Sequence[str], dry_run_value: str) -> Optional[str]:
    """The command's stdout, stripped, or None if it failed (for example,
    describing a slice that does not exist). Under dry_run: dry_run_value."""
    print(shlex.join(argv), flush=True)
    if self.dry_run:
      return dry_run_value
    result = subprocess.run(
      list(argv), cwd=REPO, capture_output=True, text=True
    )
    return result.stdout.strip() if result.returncode == 0 else None

  def state(self, tpu: Slice) -> Optional[str]:
    """The slice's state (READY, PREEMPTED, ...), None if it does not exist."""
    return self.output(
      tpu.describe_state(), "ACTIVE" if tpu.queued else "READY"
    )

  def wait_until_ready(self, tpu: Slice, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
      state = self.state(tpu)
      if state in READY:
        return
      if state not in PENDING or time.monotonic() > deadline:
        raise CommandFailed(
          f"slice {tpu.name} is {state or 'missing'}, not "
          "ready; see the commands above."
        )
      time.sleep(self.poll_s)


def add_slice_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--name", required=True, help="The slice's name.")
  parser.add_argument("--zone", required=True, help="e.g. us-west4-a.")
  parser.add_argument("--project", help="Default: gcloud's configured one.")
  parser.add_argument(
    "--accelerator-type", help="e.g. v5litepod-16, v6e-16, v4-32, v5p-64."
  )
  parser.add_argument(
    "--version",
    help="TPU runtime image; default: the "
    "generation's ("
    + ", ".join(f"{k}: {v}" for k, v in RUNTIME_VERSIONS.items())
    + ").",
  )
  parser.add_argument(
    "--queued",
    action="store_true",
    help="Go through a queued resource of the same name.",
  )
  parser.add_argument(
    "--spot",
    action="store_true",
    help="Spot capacity: cheaper, may be preempted.",
  )
  parser.add_argument(
    "--dry-run",
    action="store_true",
    help="Print the commands; run none of them.",
  )


def slice_from(args: argparse.Namespace) -> Slice:
  return Slice(
    name=args.name,
    zone=args.zone,
    project=args.project,
    accelerator_type=args.accelerator_type,
    version=args.version,
    queued=args.queued,
    spot=args.spot,
  )


def main(
  run, parser: argparse.ArgumentParser, argv=None, passthrough: bool = False
) -> None:
  """Parses flags and calls run(args, runner); failures end on one line.
  With `passthrough`, the arguments after `--` are score_jax.main's flags
  (args.main_flags)."""
  argv = sys.argv[1:] if argv is None else list(argv)
  split = argv.index("--") if "--" in argv else len(argv)
  args = parser.parse_args(argv[:split])
  args.main_flags = argv[split + 1 :]
  if args.main_flags and not passthrough:
    parser.error(f"unexpected arguments after --: {args.main_flags}")
  try:
    run(args, Runner(args.dry_run))
  except (ValueError, CommandFailed) as e:
    sys.exit(f"{parser.prog}: error: {e}")
