"""Rollout throughput against a no-cache decode and the machine's roofline.

  python -m benchmarks.rollout        # from the repository root; writes
                                      # benchmarks/results/rollout.json
  python -m benchmarks.rollout --quick --output=/tmp/rollout.json  # ~20 s smoke

For each preset and batch size it writes JSON with:
  rollout      generated tokens/s of the jitted two-attempt rollout
               (`rollout.make_rollout_fn`: prompt prefill, attempt 1, the
               instruction turn, attempt 2), generated = batch * 2 * new_tokens.
  decode_step  seconds per step of `sampling.decode` from a prefilled prompt
               (the layers split beforehand, once, as the rollout does),
               against the roofline of the machine measured in the same run:
               bytes (params + KV cache at the mean fill) / memory bandwidth
               and FLOPs (2 * matmul params * batch + attention) / matmul rate.
  no_cache     tokens/s of a static-shape decode that recomputes the forward
               pass over the whole [B, S] episode buffer for every new token
               (the logits of the sampled position only), the rollout's
               speedup over it at --compare_new_tokens, and the speedup a
               rollout at the roofline would have: at batch 1 a cached step
               reads every weight for one token while the no-cache forward
               runs at the matmul rate, so with float32 weights (4 bytes
               read per 2 FLOPs) the ceiling is about
               S * bandwidth / (2 * matmul rate).
  compare      with --compare_to=REV: REV's two-attempt rollout and this
               tree's on the same params and prompts, interleaved call by
               call in one run, their medians and the speedup, e.g.
                 python -m benchmarks.rollout --prompt_len=64 \
                   --new_tokens=128 --batch_sizes=64 --repeats=5 \
                   --no_cache_batch_sizes= --compare_to=d7379d3
Every row generates its whole budget (the stop id lies outside the
vocabulary), so tokens/s is well defined; params are random, which changes
no cost.

The defaults fit a 2-core CPU in about a quarter of an hour. On a GPU or TPU
raise them, e.g. --new_tokens=128 --repeats=5 --no_cache_steps=256
--no_cache_batch_sizes=1,8,64 (and --dtype=bfloat16 for the usual serving
dtype); nothing else changes. One device is used.
"""

import dataclasses
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from benchmarks import machine
from score_jax import data, rollout, sampling
from score_jax.models import presets
from score_jax.models import transformer as tf

_DEFAULT_OUTPUT = os.path.join(
  os.path.dirname(__file__), "results", "rollout.json"
)

_OUTPUT = flags.DEFINE_string(
  "output",
  None,
  f"JSON path; default {_DEFAULT_OUTPUT} (with --quick: "
  "rollout_quick.json in the temp directory, so the committed results stay).",
)
flags.DEFINE_list("presets", ["25m", "100m"], "Model presets.")
flags.DEFINE_list(
  "batch_sizes",
  ["1", "8", "64", "256"],
  "Batch sizes of the rollout and the decode step.",
)
flags.DEFINE_integer("new_tokens", 16, "Tokens generated per attempt.")
flags.DEFINE_integer("prompt_len", 16, "Prompt tokens per row.")
flags.DEFINE_integer(
  "instruction_len", 8, "Tokens of the instruction turn between attempts."
)
flags.DEFINE_integer("repeats", 3, "Timed calls per measurement (median).")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 is greedy.")
flags.DEFINE_enum(
  "dtype",
  "float32",
  ["float32", "bfloat16", "float16"],
  "Params, activations and KV cache dtype.",
)
flags.DEFINE_integer(
  "compare_new_tokens",
  256,
  "New tokens per row (both attempts together) "
  "at which the rollout is compared with the no-cache decode.",
)
flags.DEFINE_list(
  "no_cache_batch_sizes", ["1", "8"], "Batch sizes of the no-cache decode."
)
flags.DEFINE_integer(
  "no_cache_steps",
  2,
  "Steps of the no-cache decode that are timed. Every "
  "step runs the same full forward over the same [B, S] buffer, so its "
  "tokens/s does not depend on how many are timed.",
)
flags.DEFINE_string(
  "compare_to",
  "",
  "A git revision of this repository: its two-attempt "
  "rollout and this tree's are timed call by call, interleaved, in this "
  "run, at each preset and batch size (median of --repeats each), and the "
  "speedup reported (`compare`).",
)
flags.DEFINE_bool(
  "quick",
  False,
  "Smoke run in seconds: tiny preset and sizes (flags given "
  "explicitly still win).",
)

