"""How a sequence is laid out over the devices of a ring, and helpers to permute into it.

The sequence axis of q, k, v is split into equal, contiguous shards over the ring's
devices, in the order of the array. A layout decides which global positions each shard
holds; permute a batch into the layout before sharding it (`to_ring_layout`) and the
outputs back afterwards (`from_ring_layout`).

    T = 16 positions over n = 2 devices:
      contiguous   device 0: 0 1 2 3 4 5 6 7        device 1: 8 9 10 11 12 13 14 15
      zigzag       device 0: 0 1 2 3 12 13 14 15    device 1: 4 5 6 7 8 9 10 11
      striped      device 0: 0 2 4 6 8 10 12 14     device 1: 1 3 5 7 9 11 13 15

With causal attention a contiguous layout leaves device 0 with 1 block of work and
device n-1 with n (the others are masked); zigzag (2n chunks, device r holds chunks r
and 2n-1-r, as in Llama 3's context parallelism) and striped (Striped Attention,
Brandon et al. 2023: device r holds positions r, r+n, r+2n, ...) give every device the
same work at every ring step.

Within a shard, rows form `Piece`s: runs whose global positions are an arithmetic
progression, so one kernel call with a `q_offset` serves each pair of pieces.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

LAYOUTS = ("contiguous", "zigzag", "striped")


@dataclasses.dataclass(frozen=True)
class Piece:
  """Local rows [local_start, local_start + length) at global positions
  global_start + stride * i (i = 0, 1, ...). local_start and global_start may be traced."""

  local_start: jax.Array | int
  length: int
  global_start: jax.Array | int
  stride: int = 1

  def take(self, x, axis=1):
    """The piece's rows of a shard-local array (local_start may be traced)."""
    return jax.lax.dynamic_slice_in_dim(x, self.local_start, self.length, axis)

  def put(self, x, rows, axis=1):
    """x with the piece's rows replaced by `rows` (in place when x is not used after)."""
    return jax.lax.dynamic_update_slice_in_dim(x, rows.astype(x.dtype), self.local_start, axis)


def check_layout(layout: str, *, local_len: int) -> None:
  """ValueError unless `layout` is known and `local_len` (rows per device) suits it."""
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
  if layout == "zigzag" and local_len % 2:
    raise ValueError(f"layout='zigzag' needs an even number of rows per device, got {local_len}")


def pieces(layout: str, shard, num_shards: int, local_len: int) -> tuple[Piece, ...]:
  """The pieces of device `shard` (an int or a traced int32) of a `num_shards` ring."""
  shard = jnp.asarray(shard, jnp.int32) if not isinstance(shard, int) else shard
  if layout == "contiguous":
    return (Piece(0, local_len, shard * local_len),)
  if layout == "zigzag":
    half = local_len // 2
    return (Piece(0, half, shard * half), Piece(half, half, (2 * num_shards - 1 - shard) * half))
  if layout == "striped":
    return (Piece(0, local_len, shard, num_shards),)
  raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def ring_positions(total_len: int, num_shards: int, layout: str) -> np.ndarray:
  """int [total_len]: the global position held by each row of a batch in `layout` order."""
  if total_len % num_shards:
    raise ValueError(f"sequence length {total_len} must be a multiple of the ring size "
                     f"{num_shards}")
  local_len = total_len // num_shards
  check_layout(layout, local_len=local_len)
  rows = []
  for shard in range(num_shards):
    for piece in pieces(layout, shard, num_shards, local_len):
      rows.append(piece.global_start + piece.stride * np.arange(piece.length))
  return np.concatenate(rows)


def to_ring_layout(x, num_shards: int, layout: str, *, axis: int = 1):
  """Permutes the sequence `axis` of a global array (natural order) into `layout` order."""
  x = jnp.asarray(x)
  return jnp.take(x, ring_positions(x.shape[axis], num_shards, layout), axis=axis)


def from_ring_layout(x, num_shards: int, layout: str, *, axis: int = 1):
  """Inverse of `to_ring_layout`: `layout` order back to natural order."""
  x = jnp.asarray(x)
  order = np.argsort(ring_positions(x.shape[axis], num_shards, layout))
  return jnp.take(x, order, axis=axis)
