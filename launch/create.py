r"""Creates a TPU VM slice and waits until it is ready.

  python launch/create.py --name=score --zone=us-west4-a \
      --accelerator-type=v5litepod-16 [--queued] [--spot] [--dry-run]

--queued goes through a queued resource of the same name, which Cloud TPU
fills when the capacity is free (the way to get large or spot slices);
without it the slice is created at once or the command fails. The runtime
image defaults to the generation's (see --help).
"""

import tpu_vm


def run(args, runner: tpu_vm.Runner) -> None:
  tpu = tpu_vm.slice_from(args)
  runner.check(tpu.create())
  runner.wait_until_ready(tpu, args.ready_timeout_s)
  print(f"# {tpu.name} is ready", flush=True)


def parser() -> tpu_vm.Parser:
  p = tpu_vm.Parser(prog="launch/create.py", description=__doc__.split("\n")[0])
  tpu_vm.add_slice_flags(p)
  p.add_argument(
    "--ready-timeout-s",
    type=float,
    default=24 * 3600.0,
    help="How long to wait for the slice (a queued resource can "
    "wait for capacity).",
  )
  return p


if __name__ == "__main__":
  tpu_vm.main(run, parser())
