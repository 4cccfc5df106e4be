r"""Expands the sweep() beside a config's get_config into runs, and prints or
launches them one after another.

  python launch/sweep.py configs/demo.py:quick --workdir=/tmp/sweeps/demo
  python launch/sweep.py configs/score_math.py --workdir=gs://BUCKET/sweeps \
      --name=score --zone=us-west4-a --accelerator-type=v5litepod-16 \
      -- --config.task.data_dir=/data/math

A config file may define, beside get_config(arg), sweep(arg) returning a
list of {field: value} dicts, one a run, each field a dotted config path:
`[{"objective.alpha": a} for a in (0.0, 10.0)]`. A run is named by its
overrides (`alpha=0.0`), writes to WORKDIR/<name>, and runs
`python -m score_jax.main` on this machine or, with --name, `launch/run.py`
on that TPU slice (which it sets up before the first run only). Every
override is checked against the config before anything runs, so a typo
fails at once. --dry-run prints the commands; flags after `--` go to every
run. Rerunning a sweep resumes each run from its workdir.
"""

import dataclasses
import importlib.util
import os
import re
import sys
from typing import Any

import tpu_vm


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  workdir: str
  overrides: dict

  def flags(self) -> list[str]:
    return [f"--config.{k}={flag_value(v)}" for k, v in self.overrides.items()]


def flag_value(value: Any) -> str:
  """`value` as --config.x= takes it."""
  if isinstance(value, (tuple, list)):
    items = ",".join(flag_value(v) for v in value)
    return f"({items},)" if len(value) == 1 else f"({items})"
  return str(value)


def load(spec: str):
  """The config module of `spec` (path[:arg]) and the arg."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ValueError(f"{path}: no such config file.")
  sys.path.insert(0, tpu_vm.REPO)  # Configs import configs.common.
  module_spec = importlib.util.spec_from_file_location("swept_config", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except (ImportError, SyntaxError, NameError) as e:
    raise ValueError(f"{path}: {e}") from None
  if not hasattr(module, "sweep"):
    raise ValueError(
      f"{path} defines no sweep(); add sweep(arg=None) "
      "returning a list of {field: value} overrides."
    )
  return module, arg or None


def _name(overrides: dict) -> str:
  leaves = [k.rsplit(".", 1)[-1] for k in overrides]
  keys = leaves if len(set(leaves)) == len(leaves) else list(overrides)
  name = "-".join(
    f"{k}={flag_value(v)}" for k, v in zip(keys, overrides.values())
  )
  return re.sub(r"[^A-Za-z0-9._=,+-]", "_", name) or "default"


def _check(config, overrides: dict, index: int) -> None:
  """Sets each override on a locked copy of the config: an unknown field or
  a value of the wrong type raises, as --config.x=y would."""
  config = config.copy_and_resolve_references()
  config.lock()
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    try:
      node = config
      for parent in parents:
        node = node[parent]
      setattr(node, leaf, value)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
      raise ValueError(
        f"sweep() run {index}: --config.{key}={flag_value(value)}: {e}"
      ) from None


def expand(spec: str, workdir: str) -> list[Run]:
  module, arg = load(spec)
  config = module.get_config(arg)
  runs = []
  for index, overrides in enumerate(module.sweep(arg)):
    _check(config, overrides, index)
    name = _name(overrides)
    runs.append(Run(name, f"{workdir.rstrip('/')}/{name}", dict(overrides)))
  names = [r.name for r in runs]
  if len(set(names)) != len(names):
    raise ValueError(f"sweep() of {spec} repeats a run: {names}.")
  return runs


def command(args, run: Run, first: bool) -> list[str]:
  if not args.name:
    return [
      sys.executable,
      "-m",
      "score_jax.main",
      f"--config={args.config}",
      f"--workdir={run.workdir}",
      *run.flags(),
      *args.main_flags,
    ]
  slice_flags = (
    [f"--name={args.name}", f"--zone={args.zone}"]
    + [
      f"--{flag.replace('_', '-')}={getattr(args, flag)}"
      for flag in ("project", "accelerator_type", "version", "max_restarts")
      if getattr(args, flag)
    ]
    + [f"--{flag}" for flag in ("queued", "spot") if getattr(args, flag)]
  )
  return [
    sys.executable,
    "launch/run.py",
    *slice_flags,
    f"--config={args.config}",
    f"--workdir={run.workdir}",
    *([] if first else ["--skip-setup"]),
    "--",
    *run.flags(),
    *args.main_flags,
  ]


def run(args, runner: tpu_vm.Runner) -> None:
  if args.name and not args.zone:
    raise ValueError("--name runs the sweep on a TPU slice: pass --zone too.")
  if args.name and os.path.isabs(args.config.partition(":")[0]):
    raise ValueError(
      "on a TPU slice the config must be a path relative to "
      "the repository root, which is what is copied there."
    )
  runs = expand(args.config, args.workdir)
  print(f"# {len(runs)} runs of {args.config}", flush=True)
  failed = []
  for index, one in enumerate(runs):
    print(f"# {one.name}: {one.overrides} -> {one.workdir}", flush=True)
    if runner.run(command(args, one, first=index == 0)):
      failed.append(one.name)
  if failed:
    raise tpu_vm.CommandFailed(
      f"{len(failed)} of {len(runs)} runs failed: {failed}"
    )


def parser() -> tpu_vm.Parser:
  p = tpu_vm.Parser(prog="launch/sweep.py", description=__doc__.split("\n")[0])
  p.add_argument("config", help="configs/x.py[:arg], defining sweep().")
  p.add_argument(
    "--workdir", required=True, help="Each run writes to WORKDIR/<run name>."
  )
  p.add_argument(
    "--dry-run",
    action="store_true",
    help="Print the commands; run none of them.",
  )
  tpu = p.add_argument_group("on a TPU slice (see launch/run.py)")
  tpu.add_argument("--name", help="The slice; without it runs go here.")
  tpu.add_argument("--zone")
  tpu.add_argument("--project")
  tpu.add_argument("--accelerator-type")
  tpu.add_argument("--version")
  tpu.add_argument("--queued", action="store_true")
  tpu.add_argument("--spot", action="store_true")
  tpu.add_argument("--max-restarts", type=int, default=0)
  return p


if __name__ == "__main__":
  tpu_vm.main(run, parser(), passthrough=True)
