"""The mask arrays of a call as the Mosaic GPU kernels receive and read them.

Per-batch scalars (q_offset, q_lengths, kv_lengths: int32 [B]) travel as GMEM inputs;
each CTA reads its batch row's entry with a scalar load (`ref[batch]`), so loop bounds
and masks follow the batch row. Segment ids (int32 [B, T_pad], [B, S_pad]) travel as
GMEM inputs too; the kernels copy the ids of their resident rows into shared memory
once and stream the ids of the visited blocks through the TMA ring beside K/V (or
Q/dO), then compare them on every visited tile (`masking.key_visibility`).

`BatchRules` is what one CTA knows: the static rules (causal, window) plus its batch
row's offset and lengths. Its `positional` dict feeds `ranges` and `masking`.

Dropout's seed (uint32, carried as int32 [1]) is a GMEM input too; `Dropout` computes a
tile's keep / (1 - rate) multiplier from global indices with the counter hash every
implementation shares (`masking.dropout_keep`, its row part once per query block), so
the kept entries are bitwise the same.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from flash_jax import masking, tiles
from flash_jax.spec import AttentionArrays, AttentionSpec
from flash_jax.kernels.mosaic_gpu import compat

SCALAR_NAMES = ("q_offset", "q_lengths", "kv_lengths")
DROPOUT_SEED = "dropout_seed"
SEGMENT_NAMES = ("q_segment_ids", "kv_segment_ids")


def inputs(arrays: AttentionArrays, spec: AttentionSpec, *, t_pad: int,
           s_pad: int) -> tuple[tuple[str, ...], tuple[Any, ...]]:
  """(names, int32 arrays) of the feature inputs a kernel takes after its tensors.

  Segment ids are padded to the kernels' padded lengths (the padding is masked by
  lengths or kv_bound, or belongs to dropped rows), so every TMA block lies in bounds.
  """
  names, values = [], []
  for name in SCALAR_NAMES:
    value = getattr(arrays, name)
    if value is not None:
      names.append(name)
      values.append(value.astype(jnp.int32))
  if spec.has_segment_ids:
    names += list(SEGMENT_NAMES)
    values.append(tiles.pad_axis(arrays.q_segment_ids.astype(jnp.int32), -1, t_pad))
    values.append(tiles.pad_axis(arrays.kv_segment_ids.astype(jnp.int32), -1, s_pad))
  if spec.has_dropout:
    names.append(DROPOUT_SEED)
    values.append(lax.bitcast_convert_type(arrays.dropout_seed, jnp.int32).reshape(1))
  return tuple(names), tuple(values)


@dataclasses.dataclass(frozen=True)
class Dropout:
  """Dropout of one (batch row, query head), read inside a kernel body."""

  seed: Any  # traced uint32 scalar
  rate: float
  batch: Any
  head: Any

  @classmethod
  def read(cls, spec: AttentionSpec, refs: dict, batch, head):
    """The call's dropout, or None without it."""
    if not spec.has_dropout:
      return None
    seed = refs[DROPOUT_SEED][0].astype(jnp.uint32)  # same bits: int32 -> uint32 wraps
    return cls(seed, spec.dropout_rate, batch, head)

  def row_hashes(self, q_lo, rows: int, *, q_axis: int = 0):
    """uint32 [rows]: `masking.dropout_row_hash` of queries q_lo + i, in the layout of a
    tile's axis `q_axis` (compute once per query block: only the key varies in a row)."""
    layout = compat.row_layout() if q_axis == 0 else compat.col_layout()
    q_idx = plgpu.broadcasted_iota(jnp.int32, (rows,), 0, layout=layout) + q_lo
    return masking.dropout_row_hash(self.seed, self.batch, self.head, q_idx)

  def multiplier(self, row_hashes, shape, *, k_lo, q_axis: int = 0):
    """float32 keep / (1 - rate), 0 where dropped, on a tile whose axis `q_axis` runs
    over the queries of `row_hashes` and the other over keys k_lo + j."""
    k_idx = compat.iota(shape, 1 - q_axis) + k_lo
    rows = lax.broadcast_in_dim(row_hashes, shape, [q_axis])
    keep = masking.dropout_keep_in_row(rows, k_idx, self.rate)
    return masking.dropout_multiplier(keep, self.rate)


