r"""Ahead-of-time check: compile the rollout and the train step for a TPU
slice without its hardware, and report the memory each device needs.

  python -m score_jax.main --config=configs/score_math.py --mode=aot \
      --topology=v5e-16 --workdir=/tmp/aot

JAX compiles for a TPU topology that is not attached
(jax.experimental.topologies); that needs libtpu (`pip install -e '.[tpu]'`)
but no TPU, so it runs on a laptop. An empty --topology compiles the same
programs for the local devices instead. The programs are the ones a run
jits: the training rollout for the largest prompt bucket and the Stage II
train step (policy and reference, both attempts), on the config's mesh.
Memory per device is XLA's analysis of each compiled program: arguments +
outputs + temporaries - what donation lets outputs reuse. The rollout runs
while the optimizer state and the reference (not its arguments) stay
resident, so the peak adds them to it. For a TPU slice, projection.py turns
the compiled programs into a step time (collectives at the ICI bandwidth,
a fixed cost an op, the host's grading) and MFU on real tokens, at two
workloads.
"""

import contextlib
import dataclasses
import glob
import importlib.metadata
import json
import os
import re
import tempfile
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.experimental import topologies
from jax.experimental.compilation_cache import compilation_cache

from score_jax import episodes as episodes_lib
from score_jax import experiment as experiment_lib
from score_jax import files, hlo_analysis, projection, sharding
from score_jax.tasks import base

GIB = 2**30

# Slice sizes -> chip layouts. v5e and v6e names count chips; v4 and v5p
# names count TensorCores, two per chip, which JAX drives as one (megacore)
# device.
_LAYOUTS_2D = {
  1: "1x1",
  4: "2x2",
  8: "2x4",
  16: "4x4",
  32: "4x8",
  64: "8x8",
  128: "8x16",
  256: "16x16",
}
_LAYOUTS_3D = {
  4: "2x2x1",
  8: "2x2x2",
  16: "2x2x4",
  32: "2x4x4",
  64: "4x4x4",
  128: "4x4x8",
  256: "4x8x8",
  512: "8x8x8",
}
# Accelerator-type prefix -> (topology family, layouts, cores per chip).
_FAMILIES = {
  "v5e": ("v5e", _LAYOUTS_2D, 1),
  "v5litepod": ("v5e", _LAYOUTS_2D, 1),
  "v6e": ("v6e", _LAYOUTS_2D, 1),
  "v4": ("v4", _LAYOUTS_3D, 2),
  "v5p": ("v5", _LAYOUTS_3D, 2),
}
# Slices of up to 8 chips sit on one host (the default is 2x2 chips a host).
_ONE_HOST = {"1x1": (1, 1, 1), "2x2": (2, 2, 1), "2x4": (2, 4, 1)}
# A config fits when its peak stays within this share of HBM: the rest is
# for XLA's runtime, fragmentation and the host transfers.
FIT_FRACTION = 0.85
# The host's measured grading throughput (python -m benchmarks.rewards).
REWARDS_BENCHMARK = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  "benchmarks",
  "results",
  "rewards.json",
)
PROGRAMS = ("rollout", "reference", "train_step")

INSTALL_HINT = (
  "install libtpu to compile for TPU topologies on this "
  "machine (no TPU needed): pip install -e '.[tpu]' (or pip "
  "install 'jax[tpu]')"
)


class TopologyUnavailable(RuntimeError):
  """The installed jax cannot compile for TPU topologies (no libtpu)."""


def topology_options(name: str) -> tuple[str, dict]:
  """`v5e-16`, `v5litepod-16`, `v6e-8`, `v4-32`, `v5p-64` (gcloud's
  accelerator types) or a layout such as `v5e:4x4` -> the topology name and
  options of jax.experimental.topologies.get_topology_desc."""
  match = re.fullmatch(r"(v5e|v5litepod|v6e|v4|v5p)-(\d+)", name)
  if match:
    family, layouts, cores = _FAMILIES[match.group(1)]
    chips, rest = divmod(int(match.group(2)), cores)
    if rest or chips not in layouts:
      raise ValueError(
        f"--topology={name}: unknown slice size; use one of "
        f"{sorted(c * cores for c in layouts)} or a layout "
        "such as v5e:4x4."
      )
    name = f"{family}:{layouts[chips]}"
  elif not re.fullmatch(r"[a-z0-9]+:\d+(x\d+){1,2}", name):
    raise ValueError(
      f"--topology={name}: use an accelerator type such as "
      "v5e-16 or v4-32, or a layout such as v5e:4x4."
    )
  family, layout = name.split(":")
  options: dict[str, Any] = (
    {"chip_config_name": "megacore"} if family in ("v4", "v5") else {}
  )
  if layout in _ONE_HOST:
    options["chips_per_host_bounds"] = _ONE_HOST[layout]
  return name, options


