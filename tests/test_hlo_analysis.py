"""hlo_analysis against independent references: exact matmul FLOPs, XLA's
own cost analysis on loop-free programs, and the buffers a program makes."""

import glob
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_jax import aot, hlo_analysis, projection

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
CHIP = projection.CHIPS["TPU v5 lite"]
B, D, STEPS = 64, 256, 10


def _costs(text: str, trips=None) -> projection.Costs:
  """A one-device program's costs on a v5e chip."""
  return projection.program_costs(
    hlo_analysis.analyze(text, 1), projection.Latencies(CHIP), trips or {}
  )


def _loops(steps) -> list:
  """Every loop of a program, nested ones too."""
  found = []
  for step in steps:
    if isinstance(step, hlo_analysis.Loop):
      found += [step] + _loops(step.body)
  return found


def _layers(x, w_ld):
  """STEPS scanned layers, each x @ w[l] with its own weights."""

  def layer(x, w):
    with jax.named_scope("mlp"):
      return jnp.tanh(x @ w), None

  return jax.lax.scan(layer, x, w_ld)[0]


def _unrolled(x, w_ld):
  for l in range(STEPS):
    with jax.named_scope("mlp"):
      x = jnp.tanh(x @ w_ld[l])
  return x


def _devices():
  yield pytest.param(jax.devices("cpu")[0], id="cpu")
  if HAS_LIBTPU:
    yield pytest.param("tpu", id="tpu")


def _compile(fn, device, tmp_path):
  if device == "tpu":
    device = aot.tpu_devices("v5e-4")[0]
  s = jax.sharding.SingleDeviceSharding(device)
  args = (
    jax.ShapeDtypeStruct((B, D), jnp.float32, sharding=s),
    jax.ShapeDtypeStruct((STEPS, D, D), jnp.float32, sharding=s),
  )
  compiled = (
    jax.jit(fn)
    .lower(*args)
    .compile(compiler_options={"xla_dump_to": str(tmp_path)})
  )
  return compiled


@pytest.mark.parametrize("device", _devices())
def test_loops_count_every_trip(device, tmp_path):
  scanned = _compile(_layers, device, tmp_path / "scan")
  unrolled = _compile(_unrolled, device, tmp_path / "unrolled")
  exact = 2.0 * B * D * D * STEPS
  costs = _costs(scanned.as_text())
  [loop] = _loops(hlo_analysis.analyze(scanned.as_text(), 1))
  assert (loop.trips, loop.scope) == (STEPS, None)
  assert costs.flops == pytest.approx(exact, rel=1e-6)
  # XLA's own analysis counts the scan's body once.
  assert scanned.cost_analysis()["flops"] < exact / 5
  straight = _costs(unrolled.as_text())
  assert straight.flops == pytest.approx(exact, rel=1e-6)
  # On a loop-free program the matmul FLOPs are XLA's (which add the
  # tanh's). The bytes: every weight and the input are read at least once,
  # and a few times at most (the CPU copies each layer's slice out first);
  # on the CPU they are also XLA's own count to within its fusions' finer
  # accounting (a TPU's XLA counts its on-chip memory's traffic too, and
  # weights after their conversion).
  xla = unrolled.cost_analysis()
  assert straight.flops == pytest.approx(xla["flops"], rel=0.02)
  inputs = STEPS * D * D * 4 + B * D * 4
  assert inputs <= straight.hbm_bytes <= 4 * (inputs + 2 * STEPS * B * D * 4)
  if device != "tpu":
    assert straight.hbm_bytes == pytest.approx(xla["bytes accessed"], rel=0.25)
  # Each trip reads its own layer's slice of the stacked weights: the
  # program moves a few times the stack, not a stack a trip.
  weights = STEPS * D * D * 4
  assert weights <= costs.hbm_bytes < 0.5 * STEPS * weights
  assert costs.seconds >= max(
    exact / CHIP.peak_flops, weights / CHIP.hbm_bytes_per_s
  )


@pytest.mark.parametrize("device", _devices())
def test_largest_buffers_name_their_maker(device, tmp_path):
  def logits(x, w):
    with jax.named_scope("logits"):
      logits_bv = jnp.einsum("bd,vd->bv", x, w)
      return logits_bv, jax.nn.logsumexp(logits_bv, -1)

  if device == "tpu":
    device = aot.tpu_devices("v5e-4")[0]
  s = jax.sharding.SingleDeviceSharding(device)
  lowered = jax.jit(logits).lower(
    jax.ShapeDtypeStruct((512, 128), jnp.float32, sharding=s),
    jax.ShapeDtypeStruct((32_000, 128), jnp.float32, sharding=s),
  )
  # A compile served by JAX's persistent cache (a second test run) writes
  # no dump.
  with aot._compilation_cache_off():
    compiled = lowered.compile(compiler_options={"xla_dump_to": str(tmp_path)})
  assignment = glob.glob(str(tmp_path / "*buffer-assignment.txt"))[-1]
  buffers = hlo_analysis.largest_buffers(
    open(assignment).read(),
    compiled.as_text(),
    count=3,
    argument_labels={0: "x", 1: "w"},
  )
  largest_argument = next(b for b in buffers if b.kind == "argument")
  assert largest_argument.label == "w"
  assert largest_argument.bytes == 32_000 * 128 * 4
  logits = buffers[0]
  assert (logits.bytes, logits.shape, logits.kind) == (
    512 * 32_000 * 4,
    "f32[512,32000]",
    "output",
  )
  assert logits.label.startswith("logits: "), logits.label


def test_shapes_and_trip_counts_parse():
  assert hlo_analysis.array_bytes("(s32[], bf16[4,8]{1,0:T(8,128)(2,1)})") == (
    4 + 64
  )
  text = """
%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
  %c = s32[] constant(12)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%body (q: (s32[], f32[8])) -> (s32[], f32[8]) {
  %q = (s32[], f32[8]{0}) parameter(0)
  %i2 = s32[] get-tuple-element(%q), index=0
  %three = s32[] constant(3)
  %next = s32[] add(%i2, %three)
  %x = f32[8]{0} get-tuple-element(%q), index=1
  %y = f32[8]{0} exponential(%x)
  ROOT %t = (s32[], f32[8]{0}) tuple(%next, %y)
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[8]{0}) tuple(%zero, %a)
  %w = (s32[], f32[8]{0}) while(%init), condition=%cond, body=%body
  ROOT %out = f32[8]{0} get-tuple-element(%w), index=1
}
"""
  [loop] = _loops(hlo_analysis.analyze(text, 1))
  assert (loop.trips, loop.bound, loop.scope) == (4, 4, None)
  costs = _costs(text)
  # i = 0, 3, 6, 9: four trips, each the condition's compare (two s32 read,
  # a pred written), the counter's add (two s32 read, one written) and the
  # exponential's 32 bytes read and 32 written; each of the 3 ops pays the
  # fixed cost.
  assert costs.hbm_bytes == 4 * ((4 + 4 + 1) + (4 + 4 + 4) + 64)
  assert costs.ops == 4 * 3
  assert np.isclose(
    costs.seconds,
    costs.hbm_bytes / CHIP.hbm_bytes_per_s
    + costs.ops * projection.PER_OP_SECONDS,
  )
