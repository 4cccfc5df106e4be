"""The KV cache of a rollout: the episode as a tuple of segments.

An episode is a prompt and then turns: attempt 1, the instruction, attempt
2, ... Each is a `Segment` of the cache with slots of its own, and each
row's tokens in a segment are written from its slot 0 on, so the slots a
row holds are always a prefix of the segment (`lengths_e`), and their RoPE
positions run on from the row's previous segment (`offsets_e`). Decoding an
attempt writes token t of every row at slot t of that attempt's segment
(one aligned write, no scatter) and attends only to the segments written so
far: attempt 1 never reads the slots attempt 2 will fill. The prompt's
segment holds one entry per prompt, shared by its G samples
(`rows_per_entry`): it is prefilled once and read once per prompt.

Shape legend (docs/design.md): E entries of a segment (B rows, or U prompts
for the shared prompt segment), K kv heads, S slots, H head_dim, L layers
(a tuple over them), G rows per entry, T new tokens. Keys and values lie
[E, K, S, H], so that one entry's slots of one head are contiguous.
"""

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Segment:
  """One stretch of every episode in the cache (see the module docstring)."""

  k_leksh: tuple  # L arrays [E, K, S, H], keys after RoPE
  v_leksh: tuple  # L arrays [E, K, S, H]
  offsets_e: jax.Array  # int32: RoPE position of slot 0
  lengths_e: jax.Array  # int32: slots written (a prefix)
  rows_per_entry: int = 1  # static: batch rows that read each entry

  @property
  def num_slots(self) -> int:
    """S, the slots of each entry."""
    return self.k_leksh[0].shape[2]

  def positions_es(self) -> jax.Array:
    """The RoPE position of every slot [E, S] (int32)."""
    return self.offsets_e[:, None] + jnp.arange(self.num_slots, dtype=jnp.int32)

  def valid_es(self) -> jax.Array:
    """Which slots hold a written token [E, S] (bool)."""
    return jnp.arange(self.num_slots) < self.lengths_e[:, None]

  def ends_e(self) -> jax.Array:
    """The position after each entry's last token (int32 [E])."""
    return self.offsets_e + self.lengths_e


jax.tree_util.register_dataclass(
  Segment,
  data_fields=["k_leksh", "v_leksh", "offsets_e", "lengths_e"],
  meta_fields=["rows_per_entry"],
)


def empty_segment(
  num_layers: int,
  num_entries: int,
  num_slots: int,
  num_kv_heads: int,
  head_dim: int,
  dtype,
  shard,
  rows_per_entry: int = 1,
) -> Segment:
  """A segment with nothing written, its keys and values in `dtype` and
  laid out by `shard` (batch and kv heads split like the activations).

  Args:
    num_layers: L, the layers.
    num_entries: E, the rows (or prompts, for a shared segment).
    num_slots: S, the slots of each entry.
    num_kv_heads: K, the kv heads.
    head_dim: H, the head dimension.
    dtype: the keys' and values' dtype.
    shard: `shard(x, logical_axes)`, constrains an array's sharding.
    rows_per_entry: G, the batch rows that read each entry.

  Returns:
    The Segment: L zero keys and values [E, K, S, H], offsets and lengths
    int32 [E] zero.
  """
  zeros = lambda: shard(
    jnp.zeros((num_entries, num_kv_heads, num_slots, head_dim), dtype),
    ("activation_batch", "activation_kv_heads", None, None),
  )
  return Segment(
    k_leksh=tuple(zeros() for _ in range(num_layers)),
    v_leksh=tuple(zeros() for _ in range(num_layers)),
    offsets_e=jnp.zeros((num_entries,), jnp.int32),
    lengths_e=jnp.zeros((num_entries,), jnp.int32),
    rows_per_entry=rows_per_entry,
  )


def write(segment: Segment, layer: int, slot, k_rtkh, v_rtkh) -> Segment:
  """`segment` with T new keys and values of `layer` at slots slot .. slot
  + T - 1 of every entry (the lengths are the caller's to set).

  Args:
    segment: the segment written into.
    layer: the layer whose keys and values are written.
    slot: the first slot written, an int or an int32 scalar.
    k_rtkh: [E, T, K, H], the new keys (cast to the cache's dtype).
    v_rtkh: [E, T, K, H], the new values (likewise).

  Returns:
    The new Segment, its offsets and lengths unchanged.
  """
  zero, slot = jnp.int32(0), jnp.asarray(slot, jnp.int32)
  update = lambda cache, new: jax.lax.dynamic_update_slice(
    cache, jnp.swapaxes(new, 1, 2).astype(cache.dtype), (zero, zero, slot, zero)
  )
  k = list(segment.k_leksh)
  v = list(segment.v_leksh)
  with jax.named_scope("kv_cache"):
    k[layer] = update(k[layer], k_rtkh)
    v[layer] = update(v[layer], v_rtkh)
  return dataclasses.replace(segment, k_leksh=tuple(k), v_leksh=tuple(v))


def expand_rows(x_e, rows_per_entry: int):
  """An entry-indexed array as one row per batch row.

  Args:
    x_e: [E, ...], a value per entry.
    rows_per_entry: G, the batch rows that read each entry.

  Returns:
    [B, ...], B = E * G: each entry's value for each of its G rows (`x_e`
    itself when G is 1).
  """
  return x_e if rows_per_entry == 1 else jnp.repeat(x_e, rows_per_entry, 0)