def tpu_devices(name: str) -> list:
  """Compile-only devices of the TPU slice `name` (see topology_options)."""
  topology, options = topology_options(name)
  try:
    return list(
      topologies.get_topology_desc(topology, platform="tpu", **options).devices
    )
  except RuntimeError as e:
    if "lockfile" in str(e):
      raise TopologyUnavailable(
        f"--topology={name}: libtpu is in use by another process "
        f"({_lock_holders()}); wait for it or stop it, or set "
        "ALLOW_MULTIPLE_LIBTPU_LOAD=1 to compile beside it."
      ) from None
    if "TPU support not installed" in str(e) or "libtpu" in str(e):
      raise TopologyUnavailable(
        f"--topology={name}: this jax cannot compile for TPUs; {INSTALL_HINT}."
      ) from None
    # A layout libtpu rejects (the size of an unknown chip, say).
    raise ValueError(f"--topology={name}: {str(e).splitlines()[0]}") from None


def _lock_holders(lock: str = "/tmp/libtpu_lockfile") -> str:
  """Which processes hold libtpu's lock file, as `pid N (command)`."""
  holders = []
  for fd in glob.glob("/proc/[0-9]*/fd/*"):
    try:
      if os.readlink(fd) != lock:
        continue
      pid = fd.split("/")[2]
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        command = f.read().replace(b"\0", b" ").decode(errors="replace")
      holders.append(f"pid {pid} ({command.strip()[:80]})")
    except OSError:
      continue
  return (
    ", ".join(sorted(set(holders)))
    if holders
    else f"its lock file {lock} is held"
  )


@dataclasses.dataclass(frozen=True)
class ProgramMemory:
  """Bytes per device of one compiled program."""

  arguments: int
  outputs: int
  temporaries: int
  aliased: int  # Outputs written over donated arguments.

  @property
  def total(self) -> int:
    """Arguments + outputs + temporaries - the outputs aliased."""
    return self.arguments + self.outputs + self.temporaries - self.aliased


class DoesNotFit(ValueError):
  """A program needs more memory than a device of the slice has."""


def _argument_labels(lowered, names: list[str]) -> dict[int, str]:
  """{HLO parameter number: the name of the argument leaf it holds}. jit
  drops arguments the program never reads; the parameters are the kept
  ones, in order."""
  kept = getattr(getattr(lowered, "_lowering", None), "compile_args", {}).get(
    "kept_var_idx"
  )
  kept = sorted(kept) if kept is not None else range(len(names))
  return {
    number: names[index] if index < len(names) else f"argument {index}"
    for number, index in enumerate(kept)
  }


def _leaf_names(**trees) -> list[str]:
  """`params/layers/q`-style names of every leaf, in jit's argument order."""
  names = []
  for prefix, tree in trees.items():
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
      keys = [
        str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
        for k in path
      ]
      names.append("/".join([prefix, *keys]))
  return names


@contextlib.contextmanager
def _compilation_cache_off():
  """The buffers come from XLA's dump of the compilation; an executable
  served by JAX's persistent compilation cache comes without one. JAX
  decides whether to use the cache once, at a process's first compile, so
  the decision is reset on the way in and out."""
  previous = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", previous)
    compilation_cache.reset_cache()


