"""The "triton" implementation: Pallas kernels lowered through Triton, NVIDIA GPUs from Ampere.

Forward (forward.py; split_kv.py for decode-shaped and paged calls), dK/dV
(backward_dkv.py, which can also add up dQ with atomics: `fuses_dq`) and dQ
(backward_dq.py) kernels, wired
into one jax.custom_vjp by `BlockwiseImplementation`, whose residuals are q, k, v, the
mask arrays, out and lse (nothing of size T x S) and which computes
delta = rowsum(dO * O) - dlse in XLA before the backward kernels run.

Self-contained: nothing outside kernels/triton/ imports this package except the one
registry line in flash_jax/dispatch.py, so retiring the Triton lowering deletes a folder.
"""

from __future__ import annotations

from flash_jax import split_kv, tiles, versions
from flash_jax.config import BlockSizes
from flash_jax.implementation import BlockwiseImplementation, unsupported
from flash_jax.spec import AttentionSpec

from flash_jax.kernels.triton import config as config_lib
from flash_jax.kernels.triton import tile_math
from flash_jax.kernels.triton.backward_dkv import backward_dkv
from flash_jax.kernels.triton.backward_dq import backward_dq
from flash_jax.kernels.triton.config import TritonConfig
from flash_jax.kernels.triton.forward import forward
from flash_jax.kernels.triton.split_kv import split_kv_forward

MAX_GRID_DIM = 65535  # CUDA's limit on the grid's y and z (batch and heads here)
MIN_COMPUTE_CAPABILITY = 8  # Ampere: bf16 tensor cores, cp.async


class TritonImplementation(BlockwiseImplementation):
  name = "triton"
  platforms = ("gpu",)
  interpretable = True
  split_kv_kernels = True
  config_type = TritonConfig
  differentiable_backward = False  # Pallas Triton kernels have no JVP

  def check(self, spec: AttentionSpec, *, platform: str, interpret: bool) -> None:
    super().check(spec, platform=platform, interpret=interpret)
    major = None if interpret else config_lib.gpu_major_version()
    if major is not None and major < MIN_COMPUTE_CAPABILITY:
      raise unsupported(self.name, f"GPUs before Ampere (compute capability {major}.x)")

  def check_spec(self, spec: AttentionSpec) -> None:
    for what, size in (("batch", spec.batch), ("query heads", spec.num_q_heads)):
      if size > MAX_GRID_DIM:
        raise unsupported(self.name, f"{what} > {MAX_GRID_DIM} (got {size}): a grid limit")

  def check_config(self, config) -> None:
    """Takes a TritonConfig or a plain BlockSizes (its blocks must suit Triton too)."""
    if not isinstance(config, BlockSizes):
      raise TypeError(f"block_sizes for {self.name!r} must be a TritonConfig or BlockSizes, "
                      f"got {type(config).__name__}")
    if not isinstance(config, TritonConfig):
      TritonConfig(**config.block_fields())  # raises ValueError naming a bad block size

  def default_config(self, spec: AttentionSpec) -> TritonConfig:
    return config_lib.heuristic_config(spec)

  @versions.names_jax_version
  def forward(self, q, k, v, bias, arrays, spec, config, interpret):
    out, lse, _ = self.forward_with_stats(q, k, v, bias, arrays, spec, config, interpret)
    return out, lse

  @versions.names_jax_version
  def forward_with_stats(self, q, k, v, bias, arrays, spec, config, interpret):
    config = config_lib.resolve(config, spec)
    if split_kv.decode_shaped(spec):  # no bias: the backward recomputes from lse alone
      out, lse = split_kv_forward(q, k, v, arrays, spec, config, interpret)
      return out, lse, None
    out, lse, row_max, log_sum = forward(q, k, v, bias, arrays, spec, config, interpret)
    return out, lse, (row_max, log_sum)

  @versions.names_jax_version
  def backward(self, q, k, v, bias, arrays, out, lse, dout, delta, spec, config, interpret,
               stats=None):
    config = config_lib.resolve(config, spec)
    if stats is None:  # from lse alone, in the kernels' units
      row_max, log_sum = tiles.stats_or_lse(None, lse)
      stats = (tile_math.from_natural(row_max, spec), log_sum)
    fused = fuses_dq(spec, config)
    dk, dv, dq = backward_dkv(q, k, v, bias, arrays, stats, dout, delta, spec, config,
                              interpret, fused_dq=fused)
    dbias = None
    if not fused:
      dq, dbias = backward_dq(q, k, v, bias, arrays, stats, dout, delta, spec, config,
                              interpret)
    if dbias is not None:
      dbias = tiles.sum_to_shape(dbias, bias.shape).astype(bias.dtype)
    return dq, dk, dv, dbias


# The fused dK/dV kernel's head dims: at d256 it asked for 258 KiB of shared memory, more
# than the 227 KiB an H200 multiprocessor has (the GPU test, 2026-12-01), which
# `config.fit_shared_memory` does not model.
FUSED_DQ_MAX_HEAD_DIM = 128


def fuses_dq(spec: AttentionSpec, config: TritonConfig) -> bool:
  """Whether the dK/dV kernel also accumulates dQ, with atomics (`backward_dkv`): where
  the config asks for it, the call allows it (`spec.allows_atomic_dq`), and the head
  dims are at most FUSED_DQ_MAX_HEAD_DIM."""
  return (bool(config.atomic_dq) and spec.allows_atomic_dq
          and max(spec.head_dim, spec.head_dim_v) <= FUSED_DQ_MAX_HEAD_DIM)


IMPLEMENTATION = TritonImplementation()
