"""The "mosaic_gpu" implementation: Pallas Mosaic GPU kernels for Hopper (sm90).

Forward: `forward.py` (FlashAttention-3 warp specialization and ping-pong); decode-shaped
and paged calls: `split_kv.py` (split-KV, GQA packing, pages read in place). Backward:
`backward.py` (dK/dV and dQ kernels, deterministic). `check_spec` raises
NotImplementedError for every call these kernels do not serve, so that dispatch with
implementation=None moves on to the next implementation (Triton, chunked).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from flash_jax import masking, split_kv, tiles, versions
from flash_jax.implementation import BlockwiseImplementation, unsupported
from flash_jax.spec import AttentionSpec
from flash_jax.kernels.mosaic_gpu import backward as backward_kernels
from flash_jax.kernels.mosaic_gpu import compat, config as config_lib
from flash_jax.kernels.mosaic_gpu import forward as forward_kernel
from flash_jax.kernels.mosaic_gpu import split_kv as split_kv_kernel

# Head dims the kernels are built for, for H and Hv each: multiples of wgmma's
# 64-column tiles of 2-byte operands (128-byte swizzle); H != Hv as they come (MLA's
# 192/128). Every other head dim up to 256 runs zero-padded to the next one
# (`kernel_head_dim`): zero columns add nothing to q.k^T, zero value columns give zero
# output columns, and both are sliced off. The price is the padded FLOPs (96 -> 128:
# +33% of the matmuls).
KERNEL_HEAD_DIMS = (64, 128, 192, 256)
# Below this head dim the padding costs more than Triton's unpadded kernels: H200, bf16,
# s4k (docs/measurements/2026-11-30_h200_head_dims.json): d32 (2x the FLOPs) runs at
# 0.86-0.92x cuDNN, Triton at 1.10-1.20x; d80 (1.6x) at 0.88-0.93x, Triton at 0.71-0.85x.
PREFERRED_MIN_HEAD_DIM = 40
# With a bias at head dims up to 64, Triton is faster: H200, bf16, d64 s4k, beside cuDNN
# (docs/measurements/2026-11-30_h200_bias_mask.txt and the constant-bias run in
# docs/performance_mosaic_gpu.md): forward 0.63x (Triton 1.06x), forward+backward with a
# constant bias 1.22x (Triton 1.66x); only with d bias is mosaic_gpu ahead (0.91x, Triton
# 0.79x). Each bias tile load weighs twice as much against d64's matmuls as at d128.
BIAS_PREFERRED_MIN_HEAD_DIM = 65
# Decode-shaped calls at head dims over 64 and up to 128 go to Triton's split-KV kernel:
# the two were level there in two runs on the H200 (bf16, 2026-11-30, benchmarks/decode_gpu.py
# compare; docs/measurements/2026-11-30_h200_decode_mosaic_gpu.txt), each ahead by 1-6% on
# some problems, Triton by 6% at B = 64, S = 4096. At d64 (142-165 vs 147-182 us) and d256
# (474-500 vs 501-508) this kernel was ahead in both layouts.
SPLIT_KV_TRITON_HEAD_DIMS = range(65, 129)
# Decode-shaped calls of several 64-row tiles per K/V head (T * G > 64: speculative tokens
# with a large group) go to Triton's kernel at head dims up to 64, this one's above: B = 8,
# S = 32768, T = 16, 32/4 heads ran 169 us here against Triton's 154 at d64, and 437
# against 713 at d256 (cuDNN 737 and 1501; H200, bf16, 2026-12-01, benchmarks/
# decode_gpu.py compare --shape, each beside the others in one process).
SPLIT_KV_ROW_TILES_TRITON_MAX_HEAD_DIM = 64
SUPPORTED_DTYPES = ("bfloat16", "float16")


class MosaicGPUImplementation(BlockwiseImplementation):
  name = "mosaic_gpu"
  platforms = ("gpu",)
  interpretable = False  # the Mosaic GPU interpreter lacks layout_cast and run_state
  differentiable_backward = False  # Pallas Mosaic GPU kernels have no JVP
  split_kv_kernels = True
  config_type = config_lib.MosaicGPUBlockSizes

  def check_spec(self, spec: AttentionSpec) -> None:
    if not compat.is_hopper():
      raise unsupported(self.name, "devices other than sm90 (Hopper) GPUs")
    missing = compat.missing_api()
    if missing:
      raise unsupported(self.name, f"JAX {jax.__version__}, whose Pallas lacks "
                        f"{', '.join(missing)}")
    if spec.paged:
      if not native_head_dims(spec):
        raise unsupported(self.name, f"paged caches at head dims ({spec.head_dim}, "
                          f"{spec.head_dim_v}): the split-KV kernel takes "
                          f"{KERNEL_HEAD_DIMS}, and padding would copy the cache")
      block_kv = config_lib.default_config(spec).block_kv_split
      if not split_kv_kernel.serves_page_size(spec.page_size, block_kv):
        raise unsupported(self.name, f"page size {spec.page_size} with {block_kv}-key blocks "
                          "(a page must hold whole blocks, or a block whole pages of a "
                          "multiple of 8 tokens)")
    if spec.dtype not in SUPPORTED_DTYPES:
      raise unsupported(self.name, f"dtype {spec.dtype} (only {', '.join(SUPPORTED_DTYPES)})")
    # spec.normalize bounds both head dims by 256, the largest of KERNEL_HEAD_DIMS.

  def slower_than_next(self, spec: AttentionSpec) -> bool:
    head_dim = max(spec.head_dim, spec.head_dim_v)
    if split_kv.decode_shaped(spec):
      # Not through the split-KV kernel, the forward kernel would run on a padded copy
      # of the cache.
      return (not uses_split_kv(spec) or head_dim in SPLIT_KV_TRITON_HEAD_DIMS
              or (spec.packed_rows > config_lib.WGMMA_ROWS
                  and head_dim <= SPLIT_KV_ROW_TILES_TRITON_MAX_HEAD_DIM))
    if spec.has_bias and head_dim < BIAS_PREFERRED_MIN_HEAD_DIM:
      return True
    return head_dim < PREFERRED_MIN_HEAD_DIM

  def check_config(self, config) -> None:
    if not isinstance(config, config_lib.BlockSizes):
      raise TypeError(f"block_sizes for {self.name!r} must be a MosaicGPUBlockSizes, "
                      f"got {type(config).__name__}")

  def default_config(self, spec: AttentionSpec) -> config_lib.MosaicGPUBlockSizes:
    return config_lib.default_config(kernel_spec(spec))

  def forward(self, q, k, v, bias, arrays, spec, config, interpret):
    out, lse, _ = self.forward_with_stats(q, k, v, bias, arrays, spec, config, interpret)
    return out, lse

  @versions.names_jax_version
  def forward_with_stats(self, q, k, v, bias, arrays, spec, config, interpret):
    """With a bias, the stats are the rows' (max in natural units, log2 sum) (see
    `backward.kernel_operands`); None without."""
    del interpret
    if uses_split_kv(spec):  # no bias: the backward recomputes from lse alone
      out, lse = split_kv_kernel.split_kv_forward(q, k, v, arrays, spec,
                                                  config_lib.resolve(config, spec))
      return out, lse, None
    k, v = tiles.zero_keys_no_row_sees(spec, arrays, k, v)  # TMA loads whole key blocks
    padded = kernel_spec(spec)
    q, k = (pad_head_dim(x, padded.head_dim) for x in (q, k))
    v = pad_head_dim(v, padded.head_dim_v)
    out, lse, stats = forward_kernel.forward(q, k, v, bias, arrays, padded,
                                             config_lib.resolve(config, padded))
    if stats is not None:
      stats = tiles.backward_stats(*stats, log=jnp.log2)
    return out[..., :spec.head_dim_v], lse, stats

  @versions.names_jax_version
  def backward(self, q, k, v, bias, arrays, out, lse, dout, delta, spec, config, interpret,
               stats=None):
    del out, interpret
    k, v = tiles.zero_keys_no_row_sees(spec, arrays, k, v)  # as in forward
    padded = kernel_spec(spec)
    q, k = (pad_head_dim(x, padded.head_dim) for x in (q, k))
    v, dout = (pad_head_dim(x, padded.head_dim_v) for x in (v, dout))
    dq, dk, dv, dlogits = backward_kernels.backward(q, k, v, bias, lse, dout, delta, arrays,
                                                    padded, config_lib.resolve(config, padded),
                                                    stats=stats)
    dbias = None if dlogits is None else bias_gradient(dlogits, bias, arrays, spec)
    return dq[..., :spec.head_dim], dk[..., :spec.head_dim], dv[..., :spec.head_dim_v], dbias


def bias_gradient(dlogits, bias, arrays, spec: AttentionSpec):
  """d loss / d logits [B, Nq, T, S] float32 from the dQ kernel -> d loss / d bias of the
  bias's shape and dtype. Blocks that no CTA visits (hidden by position, lengths or an
  all-False mask block) were never written: the visibility zeroes them."""
  mask5 = None if arrays.mask is None else tiles.to_grouped_frame(arrays.mask, spec)
  visible = tiles.tile_visibility(spec, arrays, mask5, 0, spec.kv_len)  # [B?, Nkv?, G?, T, S]
  if visible is not None:
    grouped = dlogits.reshape(spec.batch, spec.num_kv_heads, spec.group_size, spec.q_len,
                              spec.kv_len)
    dlogits = jnp.where(visible, grouped, 0.0).reshape(dlogits.shape)
  dbias = masking.bias_grad(dlogits, bias)
  return tiles.sum_to_shape(dbias, bias.shape).astype(bias.dtype)


def native_head_dims(spec: AttentionSpec) -> bool:
  """Whether H and Hv are both head dims the kernels are built for (no padding)."""
  return spec.head_dim in KERNEL_HEAD_DIMS and spec.head_dim_v in KERNEL_HEAD_DIMS


def uses_split_kv(spec: AttentionSpec) -> bool:
  """Decode-shaped calls go to the split-KV kernel, which reads the cache in place. A
  contiguous call at other head dims, or whose cache length is no multiple of 8 (TMA
  tiles the cache's rows by 8), runs the forward kernel on a padded copy instead."""
  if not split_kv.decode_shaped(spec):
    return False
  return spec.paged or (native_head_dims(spec) and spec.kv_len % 8 == 0)


def kernel_head_dim(head_dim: int) -> int:
  """The kernels' head dim for a call's H or Hv: the smallest of KERNEL_HEAD_DIMS that
  holds it."""
  return next(d for d in KERNEL_HEAD_DIMS if d >= head_dim)


def kernel_spec(spec: AttentionSpec) -> AttentionSpec:
  """`spec` at the kernels' head dims (the scale stays the call's)."""
  return dataclasses.replace(spec, head_dim=kernel_head_dim(spec.head_dim),
                             head_dim_v=kernel_head_dim(spec.head_dim_v))


def pad_head_dim(x, head_dim: int):
  """[..., D] -> [..., head_dim] with zero columns."""
  return tiles.pad_axis(x, x.ndim - 1, head_dim)


IMPLEMENTATION = MosaicGPUImplementation()