_QUICK_VALUES = dict(
  presets=["test"],
  batch_sizes=["2"],
  new_tokens=4,
  prompt_len=8,
  instruction_len=4,
  repeats=1,
  compare_new_tokens=16,
  no_cache_batch_sizes=["2"],
  no_cache_steps=2,
)

PAD_ID = 0
NUM_ATTEMPTS = 2


@dataclasses.dataclass(frozen=True)
class Settings:
  presets: list
  batch_sizes: list
  new_tokens: int
  prompt_len: int
  instruction_len: int
  repeats: int
  temperature: float
  dtype: str
  compare_new_tokens: int
  no_cache_batch_sizes: list
  no_cache_steps: int
  compare_to: str
  quick: bool

  @property
  def sampler(self) -> sampling.SamplerConfig:
    return sampling.SamplerConfig(temperature=self.temperature)

  def rollout_config(self, attempt_len: int) -> rollout.RolloutConfig:
    return rollout.RolloutConfig(
      num_attempts=NUM_ATTEMPTS,
      max_attempt_len=attempt_len,
      sampler=self.sampler,
    )


def _settings() -> Settings:
  values = {
    f.name: flags.FLAGS[f.name].value for f in dataclasses.fields(Settings)
  }
  if values["quick"]:
    values.update(
      {k: v for k, v in _QUICK_VALUES.items() if not flags.FLAGS[k].present}
    )
  for name in ("batch_sizes", "no_cache_batch_sizes"):
    values[name] = [int(b) for b in values[name]]
  if values["compare_new_tokens"] % NUM_ATTEMPTS:
    raise ValueError(
      f"--compare_new_tokens={values['compare_new_tokens']} "
      f"must split evenly over {NUM_ATTEMPTS} attempts."
    )
  return Settings(**values)


class Case:
  """One preset's model, params and random prompts of the benchmark shapes."""

  def __init__(self, preset: str, s: Settings):
    self.cfg = dataclasses.replace(
      presets.build_config({"preset": preset}),
      param_dtype=s.dtype,
      dtype=s.dtype,
    )
    self.model = tf.Transformer(self.cfg)
    self.params = jax.jit(self.model.init)(jax.random.key(0))
    self.num_params = sum(x.size for x in jax.tree.leaves(self.params))
    # The tied embedding is the logits matmul; the lookup reads only B rows.
    self.logits_params = self.cfg.vocab_size * self.cfg.d_model
    self.s = s
    rng = np.random.default_rng(0)
    vocab = self.cfg.vocab_size
    self.instruction_ids = tuple(
      int(i) for i in rng.integers(1, vocab, s.instruction_len)
    )
    # An id the model cannot emit: every row decodes its whole budget.
    self.stop_ids = (vocab,)
    self._rng = rng

  def prompts(self, batch: int):
    prompts = self._rng.integers(
      1, self.cfg.vocab_size, (batch, self.s.prompt_len)
    ).tolist()
    return data.pad_prompts(prompts, PAD_ID, buckets=(self.s.prompt_len,))

  def num_slots(self, attempt_len: int) -> int:
    return rollout.num_slots(
      self.s.prompt_len,
      self.s.instruction_len,
      self.s.rollout_config(attempt_len),
    )


def measure_rollout(case: Case, batch: int, attempt_len: int) -> dict:
  """Generated tokens/s of the two-attempt rollout, prefills included."""
  fn = rollout.make_rollout_fn(
    case.model,
    case.instruction_ids,
    case.stop_ids,
    PAD_ID,
    case.s.rollout_config(attempt_len),
  )
  tokens, valid = case.prompts(batch)
  timing, episode = machine.compile_and_time(
    fn, case.params, tokens, valid, jax.random.key(1), repeats=case.s.repeats
  )
  if not np.all(np.asarray(episode.lengths_ba) == attempt_len):
    raise RuntimeError(
      "a row stopped before its budget; tokens/s would be ill-defined"
    )
  generated = batch * NUM_ATTEMPTS * attempt_len
  return dict(
    batch=batch,
    new_tokens_per_attempt=attempt_len,
    generated_tokens=generated,
    tokens_per_s=generated / timing["median_s"],
    **timing,
  )


