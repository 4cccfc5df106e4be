"""The step-time projection against independent references: collective
traffic computed by hand for compiled programs, async pairs counted once and
hidden behind the ops between them, loops the workload sizes, kernels
without a cost estimate, E[max] against a Monte Carlo draw, the 2x lines."""

import dataclasses
import functools
import importlib.util
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from score_jax import aot, hlo_analysis, projection
from score_jax.models import tpu_attention

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(
  not HAS_LIBTPU, reason="needs libtpu (pip install -e '.[tpu]'); no TPU needed"
)
V5E = projection.CHIPS["TPU v5 lite"]
ROW_BYTES = 16 * 128 * 4  # What each device puts into a collective below.


def _collectives(steps) -> list:
  return [
    s.collective
    for s in steps
    if isinstance(s, hlo_analysis.Op) and s.collective is not None
  ]


def _all_collectives(devices, shape=(2, 4)):
  """Each collective once over the 4 devices of mesh axis b; each device
  puts in a f32[16, 128]."""
  mesh = jax.sharding.Mesh(np.array(devices).reshape(shape), ("a", "b"))

  def body(x):
    # Each on its own operand: XLA would turn a reduce-scatter of what an
    # all-reduce also sums into a slice of that all-reduce.
    x = [jnp.sin(x * k) for k in range(6)]
    return (
      jax.lax.all_gather(x[0], "b", tiled=True),
      jax.lax.psum(x[1], "b"),
      jax.lax.psum_scatter(x[2], "b", scatter_dimension=0, tiled=True),
      jax.lax.all_to_all(x[3], "b", 0, 0, tiled=True),
      jax.lax.ppermute(x[4], "b", [(i, (i + 1) % 4) for i in range(4)]),
      jax.lax.psum(x[5], ("a", "b")),
    )

  spec = P(("a", "b"))
  f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec))
  x = jax.ShapeDtypeStruct(
    (len(devices) * 16, 128), jnp.float32, sharding=NamedSharding(mesh, spec)
  )
  return _compile_text(f.lower(x))


def _compile_text(lowered) -> str:
  """The optimised HLO of a fresh compile: JAX's persistent cache keys
  ignore metadata, so a cached twin could bring another op_name."""
  with aot._compilation_cache_off():
    return lowered.compile().as_text()


# Per device, by hand (B = 8 KiB in, groups of n = 4 unless said): an
# all-gather receives the 3 other shards, a reduce-scatter's ring moves
# 3/4 of B, an all-reduce twice that, an all-to-all B n / 4 on a
# bidirectional ring, a permute B over one direction of one link (2 B at
# the two-way bandwidth); the psum over both axes is a group of 8.
BY_HAND = {
  ("all-gather", 4): 3 * ROW_BYTES,
  ("all-reduce", 4): 2 * ROW_BYTES * 3 / 4,
  ("reduce-scatter", 4): ROW_BYTES * 3 / 4,
  ("all-to-all", 4): ROW_BYTES,
  ("collective-permute", 2): 2 * ROW_BYTES,
  ("all-reduce", 8): 2 * ROW_BYTES * 7 / 8,
}


def test_collective_traffic_of_a_compiled_program():
  steps = hlo_analysis.analyze(_all_collectives(jax.devices()[:8]), 8)
  found = {
    (c.kind, c.group_size): (c.bytes, projection.collective_traffic(c)[0])
    for c in _collectives(steps)
  }
  assert found == {k: (ROW_BYTES, v) for k, v in BY_HAND.items()}


@needs_libtpu
def test_async_pairs_count_once_on_a_tpu_slice():
  """The same program compiled for v5e-8: libtpu runs the permute as a
  start and a done, one collective of the same bytes that the done waits
  for; it writes this small reduce-scatter as a slice of an all-reduce,
  which it combines with the other all-reduce over b (two operands)."""
  steps = hlo_analysis.analyze(_all_collectives(aot.tpu_devices("v5e-8")), 8)
  collectives = [s for s in steps if s.collective is not None]
  b = ROW_BYTES
  assert sorted(
    (s.collective.kind, s.collective.group_size, s.collective.bytes)
    for s in collectives
  ) == sorted(
    [
      ("all-gather", 4, b),
      ("all-reduce", 4, 2 * b),
      ("all-to-all", 4, b),
      ("collective-permute", 2, b),
      ("all-reduce", 8, b),
    ]
  )
  starts = [s.name for s in collectives if s.starts]
  assert len(starts) == 1
  assert [
    name for s in steps for name in s.waits_for if name in starts
  ] == starts
  costs = projection.program_costs(steps, projection.Latencies(V5E), {})
  assert costs.ici_bytes == pytest.approx(
    3 * b + 2 * 2 * b * 3 / 4 + b + 2 * b + 2 * b * 7 / 8
  )


