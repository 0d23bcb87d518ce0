"""The "mosaic_tpu" implementation: Pallas Mosaic TPU kernels behind one custom_vjp.

Serves every feature of the API on TPU (and on CPU in TPU interpret mode): causal with
q_offset, window, segment ids, lengths, softcap, bias with dbias, dense bool mask,
dropout, GQA/MQA, any T and S, head dims 1..256, bfloat16 and float32. float16 runs in
float32 inside the kernels (TPU matrix units take bfloat16 and float32, not float16)
and is cast back. Residuals are q, k, v, bias, the mask arrays, out and lse only.

Paged calls (`paged_attention`) and contiguous decode-shaped calls
(`split_kv.decode_shaped`: a few query rows per K/V head against a longer cache) run
the decode kernel (`paged.py`: GQA packing, pages by scalar-prefetched tables); the
latter's gradients come from the usual backward kernels. There is no split-KV kernel.
"""

from __future__ import annotations

import jax.numpy as jnp

from flash_jax import split_kv, tiles, versions
from flash_jax.config import BlockSizes
from flash_jax.implementation import BlockwiseImplementation, unsupported
from flash_jax.spec import AttentionSpec

from flash_jax.kernels.mosaic_tpu import backward as backward_kernels
from flash_jax.kernels.mosaic_tpu import config as config_lib
from flash_jax.kernels.mosaic_tpu import forward as forward_kernel
from flash_jax.kernels.mosaic_tpu import page_info, paged
from flash_jax.kernels.mosaic_tpu.config import MosaicTpuBlockSizes
from flash_jax.kernels.mosaic_tpu.layout import Geometry
from flash_jax.kernels.mosaic_tpu.page_info import PagedGeometry


def _compute_dtype(spec: AttentionSpec):
  return jnp.float32 if spec.jnp_dtype == jnp.float16 else spec.jnp_dtype


def _to_compute(spec: AttentionSpec, *xs):
  dtype = _compute_dtype(spec)
  return tuple(x.astype(dtype) for x in xs)


def _decode_geometry(config: MosaicTpuBlockSizes, spec: AttentionSpec) -> PagedGeometry | None:
  """The decode kernel's tiling for a decode-shaped call, None when a contiguous call's
  tables would outgrow SMEM (the blockwise kernel serves it); a paged call's raises
  NotImplementedError then."""
  if not split_kv.decode_shaped(spec):
    return None
  geo = PagedGeometry(spec, *config_lib.decode_tiling(config, spec))
  words = page_info.scalar_words(geo)
  if words <= page_info.MAX_SCALAR_WORDS:
    return geo
  if spec.paged:
    raise unsupported("mosaic_tpu", (
        f"decode calls whose page tables need {words * 4 // 1024} KiB of SMEM (more than "
        f"{page_info.MAX_SCALAR_WORDS * 4 // 1024} KiB: batch {spec.batch} x "
        f"{geo.num_slots} table slots x {geo.num_row_blocks} row blocks); use larger "
        f"pages or a smaller batch"))
  return None


class MosaicTpuImplementation(BlockwiseImplementation):
  name = "mosaic_tpu"
  platforms = ("tpu",)
  interpretable = True
  config_type = MosaicTpuBlockSizes
  differentiable_backward = False  # Pallas Mosaic TPU kernels have no JVP

  def check_spec(self, spec: AttentionSpec) -> None:
    _decode_geometry(config_lib.resolve(MosaicTpuBlockSizes(), spec), spec)  # SMEM check

  def check_config(self, config) -> None:
    """Any `BlockSizes` is accepted; its set block sizes must be multiples of 128."""
    if not isinstance(config, BlockSizes):
      raise TypeError(f"block_sizes for {self.name!r} must be a BlockSizes (or "
                      f"MosaicTpuBlockSizes), got {type(config).__name__}")
    config.require_multiple(config_lib.LANES)

  def default_config(self, spec: AttentionSpec) -> MosaicTpuBlockSizes:
    return config_lib.default_block_sizes(spec)

  @versions.names_jax_version
  def forward(self, q, k, v, bias, arrays, spec, config, interpret):
    out, lse, _ = self.forward_with_stats(q, k, v, bias, arrays, spec, config, interpret)
    return out, lse

  @versions.names_jax_version
  def forward_with_stats(self, q, k, v, bias, arrays, spec, config, interpret):
    config = config_lib.resolve(config, spec)
    decode = _decode_geometry(config, spec)  # every paged call, and contiguous decode
    if decode is not None:  # no bias there: the backward recomputes from lse alone
      out, lse = paged.decode_attention(q, k, v, arrays, decode, interpret=interpret,
                                        vmem_limit_bytes=config.vmem_limit_bytes)
      return out, lse, None
    geo = Geometry(spec, config.block_q, config.block_kv)
    out, lse, stats = forward_kernel.forward(*_to_compute(spec, q, k, v), bias, arrays, geo,
                                             interpret=interpret,
                                             vmem_limit_bytes=config.vmem_limit_bytes)
    return out.astype(q.dtype), lse, stats

  @versions.names_jax_version
  def backward(self, q, k, v, bias, arrays, out, lse, dout, delta, spec, config, interpret,
               stats=None):
    config = config_lib.resolve(config, spec)
    cq, ck, cv, cdout = _to_compute(spec, q, k, v, dout)
    stats = tiles.stats_or_lse(stats, lse)
    kwargs = dict(interpret=interpret, vmem_limit_bytes=config.vmem_limit_bytes)
    dk, dv = backward_kernels.backward_dkv(
        cq, ck, cv, bias, arrays, stats, cdout, delta,
        Geometry(spec, config.block_q_dkv, config.block_kv_dkv), **kwargs)
    dq, dbias_full = backward_kernels.backward_dq(
        cq, ck, cv, bias, arrays, stats, cdout, delta,
        Geometry(spec, config.block_q_dq, config.block_kv_dq), **kwargs)
    dbias = None
    if dbias_full is not None:  # sum dS [B, Nq, T, S] over the dims the bias broadcasts
      dbias = tiles.from_grouped_frame(dbias_full[:, :, None], bias.shape).astype(bias.dtype)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbias


IMPLEMENTATION = MosaicTpuImplementation()
