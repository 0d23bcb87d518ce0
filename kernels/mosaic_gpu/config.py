"""Tile and pipeline configuration of the Mosaic GPU (Hopper) kernels.

Each CTA runs `num_compute_wgs` = 2 consumer warpgroups of `block_q` query rows each
(so a CTA owns 2 * block_q rows in the forward) and one producer warpgroup that streams
key/value blocks of `block_kv` rows through a ring of `num_stages` shared-memory slots.
wgmma needs 64-row operand tiles, hence the multiples of 64.
"""

from __future__ import annotations

import dataclasses

from flash_jax.config import BlockSizes
from flash_jax.spec import AttentionSpec

NUM_COMPUTE_WGS = 2  # consumer warpgroups per CTA in the forward (FA3 ping-pong pair)
WGMMA_ROWS = 64  # the M of one warpgroup's wgmma


@dataclasses.dataclass(frozen=True)
class MosaicGPUBlockSizes(BlockSizes):
  """BlockSizes plus the pipeline depth (shared-memory slots per streamed operand) and
  the forward's schedule."""

  num_stages: int | None = None
  # Forward schedule: True overlaps each step's softmax with the previous step's PV
  # matmul inside a warpgroup (FlashAttention-3 section 3.2); None: the head-dim default.
  overlap_softmax: bool | None = None
  switches = ("overlap_softmax",)

  def __post_init__(self):
    super().__post_init__()
    if self.overlap_softmax is not None and not isinstance(self.overlap_softmax, bool):
      raise ValueError(f"{type(self).__name__}.overlap_softmax must be a bool or None, "
                       f"got {self.overlap_softmax!r}")
    if self.num_stages is not None and (not isinstance(self.num_stages, int)
                                        or isinstance(self.num_stages, bool)
                                        or self.num_stages < 2):
      raise ValueError(f"{type(self).__name__}.num_stages must be an int >= 2, "
                       f"got {self.num_stages!r}")
    self.require_multiple(WGMMA_ROWS)


# Heuristic defaults per head dim, chosen so that the float32 accumulators of one
# warpgroup (block_q x H for O, block_q x block_kv for S) fit in 232 registers per
# thread and Q + the K/V ring fit in 227 KiB of shared memory. See
# docs/performance_mosaic_gpu.md for the measurements behind them.
_DEFAULTS = {
    # head_dim: (block_q, block_kv, num_stages, block_q_dkv, block_kv_dkv, block_q_dq,
    #            block_kv_dq, overlap_softmax)
    64: (64, 128, 2, 64, 64, 64, 64, False),
    128: (64, 128, 2, 64, 64, 64, 64, False),
    256: (64, 64, 2, 64, 64, 64, 64, True),
}


def default_config(spec: AttentionSpec) -> MosaicGPUBlockSizes:
  bq, bkv, stages, bq_dkv, bkv_dkv, bq_dq, bkv_dq, overlap = _DEFAULTS[spec.head_dim]
  return MosaicGPUBlockSizes(block_q=bq, block_kv=bkv, num_stages=stages,
                             block_q_dkv=bq_dkv, block_kv_dkv=bkv_dkv,
                             block_q_dq=bq_dq, block_kv_dq=bkv_dq, overlap_softmax=overlap)


def resolve(config: BlockSizes, spec: AttentionSpec) -> MosaicGPUBlockSizes:
  """Fills the fields a user left None from the heuristic; accepts a plain BlockSizes."""
  default = default_config(spec)
  if not isinstance(config, MosaicGPUBlockSizes):
    config = MosaicGPUBlockSizes(**config.block_fields())
  updates = {f.name: getattr(default, f.name) for f in dataclasses.fields(config)
             if getattr(config, f.name) is None}
  config = dataclasses.replace(config, **updates)
  if config.block_q != WGMMA_ROWS:
    raise ValueError(f"{config.block_q=} must be {WGMMA_ROWS}: each consumer warpgroup owns "
                     "one wgmma row tile")
  return config