_ASYNC = """
ENTRY %main (a: f32[1024,1024], b: f32[256,256]) -> (f32[1024,1024], f32[1024,256]) {
  %a = f32[1024,1024]{1,0} parameter(0)
  %b = f32[256,256]{1,0} parameter(1)
  %gather = (f32[256,256]{1,0}, f32[1024,256]{1,0}) all-gather-start(%b), replica_groups={{0,1,2,3}}, dimensions={0}
  %e = f32[1024,1024]{1,0} exponential(%a)
  %gathered = f32[1024,256]{1,0} all-gather-done(%gather)
  ROOT %t = (f32[1024,1024]{1,0}, f32[1024,256]{1,0}) tuple(%e, %gathered)
}
"""


def test_an_async_copy_into_on_chip_memory_costs_its_bytes_only():
  """copy-start/copy-done (memory-space assignment's prefetch): no launch
  cost, which libtpu's cost model does not give it either, but its bytes
  at HBM bandwidth; the exponential after it pays both."""
  text = """
ENTRY %main (a: f32[1024,1024], b: f32[256,256]) -> (f32[1024,1024], f32[256,256]) {
  %a = f32[1024,1024]{1,0} parameter(0)
  %b = f32[256,256]{1,0} parameter(1)
  %copy = (f32[256,256]{1,0}, f32[256,256]{1,0:S(1)}, u32[]) copy-start(%b)
  %e = f32[1024,1024]{1,0} exponential(%a)
  %near = f32[256,256]{1,0:S(1)} copy-done(%copy)
  ROOT %t = (f32[1024,1024]{1,0}, f32[256,256]{1,0:S(1)}) tuple(%e, %near)
}
"""
  lat = projection.Latencies(V5E)
  steps = hlo_analysis.analyze(text, 4)
  copy = next(s for s in steps if s.starts)
  costs = projection.program_costs(steps, lat, {})
  exp = 2 * 1024 * 1024 * 4 / V5E.hbm_bytes_per_s
  assert costs.fixed == pytest.approx(lat.per_op)  # the exponential's
  assert costs.seconds == pytest.approx(
    lat.per_op + exp + copy.bytes / V5E.hbm_bytes_per_s
  )
  assert copy.bytes >= 256 * 256 * 4


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_an_async_collective_hides_behind_the_ops_between(scale):
  """Start, an exponential, done: the gather (3 x 256 KiB at 90 GB/s, 2
  hops) runs while the exponential reads and writes 4 MiB; as one sync
  collective it would add its whole time."""
  lat = projection.Latencies(V5E, scale)
  ici = 2 * lat.hop + 3 * 256 * 256 * 4 / lat.ici_bytes_per_s
  exp = 2 * 1024 * 1024 * 4 / V5E.hbm_bytes_per_s
  costs = projection.program_costs(hlo_analysis.analyze(_ASYNC, 4), lat, {})
  assert (costs.ops, costs.ici_bytes) == (2, 3 * 256 * 256 * 4)
  assert costs.ici == pytest.approx(ici)
  assert costs.fixed == pytest.approx(2 * lat.per_op)
  # The gather starts after its own issue cost; the exponential follows.
  assert costs.seconds == pytest.approx(
    max(2 * lat.per_op + exp, lat.per_op + ici)
  )
  sync = (
    _ASYNC.replace("all-gather-start", "all-gather")
    .replace(
      "(f32[256,256]{1,0}, f32[1024,256]{1,0}) all-gather",
      "f32[1024,256]{1,0} all-gather",
    )
    .replace(
      "%gathered = f32[1024,256]{1,0} all-gather-done(%gather)",
      "%gathered = f32[1024,256]{1,0} copy(%gather)",
    )
  )
  serial = projection.program_costs(hlo_analysis.analyze(sync, 4), lat, {})
  assert serial.ici_exposed == pytest.approx(ici, rel=1e-6)


