r"""The step time a TPU slice would take, from the compiled programs.

`--mode=aot` compiles the rollout and the train step for a slice
(score_jax/aot.py) and hands their optimised HLO, read by
hlo_analysis.analyze, to `project`, which times what one device executes:

  * an op (a fusion, a copy, a kernel) takes PER_OP_SECONDS plus the longer
    of its FLOPs at the chip's peak and its HBM bytes at the chip's HBM
    bandwidth (a Pallas kernel: its pl.CostEstimate, or the estimator
    registered for its name, scaled by the workload); an async copy or
    slice into on-chip memory only its bytes (libtpu's cost model gives
    such a DMA's start no cycles);
  * a collective takes PER_OP_SECONDS, plus ICI_HOP_SECONDS for each hop
    of a bidirectional ring over its replica group of n devices, plus its
    traffic at the chip's bidirectional ICI bandwidth per link W
    (`collective_seconds`; B is what a device puts in):
        all-gather          B (n - 1)        n // 2 hops
        reduce-scatter      B (n - 1) / n    n // 2 hops
        all-reduce          2 B (n - 1) / n  2 (n // 2) hops
        all-to-all          B n / 4          n // 2 hops
        collective-permute  2 B              1 hop (one direction of a link)
    the scaling book's ring costs ("How to Scale Your Model", part 3), each
    group over one torus axis. An async collective runs on the ICI while
    the ops the schedule puts between its start and its done run; only what
    they do not cover is exposed. An async pair is one collective. A fusion
    of a collective and the matmul it feeds takes the longer of the two;
  * a loop takes its trips times its body (condition included): static
    trip counts from the compiler, the trips of loops under the named
    scopes `decode` and `micro_batches` from the workload (`Workload`).

Reported per program (the rollout, the train step, any other a step runs
once) and for the whole step, at the stated per-op latency
and ICI bandwidth and with both at twice the cost (the latencies doubled,
the bandwidth halved; the latter is also a ring without its wraparound
link), for two workloads (`worst_case`, `typical`):

  * the rollout as a share of its HBM roofline: the bytes it cannot avoid
    (the decode weights once per decode step, and the KV cache of the real
    tokens each active row attends to) at HBM bandwidth, over its time;
  * the train step as MFU on real tokens. Convention (PaLM, Chowdhery et
    al. 2022, appendix B): per real token (prompt, attempts, instruction
    turns; no padding, no slot after a row stopped) 6N + 12 L H Q T FLOPs
    for the policy (forward and backward) and 2N + 4 L H Q T for the
    reference's forward, N all parameters (the tied embedding counted once:
    it is the logits matmul), L layers, H query heads, Q head dim, T the
    episode's real tokens; rematerialisation not counted;
  * the host's grading: the answers each host grades a step at the
    measured throughput of benchmarks.rewards per worker times
    config.rewards.num_workers, exposed but for the time of the programs
    that need no reward and run meanwhile (`Grading.overlap_programs`:
    the reference's scoring, which the trainer dispatches before it
    grades).
"""

import dataclasses
import json
import math
import os
from typing import Callable, Mapping, Optional, Union

import numpy as np

from score_jax import hlo_analysis, packing
from score_jax.models import tpu_attention

GIB = 2**30
# Figures are per chip (one JAX device: a megacore v4 or v5p chip is one).
SCALING_BOOK = (
  "How to Scale Your Model (jax-ml.github.io/scaling-book), "
  "part 2 'All About TPUs', chip and ICI tables"
)


@dataclasses.dataclass(frozen=True)
class Chip:
  """Per chip: HBM, bf16 FLOP/s, HBM bytes/s and the ICI bandwidth of one
  link, both directions together (the scaling book's 'bidi' figure: what a
  ring with its wraparound moves per device per second)."""

  hbm_bytes: int
  peak_flops: float
  hbm_bytes_per_s: float
  ici_bytes_per_s: float
  source: str


