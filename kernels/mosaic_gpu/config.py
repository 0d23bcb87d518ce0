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


STAGE_FIELDS = ("num_stages", "num_stages_dkv", "num_stages_dq")


@dataclasses.dataclass(frozen=True)
class MosaicGPUBlockSizes(BlockSizes):
  """BlockSizes plus each kernel's pipeline depth (shared-memory slots per streamed
  operand: num_stages for the forward, num_stages_dkv and num_stages_dq for the
  backward's two kernels) and the schedules of the forward and of dK/dV."""

  num_stages: int | None = None
  num_stages_dkv: int | None = None
  num_stages_dq: int | None = None
  # Forward schedule: True overlaps each step's softmax with the previous step's PV
  # matmul inside a warpgroup (FlashAttention-3 section 3.2); None: the head-dim default.
  overlap_softmax: bool | None = None
  # dK/dV schedule: True makes its two consumers take turns on the tensor cores (one's
  # elementwise step under the other's matmuls, FlashAttention-3 section 3.1's
  # ping-pong); None: the default (on at d64 and at non-causal d128; docs/performance.md,
  # "Why these defaults"). One consumer at d256: no effect.
  dkv_ping_pong: bool | None = None
  switches = ("overlap_softmax", "dkv_ping_pong")

  def __post_init__(self):
    super().__post_init__()
    for name in self.switches:
      value = getattr(self, name)
      if value is not None and not isinstance(value, bool):
        raise ValueError(f"{type(self).__name__}.{name} must be a bool or None, got {value!r}")
    for name in STAGE_FIELDS:  # positive ints already (BlockSizes): a ring needs two slots
      value = getattr(self, name)
      if value is not None and value < 2:
        raise ValueError(f"{type(self).__name__}.{name} must be an int >= 2, got {value!r}")
    self.require_multiple(WGMMA_ROWS)


# Heuristic defaults per head dim, chosen so that the float32 accumulators of one
# warpgroup (block_q x H for O, block_q x block_kv for S) fit in 232 registers per
# thread and the resident tiles + each ring fit in 227 KiB of shared memory. The
# measurements behind them: docs/performance.md, "Why these defaults".
_DEFAULTS = {
    # At d64 each backward step is short: 128-wide streamed blocks halve the steps.
    64: dict(block_q=64, block_kv=128, num_stages=2, overlap_softmax=False,
             block_q_dkv=128, block_kv_dkv=64, num_stages_dkv=2, dkv_ping_pong=True,
             block_q_dq=64, block_kv_dq=128, num_stages_dq=2),
    # At d128 a third forward slot fits (230536 of 232448 bytes) but did not pay at
    # s16384; with the dK/dV ping-pong 2 slots beat 3. Causal: _CAUSAL_DEFAULTS.
    128: dict(block_q=64, block_kv=128, num_stages=2, overlap_softmax=True,
              block_q_dkv=64, block_kv_dkv=64, num_stages_dkv=2, dkv_ping_pong=True,
              block_q_dq=64, block_kv_dq=64, num_stages_dq=2),
    # At d256 every kernel's resident tiles and a 2-slot ring fill shared memory.
    256: dict(block_q=64, block_kv=64, num_stages=2, overlap_softmax=True,
              block_q_dkv=64, block_kv_dkv=64, num_stages_dkv=2, dkv_ping_pong=False,
              block_q_dq=64, block_kv_dq=64, num_stages_dq=2),
}


# Causal calls at d128 keep the sequential dK/dV: faster than the ping-pong in 3 of 4
# causal timings, where the ping-pong won all 4 non-causal ones.
_CAUSAL_DEFAULTS = {128: dict(dkv_ping_pong=False)}


def default_config(spec: AttentionSpec) -> MosaicGPUBlockSizes:
  fields = dict(_DEFAULTS[spec.head_dim])
  if spec.causal:
    fields.update(_CAUSAL_DEFAULTS.get(spec.head_dim, {}))
  return MosaicGPUBlockSizes(**fields)


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