def measure_decode_step(case: Case, batch: int, limits: dict) -> dict:
  """Seconds per `sampling.decode` step of attempt 1 after a prefilled
  prompt (the rollout's cache and sampler), with its roofline analysis."""
  s, steps = case.s, case.s.new_tokens
  tokens, _ = case.prompts(batch)  # every prompt fills its bucket
  # The layers split once, as the rollout does before its decode loops.
  params = jax.jit(tf.unstack_layers)(case.params)
  model = case.model

  def prefill(params, tokens):
    logits, prompt = model.prefill(
      params,
      tokens,
      jnp.full((batch,), s.prompt_len, jnp.int32),
      model.empty_segment(batch, s.prompt_len),
    )
    attempt = dataclasses.replace(
      model.empty_segment(batch, steps), offsets_e=prompt.ends_e()
    )
    return logits, (prompt, attempt)

  logits, segments = jax.jit(prefill)(params, jnp.asarray(tokens))
  decode = lambda params, logits, segments, keys: sampling.decode(
    model,
    params,
    segments,
    1,
    logits,
    keys,
    steps,
    case.stop_ids,
    PAD_ID,
    s.sampler,
  )
  keys = sampling.row_keys(jax.random.key(1), jnp.arange(batch), 0)
  timing, _ = machine.compile_and_time(
    decode, params, logits, segments, keys, repeats=s.repeats
  )
  step_s = timing["median_s"] / steps
  # Step i attends to the prompt and i + 1 generated tokens.
  mean_fill = s.prompt_len + (steps + 1) / 2
  return dict(
    batch=batch,
    steps=steps,
    step_s=step_s,
    tokens_per_s=batch / step_s,
    compile_s=timing["compile_s"],
    **roofline(case, batch, mean_fill, step_s, limits),
  )


def roofline(
  case: Case, batch: int, mean_fill: float, step_s: float, limits: dict
) -> dict:
  """One decode step's bytes and FLOPs, the bound they set, and how close the
  measured step comes to it."""
  cfg = case.cfg
  itemsize = jnp.dtype(cfg.dtype).itemsize
  non_embedding_params = case.num_params - case.logits_params
  kv_bytes_per_slot = (
    2 * cfg.num_layers * batch * cfg.num_kv_heads * cfg.head_dim * itemsize
  )
  params_bytes = case.num_params * jnp.dtype(cfg.param_dtype).itemsize
  kv_bytes = kv_bytes_per_slot * mean_fill
  step_bytes = params_bytes + kv_bytes
  matmul_flops = 2 * (non_embedding_params + case.logits_params) * batch
  # q.k and p.v: 2 FLOPs per multiply-add, over every head and filled slot.
  attention_flops = (
    4 * cfg.num_layers * batch * cfg.num_heads * cfg.head_dim * mean_fill
  )
  step_flops = matmul_flops + attention_flops
  memory_bound_s = step_bytes / limits["memory"]["bytes_per_s"]
  compute_bound_s = step_flops / limits["matmul"]["flops_per_s"]
  return dict(
    mean_cache_fill=mean_fill,
    params_bytes=params_bytes,
    kv_bytes_at_mean_fill=kv_bytes,
    # Attempt 1's masked attention (XLA) reads the prompt's and the
    # attempt's slots, filled or not.
    kv_bytes_read=kv_bytes_per_slot * (case.s.prompt_len + case.s.new_tokens),
    bytes_per_step=step_bytes,
    flops_per_step=step_flops,
    attention_flops_per_step=attention_flops,
    memory_bound_s=memory_bound_s,
    compute_bound_s=compute_bound_s,
    bound_s=max(memory_bound_s, compute_bound_s),
    bound_by="memory" if memory_bound_s >= compute_bound_s else "compute",
    step_over_memory_bound=step_s / memory_bound_s,
    step_over_bound=step_s / max(memory_bound_s, compute_bound_s),
    bandwidth_fraction=step_bytes / step_s / limits["memory"]["bytes_per_s"],
    matmul_fraction=step_flops / step_s / limits["matmul"]["flops_per_s"],
  )