def _loop(x, scope):
  """A loop that doubles x until its sum passes 1000: its trip count is
  data's, not static."""

  def run(x):
    return jax.lax.while_loop(
      lambda x: jnp.sum(x) < 1000.0, lambda x: jnp.tanh(x) * 2.0 + x, x
    )

  if scope is None:
    return run(x)
  with jax.named_scope(scope):
    return run(x)


def _compiled_loop(scope):
  x = jax.ShapeDtypeStruct((64, 128), jnp.float32)
  return _compile_text(jax.jit(functools.partial(_loop, scope=scope)).lower(x))


def test_an_unrecognised_loop_is_an_error_naming_it():
  with pytest.raises(hlo_analysis.UnknownLoop) as error:
    hlo_analysis.analyze(_compiled_loop(None), 1)
  message = str(error.value)
  assert "\n" not in message
  assert re.search(r"\(jit\(_loop\)/while\)", message), message
  assert "jax.named_scope" in message


def test_a_dynamic_loop_takes_the_workloads_trips():
  steps = hlo_analysis.analyze(_compiled_loop("decode"), 1)
  [loop] = [s for s in steps if isinstance(s, hlo_analysis.Loop)]
  assert (loop.scope, loop.trips, loop.op_name) == (
    "decode",
    None,
    "jit(_loop)/decode/while",
  )
  lat = projection.Latencies(V5E)
  once = projection.program_costs(loop.body, lat, {})
  outside = projection.program_costs(
    tuple(s for s in steps if s is not loop), lat, {}
  )
  for trips in ({"decode": 7}, lambda loop: 7.0):
    costs = projection.program_costs(steps, lat, trips)
    assert costs.seconds == pytest.approx(outside.seconds + 7 * once.seconds)
    assert costs.ops == outside.ops + 7 * once.ops
  with pytest.raises(projection.MissingTripCount, match="'decode'"):
    projection.program_costs(steps, lat, {"micro_batches": 3})


def test_a_dynamic_loop_stays_within_its_conditions_bound():
  def decode(x):
    with jax.named_scope("decode"):
      return jax.lax.while_loop(
        lambda c: (c[0] < 12) & (jnp.sum(c[1]) < 1000.0),
        lambda c: (c[0] + 1, c[1] * 2.0),
        (0, x),
      )[1]

  text = _compile_text(
    jax.jit(decode).lower(jax.ShapeDtypeStruct((8, 128), jnp.float32))
  )
  steps = hlo_analysis.analyze(text, 1)
  [loop] = [s for s in steps if isinstance(s, hlo_analysis.Loop)]
  assert (loop.scope, loop.bound) == ("decode", 12)
  lat = projection.Latencies(V5E)
  projection.program_costs(steps, lat, {"decode": 12})
  with pytest.raises(projection.MissingTripCount, match="at most 12"):
    projection.program_costs(steps, lat, {"decode": 13})


def test_loops_nested_in_a_dynamic_one_keep_their_own_trip_count():
  assert (
    hlo_analysis.dynamic_scope("jit(f)/while/body/closed_call/decode/while")
    == "decode"
  )
  assert (
    hlo_analysis.dynamic_scope("jit(f)/decode/while/body/scan/while") is None
  )
  assert hlo_analysis.dynamic_scope("jit(step)/micro_batches/while") == (
    "micro_batches"
  )
  assert hlo_analysis.dynamic_scope("jit(f)/while") is None


def _pallas_program(cost_estimate, name="double"):
  """A Pallas TPU kernel in shard_map over v5e-4; each device doubles a
  f32[8, 128]."""
  from jax.experimental import pallas as pl

  mesh = jax.sharding.Mesh(aot.tpu_devices("v5e-4"), ("x",))

  def kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...] * 2.0

  def double(x):
    return pl.pallas_call(
      kernel,
      name=name,
      cost_estimate=cost_estimate,
      out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
    )(x)

  f = jax.jit(
    jax.shard_map(
      double, mesh=mesh, in_specs=P("x"), out_specs=P("x"), check_vma=False
    )
  )
  x = jax.ShapeDtypeStruct(
    (32, 128), jnp.float32, sharding=NamedSharding(mesh, P("x"))
  )
  return hlo_analysis.analyze(_compile_text(f.lower(x)), 4)


