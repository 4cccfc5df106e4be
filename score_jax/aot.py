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
resident, so the peak adds them to it.
"""

import dataclasses
import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies

from score_jax import experiment as experiment_lib
from score_jax import files
from score_jax import objectives
from score_jax import rollout as rollout_lib
from score_jax import sampling
from score_jax import schedule as schedule_lib
from score_jax import train_step as train_step_lib

GIB = 2**30

# Slice sizes -> chip layouts. v5e and v6e names count chips; v4 and v5p
# names count TensorCores, two per chip, which JAX drives as one (megacore)
# device.
_LAYOUTS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8",
               128: "8x16", 256: "16x16"}
_LAYOUTS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4",
               128: "4x4x8", 256: "4x8x8", 512: "8x8x8"}
# Accelerator-type prefix -> (topology family, layouts, cores per chip).
_FAMILIES = {"v5e": ("v5e", _LAYOUTS_2D, 1),
             "v5litepod": ("v5e", _LAYOUTS_2D, 1),
             "v6e": ("v6e", _LAYOUTS_2D, 1),
             "v4": ("v4", _LAYOUTS_3D, 2), "v5p": ("v5", _LAYOUTS_3D, 2)}
# Slices of up to 8 chips sit on one host (the default is 2x2 chips a host).
_ONE_HOST = {"1x1": (1, 1, 1), "2x2": (2, 2, 1), "2x4": (2, 4, 1)}
# HBM per device, to say whether the programs fit.
HBM_BYTES = {"TPU v4": 32 * GIB, "TPU v5 lite": 16 * GIB, "TPU v5": 95 * GIB,
             "TPU v6 lite": 32 * GIB}

INSTALL_HINT = ("install libtpu to compile for TPU topologies on this "
                "machine (no TPU needed): pip install -e '.[tpu]' (or pip "
                "install 'jax[tpu]')")


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
      raise ValueError(f"--topology={name}: unknown slice size; use one of "
                       f"{sorted(c * cores for c in layouts)} or a layout "
                       "such as v5e:4x4.")
    name = f"{family}:{layouts[chips]}"
  elif not re.fullmatch(r"[a-z0-9]+:\d+(x\d+){1,2}", name):
    raise ValueError(f"--topology={name}: use an accelerator type such as "
                     "v5e-16 or v4-32, or a layout such as v5e:4x4.")
  family, layout = name.split(":")
  options = {"chip_config_name": "megacore"} if family in ("v4", "v5") else {}
  if layout in _ONE_HOST:
    options["chips_per_host_bounds"] = _ONE_HOST[layout]
  return name, options


def tpu_devices(name: str) -> list:
  """Compile-only devices of the TPU slice `name` (see topology_options)."""
  topology, options = topology_options(name)
  try:
    return list(topologies.get_topology_desc(topology, platform="tpu",
                                             **options).devices)
  except RuntimeError as e:
    if "TPU support not installed" in str(e) or "libtpu" in str(e):
      raise TopologyUnavailable(
          f"--topology={name}: this jax cannot compile for TPUs; "
          f"{INSTALL_HINT}.") from None
    # A layout libtpu rejects (the size of an unknown chip, say).
    raise ValueError(f"--topology={name}: {str(e).splitlines()[0]}") from None


@dataclasses.dataclass(frozen=True)
class ProgramMemory:
  """Bytes per device of one compiled program."""
  arguments: int
  outputs: int
  temporaries: int
  aliased: int  # Outputs written over donated arguments.

  @property
  def total(self) -> int:
    return self.arguments + self.outputs + self.temporaries - self.aliased


class DoesNotFit(ValueError):
  """A program needs more memory than a device of the slice has."""


def program_memory(lowered) -> ProgramMemory:
  """Compiles `lowered` and returns its memory per device. XLA refuses to
  compile a TPU program that cannot fit in HBM: that is DoesNotFit."""
  try:
    stats = lowered.compile().memory_analysis()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    raise DoesNotFit(str(e).splitlines()[0]) from None
  return ProgramMemory(arguments=stats.argument_size_in_bytes,
                       outputs=stats.output_size_in_bytes,
                       temporaries=stats.temp_size_in_bytes,
                       aliased=stats.alias_size_in_bytes)


def bytes_per_device(tree: Any) -> int:
  """Bytes one device holds of abstract arrays with shardings."""
  return int(sum(np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                 for x in jax.tree.leaves(tree)))


def _abstract(tree, shardings):
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree, shardings)


def _abstract_state(exp, optimizer):
  """The TrainState's shapes and shardings, traced, never allocated."""
  shardings = []

  def init():
    state, state_shardings = train_step_lib.init_state(
        exp.model, optimizer, exp.param_shardings, exp.config.seed)
    shardings.append(state_shardings)  # Plain Python, known at trace time.
    return state

  return _abstract(jax.eval_shape(init), shardings[0])


