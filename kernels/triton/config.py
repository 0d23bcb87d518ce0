"""Tile sizes, warps and pipeline stages of the Triton kernels, and their heuristic.

`TritonConfig` extends the shared `BlockSizes` with the Triton knobs of each of the
three kernels (forward, dK/dV, dQ). It is frozen and hashable, so it is a static
argument of the custom VJP; fields left None are filled by `resolve` from
`heuristic_config`, which picks per head dim, dtype and GPU generation.
"""

from __future__ import annotations

import dataclasses

import jax

from flash_jax.config import BlockSizes, next_power_of_two
from flash_jax.spec import AttentionSpec

# Triton's tensor-core dot needs every operand dimension to be at least 16.
MIN_BLOCK = 16
ALLOWED_WARPS = (1, 2, 4, 8, 16)
MAX_STAGES = 8


@dataclasses.dataclass(frozen=True)
class TritonConfig(BlockSizes):
  """Block sizes (powers of two, >= 16) plus warps and stages of each kernel.

  Forward: block_q x block_kv, num_warps, num_stages.
  dK/dV:   a key block of block_kv_dkv walks query blocks of block_q_dkv.
  dQ:      a query block of block_q_dq walks key blocks of block_kv_dq.
  """

  num_warps: int | None = None
  num_stages: int | None = None
  num_warps_dkv: int | None = None
  num_stages_dkv: int | None = None
  num_warps_dq: int | None = None
  num_stages_dq: int | None = None

  def __post_init__(self):
    super().__post_init__()
    for name, value in self.block_fields().items():
      if value is not None and (value < MIN_BLOCK or value & (value - 1)):
        raise ValueError(f"TritonConfig.{name}={value} must be a power of two >= {MIN_BLOCK}")
    for name in ("num_warps", "num_warps_dkv", "num_warps_dq"):
      value = getattr(self, name)
      if value is not None and value not in ALLOWED_WARPS:
        raise ValueError(f"TritonConfig.{name}={value} must be one of {ALLOWED_WARPS}")
    for name in ("num_stages", "num_stages_dkv", "num_stages_dq"):
      value = getattr(self, name)
      if value is not None and value > MAX_STAGES:
        raise ValueError(f"TritonConfig.{name}={value} must be at most {MAX_STAGES}")


def padded_head_dim(head_dim: int) -> int:
  """The head dim a kernel tile carries: a power of two >= 16 (tails masked on load)."""
  return max(MIN_BLOCK, next_power_of_two(head_dim))


def _gpu_major_version() -> int | None:
  """Compute capability major of the default device (9 on Hopper), None off GPU."""
  try:
    device = jax.devices()[0]
  except RuntimeError:
    return None
  capability = getattr(device, "compute_capability", None)
  if device.platform != "gpu" or capability is None:
    return None
  return int(str(capability).split(".")[0])


def heuristic_config(spec: AttentionSpec) -> TritonConfig:
  """Defaults per head dim, dtype and GPU generation (measured: docs/performance_triton.md).

  Shared memory bounds the tiles: a [block, head_dim] tile per operand and pipeline
  stage. Wide heads and float32 get smaller key blocks; Ampere (cc 8.x, up to 164 KiB
  of shared memory) gets one stage fewer than Hopper (228 KiB).
  """
  head_dim = padded_head_dim(max(spec.head_dim, spec.head_dim_v))
  wide = spec.jnp_dtype.itemsize == 4
  hopper = (_gpu_major_version() or 9) >= 9
  if head_dim <= 64:
    fwd = dict(block_q=64, block_kv=64, num_warps=4, num_stages=3)
    dkv = dict(block_q_dkv=32, block_kv_dkv=128, num_warps_dkv=4, num_stages_dkv=3)
    dq = dict(block_q_dq=128, block_kv_dq=64, num_warps_dq=4, num_stages_dq=3)
  elif head_dim <= 128:
    fwd = dict(block_q=128, block_kv=128, num_warps=8, num_stages=3)
    dkv = dict(block_q_dkv=64, block_kv_dkv=128, num_warps_dkv=8, num_stages_dkv=3)
    dq = dict(block_q_dq=128, block_kv_dq=64, num_warps_dq=8, num_stages_dq=3)
  else:
    fwd = dict(block_q=128, block_kv=64, num_warps=8, num_stages=2)
    dkv = dict(block_q_dkv=64, block_kv_dkv=64, num_warps_dkv=8, num_stages_dkv=2)
    dq = dict(block_q_dq=128, block_kv_dq=32, num_warps_dq=8, num_stages_dq=2)
  config = {**fwd, **dkv, **dq}
  if wide:  # float32 tiles take twice the shared memory
    for name in ("block_q", "block_kv", "block_q_dkv", "block_kv_dkv", "block_q_dq", "block_kv_dq"):
      config[name] = max(MIN_BLOCK, config[name] // 2)
  if not hopper:
    for name in ("num_stages", "num_stages_dkv", "num_stages_dq"):
      config[name] = max(1, config[name] - 1)
  return TritonConfig(**config)


def _fit(block: int, length: int) -> int:
  """No tile larger than the sequence needs (rounded up to a power of two >= 16)."""
  return min(block, max(MIN_BLOCK, next_power_of_two(length)))


def resolve(config: TritonConfig | BlockSizes, spec: AttentionSpec) -> TritonConfig:
  """A fully specified TritonConfig: the user's fields, the heuristic for the rest."""
  if not isinstance(config, TritonConfig):  # a plain BlockSizes: keep its block sizes
    config = TritonConfig(**config.block_fields())
  default = heuristic_config(spec)
  config = config.fill(**{f.name: getattr(default, f.name) for f in dataclasses.fields(default)})
  t, s = spec.q_len, spec.kv_len
  return dataclasses.replace(
      config, block_q=_fit(config.block_q, t), block_kv=_fit(config.block_kv, s),
      block_q_dkv=_fit(config.block_q_dkv, t), block_kv_dkv=_fit(config.block_kv_dkv, s),
      block_q_dq=_fit(config.block_q_dq, t), block_kv_dq=_fit(config.block_kv_dq, s))
