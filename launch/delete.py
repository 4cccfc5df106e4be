r"""Deletes a TPU VM slice (with --queued, its queued resource too).

  python launch/delete.py --name=score --zone=us-west4-a [--queued] [--dry-run]

The workdir stays: a gs:// one is in Cloud Storage, not on the slice.
"""

import tpu_vm


def run(args, runner: tpu_vm.Runner) -> None:
  runner.check(tpu_vm.slice_from(args).delete())


def parser() -> tpu_vm.Parser:
  p = tpu_vm.Parser(prog="launch/delete.py", description=__doc__.split("\n")[0])
  tpu_vm.add_slice_flags(p)
  return p


if __name__ == "__main__":
  tpu_vm.main(run, parser())