def compile_programs(config, devices) -> dict:
  """Compiles the training rollout and train step of `config` for
  `devices` (local or compile-only) and reports their memory per device."""
  exp = experiment_lib.build(config, devices)
  cfg = exp.config
  rows = cfg.prompts_per_step * cfg.samples_per_prompt
  if rows % cfg.num_micro_batches or (
      rows // cfg.num_micro_batches) % exp.batch_shards:
    raise ValueError(
        f"prompts_per_step x samples_per_prompt = {rows} episodes must split "
        f"into {cfg.num_micro_batches} micro-batches, each a multiple of the "
        f"{exp.batch_shards} batch shards of the mesh {dict(exp.mesh.shape)}.")
  plan = schedule_lib.phases(cfg.schedule, cfg.stage1_steps, cfg.stage2_steps,
                             cfg.cycles, cfg.sft.steps)
  optimizer, lr_schedule = train_step_lib.make_optimizer(
      cfg.optimizer, sum(p.steps for p in plan), cfg.sft.steps,
      cfg.sft.learning_rate)
  state = _abstract_state(exp, optimizer)
  params = state.params
  replicated = jax.sharding.NamedSharding(exp.mesh,
                                          jax.sharding.PartitionSpec())
  rows_sharding = exp.batch_sharding(1)

  # The rollout, for the longest prompts training may see.
  prompt_len = max(cfg.rollout.prompt_buckets)
  prompt = lambda dtype: jax.ShapeDtypeStruct((rows, prompt_len), dtype,
                                              sharding=rows_sharding)
  rng = jax.ShapeDtypeStruct((), jax.eval_shape(jax.random.key, 0).dtype,
                             sharding=replicated)
  rollout_fn = exp.rollout_fn(sampling.SamplerConfig(
      cfg.rollout.temperature, cfg.rollout.top_k, cfg.rollout.top_p))
  lowered = {"rollout": rollout_fn.lower(params, prompt(jnp.int32),
                                         prompt(jnp.bool_), rng)}

  # The Stage II train step on the episodes that rollout writes.
  slots = rollout_lib.num_slots(prompt_len, len(exp.instruction_ids),
                                rollout_lib.RolloutConfig(
                                    cfg.rollout.num_attempts,
                                    cfg.rollout.max_attempt_len))
  attempts = cfg.rollout.num_attempts
  episode = lambda shape, dtype: jax.ShapeDtypeStruct(
      (rows, *shape), dtype, sharding=rows_sharding)
  batch = {"tokens": episode((slots,), jnp.int32),
           "valid": episode((slots,), jnp.bool_),
           "attempt_mask": episode((attempts, slots), jnp.bool_),
           "sampler_log_probs": episode((slots,), jnp.float32),
           "rewards": episode((attempts,), jnp.float32)}
  objective = objectives.ObjectiveConfig(stage="stage2", **dict(cfg.objective))
  step_fn = train_step_lib.jit_train_step(
      train_step_lib.make_train_step(
          exp.model, optimizer, lr_schedule, objective, cfg.num_micro_batches,
          cfg.samples_per_prompt, cfg.rollout.max_attempt_len),
      jax.tree.map(lambda x: x.sharding, state), exp.param_shardings,
      rows_sharding)
  lowered["train_step"] = step_fn.lower(state, params, batch)

  kind = devices[0].device_kind
  report = {
      "devices": len(devices), "device_kind": kind,
      "processes": len({d.process_index for d in devices}),
      "mesh": dict(exp.mesh.shape), "params": exp.model.cfg.num_params,
      "episodes_per_step": rows, "prompt_len": prompt_len,
      "episode_len": slots, "hbm_bytes_per_device": HBM_BYTES.get(kind),
      "peak_bytes_per_device": None,
  }
  programs = {}
  for name, program in lowered.items():
    try:
      programs[name] = program_memory(program)
      report[name] = dict(dataclasses.asdict(programs[name]),
                          total=programs[name].total)
    except DoesNotFit as e:
      report[name] = {"does_not_fit": str(e)}
  if len(programs) == len(lowered):
    # Held through the rollout besides its arguments: the optimizer state
    # and the reference params (the policy's own size).
    resident = bytes_per_device(state.opt_state) + bytes_per_device(params)
    report["peak_bytes_per_device"] = max(
        programs["train_step"].total, programs["rollout"].total + resident)
  return report


def run(config, topology: str, workdir: str) -> dict:
  """--mode=aot: compiles for `topology` (empty: the local devices), prints
  the memory per device and writes WORKDIR/aot/<topology>.json."""
  devices = tpu_devices(topology) if topology else jax.devices()
  report = dict(topology=topology or "local", **compile_programs(config,
                                                                 devices))
  print(summary(report))
  files.write_atomic(
      os.path.join(workdir, "aot", f"{report['topology']}.json"),
      json.dumps(report, indent=2) + "\n")
  too_big = [name for name in ("rollout", "train_step")
             if "does_not_fit" in report[name]]
  peak, hbm = report["peak_bytes_per_device"], report["hbm_bytes_per_device"]
  if peak is not None and hbm is not None and peak > hbm:
    too_big.append("the rollout beside the optimizer state and reference")
  if too_big:
    verb = "does" if len(too_big) == 1 else "do"
    raise DoesNotFit(f"{report['topology']}: {' and '.join(too_big)} {verb} "
                     "not fit in a device's memory; shard more "
                     "(config.mesh_shape), raise config.num_micro_batches or "
                     "shorten the episodes (see above).")
  return report


def _size(n: int) -> str:
  for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
    if abs(n) >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{n} B"


def summary(report: dict) -> str:
  """The report as a few lines for the terminal."""
  lines = [f"{report['topology']}: {report['devices']} x "
           f"{report['device_kind']} on {report['processes']} host(s), mesh "
           f"{report['mesh']}, {report['params']:,} params"]
  for name in ("rollout", "train_step"):
    m = report[name]
    if "does_not_fit" in m:
      lines.append(f"  {name:<10}  does NOT fit: {m['does_not_fit']}")
      continue
    lines.append("  {:<10}  arguments {}  outputs {}  temporaries {}  "
                 "aliased {}  total {}".format(name, *map(_size, (
                     m["arguments"], m["outputs"], m["temporaries"],
                     m["aliased"], m["total"]))))
  peak, hbm = report["peak_bytes_per_device"], report["hbm_bytes_per_device"]
  if peak is not None:
    verdict = "" if hbm is None else f" of {_size(hbm)} HBM: " + (
        "fits" if peak <= hbm else "does NOT fit")
    lines.append(f"  peak per device {_size(peak)}{verdict}")
  return "\n".join(lines)