@dataclasses.dataclass(frozen=True)
class BatchRules:
  """The visibility rules of one batch row, read inside a kernel body."""

  causal: bool
  window: Any
  q_offset: Any  # traced int32 scalar or None
  q_length: Any
  kv_length: Any
  kv_bound: int | None  # static S when key blocks overhang it
  segments: dict  # name -> GMEM ref [B, T_pad] / [B, S_pad]; empty without segment ids

  @classmethod
  def read(cls, spec: AttentionSpec, refs: dict, batch, *, kv_bound: int | None):
    scalar = lambda name: refs[name][batch] if name in refs else None
    return cls(spec.causal, spec.window, scalar("q_offset"), scalar("q_lengths"),
               scalar("kv_lengths"), kv_bound,
               {name: refs[name] for name in SEGMENT_NAMES if name in refs})

  @property
  def positional(self) -> dict:
    """Keyword arguments of the `ranges` functions."""
    return dict(causal=self.causal, window=self.window, q_offset=self.q_offset,
                q_length=self.q_length, kv_length=self.kv_length)

  @property
  def has_segments(self) -> bool:
    return bool(self.segments)

  def visible(self, q_idx, k_idx, *, q_segments=None, kv_segments=None):
    """Bool visibility of a tile (`masking.key_visibility`), or None."""
    return masking.key_visibility(
        q_idx, k_idx, causal=self.causal, window=self.window, q_offset=self.q_offset,
        q_segment_ids=q_segments, kv_segment_ids=kv_segments, q_length=self.q_length,
        kv_length=self.kv_length, kv_bound=self.kv_bound)

  def tile_visible(self, shape, *, q_lo, k_lo, q_axis: int = 0, read_segment_ids=None):
    """Visibility of a masked tile, or None: axis `q_axis` of `shape` runs over queries
    q_lo + i, the other over keys k_lo + j.

    read_segment_ids: with segment ids, a function returning the tile's (query ids,
    key ids) as vectors along their axes; it is called after the position iotas, so a
    wait on a ring slot comes as late as it can.
    """
    k_axis = 1 - q_axis
    q_idx = compat.iota(shape, q_axis) + q_lo
    k_idx = compat.iota(shape, k_axis) + k_lo
    q_ids = kv_ids = None
    if read_segment_ids is not None:
      q_vec, kv_vec = read_segment_ids()
      q_ids = lax.broadcast_in_dim(q_vec, shape, [q_axis])
      kv_ids = lax.broadcast_in_dim(kv_vec, shape, [k_axis])
    return self.visible(q_idx, k_idx, q_segments=q_ids, kv_segments=kv_ids)


def read_ring_slot(ring, ready, free, slot, active=None):
  """Slot `slot` of a producer-fed ring of vectors [block], in the column layout of a
  tile (one entry per column): wait for the copy, load, release the slot. With a traced
  bool `active`, the barrier traffic happens only where it is true (the load does not
  wait then: the caller must not trust the values)."""
  sync = (lambda f: f()) if active is None else pl.when(active)
  sync(lambda: plgpu.barrier_wait(ready.at[slot]))
  vector = compat.load(ring.at[slot], compat.col_layout())
  sync(lambda: plgpu.barrier_arrive(free.at[slot]))
  return vector


def split_refs(refs, names: tuple[str, ...], num_tensors: int):
  """(tensor refs, {feature name: ref}, the remaining refs) of a kernel's arguments."""
  tensors = refs[:num_tensors]
  feature_refs = dict(zip(names, refs[num_tensors:num_tensors + len(names)]))
  return tensors, feature_refs, refs[num_tensors + len(names):]