CHIPS = {
  "TPU v5 lite": Chip(
    16 * GIB,
    197e12,
    819e9,
    9e10,
    SCALING_BOOK
    + (
      "; Cloud TPU v5e page: 197 TFLOP/s, 819 GB/s HBM, 400 GB/s "
      "bidirectional ICI a chip over 4 ports"
    ),
  ),
  "TPU v5": Chip(
    95 * GIB,
    459e12,
    2765e9,
    1.8e11,
    SCALING_BOOK
    + (
      "; Cloud TPU v5p page: 459 TFLOP/s, 2765 GB/s HBM, 1200 GB/s "
      "bidirectional ICI a chip over 6 ports"
    ),
  ),
  "TPU v4": Chip(
    32 * GIB,
    275e12,
    1.2e12,
    9e10,
    SCALING_BOOK
    + (" (v4p: 2.75e14 FLOP/s, 1.2e12 B/s HBM, 9e10 B/s ICI a link)"),
  ),
  "TPU v6 lite": Chip(
    32 * GIB,
    918e12,
    1638e9,
    1.8e11,
    SCALING_BOOK
    + (
      "; Cloud TPU v6e page: 918 TFLOP/s, 1638 GB/s HBM, 800 GB/s "
      "bidirectional ICI a chip over 4 ports"
    ),
  ),
}
# What an executed op costs however small: libtpu 0.0.42.1's own cost model
# (the estimated_cycles it writes into each TPU fusion's backend config)
# puts a one-tile f32[8,128] fusion at 1841 cycles on v5e, 1.2 us at the
# 1.5 GHz clock the scaling book gives (tests/test_projection.py checks
# it); rounded to 1 us for every chip.
PER_OP_SECONDS = 1e-6
PER_OP_SOURCE = (
  "libtpu 0.0.42.1's cost model: a one-tile fusion is 1841 "
  "cycles on v5e, 1.2 us at 1.5 GHz (scaling book)"
)
# The intrinsic latency of one ICI hop, whatever the bytes (scaling book,
# part 3 'Sharded Matrices', 'A note on ICI latency': "typically around
# 1us").
ICI_HOP_SECONDS = 1e-6
# Twice the cost: latencies doubled, ICI bandwidth halved.
SENSITIVITY = 2.0


@dataclasses.dataclass(frozen=True)
class Costs:
  """What a program (or a part) costs one device; seconds at one chip and
  one set of latencies. `seconds` >= roofline + fixed (ops run one at a
  time); the rest is ICI time that nothing covers."""

  seconds: float = 0.0
  roofline: float = 0.0  # per op, the longer of FLOPs and HBM bytes
  fixed: float = 0.0  # PER_OP_SECONDS a executed op
  ici: float = 0.0  # collectives' ICI time, covered or not
  ops: float = 0.0  # executed ops
  flops: float = 0.0
  hbm_bytes: float = 0.0
  ici_bytes: float = 0.0  # traffic per device, at the link bandwidth

  @property
  def ici_exposed(self) -> float:
    """The ICI seconds no op covers: `seconds` less roofline and fixed."""
    return max(self.seconds - self.roofline - self.fixed, 0.0)

  def scaled(self, k: float) -> "Costs":
    """Every figure, `seconds` included, `k` times (a loop's trips)."""
    return Costs(*(k * getattr(self, f.name) for f in dataclasses.fields(self)))

  def plus(self, other: "Costs", seconds: float) -> "Costs":
    """Both parts' work, run in `seconds`.

    Args:
      other: the other part's costs.
      seconds: the time the two take together (their own are not added).

    Returns:
      Costs of `seconds`, every other figure the sum of the two parts'.
    """
    return Costs(
      seconds,
      *(
        getattr(self, f.name) + getattr(other, f.name)
        for f in dataclasses.fields(self)[1:]
      ),
    )


@dataclasses.dataclass(frozen=True)
class Latencies:
  """The figures a projection rides on; `scale` 2 is the pessimistic line."""

  chip: Chip
  scale: float = 1.0

  @property
  def per_op(self) -> float:
    """The seconds an executed op costs however small, scaled."""
    return PER_OP_SECONDS * self.scale

  @property
  def hop(self) -> float:
    """The seconds of one ICI hop's latency, scaled."""
    return ICI_HOP_SECONDS * self.scale

  @property
  def ici_bytes_per_s(self) -> float:
    """The bidirectional bandwidth of one ICI link, divided by the scale."""
    return self.chip.ici_bytes_per_s / self.scale