def compile_program(
  lowered, argument_names: list[str]
) -> tuple[dict, Optional[str]]:
  """Compiles `lowered` (with JAX's compilation cache off, so that XLA
  dumps its buffer assignment) and reports its memory per device.

  Args:
    lowered: the jitted program, lowered for the devices.
    argument_names: the name of each argument leaf, in jit's order
      (`_leaf_names`), to label the argument buffers.

  Returns:
    (the report: ProgramMemory's fields, its `total` and its
    `largest_buffers` (hlo_analysis.largest_buffers, as dicts); the
    optimised HLO text). XLA refuses to compile a TPU program that cannot
    fit in HBM: then the report is `does_not_fit` (the error's first line)
    and `compiler_report` (the largest allocations XLA's error lists), and
    the text is None.
  """
  with tempfile.TemporaryDirectory() as dump, _compilation_cache_off():
    try:
      compiled = lowered.compile(compiler_options={"xla_dump_to": dump})
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      return {
        "does_not_fit": str(e).splitlines()[0],
        "compiler_report": _oom_report(str(e)),
      }, None
    assignment = glob.glob(
      os.path.join(dump, "*after_optimizations-buffer-assignment.txt")
    )
    text = compiled.as_text()
    buffers = hlo_analysis.largest_buffers(
      open(assignment[-1]).read() if assignment else "",
      text,
      argument_labels=_argument_labels(lowered, argument_names),
    )
  stats = compiled.memory_analysis()
  memory = ProgramMemory(
    arguments=stats.argument_size_in_bytes,
    outputs=stats.output_size_in_bytes,
    temporaries=stats.temp_size_in_bytes,
    aliased=stats.alias_size_in_bytes,
  )
  return dict(
    dataclasses.asdict(memory),
    total=memory.total,
    largest_buffers=[dataclasses.asdict(b) for b in buffers],
  ), text


def _oom_report(message: str) -> list[str]:
  """The lines of XLA's out-of-memory error that list its largest
  allocations (shape, size, the op that made them)."""
  lines = message.splitlines()
  start = next(
    (
      i for i, line in enumerate(lines) if "Largest program allocations" in line
    ),
    None,
  )
  return (
    []
    if start is None
    else [l.strip() for l in lines[start : start + 60] if l.strip()]
  )


