"""Builds the pallas_calls of the Mosaic TPU kernels: named operands, block specs derived
from one tile-coordinate function per grid, scalar prefetch, grid semantics, cost, interpret.

Every kernel here has a 4-D grid whose first three axes are "parallel" and whose last,
the reduction over key blocks (forward, dQ) or query blocks (dK/dV), is "arbitrary", so
its VMEM scratch accumulators persist across it. Four int32 arrays are scalar-prefetched
into SMEM, always in this order: the block states, the fetch indices (`block_info`), the
per-batch scalars and the dropout seed (`layout`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from flash_jax import vmapping
from flash_jax.kernels.mosaic_tpu.config import LANES, SUBLANES
from flash_jax.kernels.mosaic_tpu.layout import Geometry

DIMENSION_SEMANTICS = ("parallel", "parallel", "parallel", "arbitrary")


@dataclasses.dataclass(frozen=True)
class Scalars:
  """The scalar-prefetched SMEM refs, as index maps and kernels receive them."""

  states: Any  # int32 [Bi * Ni * outer * inner]: block_info.SKIP / PARTIAL / FULL
  fetch: Any  # int32, same shape: the block to load along the reduction axis
  batch: Any  # int32 [B * 3]: q_offset, q_length, kv_length per batch
  seed: Any  # int32 [1]: dropout seed bits


@dataclasses.dataclass(frozen=True)
class TileCoords:
  """The tile whose blocks the pipeline loads at a grid point (traced int32 scalars)."""

  batch: Any
  q_head: Any
  q_block: Any
  kv_block: Any


# A grid's coordinate function: (grid indices, scalars) -> the tile to load there.
CoordsFn = Callable[[tuple, Scalars], TileCoords]


@dataclasses.dataclass(frozen=True)
class Operand:
  name: str
  value: Any  # jax.Array (input) or jax.ShapeDtypeStruct (output)
  block_spec: pl.BlockSpec


def _index_map(coords: CoordsFn, place: Callable[[TileCoords], tuple]):
  def index_map(*args):
    grid, scalar_refs = args[:4], args[4:]
    return place(coords(grid, Scalars(*scalar_refs)))
  return index_map


def block_spec(coords: CoordsFn, block_shape, place) -> pl.BlockSpec:
  """A BlockSpec whose block index is `place(tile coordinates)`."""
  return pl.BlockSpec(block_shape, _index_map(coords, place))


def q_rows(geo: Geometry, coords: CoordsFn, width: int) -> pl.BlockSpec:
  """[B, Nq, T_pad, width] (q, dO, out, dq; lse and delta with width 128): one query
  block of one head."""
  return block_spec(coords, (None, None, geo.block_q, width),
                    lambda c: (c.batch, c.q_head, c.q_block, 0))


def kv_rows(geo: Geometry, coords: CoordsFn, width: int) -> pl.BlockSpec:
  """[B, Nkv, S_pad, width] (k, v): the key block of the query head's K/V head (GQA:
  query head h reads K/V head h // G, so repeated K/V are never materialized)."""
  group = geo.spec.group_size
  return block_spec(coords, (None, None, geo.block_kv, width),
                    lambda c: (c.batch, c.q_head // group, c.kv_block, 0))


def pairwise(geo: Geometry, coords: CoordsFn, shape) -> pl.BlockSpec:
  """A padded [B?, Nq?, T_pad | 1, S_pad] bias or mask; broadcast dims read block 0."""
  b, n, t, _ = shape
  pick = lambda index, size: index if size > 1 else 0
  block = (None, None, geo.block_q if t > 1 else 1, geo.block_kv)
  return block_spec(coords, block, lambda c: (
      pick(c.batch, b), pick(c.q_head, n), pick(c.q_block, t), c.kv_block))


def q_segment_rows(geo: Geometry, coords: CoordsFn) -> pl.BlockSpec:
  """[B, T_pad, 128] lane-replicated query segment ids -> a [block_q, 128] block."""
  return block_spec(coords, (None, geo.block_q, LANES), lambda c: (c.batch, c.q_block, 0))


def kv_segment_cols(geo: Geometry, coords: CoordsFn) -> pl.BlockSpec:
  """[B, 8, S_pad] sublane-replicated key segment ids -> an [8, block_kv] block."""
  return block_spec(coords, (None, SUBLANES, geo.block_kv),
                    lambda c: (c.batch, 0, c.kv_block))


def interpret_params(interpret) -> Any:
  """The API's interpret flag -> pallas_call's: True runs TPU interpret mode (simulated
  HBM/VMEM/SMEM, DMAs and grid semantics on CPU); an `InterpretParams` is used as is
  (tests pass one with detect_races=True)."""
  if isinstance(interpret, pltpu.InterpretParams):
    return interpret
  if interpret is True:
    return pltpu.InterpretParams()
  if interpret is False or interpret is None:
    return False
  raise TypeError(f"interpret must be a bool or a pltpu.InterpretParams, got {interpret!r}")


def cost_estimate(geo: Geometry, *, matmuls_qk: int, matmuls_v: int, exps: int,
                  operands: Sequence[Operand]) -> pl.CostEstimate:
  """For XLA's scheduler: 2 FLOPs per multiply-add of `matmuls_qk` [T, S, H] and
  `matmuls_v` [T, S, Hv] products over the visible plane (half of it when causal),
  `exps` exponentials per visible entry, and every operand's bytes moved once."""
  spec = geo.spec
  pairs = spec.batch * spec.num_q_heads * spec.q_len * spec.kv_len
  if spec.causal:
    pairs //= 2
  flops = 2 * pairs * (matmuls_qk * spec.head_dim + matmuls_v * spec.head_dim_v)
  nbytes = sum(num_bytes(op.value) for op in operands)
  return pl.CostEstimate(flops=int(flops), transcendentals=int(exps * pairs),
                         bytes_accessed=int(nbytes))


def num_bytes(x) -> int:
  """Bytes of an array or ShapeDtypeStruct."""
  n = jnp.dtype(x.dtype).itemsize
  for d in x.shape:
    n *= int(d)
  return n


def call(body, *, name: str, grid: tuple[int, int, int, int], scalars: Sequence[jax.Array],
         inputs: Sequence[Operand], outputs: Sequence[Operand],
         scratch: Sequence[tuple[str, Any]], cost: pl.CostEstimate, interpret,
         vmem_limit_bytes: int | None):
  """Runs `body(scalars, refs)` over `grid`; refs maps operand and scratch names to refs.

  Returns the outputs in order.
  """
  names = [op.name for op in inputs] + [op.name for op in outputs] + [n for n, _ in scratch]

  def kernel(*refs):
    body(Scalars(*refs[:4]), dict(zip(names, refs[4:])))

  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=4, grid=grid,
      in_specs=[op.block_spec for op in inputs],
      out_specs=[op.block_spec for op in outputs],
      scratch_shapes=[shape for _, shape in scratch])
  params = interpret_params(interpret)
  run = pl.pallas_call(
      kernel, grid_spec=grid_spec, out_shape=[op.value for op in outputs], name=name,
      compiler_params=pltpu.CompilerParams(dimension_semantics=DIMENSION_SEMANTICS,
                                           vmem_limit_bytes=vmem_limit_bytes),
      cost_estimate=cost, interpret=params)
  if params:
    run = vmapping.map_when_vmapped(run)
  return run(*scalars, *[op.value for op in inputs])