def collective_traffic(c: hlo_analysis.Collective) -> tuple[float, int]:
  """(bytes per device at the bidirectional link bandwidth, ring hops) of a
  collective; the table in the module docstring."""
  n, b = max(c.group_size, 1), c.bytes
  half = max(n // 2, 1)
  if n == 1 and c.kind != "collective-permute":
    return 0.0, 0
  return {
    "all-gather": (b * (n - 1), half),
    "reduce-scatter": (b * (n - 1) / n, half),
    "all-reduce": (2 * b * (n - 1) / n, 2 * half),
    "all-to-all": (b * n / 4, half),
    "collective-permute": (2 * b, 1),
  }[c.kind]


def collective_seconds(
  c: hlo_analysis.Collective, lat: Latencies
) -> tuple[float, float]:
  """The ICI time and traffic of one collective, without the per-op cost
  every op pays (the module docstring's table).

  Args:
    c: the collective: its kind, the bytes a device puts in and its
      replica group's size.
    lat: the hop latency and the link bandwidth, at their scale.

  Returns:
    (seconds on the ICI: its ring hops' latency plus its traffic at the
    link bandwidth, its traffic in bytes per device).
  """
  traffic, hops = collective_traffic(c)
  return hops * lat.hop + traffic / lat.ici_bytes_per_s, traffic


# Cost functions of kernels that compile without a cost estimate, by kernel
# name (pallas_call's `name`): fn(kernel) -> hlo_analysis.CostEstimate per
# device, from the custom call's operand and result shapes.
KERNEL_ESTIMATORS: dict[
  str, Callable[[hlo_analysis.Kernel], hlo_analysis.CostEstimate]
] = {}


def register_kernel_estimator(name: str):
  """Decorator: `fn(kernel) -> CostEstimate` costs the kernels named
  `name` (jax's splash attention, say, which states no estimate)."""

  def register(fn):
    KERNEL_ESTIMATORS[name] = fn
    return fn

  return register


def _splash_estimator(phase: str):
  def estimate(kernel: hlo_analysis.Kernel) -> hlo_analysis.CostEstimate:
    # Operand 2 holds the queries, [rows, query heads, slots, head_dim];
    # the compiler drops a leading dimension of 1 (one row a device).
    q = kernel.operand_shapes[2]
    *lead, slots, head_dim = hlo_analysis._dims(q)
    rows_heads = math.prod(lead)
    flops, moved = tpu_attention.splash_cost(
      phase,
      rows_heads,
      slots,
      head_dim,
      hlo_analysis.array_bytes(q) // (rows_heads * slots * head_dim),
    )
    return hlo_analysis.CostEstimate(flops, moved)

  return estimate


for _name, _phase in tpu_attention.SPLASH_KERNELS.items():
  register_kernel_estimator(_name)(_splash_estimator(_phase))


class MissingCostEstimate(ValueError):
  """A kernel with neither a cost estimate nor a registered estimator."""


class MissingTripCount(ValueError):
  """A dynamic loop whose workload supplies no trip count, or more trips
  than its condition allows."""


Trips = Union[Mapping[str, float], Callable[[hlo_analysis.Loop], float]]


def kernel_estimate(kernel: hlo_analysis.Kernel) -> hlo_analysis.CostEstimate:
  """A kernel's cost: its registered estimator's, else its compiled
  pl.CostEstimate; neither is an error."""
  if kernel.name in KERNEL_ESTIMATORS:
    return KERNEL_ESTIMATORS[kernel.name](kernel)
  if kernel.estimate is None:
    raise MissingCostEstimate(
      f"Pallas kernel {kernel.name} compiled without a cost estimate; pass "
      "cost_estimate=pl.CostEstimate(...) to its pallas_call, or register "
      "one with projection.register_kernel_estimator("
      f"{kernel.name!r})."
    )
  return kernel.estimate


def loop_trips(loop: hlo_analysis.Loop, trips: Trips) -> float:
  """How often `loop` runs: static, or the workload's for its scope (at
  most the bound its condition states).

  Args:
    loop: a while loop of an analysed program; its `scope` is None when
      its trip count is static.
    trips: trip counts of the dynamic loops, by scope, or a callable of
      the Loop.

  Returns:
    The loop's trips.

  Raises:
    MissingTripCount: `trips` has no count for the loop's scope, or one
      above its bound.
  """
  if loop.scope is None:
    return float(loop.trips)
  count = trips(loop) if callable(trips) else trips.get(loop.scope)
  if count is None:
    raise MissingTripCount(
      f"loop {loop.op_name} runs as often as the workload says (scope "
      f"{loop.scope}), and the workload gives no trip count for it; add "
      f"{loop.scope!r} to its trips."
    )
  if loop.bound is not None and count > loop.bound:
    raise MissingTripCount(
      f"loop {loop.op_name}: the workload asks {count:g} trips, its "
      f"condition allows at most {loop.bound}; cap the workload's "
      f"{loop.scope!r} trips."
    )
  return float(count)


def program_costs(
  steps: tuple,
  lat: Latencies,
  trips: Trips,
  kernel_scaling: Optional[Mapping[str, float]] = None,
) -> Costs:
  """One device's costs of a program (hlo_analysis.analyze's `steps`).

  Two streams: the ops run one after the other; collectives run on the
  ICI, a sync one while the ops wait, an async one from its start until
  the op that waits for it (`Op.waits_for`), behind the ops between.

  Args:
    steps: hlo_analysis.analyze's output (or a Loop's body).
    lat: the chip and the latency scale.
    trips: trip counts of the dynamic loops, by scope, or a callable.
    kernel_scaling: {kernel name: factor} on a kernel's cost estimate (a
      ragged kernel whose compiled estimate is for full lengths); None:
      none scaled.

  Returns:
    Costs; `seconds` is the time the ops and the exposed ICI take.
  """
  chip, total = lat.chip, Costs()
  kernel_scaling = kernel_scaling or {}
  now = ici_free = 0.0
  pending = {}
  for step in steps:
    if isinstance(step, hlo_analysis.Loop):
      body = program_costs(step.body, lat, trips, kernel_scaling)
      part = body.scaled(loop_trips(step, trips))
      total, now = total.plus(part, 0.0), now + part.seconds
      continue
    if step.waits_for:
      names = (
        list(pending)
        if step.waits_for == ("*",)
        else [n for n in step.waits_for if n in pending]
      )
      now = max([now] + [pending.pop(n) for n in names])
      continue
    flops, moved = step.flops, step.bytes
    if step.kernel is not None:
      estimate = kernel_estimate(step.kernel)
      k = kernel_scaling.get(step.kernel.name, 1.0)
      flops, moved = k * estimate.flops, k * estimate.bytes
    roofline = max(flops / chip.peak_flops, moved / chip.hbm_bytes_per_s)
    ici = traffic = 0.0
    # An async copy or slice (memory-space assignment moving a buffer into
    # on-chip memory) is a DMA the op stream issues: libtpu's cost model
    # gives its start no cycles. Its bytes still count, at HBM bandwidth.
    launch = 0.0 if step.starts and step.collective is None else lat.per_op
    if step.collective is None:
      now += launch + roofline
    else:
      ici, traffic = collective_seconds(step.collective, lat)
      begin = max(now + lat.per_op, ici_free)
      if step.starts:
        ici_free = begin + ici
        pending[step.name] = ici_free
        now += lat.per_op
      else:  # The ops wait; a fused matmul overlaps its own collective.
        now = ici_free = begin + max(ici, roofline)
    total = total.plus(
      Costs(
        roofline=roofline,
        fixed=launch,
        ici=ici,
        ops=1,
        flops=flops,
        hbm_bytes=moved,
        ici_bytes=traffic,
      ),
      0.0,
    )
  seconds = max([now, ici_free] + list(pending.values()))
  return dataclasses.replace(total, seconds=seconds)


# -- Workloads ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Lengths:
  """A distribution of attempt lengths in tokens (the stop token counted),
  over 1..cap: pmf[k - 1] = P(length = k)."""

  pmf: tuple[float, ...]
  source: str

  @property
  def cap(self) -> int:
    """The longest length, in tokens."""
    return len(self.pmf)

  def mean(self) -> float:
    """The mean length, in tokens."""
    return sum((k + 1) * p for k, p in enumerate(self.pmf))

  def moment2(self) -> float:
    """E[length ** 2], in tokens squared."""
    return sum((k + 1) ** 2 * p for k, p in enumerate(self.pmf))

  def expected_max(self, rows: int) -> float:
    """E[max of `rows` independent lengths], exactly from the CDF:
    sum over k < cap of 1 - F(k)^rows."""
    total, cdf = 0.0, 0.0
    for p in self.pmf[:-1]:
      cdf += p
      total += 1.0 - min(cdf, 1.0) ** rows
    return 1.0 + total  # P(max >= 1) = 1

  @classmethod
  def fixed(cls, length: int) -> "Lengths":
    """Every attempt `length` tokens (the cap)."""
    return cls(
      tuple([0.0] * (length - 1) + [1.0]), f"every attempt {length} tokens"
    )

  @classmethod
  def lognormal(cls, cap: int, mean: float, at_cap: float) -> "Lengths":
    """A log-normal length ceil(X), X ~ LogNormal(mu, sigma), cut at `cap`
    (longer attempts stop at the cap), with the two parameters solved so
    that the mean is `mean` and P(length = cap) is `at_cap`. A log-normal
    is the usual model of response lengths; the two figures are the
    workload's stated assumptions.

    Args:
      cap: the longest attempt, in tokens.
      mean: the mean length, in tokens; above at_cap * cap + 1 - at_cap
        and below `cap`.
      at_cap: P(length = cap).

    Returns:
      The Lengths over 1..cap, its source stating the two figures.

    Raises:
      ValueError: `mean` is out of that range.
    """
    if not at_cap * cap + (1 - at_cap) < mean < cap:
      raise ValueError(
        f"attempt lengths of mean {mean:g} with {at_cap:.0%} "
        f"at a cap of {cap} cannot be; the mean must lie "
        "between the cap's share of it and the cap."
      )
    z = _normal_quantile(1.0 - at_cap)

    def pmf(sigma):
      mu = math.log(cap - 1) - sigma * z  # P(X > cap - 1) = at_cap
      cdf = lambda x: 0.5 * math.erfc(-(math.log(x) - mu) / (sigma * 2**0.5))
      values = [cdf(1.0)] + [cdf(k) - cdf(k - 1) for k in range(2, cap)]
      return values + [1.0 - sum(values)]

    low, high = 1e-3, 5.0  # The mean falls as sigma grows.
    for _ in range(100):
      sigma = (low + high) / 2
      m = sum((k + 1) * p for k, p in enumerate(pmf(sigma)))
      low, high = (sigma, high) if m > mean else (low, sigma)
    return cls(
      tuple(pmf((low + high) / 2)),
      (
        f"log-normal attempt lengths cut at {cap}: mean {mean:g} tokens, "
        f"{at_cap:.0%} at the cap (assumed)"
      ),
    )


def _normal_quantile(p: float) -> float:
  low, high = -10.0, 10.0
  for _ in range(200):
    mid = (low + high) / 2
    low, high = (
      (mid, high) if 0.5 * math.erfc(-mid / 2**0.5) < p else (low, mid)
    )
  return (low + high) / 2


# MATH-500's problems average 266.89 characters (EvalScope's MATH-500 data
# statistics); the MATH train split is of the same competitions. At 4
# characters a token (OpenAI's rule of thumb for English; LaTeX is denser,
# so this undercounts a little), plus the task's first-turn prompt around
# the problem and 6 tokens of chat markup (BOS, the user and model turn
# markers), the first turn's real tokens.
MATH_MEAN_PROBLEM_CHARS = 266.89
CHARS_PER_TOKEN = 4.0
CHAT_MARKUP_TOKENS = 6


def math_prompt_tokens(prompt_wrapper_chars: int) -> float:
  """The real tokens of a MATH first turn: the mean problem and the
  `prompt_wrapper_chars` characters the task puts around it, at
  CHARS_PER_TOKEN, plus CHAT_MARKUP_TOKENS."""
  return (
    CHAT_MARKUP_TOKENS
    + (prompt_wrapper_chars + MATH_MEAN_PROBLEM_CHARS) / CHARS_PER_TOKEN
  )


@dataclasses.dataclass(frozen=True)
class StepShape:
  """What a training step runs, for the workload figures: from the config
  and the compiled programs' arguments (aot.compile_programs)."""

  devices: int
  processes: int
  episodes: int  # a step's, over the slice
  prompt_bucket: int  # prompt slots
  attempt_cap: int  # config.rollout.max_attempt_len
  num_attempts: int
  instruction_len: int  # tokens between attempts
  rollout_micro_batches: int
  train_micro_batches: int
  params: int
  layers: int
  heads: int
  head_dim: int
  kv_bytes_per_token: int  # K and V of one token, every layer, the slice
  decode_weight_bytes: int  # the decode copy of the params, per device
  samples_per_prefill: int  # rows that read each prompt's cache entry
  row_len: int  # slots of a packed row (packing.py)


@dataclasses.dataclass(frozen=True)
class Workload:
  """Real prompt tokens and attempt lengths of a step's episodes.

  `trips` overrides the trip counts of the dynamic loops (by scope, or a
  callable of the Loop); by default a `decode` loop runs E[the longest
  attempt of the rollout micro-batch's rows] and `micro_batches` every
  train micro-batch. `kernel_scaling` maps a kernel name to fn(workload,
  shape) -> a factor on its cost estimate."""

  name: str
  prompt_tokens: float
  lengths: Lengths
  source: str
  trips: Optional[Trips] = None
  kernel_scaling: Mapping[str, Callable] = dataclasses.field(
    default_factory=dict
  )

  def loop_trips(self, shape: StepShape) -> Trips:
    """The dynamic loops' trips in a step of `shape`: `trips`, else the
    defaults the class docstring states."""
    if self.trips is not None:
      return self.trips
    rows = shape.episodes // shape.rollout_micro_batches
    return {
      "decode": self.lengths.expected_max(rows),
      "micro_batches": float(shape.train_micro_batches),
    }

  def scaling(self, shape: StepShape) -> dict:
    """{kernel name: the factor on its cost estimate} in a step of
    `shape`."""
    return {name: fn(self, shape) for name, fn in self.kernel_scaling.items()}

  def real_tokens(self, shape: StepShape) -> float:
    """Real tokens of one episode: prompt, attempts, instruction turns."""
    return (
      self.prompt_tokens
      + shape.num_attempts * self.lengths.mean()
      + (shape.num_attempts - 1) * shape.instruction_len
    )


def worst_case(shape: StepShape) -> Workload:
  """Prompts filling their bucket, every attempt at the cap (the decode
  kernel still reads only what each step's attempt has written)."""
  return Workload(
    "worst",
    shape.prompt_bucket,
    Lengths.fixed(shape.attempt_cap),
    f"prompts filling the {shape.prompt_bucket}-token bucket, "
    f"every attempt at the {shape.attempt_cap}-token cap",
    kernel_scaling={tpu_attention.DECODE_KERNEL: decode_read_fraction},
  )


# The typical workload's attempts (assumed): mean length, share at the cap.
TYPICAL_MEAN_ATTEMPT = 400.0
TYPICAL_AT_CAP = 0.02


def typical(shape: StepShape, prompt_wrapper_chars: int) -> Workload:
  """MATH prompts of the mean problem's length, attempts from the
  log-normal with TYPICAL_MEAN_ATTEMPT and TYPICAL_AT_CAP; the cap must
  exceed the mean (Lengths.lognormal).

  Args:
    shape: what a step runs; its attempt cap cuts the lengths.
    prompt_wrapper_chars: the characters the task's first turn puts around
      a problem.

  Returns:
    The "typical" Workload: its decode loops run E[the longest attempt of a
    rollout micro-batch's rows], its train step the micro-batches its
    episodes pack into (packed_micro_batches), and the decode kernel's
    cost is scaled by decode_read_fraction.
  """
  lengths = Lengths.lognormal(
    shape.attempt_cap, TYPICAL_MEAN_ATTEMPT, TYPICAL_AT_CAP
  )
  prompt = math_prompt_tokens(prompt_wrapper_chars)
  rows = shape.episodes // shape.rollout_micro_batches
  trips = {
    "decode": lengths.expected_max(rows),
    "micro_batches": packed_micro_batches(prompt, lengths, shape),
  }
  return Workload(
    "typical",
    prompt,
    lengths,
    trips=trips,
    kernel_scaling={tpu_attention.DECODE_KERNEL: decode_read_fraction},
    source=(
      f"prompts of {prompt:.0f} tokens (MATH-500's mean problem, "
      f"{MATH_MEAN_PROBLEM_CHARS} characters (EvalScope), in the task's "
      f"prompt and chat format at {CHARS_PER_TOKEN:g} characters a token); "
      + lengths.source
    ),
  )


def packed_micro_batches(
  prompt_tokens: float, lengths: Lengths, shape: StepShape, draws: int = 16
) -> float:
  """E[micro-batches the train step runs] (the `micro_batches` loops'
  trips): a step's episodes, of `prompt_tokens` and attempts drawn from
  `lengths` (with the instruction turns between), packed as the trainer
  packs them (packing.plan, each process its own rows; the most any
  process needs), over `draws` seeded draws.

  Args:
    prompt_tokens: the real tokens of a prompt (rounded).
    lengths: the attempt lengths.
    shape: what a step runs: episodes, attempts, processes, packed rows.
    draws: the draws averaged, from a generator seeded with 0.

  Returns:
    The mean over the draws of the micro-batches in use.
  """
  rng = np.random.default_rng(0)
  A, B, P = shape.num_attempts, shape.episodes, shape.processes
  pmf = np.asarray(lengths.pmf)
  used = []
  for _ in range(draws):
    attempts = rng.choice(
      np.arange(1, lengths.cap + 1), p=pmf / pmf.sum(), size=(B, A)
    ).sum(1)
    real = round(prompt_tokens) + attempts + (A - 1) * shape.instruction_len
    used.append(
      max(
        packing.plan(block, rows, shape.row_len, shape.train_micro_batches)[2]
        for block, rows in zip(np.split(real, P), np.split(np.arange(B), P))
      )
    )
  return float(np.mean(used))


def decode_read_fraction(workload: "Workload", shape: StepShape) -> float:
  """The share of the ragged decode kernel's compiled cost estimate (every
  slot of every segment it is given) that a rollout of `workload` reads.
  At step t of attempt a, a row still sampling reads its prompt (its cache
  entry is shared by the samples of the prompt and read while any of them
  samples), its earlier attempts and instructions, and the t + 1 tokens
  of this attempt so far; a row that stopped reads nothing. Each decode
  loop runs `decode_trips` steps.

  Args:
    workload: the prompts' real tokens and the attempt lengths.
    shape: what a step runs: its prompt bucket, attempt cap, instruction
      turn and samples per prompt.

  Returns:
    The share: the slots read over those the estimate counts, summed over
    the decode steps and attempts.
  """
  pmf = np.asarray(workload.lengths.pmf)
  survival = 1.0 - np.cumsum(pmf)  # P(length > t): the row samples token t
  G, Y, I = shape.samples_per_prefill, shape.attempt_cap, shape.instruction_len
  mean = workload.lengths.mean()
  steps = np.arange(int(round(decode_trips(workload, shape))))
  alive = np.concatenate([[1.0], survival])[steps]
  read = full = 0.0
  for a in range(shape.num_attempts):
    read += np.sum(
      (1 - (1 - alive) ** G) * workload.prompt_tokens / G
      + alive * (a * (mean + I) + steps + 1)
    )
    full += len(steps) * (shape.prompt_bucket / G + a * (Y + I) + Y)
  return float(read / full)


# -- Model FLOPs and the rollout's necessary bytes ---------------------------


def train_model_flops(workload: Workload, shape: StepShape) -> float:
  """Model FLOPs of a train step on real tokens (module docstring): the
  policy's 6N + 12 L H Q T and the reference's 2N + 4 L H Q T a token.

  Args:
    workload: the real tokens of an episode.
    shape: the step's episodes and the model's size.

  Returns:
    The FLOPs over all of a step's episodes, the whole slice's.
  """
  tokens = workload.real_tokens(shape)
  attention = shape.layers * shape.heads * shape.head_dim * tokens
  return shape.episodes * tokens * (8 * shape.params + 16 * attention)


def decode_trips(workload: Workload, shape: StepShape) -> float:
  """Trips of one decode loop: the workload's (its longest row).

  Args:
    workload: its `decode` trips, else its attempt lengths.
    shape: the rows of a rollout micro-batch.

  Returns:
    The workload's `decode` trips where its trips map one, else E[the
    longest attempt of a rollout micro-batch's rows].
  """
  trips = workload.loop_trips(shape)
  if isinstance(trips, Mapping) and "decode" in trips:
    return trips["decode"]
  return workload.lengths.expected_max(
    shape.episodes // shape.rollout_micro_batches
  )


def decode_steps(workload: Workload, shape: StepShape) -> float:
  """Sequential decode steps a rollout takes (every micro-batch, every
  attempt, each its longest row's length).

  Args:
    workload: the attempt lengths (decode_trips).
    shape: the rollout's micro-batches and attempts.

  Returns:
    Micro-batches x attempts x decode_trips.
  """
  return (
    shape.rollout_micro_batches
    * shape.num_attempts
    * decode_trips(workload, shape)
  )


def rollout_necessary_bytes(workload: Workload, shape: StepShape) -> float:
  """HBM bytes a device cannot avoid in a rollout: the decode weights once a
  decode step, and per active row and generated token the KV cache of the
  row's real tokens so far (prompt, earlier attempts and instructions, this
  attempt's tokens).

  Args:
    workload: the prompts' real tokens and the attempt lengths.
    shape: the step's episodes, devices, KV bytes a token and decode
      weights.

  Returns:
    The bytes per device, in expectation over the attempt lengths.
  """
  mean, moment2 = workload.lengths.mean(), workload.lengths.moment2()
  kv_reads = 0.0  # tokens of KV read, per episode
  context = workload.prompt_tokens
  for _ in range(shape.num_attempts):
    # sum over j = 1..L of (context + j - 1), in expectation over L.
    kv_reads += mean * context + (moment2 - mean) / 2
    context += mean + shape.instruction_len
  kv = shape.episodes * kv_reads * shape.kv_bytes_per_token / shape.devices
  return decode_steps(workload, shape) * shape.decode_weight_bytes + kv


# -- Host grading ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Grading:
  """Answers graded a second by one reward worker (benchmarks.rewards'
  measured rate over its workers), the workers a host runs, and the
  programs that need no reward and run on the devices while the host
  grades (aot.py names the reference's scoring)."""

  answers_per_worker_s: float
  workers: int
  overlap_programs: tuple[str, ...] = ()
  source: str = ""

  def seconds(self, shape: StepShape) -> float:
    """The seconds a host takes to grade its share of a step's answers
    (one an attempt), all its workers at once."""
    answers = shape.episodes * shape.num_attempts / shape.processes
    return answers / (self.answers_per_worker_s * self.workers)


def measured_grading(
  path: str,
  workers: int,
  task: str = "math",
  overlap_programs: tuple[str, ...] = (),
) -> Grading:
  """Grading from benchmarks/results/rewards.json (`python -m
  benchmarks.rewards`): the programs (task "code") or MATH answers (any
  other task) it graded a second, over its workers.

  Args:
    path: the benchmark's JSON result.
    workers: the reward workers a host runs (config.rewards.num_workers).
    task: the task's name; "code" takes the programs' rate, any other the
      MATH answers'.
    overlap_programs: the programs that need no reward and run on the
      devices while the host grades.

  Returns:
    The Grading, its source the file, the rate and the benchmark's command.
  """
  with open(path) as f:
    result = json.load(f)
  kind = "code" if task == "code" else "math"
  rate = result[kind]["items_per_s"] / result["workers"]
  return Grading(
    rate,
    workers,
    overlap_programs,
    (
      f"{os.path.basename(path)}: {result[kind]['items_per_s']:.0f} {kind} "
      f"answers/s on {result['workers']} workers ({result['command']}, "
      f"{result['cpu_count']} cores)"
    ),
  )


# -- The projection ----------------------------------------------------------


def _costs_dict(c: Costs) -> dict:
  return dict(dataclasses.asdict(c), ici_exposed=c.ici_exposed)


def project(
  programs: Mapping[str, tuple],
  shape: StepShape,
  chip: Chip,
  workloads: list[Workload],
  grading: Grading,
  total_steps: int,
) -> dict:
  """The step's time, per workload and latency scale (1x, 2x).

  Args:
    programs: {name: hlo_analysis.analyze of a program a step runs once},
      "rollout" among them; the others train (the MFU's time).
    shape: what a step runs (StepShape).
    chip: the slice's chip (CHIPS).
    workloads: e.g. [worst_case(shape), typical(shape, ...)].
    grading: the host's grading rate and the programs it overlaps.
    total_steps: the run's steps, for its hours.

  Returns:
    {"figures": the chip's and the latencies' figures and sources, "shape",
    "workloads": [{name, source, prompt_tokens, mean_attempt_tokens,
    decode_trips, real_tokens_per_episode, train_model_flops,
    rollout_necessary_bytes_per_device, scales: {"1x"|"2x": {programs:
    {name: Costs as a dict}, grading_seconds, grading_exposed_seconds,
    step_seconds, rollout_hbm_share, train_mfu, step_mfu, run_hours}}}]}.
  """
  results = []
  capacity = shape.devices * chip.peak_flops
  for workload in workloads:
    trips = workload.loop_trips(shape)
    scaling = workload.scaling(shape)
    model_flops = train_model_flops(workload, shape)
    necessary = rollout_necessary_bytes(workload, shape)
    scales = {}
    for scale in (1.0, SENSITIVITY):
      lat = Latencies(chip, scale)
      costs = {
        name: program_costs(steps, lat, trips, scaling)
        for name, steps in programs.items()
      }
      seconds = {name: c.seconds for name, c in costs.items()}
      grade = grading.seconds(shape)
      exposed = max(
        grade - sum(seconds[n] for n in grading.overlap_programs), 0.0
      )
      step = sum(seconds.values()) + exposed
      train = step - seconds["rollout"] - exposed
      scales[f"{scale:g}x"] = dict(
        programs={name: _costs_dict(c) for name, c in costs.items()},
        grading_seconds=grade,
        grading_exposed_seconds=exposed,
        step_seconds=step,
        rollout_hbm_share=(
          necessary / chip.hbm_bytes_per_s / seconds["rollout"]
        ),
        train_mfu=model_flops / (capacity * train),
        step_mfu=model_flops / (capacity * step),
        run_hours=total_steps * step / 3600,
      )
    results.append(
      dict(
        name=workload.name,
        source=workload.source,
        prompt_tokens=workload.prompt_tokens,
        mean_attempt_tokens=workload.lengths.mean(),
        decode_trips=decode_trips(workload, shape),
        real_tokens_per_episode=workload.real_tokens(shape),
        train_model_flops=model_flops,
        rollout_necessary_bytes_per_device=necessary,
        scales=scales,
      )
    )
  return dict(
    figures=dict(
      chip=dataclasses.asdict(chip),
      per_op_seconds=PER_OP_SECONDS,
      per_op_source=PER_OP_SOURCE,
      ici_hop_seconds=ICI_HOP_SECONDS,
      sensitivity=SENSITIVITY,
      grading=dataclasses.asdict(grading),
      mfu=(
        "PaLM appendix B on real tokens: 6N + 12LHQT policy, 2N + "
        "4LHQT reference; rematerialisation not counted"
      ),
    ),
    shape=dataclasses.asdict(shape),
    workloads=results,
  )


def summary(projection: dict) -> list[str]:
  """The projection as a few lines for the terminal."""
  f = projection["figures"]
  chip = f["chip"]
  lines = [
    f"  projection: {chip['peak_flops'] / 1e12:.0f} TFLOP/s, "
    f"{chip['hbm_bytes_per_s'] / 1e9:.0f} GB/s HBM, "
    f"{chip['ici_bytes_per_s'] / 1e9:.0f} GB/s ICI a link, "
    f"{f['per_op_seconds'] * 1e6:g} us an op, "
    f"{f['ici_hop_seconds'] * 1e6:g} us an ICI hop; grading "
    f"{f['grading']['answers_per_worker_s']:.0f} answers/s a worker x "
    f"{f['grading']['workers']}"
  ]
  for w in projection["workloads"]:
    lines.append(
      f"    {w['name']}: {w['source']}; "
      f"{w['real_tokens_per_episode']:.0f} real tokens an "
      f"episode, decode loops of {w['decode_trips']:.0f} steps"
    )
    for scale, s in w["scales"].items():
      parts = []
      for name, c in s["programs"].items():
        figure = (
          f"{s['rollout_hbm_share']:.0%} of its HBM roofline"
          if name == "rollout"
          else ""
        )
        parts.append(
          f"{name} {c['seconds']:.1f} (roofline {c['roofline']:.1f}, ops "
          f"{c['fixed']:.1f}, ICI {c['ici_exposed']:.1f} of {c['ici']:.1f}"
          + (f"; {figure})" if figure else ")")
        )
      lines.append(
        f"      {scale} latency & ICI: step {s['step_seconds']:.1f} s = "
        + " + ".join(parts)
        + f" + grading "
        f"{s['grading_exposed_seconds']:.2f} exposed; train MFU "
        f"{s['train_mfu']:.0%}, step MFU {s['step_mfu']:.0%}, "
        f"{s['run_hours']:.0f} h a run"
      )
  return lines