@needs_libtpu
def test_kernels_cost_their_estimate_or_their_registered_estimator(monkeypatch):
  from jax.experimental import pallas as pl

  lat = projection.Latencies(V5E)
  estimate = pl.CostEstimate(
    flops=3_000_000_000, transcendentals=0, bytes_accessed=2_000_000
  )
  steps = _pallas_program(estimate)
  [kernel] = [s.kernel for s in steps if s.kernel is not None]
  assert (kernel.name, kernel.result_shape.split("{")[0]) == (
    "double",
    "f32[8,128]",
  )
  assert kernel.estimate == hlo_analysis.CostEstimate(3e9, 2e6, 0)
  costs = projection.program_costs(steps, lat, {})
  assert costs.flops == 3e9 and costs.hbm_bytes >= 2e6
  # A workload that reads half of what the estimate assumes.
  half = projection.program_costs(steps, lat, {}, {"double": 0.5})
  assert costs.roofline - half.roofline == pytest.approx(
    0.5 * 3e9 / V5E.peak_flops
  )

  bare = _pallas_program(None)
  with pytest.raises(projection.MissingCostEstimate) as error:
    projection.program_costs(bare, lat, {})
  assert "double" in str(error.value) and "\n" not in str(error.value)
  monkeypatch.setitem(
    projection.KERNEL_ESTIMATORS,
    "double",
    lambda k: hlo_analysis.CostEstimate(
      flops=0, bytes=2 * hlo_analysis.array_bytes(k.result_shape)
    ),
  )
  registered = projection.program_costs(bare, lat, {})
  assert registered.hbm_bytes >= 2 * 8 * 128 * 4


def test_an_unknown_custom_call_is_an_error():
  text = _ASYNC.replace(
    "exponential(%a)", 'custom-call(%a), custom_call_target="mystery"'
  )
  with pytest.raises(hlo_analysis.UnknownCustomCall, match="mystery"):
    hlo_analysis.analyze(text, 4)


@needs_libtpu
def test_the_per_op_cost_is_the_compilers_one_tile_fusion():
  """PER_OP_SECONDS stands for libtpu's own estimate of a one-tile fusion
  on v5e at its 1.5 GHz clock; a libtpu that moves it far shows here."""
  device = aot.tpu_devices("v5e-4")[0]
  s = jax.sharding.SingleDeviceSharding(device)
  x = jax.ShapeDtypeStruct((8, 128), jnp.float32, sharding=s)
  text = _compile_text(
    jax.jit(lambda x, y: (jnp.exp(x) * y + 1, jnp.sum(x))).lower(x, x)
  )
  cycles = [int(c) for c in re.findall(r'"estimated_cycles":"(\d+)"', text)]
  assert cycles
  seconds = min(cycles) / 1.5e9
  assert (
    0.5 * projection.PER_OP_SECONDS
    <= seconds
    <= (2 * projection.PER_OP_SECONDS)
  ), seconds


def test_expected_max_against_monte_carlo():
  lengths = projection.Lengths.lognormal(1024, 400.0, 0.02)
  pmf = np.array(lengths.pmf)
  assert pmf.min() >= 0 and pmf.sum() == pytest.approx(1.0)
  assert lengths.mean() == pytest.approx(400.0, abs=0.5)
  assert pmf[-1] == pytest.approx(0.02, abs=1e-3)
  rng = np.random.default_rng(0)
  for rows in (1, 8, 256):
    draws = rng.choice(
      np.arange(1, 1025), p=pmf / pmf.sum(), size=(20_000, rows)
    ).max(axis=1)
    error = 4 * draws.std() / np.sqrt(len(draws)) + 1e-9
    assert abs(lengths.expected_max(rows) - draws.mean()) <= error, rows
  with pytest.raises(ValueError, match="cannot be"):
    projection.Lengths.lognormal(256, 400.0, 0.02)
  two = projection.Lengths((0.5, 0.5), "")
  assert two.expected_max(2) == pytest.approx(1.75)  # 1 + P(max > 1)
  assert projection.Lengths.fixed(1024).expected_max(256) == 1024


SHAPE = projection.StepShape(
  devices=4,
  processes=2,
  episodes=8,
  prompt_bucket=64,
  attempt_cap=32,
  num_attempts=2,
  instruction_len=5,
  rollout_micro_batches=2,
  train_micro_batches=4,
  params=1000,
  layers=2,
  heads=4,
  head_dim=8,
  kv_bytes_per_token=100,
  decode_weight_bytes=500,
  samples_per_prefill=2,
  row_len=256,
)