def no_cache_decode(
  model: tf.Transformer,
  params,
  tokens_bs,
  valid_bs,
  keys_b,
  start: int,
  num_steps: int,
  cfg: sampling.SamplerConfig,
):
  """Writes `num_steps` tokens at slots start, start + 1, ..., each sampled
  from a full forward pass over the whole [B, S] buffer (no KV cache), with
  the logits of the one position it samples from."""

  def step(i, carry):
    tokens_bs, valid_bs = carry
    slot = start + i
    logits_b1v = model.apply(
      params,
      tokens_bs,
      tf.positions_from_mask(valid_bs),
      tf.episode_ids(valid_bs),
      logits_at_b=jnp.full((tokens_bs.shape[0],), slot - 1),
    )
    token_b, _ = sampling.sample_tokens(
      logits_b1v[:, 0], sampling.token_keys(keys_b, i), cfg
    )
    tokens_bs = jax.lax.dynamic_update_index_in_dim(tokens_bs, token_b, slot, 1)
    valid_bs = jax.lax.dynamic_update_index_in_dim(
      valid_bs, jnp.ones_like(token_b, bool), slot, 1
    )
    return tokens_bs, valid_bs

  return jax.lax.fori_loop(0, num_steps, step, (tokens_bs, valid_bs))


def measure_no_cache(case: Case, batch: int, limits: dict) -> dict:
  """The no-cache decode in the episode buffer of the compared rollout, the
  rollout's speedup over it, and the speedup a rollout whose every step ran
  at the roofline would have (the ceiling this machine allows)."""
  s = case.s
  attempt_len = s.compare_new_tokens // NUM_ATTEMPTS
  num_slots = case.num_slots(attempt_len)
  steps = min(s.no_cache_steps, s.compare_new_tokens)
  prompt_tokens, prompt_valid = case.prompts(batch)
  tokens = np.zeros((batch, num_slots), np.int32)
  valid = np.zeros((batch, num_slots), bool)
  tokens[:, : s.prompt_len], valid[:, : s.prompt_len] = (
    prompt_tokens,
    prompt_valid,
  )
  decode = lambda params, tokens, valid, keys: no_cache_decode(
    case.model, params, tokens, valid, keys, s.prompt_len, steps, s.sampler
  )
  keys = sampling.row_keys(jax.random.key(1), jnp.arange(batch), 0)
  timing, _ = machine.compile_and_time(
    decode, case.params, tokens, valid, keys, repeats=s.repeats
  )
  no_cache_tps = batch * steps / timing["median_s"]
  cached = measure_rollout(case, batch, attempt_len)
  bound_s = roofline(
    case, batch, s.prompt_len + s.compare_new_tokens / 2, 1.0, limits
  )["bound_s"]
  return dict(
    batch=batch,
    new_tokens=s.compare_new_tokens,
    num_slots=num_slots,
    steps_timed=steps,
    no_cache_tokens_per_s=no_cache_tps,
    no_cache_compile_s=timing["compile_s"],
    no_cache_all_s=timing["all_s"],
    rollout_tokens_per_s=cached["tokens_per_s"],
    rollout_all_s=cached["all_s"],
    speedup=cached["tokens_per_s"] / no_cache_tps,
    speedup_at_roofline=batch / bound_s / no_cache_tps,
  )


def load_revision(revision: str) -> dict:
  """The rollout, transformer, presets and sampling modules of `revision`
  (git archive of score_jax/ into a temporary directory), imported beside
  this tree's: score_jax's entries of sys.modules are swapped out while
  they import, then back; the loaded modules keep their own imports."""
  root = tempfile.mkdtemp(prefix="score_jax_")
  archive = subprocess.run(
    ["git", "archive", revision, "score_jax"],
    capture_output=True,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )
  if archive.returncode:
    raise app.UsageError(
      f"--compare_to={revision}: {archive.stderr.decode().strip()}"
    )
  archive = archive.stdout
  subprocess.run(["tar", "-x", "-C", root], input=archive, check=True)
  ours = lambda: {
    k: m
    for k, m in sys.modules.items()
    if k == "score_jax" or k.startswith("score_jax.")
  }
  saved = ours()
  for name in saved:
    del sys.modules[name]
  sys.path.insert(0, root)
  try:
    return {
      name: importlib.import_module(f"score_jax.{name}")
      for name in (
        "rollout",
        "models.transformer",
        "models.presets",
        "sampling",
      )
    }
  finally:
    sys.path.remove(root)
    for name in ours():
      del sys.modules[name]
    sys.modules.update(saved)


