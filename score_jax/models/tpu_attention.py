"""Attention kernels for TPUs (Pallas), behind the plain-XLA paths of
attention.py, which CPUs and GPUs keep using.

  ragged_decode_attention  a KV-cache segment's attention for the new
                           tokens, reading each entry's written slots only:
                           the blocks past an entry's length are neither
                           loaded nor computed, and an entry of length 0 (a
                           row that stopped) costs nothing.
  splash_self_attention    training and scoring over packed rows: jax's
                           splash attention, causal within each episode
                           (its segment ids), Gemma 2's soft-cap, fully
                           masked blocks skipped.

Both run per device inside `jax.shard_map`, with the activations' layout
(batch rows over the batch axes, kv heads or query heads over tensor).
With `interpret=True` they run on the CPU, which the tests compare against
the XLA paths.

Shape legend (docs/design.md): E cache entries (rows, or prompts), K kv
heads, Z queries per entry and kv head (G rows per entry x T new tokens x Q
query heads per kv head), S slots, H head_dim, B rows, T tokens, N query
heads.
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


def _decode_kernel(lengths_ref, q_ref, k_ref, v_ref, out_ref, lse_ref,
                   max_ref, sum_ref, acc_ref, *, block: int, cap):
  """One (entry, kv head) pair, one block of slots: online softmax over
  the entry's Z queries."""
  entry, block_index = pl.program_id(0), pl.program_id(2)
  length = lengths_ref[entry]

  @pl.when(block_index == 0)
  def _start():
    max_ref[...] = jnp.full(max_ref.shape, -jnp.inf, jnp.float32)
    sum_ref[...] = jnp.zeros(sum_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when(block_index * block < length)
  def _accumulate():
    logits_zs = jax.lax.dot_general(
        q_ref[...], k_ref[...], (((1,), (1,)), ((), ())),
        preferred_element_type=jnp.float32)
    if cap is not None:
      logits_zs = cap * jnp.tanh(logits_zs / cap)
    slots = block_index * block + jax.lax.broadcasted_iota(
        jnp.int32, logits_zs.shape, 1)
    logits_zs = jnp.where(slots < length, logits_zs, -jnp.inf)
    previous = max_ref[...][:, :1]
    new_max = jnp.maximum(previous, logits_zs.max(axis=1, keepdims=True))
    probs_zs = jnp.exp(logits_zs - new_max)
    correction = jnp.exp(previous - new_max)
    sum_ref[...] = jnp.broadcast_to(
        correction * sum_ref[...][:, :1] + probs_zs.sum(1, keepdims=True),
        sum_ref.shape)
    max_ref[...] = jnp.broadcast_to(new_max, max_ref.shape)
    acc_ref[...] = correction * acc_ref[...] + jax.lax.dot_general(
        probs_zs.astype(v_ref.dtype), v_ref[...], (((1,), (0,)), ((), ())),
        preferred_element_type=jnp.float32)

  @pl.when(block_index == pl.num_programs(2) - 1)
  def _finish():
    total = sum_ref[...][:, :1]
    seen = total > 0
    out_ref[...] = jnp.where(seen, acc_ref[...] / jnp.where(seen, total, 1.0),
                             0.0).astype(out_ref.dtype)
    lse_ref[...] = jnp.broadcast_to(
        jnp.where(seen, max_ref[...][:, :1] + jnp.log(
            jnp.where(seen, total, 1.0)), -jnp.inf), lse_ref.shape)


def _ragged_decode_local(q_ekzh, k_eksh, v_eksh, lengths_e, cap,
                         interpret: bool):
  """The kernel on one device's shards. Returns (out [E, K, Z, H] in q's
  dtype, normalised; log-sum-exp of the logits [E, K, Z] float32, -inf for
  an entry with nothing to read)."""
  E, K, Z, H = q_ekzh.shape
  S = k_eksh.shape[2]
  block = _block_len(S)
  num_blocks = S // block

  def kv_map(entry, head, index, lengths):
    # Past an entry's last written block, the same block again: Pallas
    # skips a copy whose block index does not change.
    last = jnp.maximum(pl.cdiv(lengths[entry], block) - 1, 0)
    return entry, head, jnp.minimum(index, last), 0

  q_map = lambda entry, head, index, lengths: (entry, head, 0, 0)
  itemsize = jnp.dtype(k_eksh.dtype).itemsize
  cost = pl.CostEstimate(
      flops=4 * E * K * Z * S * H,
      transcendentals=E * K * Z * S,
      bytes_accessed=(2 * E * K * S * H * itemsize
                      + 2 * E * K * Z * H * jnp.dtype(q_ekzh.dtype).itemsize
                      + E * K * Z * _LANES * 4))
  out, lse = pl.pallas_call(
      functools.partial(_decode_kernel, block=block, cap=cap),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(E, K, num_blocks),
          in_specs=[pl.BlockSpec((None, None, Z, H), q_map),
                    pl.BlockSpec((None, None, block, H), kv_map),
                    pl.BlockSpec((None, None, block, H), kv_map)],
          out_specs=[pl.BlockSpec((None, None, Z, H), q_map),
                     pl.BlockSpec((None, None, Z, _LANES), q_map)],
          scratch_shapes=[pltpu.VMEM((Z, _LANES), jnp.float32),
                          pltpu.VMEM((Z, _LANES), jnp.float32),
                          pltpu.VMEM((Z, H), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct((E, K, Z, H), q_ekzh.dtype),
                 jax.ShapeDtypeStruct((E, K, Z, _LANES), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      cost_estimate=cost, interpret=interpret, name=DECODE_KERNEL,
  )(lengths_e.astype(jnp.int32), q_ekzh, k_eksh, v_eksh)
  return out, lse[..., 0]


def ragged_decode_attention(q_ekzh, k_eksh, v_eksh, lengths_e, cap, shard,
                            interpret: bool = False):
  """softmax(q k^T) v of each entry's queries over its first `lengths_e`
  slots (the logits soft-capped by `cap`), with the log-sum-exp of its
  logits so that segments combine (`combine`). Entries are split over the
  batch axes and kv heads over tensor as `shard` (the model's
  ActivationSharding, or no mesh) lays them out."""
  fn = functools.partial(_ragged_decode_local, cap=cap, interpret=interpret)
  mesh = getattr(shard, "mesh", None)
  if mesh is None:
    return fn(q_ekzh, k_eksh, v_eksh, lengths_e)
  rules = shard.rules
  spec = lambda x, axes: sharding_lib.partition_spec(axes, x.shape, mesh,
                                                     rules)
  q_spec = spec(q_ekzh, ("activation_batch", "activation_kv_heads",
                         "activation_heads", None))
  kv_spec = PartitionSpec(q_spec[0], q_spec[1], None, None)
  return jax.shard_map(
      fn, mesh=mesh,
      in_specs=(q_spec, kv_spec, kv_spec, PartitionSpec(q_spec[0])),
      out_specs=(q_spec, PartitionSpec(*q_spec[:3])),
      check_vma=False)(q_ekzh, k_eksh, v_eksh, lengths_e)


def combine(outs, lses):
  """The attention over the union of disjoint key sets, from each set's
  normalised output [..., H] and log-sum-exp [...]: each weighted by its
  share of the total softmax mass. Float32."""
  lse_all = jnp.stack(lses)
  top = jnp.max(lse_all, axis=0)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  weights = jnp.exp(lse_all - top)
  total = jnp.sum(weights, axis=0)
  out = sum(w[..., None] * o.astype(jnp.float32)
            for w, o in zip(weights, outs))
  return out / jnp.where(total > 0, total, 1.0)[..., None]


def splash_self_attention(q_btnh, k_btkh, v_btkh, episodes_bt, cap, shard,
                          interpret: bool = False):
  """Causal attention within each episode of packed rows (`episodes_bt`:
  ids, -1 for padding; each episode's tokens consecutive and in order),
  with jax's splash attention: blocks above the diagonal are skipped,
  other episodes' keys masked by segment ids. [B, T, N, H]."""
  T = q_btnh.shape[1]
  block = _block_len(T)
  sizes = splash.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block,
      block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
      block_q_dq=block, block_kv_dq=block)

  def local(q, k, v, episodes):
    heads = q.shape[2]
    mask = splash_mask.MultiHeadMask(
        [splash_mask.CausalMask((T, T)) for _ in range(heads)])
    kernel = splash.make_splash_mha(
        mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
        attn_logits_soft_cap=cap, interpret=interpret)
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # [B, heads, T, H]
    out = jax.vmap(kernel)(heads_first(q), heads_first(k), heads_first(v),
                           splash.SegmentIds(q=episodes, kv=episodes))
    return heads_first(out)

  mesh = getattr(shard, "mesh", None)
  if mesh is None:
    return local(q_btnh, k_btkh, v_btkh, episodes_bt)
  rules = shard.rules
  spec = lambda x, axes: sharding_lib.partition_spec(axes, x.shape, mesh,
                                                     rules)
  # Query heads split with their kv heads: both over tensor when the kv
  # heads divide, else the kv heads on every device of it.
  kv_spec = spec(k_btkh, ("activation_batch", None, "activation_kv_heads",
                          None))
  q_spec = kv_spec if kv_spec[2] is not None else spec(
      q_btnh, ("activation_batch", None, "activation_heads", None))
  return jax.shard_map(
      local, mesh=mesh,
      in_specs=(q_spec, kv_spec, kv_spec, PartitionSpec(q_spec[0])),
      out_specs=q_spec, check_vma=False)(q_btnh, k_btkh, v_btkh, episodes_bt)


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


def splash_cost(phase: str, rows_heads: int, num_slots: int, head_dim: int,
                itemsize: int) -> tuple[float, float]:
  """(FLOPs, HBM bytes) of one splash kernel call (SPLASH_KERNELS's phase)
  over `rows_heads` rows x query heads of `num_slots` tokens: the causal
  mask's blocks on and below the diagonal (packing's other episodes in
  them are masked, not skipped), each a query block against a kv block.
  Splash sets no cost estimate of its own; this is --mode=aot's."""
  block = _block_len(num_slots)
  n = num_slots // block
  pairs = n * (n + 1) // 2
  flops = rows_heads * pairs * _SPLASH_MATMULS[phase] * 2 * block**2 * head_dim
  # Each pair reads a key and a value block; the queries (and their
  # gradients, outputs) stream once.
  io = {"fwd": 2, "dq": 4, "dkv": 5}[phase]
  moved = rows_heads * head_dim * itemsize * (2 * pairs * block
                                              + io * num_slots)
  return float(flops), float(moved)


def platform_kernels(mesh) -> str:
  """"tpu" when `mesh`'s devices are TPUs (compiled for, or attached),
  else "xla"."""
  device = np.asarray(mesh.devices).flat[0] if mesh is not None else (
      jax.devices()[0])
  return "tpu" if device.platform == "tpu" else "xla"


