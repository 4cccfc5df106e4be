"""SCoRe train-step throughput, achieved FLOP/s and peak memory.

  python -m benchmarks.train_step        # from the repository root; writes
                                         # benchmarks/results/train_step.json
  python -m benchmarks.train_step --quick --output=/tmp/train_step.json  # smoke

The measured step is the real one: `train_step.make_train_step` with the
Stage II objective of `configs.common.base_config()` (RLOO over K samples per
prompt, k2 KL to a frozen reference, shaped attempt-2 reward), jitted by
`train_step.jit_train_step` on a one-device mesh with the config's sharding
rules and Adam with global-norm clipping, the state donated and fed back from
call to call as in training. The batch is synthetic, in the rollout's buffer
layout: B episodes of S = prompt + 2 attempts + instruction slots, prompts
left-padded and attempts stopped early at random lengths, random tokens and
rewards, packed into rows as the trainer packs them (packing.py) and scored
by the reference (`train_step.make_reference_fn`, timed apart). Params are
random, which changes no cost.

For each preset it writes JSON with:
  throughput  valid (real) tokens/s of the train step, and the slots of the
              packed rows it computes (`computed_tokens`), from the median
              step time.
  flops       the analytic FLOPs of one step over the computed slots
              (below), the achieved FLOP/s and their fraction of the dense
              matmul rate measured in the same run.
  memory      peak memory against the analytic bytes of the params, the
              reference params, the gradients and Adam's state: XLA's own
              figure for the compiled step (`memory_analysis`) on every
              platform, and what the process really used (the allocator's
              peak on GPU/TPU, peak resident set size on a Linux CPU).

FLOPs per step, per computed slot (2 per multiply-add; the logits matmul of
the tied embedding counted, norms and softmaxes not):
  policy forward + backward   3 * (2 * matmul_params + 4 * L * N * H * keys)
where keys is the slots each query's block attends to (the blocked
attention computes the blocks on and below the diagonal, masked keys in them
included: PaLM's accounting over what is computed).

The layers run unrolled (--scan_layers=false, the default here): on a 2-core
CPU the 100m step is 15% faster than with lax.scan (4.4 s against 5.1 s);
pass --scan_layers to measure the scanned step.

The defaults fit a 2-core CPU in a few minutes. On a GPU or TPU raise the
batch, e.g. --episodes=64 --max_attempt_len=256 (and --dtype=bfloat16 for the
configs' dtype); nothing else changes. One device is used.
"""

import dataclasses
import functools
import json
import os
import sys
import tempfile
import time
from typing import Optional

import jax
import numpy as np
from absl import app, flags, logging

from benchmarks import machine
from configs import common
from score_jax import (
  episodes,
  objectives,
  packing,
  rollout,
  sharding,
  train_step,
)
from score_jax.models import presets
from score_jax.models import transformer as tf

_DEFAULT_OUTPUT = os.path.join(
  os.path.dirname(__file__), "results", "train_step.json"
)

_OUTPUT = flags.DEFINE_string(
  "output",
  None,
  f"JSON path; default {_DEFAULT_OUTPUT} (with --quick: "
  "train_step_quick.json in the temp directory, so the committed results "
  "stay).",
)
flags.DEFINE_list(
  "presets",
  ["25m", "100m"],
  "Model presets, smallest first (a GPU allocator's peak only ever grows).",
)
flags.DEFINE_integer(
  "episodes",
  8,
  "Episodes (rows) per step, B: whole groups of --samples_per_prompt.",
)
flags.DEFINE_integer(
  "samples_per_prompt", 4, "K, the group of the leave-one-out baseline."
)
flags.DEFINE_integer("prompt_len", 32, "Prompt slots per episode.")
flags.DEFINE_integer("max_attempt_len", 40, "Slots per attempt.")
flags.DEFINE_integer(
  "instruction_len", 16, "Slots of the instruction turn between attempts."
)
flags.DEFINE_integer("num_micro_batches", 1, "Gradient accumulation steps.")
flags.DEFINE_integer("repeats", 3, "Timed steps per preset (median).")
flags.DEFINE_enum(
  "dtype",
  "float32",
  ["float32", "bfloat16", "float16"],
  "Params, optimizer state and activations dtype.",
)
flags.DEFINE_bool(
  "scan_layers",
  False,
  "Run the layers with lax.scan (the "
  "TransformerConfig default) instead of unrolled; on a CPU "
  "the unrolled step is faster.",
)
flags.DEFINE_bool(
  "quick",
  False,
  "Smoke run in seconds: tiny preset and sizes (flags given "
  "explicitly still win).",
)

