"""Attention kernels for TPUs (Pallas), behind the plain-XLA paths of
attention.py, which CPUs and GPUs keep using.

  decode_attention         the attention of the new tokens over a KV
                           cache's segments in one call, reading each row's
                           written slots only: the blocks past a row's
                           length are neither loaded nor computed, a row
                           that stopped costs nothing, and a prompt's
                           segment is read once for its G rows.
  splash_self_attention    training and scoring over packed rows: jax's
                           splash attention, causal within each episode
                           (its segment ids), Gemma 2's soft-cap, fully
                           masked blocks skipped.

Both run per device inside `jax.shard_map`, with the activations' layout
(batch rows over the batch axes, kv heads or query heads over tensor).
With `interpret=True` they run on the CPU, which the tests compare against
the XLA paths.

Shape legend (docs/design.md): U prompts, G rows per prompt (the entries of
a turn's segment; the prompt's segment has one entry per prompt), K kv
heads, Z queries per row and kv head (T new tokens x Q query heads per kv
head), S slots, H head_dim, B rows, T tokens, N query heads.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu.splash_attention import (
  splash_attention_kernel as splash,
)
from jax.experimental.pallas.ops.tpu.splash_attention import (
  splash_attention_mask as splash_mask,
)
from jax.sharding import PartitionSpec

from score_jax import sharding as sharding_lib

_LANES = 128  # TPU vector lanes: the last dimension of the kernel's stats
DECODE_KERNEL = "ragged_decode_attention"


def _block_len(num_slots: int) -> int:
  """The largest of 512, 256, 128 that divides `num_slots` (else the whole
  segment: a segment shorter than 128 slots is one block)."""
  return next((b for b in (512, 256, 128) if num_slots % b == 0), num_slots)


def _decode_kernel(lengths_ref, q_ref, *refs, plan, G: int, Z: int, cap):
  """One (prompt, kv head) pair and one block of one segment's slots: the
  online softmax of the prompt's G rows' queries over it. `plan` holds,
  per segment, (first block index, blocks, block length, shared)."""
  kv_refs, (out_ref, lse_ref, max_ref, sum_ref, acc_ref) = (
    refs[: 2 * len(plan)],
    refs[2 * len(plan) :],
  )
  entry, index = pl.program_id(0), pl.program_id(2)

  @pl.when(index == 0)
  def _start():
    max_ref[...] = jnp.full(max_ref.shape, -jnp.inf, jnp.float32)
    sum_ref[...] = jnp.zeros(sum_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  for number, (first, blocks, block, shared) in enumerate(plan):
    k_ref, v_ref = kv_refs[2 * number], kv_refs[2 * number + 1]
    lengths = [lengths_ref[number, entry * G + g] for g in range(G)]
    start = (index - first) * block
    longest = functools.reduce(jnp.maximum, lengths)

    @pl.when((index >= first) & (index < first + blocks) & (start < longest))
    def _accumulate(
      k_ref=k_ref,
      v_ref=v_ref,
      lengths=lengths,
      start=start,
      block=block,
      shared=shared,
    ):
      for g in range(G):
        rows = slice(g * Z, (g + 1) * Z)
        keys = k_ref[...] if shared else k_ref[g]
        values = v_ref[...] if shared else v_ref[g]
        logits_zs = jax.lax.dot_general(
          q_ref[g],
          keys,
          (((1,), (1,)), ((), ())),
          preferred_element_type=jnp.float32,
        )
        if cap is not None:
          logits_zs = cap * jnp.tanh(logits_zs / cap)
        slots = start + jax.lax.broadcasted_iota(jnp.int32, logits_zs.shape, 1)
        logits_zs = jnp.where(slots < lengths[g], logits_zs, -jnp.inf)
        previous = max_ref[rows, :1]
        new_max = jnp.maximum(previous, logits_zs.max(axis=1, keepdims=True))
        # A row with nothing here yet keeps -inf; exp(-inf - -inf) is NaN.
        safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
        probs_zs = jnp.exp(logits_zs - safe_max)
        correction = jnp.exp(previous - safe_max)
        sum_ref[rows, :] = jnp.broadcast_to(
          correction * sum_ref[rows, :1] + probs_zs.sum(1, keepdims=True),
          (Z, _LANES),
        )
        max_ref[rows, :] = jnp.broadcast_to(new_max, (Z, _LANES))
        acc_ref[rows, :] = correction * acc_ref[rows, :] + jax.lax.dot_general(
          probs_zs.astype(values.dtype),
          values,
          (((1,), (0,)), ((), ())),
          preferred_element_type=jnp.float32,
        )

  @pl.when(index == pl.num_programs(2) - 1)
  def _finish():
    total = sum_ref[:, :1]
    seen = total > 0
    out = jnp.where(seen, acc_ref[...] / jnp.where(seen, total, 1.0), 0.0)
    out_ref[...] = out.reshape(out_ref.shape).astype(out_ref.dtype)
    lse = jnp.where(
      seen, max_ref[:, :1] + jnp.log(jnp.where(seen, total, 1.0)), -jnp.inf
    )
    lse_ref[...] = jnp.broadcast_to(lse, (G * Z, _LANES)).reshape(lse_ref.shape)


def _decode_local(q_ugkzh, segments, cap, interpret: bool):
  """The kernel on one device's shards. `segments`: (keys, values, lengths)
  of each: shared ones [U, K, S, H] with lengths [U], the others
  [U * G, K, S, H] with lengths [U * G]. Returns (out [U, G, K, Z, H] in
  q's dtype, normalised; log-sum-exp of the logits [U, G, K, Z] float32,
  -inf for a row with nothing to read)."""
  U, G, K, Z, H = q_ugkzh.shape
  plan, inputs, specs, lengths = [], [], [], []
  first = 0
  for keys, values, length in segments:
    S = keys.shape[2]
    block = _block_len(S)
    blocks = S // block
    shared = length.shape[0] == U and G > 1
    plan.append((first, blocks, block, shared))
    lengths.append(jnp.repeat(length, G) if shared else length)
    number = len(plan) - 1

    def kv_map(
      entry,
      head,
      index,
      lengths_ref,
      number=number,
      first=first,
      block=block,
      blocks=blocks,
      shared=shared,
    ):
      # Outside this segment's blocks, or past its entries' written slots,
      # the block it holds already: Pallas copies nothing then.
      longest = functools.reduce(
        jnp.maximum, [lengths_ref[number, entry * G + g] for g in range(G)]
      )
      last = jnp.maximum(pl.cdiv(longest, block) - 1, 0)
      within = jnp.clip(index - first, 0, jnp.minimum(last, blocks - 1))
      return (entry, head, within, 0) if shared else (entry, 0, head, within, 0)

    if shared:
      spec = pl.BlockSpec((None, None, block, H), kv_map)
    else:
      keys = keys.reshape(U, G, K, S, H)
      values = values.reshape(U, G, K, S, H)
      spec = pl.BlockSpec((None, G, None, block, H), kv_map)
    inputs += [keys, values]
    specs += [spec, spec]
    first += blocks
  q_map = lambda entry, head, index, lengths_ref: (entry, 0, head, 0, 0)
  itemsize = jnp.dtype(segments[0][0].dtype).itemsize
  slots = sum(
    k.shape[2] * (1 if k.shape[0] == U and G > 1 else G) for k, _, _ in segments
  )
  cost = pl.CostEstimate(
    flops=4 * U * K * G * Z * slots * H,
    transcendentals=U * K * G * Z * slots,
    bytes_accessed=(
      2 * U * K * slots * H * itemsize
      + 2 * U * K * G * Z * H * jnp.dtype(q_ugkzh.dtype).itemsize
      + U * K * G * Z * _LANES * 4
    ),
  )
  out, lse = pl.pallas_call(
    functools.partial(_decode_kernel, plan=tuple(plan), G=G, Z=Z, cap=cap),
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(U, K, first),
      in_specs=[pl.BlockSpec((None, G, None, Z, H), q_map)] + specs,
      out_specs=[
        pl.BlockSpec((None, G, None, Z, H), q_map),
        pl.BlockSpec((None, G, None, Z, _LANES), q_map),
      ],
      scratch_shapes=[
        pltpu.VMEM((G * Z, _LANES), jnp.float32),
        pltpu.VMEM((G * Z, _LANES), jnp.float32),
        pltpu.VMEM((G * Z, H), jnp.float32),
      ],
    ),
    out_shape=[
      jax.ShapeDtypeStruct((U, G, K, Z, H), q_ugkzh.dtype),
      jax.ShapeDtypeStruct((U, G, K, Z, _LANES), jnp.float32),
    ],
    compiler_params=pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "arbitrary")
    ),
    cost_estimate=cost,
    interpret=interpret,
    name=DECODE_KERNEL,
  )(jnp.stack(lengths).astype(jnp.int32), q_ugkzh, *inputs)
  return out, lse[..., 0]


def decode_attention(q_ugkzh, segments, cap, shard, interpret: bool = False):
  """softmax(q k^T) v of each row's queries over the written slots of
  several KV-cache segments, in one kernel call. A block past every row's
  length is neither loaded nor computed, a row of length 0 (stopped) reads
  nothing of that segment. Prompts go over the batch axes and kv heads over
  tensor as `shard` lays them out.

  Args:
    q_ugkzh: [U, G, K, Z, H], the queries of the U prompts' G rows each
      (the rows' [B, N, H] as they lie), scaled and rotated.
    segments: (keys, values, lengths) of each segment: the prompt's, shared
      by its G rows ([U, K, S, H], int32 lengths [U]), or a turn's ([U * G,
      K, S, H], lengths [U * G]); each entry's slots 0 .. length - 1 are
      read.
    cap: the logits' soft-cap (None: none).
    shard: the model's ActivationSharding (its mesh and rules), or a
      function without a mesh (no shard_map).
    interpret: run the kernel interpreted (on the CPU).

  Returns:
    (out [U, G, K, Z, H] in the queries' dtype, normalised, zero for a row
    that reads nothing; log-sum-exp of the logits, float32 [U, G, K, Z],
    -inf for such a row), so that other keys combine (`combine`).
  """
  fn = functools.partial(_decode_local, cap=cap, interpret=interpret)
  mesh = getattr(shard, "mesh", None)
  if mesh is None:
    return fn(q_ugkzh, segments)
  q_spec = sharding_lib.partition_spec(
    ("activation_batch", None, "activation_kv_heads", "activation_heads", None),
    q_ugkzh.shape,
    mesh,
    shard.rules,
  )
  kv_spec = PartitionSpec(q_spec[0], q_spec[2], None, None)
  lengths_spec = PartitionSpec(q_spec[0])
  return jax.shard_map(
    lambda q, segments: fn(q, segments),
    mesh=mesh,
    in_specs=(q_spec, [(kv_spec, kv_spec, lengths_spec)] * len(segments)),
    out_specs=(q_spec, PartitionSpec(*q_spec[:4])),
    check_vma=False,
  )(q_ugkzh, [tuple(s) for s in segments])


def combine(outs, lses):
  """The attention over the union of disjoint key sets, from each set's
  normalised output and log-sum-exp: each weighted by its share of the
  total softmax mass.

  Args:
    outs: each set's normalised output [..., H].
    lses: each set's log-sum-exp of the logits [...] (-inf: no key).

  Returns:
    float32 [..., H]; zero for a query no set has a key for.
  """
  lse_all = jnp.stack(lses)
  top = jnp.max(lse_all, axis=0)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  weights = jnp.exp(lse_all - top)
  total = jnp.sum(weights, axis=0)
  out = sum(w[..., None] * o.astype(jnp.float32) for w, o in zip(weights, outs))
  return out / jnp.where(total > 0, total, 1.0)[..., None]


def splash_self_attention(
  q_btnh, k_btkh, v_btkh, episodes_bt, cap, shard, interpret: bool = False
):
  """Causal attention within each episode of packed rows (`episodes_bt`:
  ids, -1 for padding; each episode's tokens consecutive and in order),
  with jax's splash attention: blocks above the diagonal are skipped,
  other episodes' keys masked by segment ids.

  Args:
    q_btnh: [B, T, N, H], the queries, scaled and rotated.
    k_btkh: [B, T, K, H], the keys, rotated.
    v_btkh: [B, T, K, H], the values.
    episodes_bt: int32 [B, T], each token's episode id, -1 for padding.
    cap: the logits' soft-cap (None: none).
    shard: the model's ActivationSharding (its mesh and rules), or a
      function without a mesh (no shard_map).
    interpret: run the kernel interpreted (on the CPU).

  Returns:
    [B, T, N, H], the attention's output per query head.
  """
  T = q_btnh.shape[1]
  block = _block_len(T)
  sizes = splash.BlockSizes(
    block_q=block,
    block_kv=block,
    block_kv_compute=block,
    block_q_dkv=block,
    block_kv_dkv=block,
    block_kv_dkv_compute=block,
    block_q_dq=block,
    block_kv_dq=block,
  )

  def local(q, k, v, episodes):
    heads = q.shape[2]
    mask = splash_mask.MultiHeadMask(
      [splash_mask.CausalMask((T, T)) for _ in range(heads)]
    )
    kernel = splash.make_splash_mha(
      mask,
      block_sizes=sizes,
      head_shards=1,
      q_seq_shards=1,
      attn_logits_soft_cap=cap,
      interpret=interpret,
    )
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # [B, heads, T, H]
    out = jax.vmap(kernel)(
      heads_first(q),
      heads_first(k),
      heads_first(v),
      splash.SegmentIds(q=episodes, kv=episodes),
    )
    return heads_first(out)

  mesh = getattr(shard, "mesh", None)
  if mesh is None:
    return local(q_btnh, k_btkh, v_btkh, episodes_bt)
  rules = shard.rules
  spec = lambda x, axes: sharding_lib.partition_spec(axes, x.shape, mesh, rules)
  # Query heads split with their kv heads: both over tensor when the kv
  # heads divide, else the kv heads on every device of it.
  kv_spec = spec(
    k_btkh, ("activation_batch", None, "activation_kv_heads", None)
  )
  q_spec = (
    kv_spec
    if kv_spec[2] is not None
    else spec(q_btnh, ("activation_batch", None, "activation_heads", None))
  )
  return jax.shard_map(
    local,
    mesh=mesh,
    in_specs=(q_spec, kv_spec, kv_spec, PartitionSpec(q_spec[0])),
    out_specs=q_spec,
    check_vma=False,
  )(q_btnh, k_btkh, v_btkh, episodes_bt)


# The splash kernels a train step runs, by pallas_call name, and their
# phase: the forward (with the residuals the backward reads, or without for
# the reference's scoring) and the backward's two kernels.
SPLASH_KERNELS = {
  "splash_mha_fwd_segmented_residuals": "fwd",
  "splash_mha_fwd_segmented_no_residuals": "fwd",
  "splash_mha_dq_segmented_no_residuals": "dq",
  "splash_mha_dkv_segmented_no_residuals": "dkv",
}
# Matmuls a pair of (query block, kv block) costs in each phase: q.k and
# p.v forward; the backward recomputes q.k and d(o).v in both of its kernels,
# then d(s).k for dq, p.d(o) and d(s).q for dk and dv.
_SPLASH_MATMULS = {"fwd": 2, "dq": 3, "dkv": 4}


def splash_cost(
  phase: str, rows_heads: int, num_slots: int, head_dim: int, itemsize: int
) -> tuple[float, float]:
  """(FLOPs, HBM bytes) of one splash kernel call (SPLASH_KERNELS's phase)
  over `rows_heads` rows x query heads of `num_slots` tokens: the causal
  mask's blocks on and below the diagonal (packing's other episodes in
  them are masked, not skipped), each a query block against a kv block.
  Splash sets no cost estimate of its own; this is --mode=aot's.

  Args:
    phase: "fwd", "dq" or "dkv" (SPLASH_KERNELS's values).
    rows_heads: the call's rows x query heads.
    num_slots: T, the tokens of a row.
    head_dim: H, the head dimension.
    itemsize: bytes per element of the queries, keys and values.

  Returns:
    (FLOPs, HBM bytes), floats.
  """
  block = _block_len(num_slots)
  n = num_slots // block
  pairs = n * (n + 1) // 2
  flops = rows_heads * pairs * _SPLASH_MATMULS[phase] * 2 * block**2 * head_dim
  # Each pair reads a key and a value block; the queries (and their
  # gradients, outputs) stream once.
  io = {"fwd": 2, "dq": 4, "dkv": 5}[phase]
  moved = (
    rows_heads * head_dim * itemsize * (2 * pairs * block + io * num_slots)
  )
  return float(flops), float(moved)


def platform_kernels(mesh) -> str:
  """ "tpu" when `mesh`'s devices are TPUs (compiled for, or attached),
  else "xla"."""
  device = (
    np.asarray(mesh.devices).flat[0] if mesh is not None else (jax.devices()[0])
  )
  return "tpu" if device.platform == "tpu" else "xla"