def measure_compare(case: Case, batch: int, baseline: dict) -> dict:
  """The two-attempt rollout of `baseline` (load_revision) and of this
  tree, on the same params and prompts, timed in alternation."""
  s = case.s
  tokens, valid = case.prompts(batch)
  ours = dict(rollout=rollout, sampling=sampling)
  compiled, episodes = {}, {}
  for name, modules in (("baseline", baseline), ("this_tree", ours)):
    model = (
      modules["models.transformer"].Transformer(case.cfg)
      if name == "baseline"
      else case.model
    )
    cfg = modules["rollout"].RolloutConfig(
      num_attempts=NUM_ATTEMPTS,
      max_attempt_len=s.new_tokens,
      sampler=modules["sampling"].SamplerConfig(temperature=s.temperature),
    )
    fn = modules["rollout"].make_rollout_fn(
      model, case.instruction_ids, case.stop_ids, PAD_ID, cfg
    )
    args = (case.params, tokens, valid, jax.random.key(1))
    compiled[name] = (fn.lower(*args).compile(), args)
    episodes[name] = jax.device_get(compiled[name][0](*args))
  seconds = {name: [] for name in compiled}
  for _ in range(s.repeats):
    for name, (fn, args) in compiled.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      seconds[name].append(time.perf_counter() - start)
  median = {name: float(np.median(t)) for name, t in seconds.items()}
  return dict(
    batch=batch,
    new_tokens_per_attempt=s.new_tokens,
    baseline_s=median["baseline"],
    this_tree_s=median["this_tree"],
    baseline_all_s=seconds["baseline"],
    this_tree_all_s=seconds["this_tree"],
    speedup=median["baseline"] / median["this_tree"],
    same_tokens=bool(
      np.array_equal(
        episodes["baseline"].tokens_bs, episodes["this_tree"].tokens_bs
      )
    ),
  )


def benchmark_preset(preset: str, s: Settings, limits: dict) -> dict:
  case = Case(preset, s)
  cfg = case.cfg
  logging.info("%s: %.1fM params", preset, case.num_params / 1e6)
  result = dict(
    config=dataclasses.asdict(cfg),
    num_params=case.num_params,
    non_embedding_params=case.num_params - case.logits_params,
    rollout_slots=case.num_slots(s.new_tokens),
    rollout=[],
    decode_step=[],
    no_cache=[],
    compare=[],
  )
  for batch in s.batch_sizes:
    result["rollout"].append(measure_rollout(case, batch, s.new_tokens))
    result["decode_step"].append(measure_decode_step(case, batch, limits))
    logging.info(
      "%s batch %d: rollout %.0f tok/s, step %.2f ms (%.2fx "
      "memory bound, %.0f%% of matmul rate)",
      preset,
      batch,
      result["rollout"][-1]["tokens_per_s"],
      result["decode_step"][-1]["step_s"] * 1e3,
      result["decode_step"][-1]["step_over_memory_bound"],
      100 * result["decode_step"][-1]["matmul_fraction"],
    )
  if s.compare_to:
    baseline = load_revision(s.compare_to)
    for batch in s.batch_sizes:
      result["compare"].append(measure_compare(case, batch, baseline))
      logging.info(
        "%s batch %d: %.2fx faster than %s",
        preset,
        batch,
        result["compare"][-1]["speedup"],
        s.compare_to,
      )
  for batch in s.no_cache_batch_sizes:
    result["no_cache"].append(measure_no_cache(case, batch, limits))
    logging.info(
      "%s batch %d: no-cache %.1f tok/s, rollout %.1fx faster "
      "(%.1fx at the roofline)",
      preset,
      batch,
      result["no_cache"][-1]["no_cache_tokens_per_s"],
      result["no_cache"][-1]["speedup"],
      result["no_cache"][-1]["speedup_at_roofline"],
    )
  return result