_QUICK_VALUES = dict(
  presets=["test"],
  episodes=4,
  prompt_len=8,
  max_attempt_len=8,
  instruction_len=4,
  repeats=1,
)

PAD_ID = 0
NUM_ATTEMPTS = 2
LARGER_PRESET_TARGET = 0.4  # the matmul fraction at the larger preset


@dataclasses.dataclass(frozen=True)
class Settings:
  presets: list
  episodes: int
  samples_per_prompt: int
  prompt_len: int
  max_attempt_len: int
  instruction_len: int
  num_micro_batches: int
  repeats: int
  dtype: str
  scan_layers: bool
  quick: bool

  @property
  def num_slots(self) -> int:
    return rollout.num_slots(
      self.prompt_len,
      self.instruction_len,
      rollout.RolloutConfig(
        num_attempts=NUM_ATTEMPTS, max_attempt_len=self.max_attempt_len
      ),
    )


def _settings() -> Settings:
  values = {
    f.name: flags.FLAGS[f.name].value for f in dataclasses.fields(Settings)
  }
  if values["quick"]:
    values.update(
      {k: v for k, v in _QUICK_VALUES.items() if not flags.FLAGS[k].present}
    )
  s = Settings(**values)
  group = s.samples_per_prompt * s.num_micro_batches
  if s.samples_per_prompt < 2 or s.episodes % group:
    raise ValueError(
      f"--episodes={s.episodes} must be whole groups of "
      f"--samples_per_prompt={s.samples_per_prompt} (>= 2) in each of "
      f"--num_micro_batches={s.num_micro_batches}: a multiple of {group}."
    )
  return s


