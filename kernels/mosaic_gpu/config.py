"""Tile and pipeline configuration of the Mosaic GPU (Hopper) kernels.

Each CTA runs `num_compute_wgs` = 2 consumer warpgroups of `block_q` query rows each
(so a CTA owns 2 * block_q rows in the forward) and one producer warpgroup that streams
key/value blocks of `block_kv` rows through a ring of `num_stages` shared-memory slots.
wgmma needs 64-row operand tiles, hence the multiples of 64.
"""

from __future__ import annotations

import dataclasses
import pathlib

from flash_jax import tuning
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
  # matmul inside a warpgroup (FlashAttention-3 section 3.2); None: the tuning table's.
  overlap_softmax: bool | None = None
  # dK/dV schedule: True makes its two consumers take turns on the tensor cores (one's
  # elementwise step under the other's matmuls, FlashAttention-3 section 3.1's
  # ping-pong); None: the tuning table's. One consumer at d256: no effect.
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


def _check_table_fields(fields: dict) -> None:
  """A tuning entry's fields as MosaicGPUBlockSizes and `resolve` take them."""
  MosaicGPUBlockSizes(**fields)
  if fields.get("block_q", WGMMA_ROWS) != WGMMA_ROWS:
    raise ValueError(f"block_q={fields['block_q']} must be {WGMMA_ROWS}")


TABLE_HEAD_DIMS = (64, 128, 256)


def table_key(spec: AttentionSpec) -> dict:
  """What a tuning entry can match on: the head dim, causal and the dtype. The head dim
  is the larger of H and Hv (the larger tiles bound registers and shared memory); one
  without entries of its own (192) takes those of the next larger (256), whose tiles
  are larger still."""
  head_dim = next(d for d in TABLE_HEAD_DIMS if d >= max(spec.head_dim, spec.head_dim_v))
  return dict(head_dim=head_dim, causal=spec.causal, dtype=spec.dtype)


# The defaults are data: kernels/mosaic_gpu/tuning/<device kind>.json, one file per GPU,
# each entry with the measurement behind it (flash_jax/tuning.py reads them).
TUNING = tuning.Schema(
    implementation="mosaic_gpu",
    directory=pathlib.Path(__file__).parent / "tuning",
    keys={"head_dim": TABLE_HEAD_DIMS, "causal": (False, True),
          "dtype": ("bfloat16", "float16")},
    key=table_key,
    fields=tuple(f.name for f in dataclasses.fields(MosaicGPUBlockSizes)),
    required=tuple(f.name for f in dataclasses.fields(MosaicGPUBlockSizes)),
    check=_check_table_fields)


def default_config(spec: AttentionSpec) -> MosaicGPUBlockSizes:
  """The tuning table's config for this call on the current device."""
  return MosaicGPUBlockSizes(**tuning.lookup(TUNING, table_key(spec)).fields)


def resolve(config: BlockSizes, spec: AttentionSpec) -> MosaicGPUBlockSizes:
  """Fills the fields a user left None from the tuning table; accepts a plain BlockSizes."""
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