def compile_programs(config, devices) -> dict:
  """Compiles the training rollout, the reference's scoring and the train
  step of `config` for `devices` (local or compile-only) and reports their
  memory per device, their largest buffers and, on a TPU slice, the step
  time they imply (projection.project).

  Returns:
    The report: the slice, mesh and step's figures, a compile_program
    report under each of PROGRAMS, the resident state per device, the
    peak per device (None unless every program fits) and, where the
    programs fit on a chip of projection.CHIPS, "projection".
  """
  exp = experiment_lib.build(config, devices)
  cfg = exp.config
  rows = cfg.prompts_per_step * cfg.samples_per_prompt
  training = exp.training
  state = exp.abstract_state()
  reference = exp.abstract_reference()
  replicated = jax.sharding.NamedSharding(
    exp.mesh, jax.sharding.PartitionSpec()
  )
  rows_sharding = exp.batch_sharding(1)
  kind = devices[0].device_kind
  chip = projection.CHIPS.get(kind)

  # The rollout, for the longest prompts training may see.
  prompt_len = exp.train_prompt_bucket
  samples_per_prefill = training.rollout.samples_per_prompt
  prompt = lambda dtype: jax.ShapeDtypeStruct(
    (rows // samples_per_prefill, prompt_len), dtype, sharding=rows_sharding
  )
  rng = jax.ShapeDtypeStruct(
    (), jax.eval_shape(jax.random.key, 0).dtype, sharding=replicated
  )
  rollout_fn = exp.rollout_fn(training.sampler, samples_per_prefill)
  rollout_args = (state.params, prompt(jnp.int32), prompt(jnp.bool_), rng)
  reports, texts = {}, {}
  reports["rollout"], texts["rollout"] = compile_program(
    rollout_fn.lower(*rollout_args),
    _leaf_names(params=state.params, prompt_tokens=0, prompt_valid=0, rng=0),
  )

  # The reference's scoring and the Stage II train step on those episodes,
  # packed.
  episode = jax.eval_shape(rollout_fn, *rollout_args)
  slots = episode.tokens_bs.shape[1]
  packed = episodes_lib.abstract_packed(
    rows, exp.row_len, exp.packed_shardings()
  )
  reports["reference"], texts["reference"] = compile_program(
    exp.reference_fn.lower(reference, packed),
    _leaf_names(reference=reference, packed=packed),
  )
  batch = episodes_lib.RLBatch(
    packed,
    jax.ShapeDtypeStruct(
      packed.tokens_rt.shape, jnp.float32, sharding=rows_sharding
    ),
    jax.ShapeDtypeStruct(
      episode.lengths_ba.shape, jnp.float32, sharding=rows_sharding
    ),
  )
  reports["train_step"], texts["train_step"] = compile_program(
    exp.train_step(training.objective).lower(state, batch),
    _leaf_names(state=state, batch=batch),
  )

  hbm = chip.hbm_bytes if chip else None
  resident = {
    "params": sharding.bytes_per_device(state.params),
    "opt_state": sharding.bytes_per_device(state.opt_state),
    "reference": sharding.bytes_per_device(reference),
  }
  report = {
    "devices": len(devices),
    "device_kind": kind,
    "processes": len({d.process_index for d in devices}),
    "mesh": dict(exp.mesh.shape),
    "params": exp.model.cfg.num_params,
    "episodes_per_step": rows,
    "prompt_len": prompt_len,
    "prompt_len_source": (
      "config.rollout.max_prompt_len"
      if cfg.rollout.max_prompt_len
      else "the largest of config.rollout.prompt_buckets"
    ),
    "episode_len": slots,
    "micro_batches": {
      "train_step": cfg.num_micro_batches,
      "rollout": cfg.rollout.num_micro_batches,
    },
    "hbm_bytes_per_device": hbm,
    "budget_bytes_per_device": None if hbm is None else int(FIT_FRACTION * hbm),
    "resident_bytes_per_device": resident,
    "peak_bytes_per_device": None,
    **reports,
  }
  if all("total" in r for r in reports.values()):
    # Held through the rollout besides its arguments: the optimizer state
    # and the reference params.
    # The reference's scoring runs beside the train state.
    report["peak_bytes_per_device"] = max(
      reports["train_step"]["total"],
      reports["rollout"]["total"]
      + resident["opt_state"]
      + resident["reference"],
      reports["reference"]["total"]
      + resident["params"]
      + resident["opt_state"],
    )
    if chip:
      shape = step_shape(exp, len(devices), report["processes"], prompt_len)
      steps = {
        name: hlo_analysis.analyze(text, len(devices))
        for name, text in texts.items()
      }
      # The typical workload is MATH's, with attempts longer than its mean.
      typical = (
        [projection.typical(shape, _prompt_wrapper_chars(exp))]
        if cfg.task.name == "math"
        and shape.attempt_cap > projection.TYPICAL_MEAN_ATTEMPT
        else []
      )
      report["projection"] = projection.project(
        steps,
        shape,
        chip,
        [projection.worst_case(shape)] + typical,
        # The reference scores the episodes while the host grades them.
        projection.measured_grading(
          REWARDS_BENCHMARK,
          cfg.rewards.num_workers,
          cfg.task.name,
          overlap_programs=("reference",),
        ),
        training.total_steps,
      )
  return report


def step_shape(
  exp, devices: int, processes: int, prompt_len: int
) -> projection.StepShape:
  """What a training step of `exp` runs, for the projection's workloads.

  Args:
    exp: the experiment, built for the slice's devices.
    devices: how many devices the slice has.
    processes: how many processes (hosts) drive them.
    prompt_len: the prompt bucket the rollout was compiled for.

  Returns:
    The StepShape.
  """
  cfg, model = exp.config, exp.model.cfg
  decode_params = sharding.abstract(
    jax.eval_shape(exp.model.compute_params, exp.abstract_params()),
    exp.decode_shardings,
  )
  return projection.StepShape(
    devices=devices,
    processes=processes,
    episodes=cfg.prompts_per_step * cfg.samples_per_prompt,
    prompt_bucket=prompt_len,
    attempt_cap=cfg.rollout.max_attempt_len,
    num_attempts=cfg.rollout.num_attempts,
    instruction_len=len(exp.instruction_ids),
    rollout_micro_batches=cfg.rollout.num_micro_batches,
    train_micro_batches=cfg.num_micro_batches,
    params=model.num_params,
    layers=model.num_layers,
    heads=model.num_heads,
    head_dim=model.head_dim,
    kv_bytes_per_token=(
      2
      * model.num_layers
      * model.num_kv_heads
      * model.head_dim
      * jnp.dtype(model.dtype).itemsize
    ),
    decode_weight_bytes=sharding.bytes_per_device(decode_params),
    samples_per_prefill=exp.training.rollout.samples_per_prompt,
    row_len=exp.row_len,
  )


def _prompt_wrapper_chars(exp) -> int:
  """Characters the task puts around a problem in its first turn."""
  return len(exp.task.format_problem(base.Example(problem="", answer_key=None)))


def run(config, topology: str, workdir: str) -> dict:
  """--mode=aot: compiles for `topology` (empty: the local devices), prints
  the memory per device and writes WORKDIR/aot/<topology>.json.

  Args:
    config: the experiment config.
    topology: a TPU slice (topology_options), or "" for the local devices.
    workdir: where the report goes, under aot/.

  Returns:
    The report written (compile_programs's, with the topology and the jax
    and libtpu versions).

  Raises:
    DoesNotFit: a program, or the peak, does not fit a device's memory
      (the report is written first).
  """
  devices = tpu_devices(topology) if topology else jax.devices()
  report = dict(
    topology=topology or "local",
    jax_version=jax.__version__,
    libtpu_version=_libtpu_version(),
    **compile_programs(config, devices),
  )
  print(summary(report))
  files.write_atomic(
    os.path.join(workdir, "aot", f"{report['topology']}.json"),
    json.dumps(report, indent=2) + "\n",
  )
  too_big = [name for name in PROGRAMS if "does_not_fit" in report[name]]
  peak, budget = (
    report["peak_bytes_per_device"],
    report["budget_bytes_per_device"],
  )
  if peak is not None and budget is not None and peak > budget:
    too_big.append(
      f"the peak ({_size(peak)} with the rollout beside the "
      f"optimizer state and reference; the budget is "
      f"{FIT_FRACTION:.0%} of HBM)"
    )
  if too_big:
    verb = "does" if len(too_big) == 1 else "do"
    raise DoesNotFit(
      f"{report['topology']}: {' and '.join(too_big)} {verb} "
      "not fit in a device's memory; see the largest buffers "
      "above: shard more (config.mesh_shape), raise "
      "config.num_micro_batches or "
      "config.rollout.num_micro_batches, or shorten the "
      "episodes."
    )
  return report


def _libtpu_version() -> Optional[str]:
  try:
    return importlib.metadata.version("libtpu")
  except importlib.metadata.PackageNotFoundError:
    return None


def _size(n: int) -> str:
  for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
    if abs(n) >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{n} B"


def summary(report: dict) -> str:
  """The report as a few lines for the terminal."""
  lines = [
    f"{report['topology']}: {report['devices']} x "
    f"{report['device_kind']} on {report['processes']} host(s), mesh "
    f"{report['mesh']}, {report['params']:,} params; "
    f"{report['episodes_per_step']} episodes of "
    f"{report['episode_len']} slots (prompt bucket "
    f"{report['prompt_len']}: {report['prompt_len_source']}), "
    f"micro-batches {report['micro_batches']}"
  ]
  resident = report["resident_bytes_per_device"]
  lines.append(
    "  state per device: "
    + ", ".join(f"{k} {_size(v)}" for k, v in resident.items())
  )
  for name in PROGRAMS:
    m = report[name]
    if "does_not_fit" in m:
      lines.append(f"  {name:<10}  does NOT fit: {m['does_not_fit']}")
      lines.extend(f"      {line}" for line in m["compiler_report"])
      continue
    lines.append(
      "  {:<10}  arguments {}  outputs {}  temporaries {}  "
      "aliased {}  total {}".format(
        name,
        *map(
          _size,
          (
            m["arguments"],
            m["outputs"],
            m["temporaries"],
            m["aliased"],
            m["total"],
          ),
        ),
      )
    )
    for b in m["largest_buffers"]:
      lines.append(
        f"      {b['count']:>3} x {_size(b['bytes']):>10}  "
        f"{b['kind']:<9}  {b['shape']:<32}  {b['label']}"
      )
  peak, hbm = report["peak_bytes_per_device"], report["hbm_bytes_per_device"]
  if peak is not None:
    verdict = (
      ""
      if hbm is None
      else (
        f" = {peak / hbm:.0%} of {_size(hbm)} HBM: "
        + (
          "fits"
          if peak <= FIT_FRACTION * hbm
          else f"does NOT fit (budget {FIT_FRACTION:.0%})"
        )
      )
    )
    lines.append(f"  peak per device {_size(peak)}{verdict}")
  if report.get("projection"):
    lines.extend(projection.summary(report["projection"]))
  return "\n".join(lines)