def synthetic_episodes(s: Settings, vocab_size: int, seed: int = 0):
  """RL episodes in the rollout's layout (rollout's docstring): prompts
  left-padded to prompt_len, attempts that stop early leave padding before
  the next turn, sampler log-probs; and 0/1 rewards."""
  rng = np.random.default_rng(seed)
  B, S, P, A, I = (
    s.episodes,
    s.num_slots,
    s.prompt_len,
    s.max_attempt_len,
    s.instruction_len,
  )
  valid = np.zeros((B, S), bool)
  attempt_mask = np.zeros((B, NUM_ATTEMPTS, S), bool)
  for i in range(NUM_ATTEMPTS - 1):  # the instruction turns
    valid[:, P + i * (A + I) + A : P + (i + 1) * (A + I)] = True
  for b in range(B):
    valid[b, P - rng.integers(P // 2, P + 1) : P] = True
    for i in range(NUM_ATTEMPTS):
      start = P + i * (A + I)
      attempt_mask[b, i, start : start + rng.integers(A // 2, A + 1)] = True
  valid |= attempt_mask.any(1)
  tokens = np.where(valid, rng.integers(1, vocab_size, (B, S)), PAD_ID)
  in_attempt = attempt_mask.any(1)
  episode = episodes.Episode(
    tokens_bs=tokens.astype(np.int32),
    valid_bs=valid,
    attempt_mask_bas=attempt_mask,
    log_probs_bs=np.where(
      in_attempt, -rng.exponential(2.0, (B, S)), 0.0
    ).astype(np.float32),
    lengths_ba=attempt_mask.sum(2, dtype=np.int32),
  )
  return episode, rng.integers(0, 2, (B, NUM_ATTEMPTS)).astype(np.float32)


def step_flops(
  cfg: tf.TransformerConfig, matmul_params: int, row_len: int, rows: int
) -> dict:
  """The analytic FLOPs of one step over `rows` computed packed rows
  (module docstring)."""
  tokens = rows * row_len
  block = min(cfg.attention_block_len, row_len)
  blocks = -(-row_len // block)
  # Query block i attends to the keys of blocks 0..i.
  keys_per_row = sum(
    min(block, row_len - i * block) * min((i + 1) * block, row_len)
    for i in range(blocks)
  )
  attention_forward = (
    4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * keys_per_row * rows
  )
  matmul_forward = 2 * matmul_params * tokens
  policy = 3 * (matmul_forward + attention_forward)
  return dict(
    policy_forward_backward=policy,
    attention=3 * attention_forward,
    total=policy,
  )


def analytic_bytes(num_params: int, param_dtype: str) -> dict:
  """What the step must hold: params, the reference, gradients, Adam."""
  params = num_params * np.dtype(param_dtype).itemsize
  parts = dict(
    params=params,
    reference_params=params,
    grads=params,
    adam_mu_nu=2 * params,
    adam_count=4,
  )
  return dict(parts, total=sum(parts.values()))


class PeakMemory:
  """How far the process's memory rises above its level at `start()`: the
  device allocator's peak where it keeps statistics (GPU, TPU; a lifetime
  peak, so run presets smallest first), else the resident set size from
  Linux /proc, whose peak `start()` resets (on CPU arrays live in host
  memory, and this leaves out what compilation took)."""

  def __init__(self):
    self._device = jax.devices()[0]
    if "peak_bytes_in_use" in (self._device.memory_stats() or {}):
      self.source = "device allocator: peak_bytes_in_use - bytes_in_use"
    elif os.path.exists("/proc/self/clear_refs"):
      self.source = "process: VmHWM - VmRSS (/proc/self/status)"
    else:
      self.source = None
    self._start = None

  def _in_use_and_peak(self) -> tuple[int, int]:
    stats = self._device.memory_stats()
    if stats and "peak_bytes_in_use" in stats:
      return stats["bytes_in_use"], stats["peak_bytes_in_use"]
    with open("/proc/self/status") as f:
      fields = dict(line.split(":", 1) for line in f if ":" in line)
    kib = lambda name: int(fields[name].split()[0]) * 1024
    return kib("VmRSS"), kib("VmHWM")

  def start(self) -> None:
    if self.source and self.source.startswith("process"):
      with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to VmRSS
    if self.source:
      self._start = self._in_use_and_peak()[0]

  def rise(self) -> Optional[int]:
    """Bytes of the peak since `start()` above the level at `start()`."""
    return self._in_use_and_peak()[1] - self._start if self.source else None


class Case:
  """One preset's sharded train state, reference, batch and jitted step."""

  def __init__(self, preset: str, s: Settings):
    self.cfg = dataclasses.replace(
      presets.build_config({"preset": preset}),
      param_dtype=s.dtype,
      dtype=s.dtype,
      scan_layers=s.scan_layers,
    )
    model = tf.Transformer(self.cfg)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    rules = common.SHARDING_RULES
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    param_shardings = sharding.tree_shardings(
      tf.param_axes(self.cfg), shapes, mesh, rules
    )
    named = jax.tree_util.tree_flatten_with_path(shapes)[0]
    self.num_params = sum(x.size for _, x in named)
    # Norm scales multiply elementwise; every other weight is a matmul's,
    # the tied embedding as the logits projection.
    self.matmul_params = sum(
      x.size for path, x in named if "norm" not in jax.tree_util.keystr(path)
    )
    config = common.base_config()
    optimizer, lr_schedule = train_step.make_optimizer(
      config.optimizer, s.repeats + 1
    )
    self.state, state_shardings = train_step.init_state(
      model, optimizer, param_shardings, seed=0
    )
    self.reference = jax.jit(
      lambda key: model.compute_params(model.init(key)),
      out_shardings=param_shardings,
    )(jax.random.key(1))
    objective = objectives.ObjectiveConfig(
      stage="stage2", **config.objective.to_dict()
    )
    rows = sharding.batch_sharding(mesh, rules, 1)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    self.host_episode, rewards = synthetic_episodes(s, self.cfg.vocab_size)
    B = s.episodes
    self.row_len = packing.row_len(s.num_slots)
    row_b, offset_b, used = packing.plan(
      self.host_episode.valid_bs.sum(1),
      np.arange(B),
      self.row_len,
      s.num_micro_batches,
    )
    self.computed_rows = used * B // s.num_micro_batches
    packed = jax.jit(
      functools.partial(
        packing.pack_episodes, num_rows=B, row_len=self.row_len
      ),
      out_shardings=episodes.packed_shardings(rows, replicated),
    )(
      jax.device_put(self.host_episode, rows),
      jax.device_put(row_b, rows),
      jax.device_put(offset_b, rows),
      used,
    )
    self.reference_fn = jax.jit(
      train_step.make_reference_fn(model, s.num_micro_batches)
    )
    self.batch = episodes.RLBatch(
      packed,
      self.reference_fn(self.reference, packed),
      jax.device_put(rewards, rows),
    )
    self.step = train_step.jit_train_step(
      train_step.make_train_step(
        model,
        optimizer,
        lr_schedule,
        objective,
        s.num_micro_batches,
        s.samples_per_prompt,
        s.max_attempt_len,
      ),
      state_shardings,
      episodes.batch_shardings(self.batch, rows, replicated),
    )
    # What lies in memory when the step starts.
    self.argument_bytes = sum(
      x.nbytes for x in jax.tree.leaves((self.state, self.batch))
    )


def time_steps(case: Case, repeats: int) -> dict:
  """Compiles the step, runs one warm-up step, then times `repeats` steps to
  completion, each taking the state the previous one returned (it is donated,
  so `machine.compile_and_time`'s repeated calls on one input cannot run)."""
  start = time.perf_counter()
  compiled = case.step.lower(case.state, case.batch).compile()
  compile_s = time.perf_counter() - start
  reference_timing, _ = machine.compile_and_time(
    case.reference_fn, case.reference, case.batch.packed, repeats=repeats
  )
  peak_memory = PeakMemory()
  peak_memory.start()
  state, metrics = jax.block_until_ready(compiled(case.state, case.batch))
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics = jax.block_until_ready(compiled(state, case.batch))
    seconds.append(time.perf_counter() - start)
  metrics = jax.device_get(metrics)
  if metrics["skipped"]:
    raise RuntimeError(
      f"the step was skipped (loss {metrics['loss']}, update "
      f"ratio {metrics['update_ratio']}); the benchmark "
      "batch is broken."
    )
  stats = compiled.memory_analysis()
  rise = peak_memory.rise()
  return dict(
    process_memory=dict(
      source=peak_memory.source,
      arguments_bytes=case.argument_bytes,
      rise_during_steps_bytes=rise,
      peak_bytes=None if rise is None else case.argument_bytes + rise,
    ),
    timing=dict(
      median_s=float(np.median(seconds)),
      all_s=seconds,
      compile_s=compile_s,
      reference_median_s=reference_timing["median_s"],
    ),
    loss=float(metrics["loss"]),
    grad_norm=float(metrics["grad_norm"]),
    compiled_memory=dict(
      argument_bytes=stats.argument_size_in_bytes,
      output_bytes=stats.output_size_in_bytes,
      alias_bytes=stats.alias_size_in_bytes,
      temp_bytes=stats.temp_size_in_bytes,
      # The buffers XLA allocates for one call: arguments, outputs not
      # written into donated arguments, and the temp block.
      total_bytes=(
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        - stats.alias_size_in_bytes
        + stats.temp_size_in_bytes
      ),
      # XLA's heap-simulation figure; on CPU it can be below the
      # arguments plus the live temporaries, so it is not the ratio's.
      xla_peak_memory_bytes=stats.peak_memory_in_bytes,
    ),
  )


def benchmark_preset(preset: str, s: Settings, limits: dict) -> dict:
  case = Case(preset, s)
  cfg = case.cfg
  logging.info("%s: %.1fM params", preset, case.num_params / 1e6)
  measured = time_steps(case, s.repeats)
  step_s = measured["timing"]["median_s"]
  rows, slots = s.episodes, s.num_slots
  flops = step_flops(cfg, case.matmul_params, case.row_len, case.computed_rows)
  achieved = flops["total"] / step_s
  expected = analytic_bytes(case.num_params, cfg.param_dtype)
  process = measured["process_memory"]
  compiled_total = measured["compiled_memory"]["total_bytes"]
  valid_tokens = int(case.host_episode.valid_bs.sum())
  return dict(
    config=dataclasses.asdict(cfg),
    num_params=case.num_params,
    matmul_params=case.matmul_params,
    batch=dict(
      episodes=rows,
      slots=slots,
      tokens=rows * slots,
      valid_tokens=valid_tokens,
      attempt_tokens=int(case.host_episode.attempt_mask_bas.sum()),
      row_len=case.row_len,
      computed_rows=case.computed_rows,
      computed_tokens=case.computed_rows * case.row_len,
      micro_batches=s.num_micro_batches,
    ),
    **measured["timing"],
    throughput=dict(
      valid_tokens_per_s=valid_tokens / step_s,
      computed_tokens_per_s=(case.computed_rows * case.row_len / step_s),
    ),
    flops=dict(
      per_step=flops,
      achieved_flops_per_s=achieved,
      matmul_fraction=achieved / limits["matmul"]["flops_per_s"],
    ),
    memory=dict(
      analytic=expected,
      compiled=measured["compiled_memory"],
      process=process,
      # One micro-batch's [B, C, V] float32 logits chunk: the largest
      # activation, of which the step holds a few copies.
      logits_bytes=(
        rows
        // s.num_micro_batches
        * min(case.row_len, cfg.logits_chunk_len)
        * cfg.vocab_size
        * 4
      ),
      compiled_total_over_analytic=compiled_total / expected["total"],
      process_peak_over_analytic=(
        process["peak_bytes"] / expected["total"]
        if process["peak_bytes"] is not None
        else None
      ),
    ),
    final_loss=measured["loss"],
    final_grad_norm=measured["grad_norm"],
  )


def check_targets(results: dict) -> dict:
  """The issue's target, at the largest preset of the run."""
  preset = max(results, key=lambda p: results[p]["num_params"])
  value = results[preset]["flops"]["matmul_fraction"]
  return {
    preset: {
      "matmul_fraction": dict(
        value=value,
        target=f">= {LARGER_PRESET_TARGET}",
        met=value >= LARGER_PRESET_TARGET,
      )
    }
  }


def print_summary(report: dict) -> None:
  print(
    f"{report['device_kind']}: matmul "
    f"{report['machine_limits']['matmul']['flops_per_s'] / 1e9:.1f} "
    f"GFLOP/s, memory "
    f"{report['machine_limits']['memory']['bytes_per_s'] / 1e9:.1f} GB/s"
  )
  print(
    "  preset  params  computed  step s  computed tok/s  valid tok/s  "
    "GFLOP/s  matmul frac  analytic GB  XLA total GB  process peak GB"
  )
  for preset, r in report["presets"].items():
    process = r["memory"]["process"].get("peak_bytes")
    print(
      f"  {preset:>6}  {r['num_params'] / 1e6:5.1f}M  "
      f"{r['batch']['computed_tokens']:8d}  {r['median_s']:6.2f}  "
      f"{r['throughput']['computed_tokens_per_s']:14.0f}  "
      f"{r['throughput']['valid_tokens_per_s']:11.0f}  "
      f"{r['flops']['achieved_flops_per_s'] / 1e9:7.1f}  "
      f"{r['flops']['matmul_fraction']:11.2f}  "
      f"{r['memory']['analytic']['total'] / 1e9:11.2f}  "
      f"{r['memory']['compiled']['total_bytes'] / 1e9:12.2f}  "
      + (f"{process / 1e9:15.2f}" if process is not None else "n/a")
    )
  machine.print_targets(report["targets"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; use --flags.")
  s = _settings()
  start = time.perf_counter()
  info = machine.describe(
    " ".join(["python -m benchmarks.train_step"] + sys.argv[1:])
  )
  logging.info("device %s, jax %s", info["device_kind"], info["jax_version"])
  limits = machine.limits(s.dtype, s.quick)
  results = {}
  for preset in s.presets:
    results[preset] = benchmark_preset(preset, s, limits)
    logging.info(
      "%s: %.2f s/step, %.0f valid tok/s, %.0f%% of matmul rate",
      preset,
      results[preset]["median_s"],
      results[preset]["throughput"]["valid_tokens_per_s"],
      100 * results[preset]["flops"]["matmul_fraction"],
    )
  report = dict(
    **info,
    settings=dataclasses.asdict(s),
    machine_limits=limits,
    targets=check_targets(results),
    notes=[
      "step: Stage II, RLOO over samples_per_prompt, k2 KL, Adam with "
      "clipping (configs.common.base_config()), state donated; timings "
      "are the median of `repeats` steps after a warm-up step, each "
      "run to completion; compile_s is separate.",
      "tokens = episodes * slots of the episode buffers; the step "
      "computes computed_tokens, the packed rows of its micro-batches "
      "in use; valid_tokens are the real ones; attempt_tokens the "
      "trained ones.",
      "flops: analytic (module docstring); matmul_fraction = achieved "
      "FLOP/s / the matmul rate measured in this run.",
      "memory.analytic: params + reference + grads + Adam mu, nu and "
      "count. memory.compiled: XLA's buffer assignment of the step; "
      "total_bytes = arguments + outputs - aliased (donated) + temp. "
      "memory.process: what really lay in memory at the step's peak = "
      "its arguments (exact) + the rise of process memory (host RSS on "
      "CPU, the allocator on GPU/TPU) during the steps, compilation "
      "excluded. The excess over analytic is mostly activations "
      "(logits_bytes is the largest) and the batch.",
    ],
    presets=results,
    total_s=time.perf_counter() - start,
  )
  output = _OUTPUT.value or (
    os.path.join(tempfile.gettempdir(), "train_step_quick.json")
    if s.quick
    else _DEFAULT_OUTPUT
  )
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  with open(output, "w") as f:
    json.dump(report, f, indent=2)
  print_summary(report)
  print(f"wrote {output} in {report['total_s']:.0f} s")


if __name__ == "__main__":
  app.run(main)
