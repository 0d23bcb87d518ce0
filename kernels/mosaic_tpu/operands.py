"""The optional inputs every kernel shares (bias, dense mask, segment ids): padded into the
kernel layout, given block specs, and loaded as tile values inside a kernel."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from flash_jax.spec import AttentionArrays

from flash_jax.kernels.mosaic_tpu import launch, layout, tile
from flash_jax.kernels.mosaic_tpu.layout import Geometry


@dataclasses.dataclass(frozen=True)
class MaskTiles:
  """Values of one tile's optional inputs (None when the feature is off)."""

  bias: jax.Array | None = None  # [bq|1, bk], bias dtype
  mask: jax.Array | None = None  # [bq|1, bk] int8 (int32 when broadcast over T)
  q_segment_ids: jax.Array | None = None  # [bq, bk] int32
  kv_segment_ids: jax.Array | None = None  # [1, bk] int32


def mask_operands(bias, arrays: AttentionArrays, geo: Geometry,
                  coords: launch.CoordsFn) -> list[launch.Operand]:
  """Named operands for the bias, dense mask and segment ids that are present."""
  operands = []
  if bias is not None:
    if bias.shape[2] == 1:  # a single-row block of a packed dtype would not fill a tile
      bias = bias.astype(jnp.float32)
    padded = layout.pad_pairwise(bias, geo)
    operands.append(launch.Operand("bias", padded, launch.pairwise(geo, coords, padded.shape)))
  if arrays.mask is not None:
    padded = layout.dense_mask(arrays.mask, geo)
    operands.append(launch.Operand("mask", padded, launch.pairwise(geo, coords, padded.shape)))
  if arrays.q_segment_ids is not None:
    q_ids, kv_ids = layout.segment_ids(arrays, geo)
    operands.append(launch.Operand("q_segment_ids", q_ids, launch.q_segment_rows(geo, coords)))
    operands.append(launch.Operand("kv_segment_ids", kv_ids,
                                   launch.kv_segment_cols(geo, coords)))
  return operands


def load_mask_tiles(refs, geo: Geometry) -> MaskTiles:
  load = lambda name: refs[name][...] if name in refs else None
  q_ids = kv_ids = None
  if "q_segment_ids" in refs:
    q_ids = tile.widen(refs["q_segment_ids"][...], geo.block_kv)  # [bq, 128] -> [bq, bk]
    kv_ids = refs["kv_segment_ids"][:1, :]  # one of the 8 replicated rows: [1, bk]
  return MaskTiles(bias=load("bias"), mask=load("mask"), q_segment_ids=q_ids,
                   kv_segment_ids=kv_ids)