def test_model_flops_and_necessary_bytes_by_hand():
  worst = projection.worst_case(SHAPE)
  tokens = 64 + 2 * 32 + 5
  assert worst.real_tokens(SHAPE) == tokens
  assert projection.train_model_flops(worst, SHAPE) == 8 * tokens * (
    8 * 1000 + 16 * 2 * 4 * 8 * tokens
  )
  # 2 micro-batches x 2 attempts x 32 decode steps of 500 weight bytes,
  # and per episode the KV of 64 + j - 1 tokens at token j of attempt 1,
  # 64 + 32 + 5 + j - 1 in attempt 2, 8 episodes over 4 devices.
  kv = sum(64 + j for j in range(32)) + sum(101 + j for j in range(32))
  assert projection.rollout_necessary_bytes(worst, SHAPE) == pytest.approx(
    2 * 2 * 32 * 500 + 8 * kv * 100 / 4
  )


def test_grading_from_the_measured_throughput(tmp_path):
  path = tmp_path / "rewards.json"
  path.write_text(
    json.dumps(
      {
        "command": "python -m benchmarks.rewards",
        "cpu_count": 2,
        "workers": 2,
        "math": {"items_per_s": 400.0},
      }
    )
  )
  grading = projection.measured_grading(str(path), workers=8)
  # 8 episodes x 2 attempts over 2 hosts, 200 answers/s x 8 workers.
  assert grading.seconds(SHAPE) == pytest.approx(8 / 1600)
  assert "400 math answers/s on 2 workers" in grading.source


def test_the_projection_prints_both_scales_for_both_workloads(tmp_path):
  steps = hlo_analysis.analyze(_ASYNC, 4)
  path = tmp_path / "rewards.json"
  path.write_text(
    json.dumps(
      {
        "command": "c",
        "cpu_count": 2,
        "workers": 1,
        "math": {"items_per_s": 100.0},
      }
    )
  )
  grading = projection.measured_grading(str(path), workers=1)
  programs = {"rollout": steps, "train_step": steps}
  shape = dataclasses.replace(
    SHAPE, attempt_cap=1024, prompt_bucket=256, row_len=2432
  )
  result = projection.project(
    programs,
    shape,
    V5E,
    [projection.worst_case(shape), projection.typical(shape, 300)],
    grading,
    total_steps=10,
  )
  for w in result["workloads"]:
    one, two = w["scales"]["1x"], w["scales"]["2x"]
    for program in programs:
      one_p, two_p = one["programs"][program], two["programs"][program]
      assert two_p["fixed"] == pytest.approx(2 * one_p["fixed"])
      assert two_p["ici"] == pytest.approx(2 * one_p["ici"])
      assert two_p["roofline"] == one_p["roofline"]
    assert (
      one["grading_exposed_seconds"]
      == one["grading_seconds"]
      == (pytest.approx(8 * 2 / 2 / 100))
    )
    assert one["step_seconds"] == pytest.approx(
      2 * one["programs"]["rollout"]["seconds"] + one["grading_seconds"]
    )
  lines = projection.summary(result)
  for name in ("worst", "typical"):
    assert any(l.strip().startswith(f"{name}:") for l in lines)
  assert sum("1x latency & ICI" in l for l in lines) == 2
  assert sum("2x latency & ICI" in l for l in lines) == 2
  # A reference forward that needs no reward, run while the host grades,
  # hides what of the grading it lasts.
  slow = projection.Grading(1.0, 1, overlap_programs=("reference",))
  result = projection.project(
    dict(programs, reference=steps),
    SHAPE,
    V5E,
    [projection.worst_case(SHAPE)],
    slow,
    10,
  )
  one = result["workloads"][0]["scales"]["1x"]
  reference = one["programs"]["reference"]["seconds"]
  assert one["grading_exposed_seconds"] == pytest.approx(8 - reference)
  assert one["step_seconds"] == pytest.approx(8 + 2 * reference)