def check_targets(results: dict) -> dict:
  """The issue's targets, per preset, from the measurements."""
  targets = {}
  for preset, r in results.items():
    steps = {d["batch"]: d for d in r["decode_step"]}
    checks = {}
    if 1 in steps:
      value = steps[1]["step_over_memory_bound"]
      checks["batch_1_step_over_memory_bound"] = dict(
        value=value, target="<= 2", met=value <= 2
      )
    if 256 in steps:
      value = steps[256]["matmul_fraction"]
      checks["batch_256_matmul_fraction"] = dict(
        value=value, target=">= 0.5", met=value >= 0.5
      )
    for row in r["no_cache"]:
      checks[f"batch_{row['batch']}_speedup_over_no_cache"] = dict(
        value=row["speedup"], target=">= 20", met=row["speedup"] >= 20
      )
    for row in r["compare"]:
      checks[f"batch_{row['batch']}_speedup_over_baseline"] = dict(
        value=row["speedup"], target=">= 1.5", met=row["speedup"] >= 1.5
      )
    targets[preset] = checks
  return targets


def print_summary(report: dict) -> None:
  print(
    f"{report['device_kind']}: memory "
    f"{report['machine_limits']['memory']['bytes_per_s'] / 1e9:.1f} GB/s, "
    f"matmul {report['machine_limits']['matmul']['flops_per_s'] / 1e9:.1f}"
    " GFLOP/s"
  )
  for preset, r in report["presets"].items():
    print(f"{preset} ({r['num_params'] / 1e6:.1f}M params)")
    print(
      "  batch  rollout tok/s  step ms  bound ms  step/mem-bound  matmul frac"
    )
    for roll, step in zip(r["rollout"], r["decode_step"]):
      print(
        f"  {roll['batch']:5d}  {roll['tokens_per_s']:13.1f}  "
        f"{step['step_s'] * 1e3:7.2f}  {step['bound_s'] * 1e3:8.2f}  "
        f"{step['step_over_memory_bound']:14.2f}  "
        f"{step['matmul_fraction']:11.2f}"
      )
    for row in r["compare"]:
      print(
        f"  batch {row['batch']}: {row['this_tree_s']:.2f} s, "
        f"{row['speedup']:.2f}x faster than --compare_to "
        f"({row['baseline_s']:.2f} s; same tokens: {row['same_tokens']})"
      )
    for row in r["no_cache"]:
      print(
        f"  batch {row['batch']}, {row['new_tokens']} new tokens: rollout "
        f"{row['rollout_tokens_per_s']:.1f} tok/s, no cache "
        f"{row['no_cache_tokens_per_s']:.2f} tok/s, {row['speedup']:.1f}x"
      )
  machine.print_targets(report["targets"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; use --flags.")
  s = _settings()
  start = time.perf_counter()
  info = machine.describe(
    " ".join(["python -m benchmarks.rollout"] + sys.argv[1:])
  )
  logging.info("device %s, jax %s", info["device_kind"], info["jax_version"])
  limits = machine.limits(s.dtype, s.quick)
  results = {p: benchmark_preset(p, s, limits) for p in s.presets}
  report = dict(
    **info,
    settings=dataclasses.asdict(s),
    machine_limits=limits,
    targets=check_targets(results),
    notes=[
      "generated tokens = batch * 2 attempts * new_tokens_per_attempt; "
      "tokens/s includes the prompt and instruction prefills.",
      "decode_step: sampling.decode alone after a prefilled prompt, "
      "new_tokens steps in the rollout's buffer; bound_s = max(bytes / "
      "bandwidth, FLOPs / matmul rate) with the KV cache at the mean fill.",
      "compare: this tree's rollout against --compare_to's, on the same "
      "params and prompts, one call of each in turn, repeats times; "
      "speedup = baseline median / this tree's median.",
      "no_cache: the rollout at compare_new_tokens (two attempts of half "
      "each) against a decode that reruns the full forward (logits at the "
      "sampled position only) over the same [B, S] buffer per token; "
      "steps_timed of "
      "its identical steps are timed. Batch sizes beyond "
      "no_cache_batch_sizes are infeasible for it on a 2-core CPU. "
      "speedup_at_roofline: the speedup of a rollout whose every step "
      "took the decode step's bound at the mean fill, the ceiling the "
      "machine's bandwidth and matmul rate allow.",
    ],
    presets=results,
    total_s=time.perf_counter() - start,
  )
  output = _OUTPUT.value or (
    os.path.join(tempfile.gettempdir(), "rollout_quick.json")
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