@needs_libtpu
def test_an_fsdp_gather_feeding_its_matmul_keeps_the_matmuls_flops():
  """Weights split over 8 devices, gathered for each device's rows: the
  program does the matmul of its rows against the whole weight once
  (libtpu may fuse the gather into the dot) and gathers the weight once."""
  mesh = jax.sharding.Mesh(aot.tpu_devices("v5e-8"), ("fsdp",))
  rows, d, f = 64, 512, 1024
  x = jax.ShapeDtypeStruct(
    (8 * rows, d), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp"))
  )
  w = jax.ShapeDtypeStruct(
    (d, f), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp"))
  )
  text = _compile_text(
    jax.jit(
      lambda x, w: jnp.tanh(x @ w), out_shardings=NamedSharding(mesh, P("fsdp"))
    ).lower(x, w)
  )
  steps = hlo_analysis.analyze(text, 8)
  costs = projection.program_costs(steps, projection.Latencies(V5E), {})
  assert costs.flops == 2 * rows * d * f
  [gather] = _collectives(steps)
  assert (gather.kind, gather.group_size, gather.bytes) == (
    "all-gather",
    8,
    d * f * 2 // 8,
  )


_GATHER_DOT = """
%gather_dot (w: bf16[64,1024], x: bf16[256,512]) -> bf16[256,1024] {
  %w = bf16[64,1024]{1,0} parameter(0)
  %x = bf16[256,512]{1,0} parameter(1)
  %all = bf16[512,1024]{1,0} all-gather(%w), replica_groups=[1,8]<=[8], dimensions={0}
  ROOT %y = bf16[256,1024]{1,0} dot(%x, %all), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (w: bf16[64,1024], x: bf16[256,512]) -> bf16[256,1024] {
  %w = bf16[64,1024]{1,0} parameter(0)
  %x = bf16[256,512]{1,0} parameter(1)
  ROOT %f = bf16[256,1024]{1,0} fusion(%w, %x), kind=kOutput, calls=%gather_dot
}
"""


def test_a_gather_fused_into_its_dot_costs_both_overlapped():
  """libtpu fuses an FSDP weight gather into the dot that reads it (as in
  the train step's layers): one op with the dot's FLOPs and the gather's
  ICI time, the longer of the two."""
  [op] = hlo_analysis.analyze(_GATHER_DOT, 8)
  assert op.flops == 2 * 256 * 512 * 1024
  assert (
    op.collective.kind,
    op.collective.bytes,
    op.collective.group_size,
  ) == ("all-gather", 64 * 1024 * 2, 8)
  lat = projection.Latencies(V5E)
  costs = projection.program_costs((op,), lat, {})
  ici = projection.collective_seconds(op.collective, lat)[0]
  assert costs.seconds == pytest.approx(lat.per_op + max(ici, costs.roofline))
  assert costs.roofline == pytest.approx(
    max(op.flops / V5E.peak_flops, op.bytes / V5E.hbm_bytes_per_s)
  )


def test_typical_trips_and_the_decode_kernels_share_by_hand():
  """Every attempt 3 tokens of an 8-token cap, prompts of 10 in a bucket of
  64, instructions of 5, a prompt read by 2 rows: the decode loops run 3
  steps, the kernel reads what a row has written of its segments, and the
  packed episodes fill the micro-batches packing.plan says."""
  shape = dataclasses.replace(SHAPE, attempt_cap=8, row_len=64)
  three = projection.Lengths(tuple([0.0, 0.0, 1.0] + [0.0] * 5), "")
  workload = projection.Workload("fixed", 10, three, "", trips={"decode": 3})
  # Attempt 1, steps t = 0, 1, 2: the prompt (10 of 64, a half each for
  # its 2 rows) and t + 1 slots of the attempt (8); attempt 2 adds the
  # first attempt (3 of 8) and the instruction (5 of 5).
  read = 3 * 10 / 2 + 6 + 3 * (10 / 2 + 3 + 5) + 6
  full = 3 * (64 / 2 + 8) + 3 * (64 / 2 + 8 + 5 + 8)
  assert projection.decode_read_fraction(workload, shape) == pytest.approx(
    read / full
  )
  # Even at the worst, a step reads only the slots its attempt has written:
  # (8 x 32 + 36) + (8 x (32 + 8 + 5) + 36) of 8 x 40 + 8 x 53.
  worst = projection.worst_case(shape)
  assert worst.kernel_scaling[tpu_attention.DECODE_KERNEL](
    worst, shape
  ) == pytest.approx((292 + 396) / (320 + 424))
  # 8 episodes of 10 + 3 + 5 + 3 = 21 tokens, two processes of 4 rows:
  # 3 fit a 64-slot row, so 2 rows each, rows 0 and 1 (micro-batches 0 and
  # 1 of 4) on one process, 4 and 5 (0 and 1) on the other.
  assert projection.packed_micro_batches(10, three, shape) == 2
