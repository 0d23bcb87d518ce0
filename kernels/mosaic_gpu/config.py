"""Tile and pipeline configuration of the Mosaic GPU (Hopper) kernels.

Each CTA runs `num_compute_wgs` = 2 consumer warpgroups of `block_q` query rows each
(so a CTA owns 2 * block_q rows in the forward) and one producer warpgroup that streams
key/value blocks of `block_kv` rows through a ring of `num_stages` shared-memory slots.
wgmma needs 64-row operand tiles, hence the multiples of 64.
"""

from __future__ import annotations

import dataclasses
import pathlib

from flash_jax import split_kv, tuning
from flash_jax.config import BlockSizes
from flash_jax.spec import AttentionSpec

NUM_COMPUTE_WGS = 2  # consumer warpgroups per CTA in the forward (FA3 ping-pong pair)
WGMMA_ROWS = 64  # the M of one warpgroup's wgmma


STAGE_FIELDS = ("num_stages", "num_stages_dkv", "num_stages_dq", "num_stages_split")


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
  # The unordered backward: the dK/dV kernel also adds each step's dS K into a float32
  # dQ in global memory (TMA reduce-add) and no dQ kernel runs; None: the tuning
  # table's. Only where the call allows it (`spec.allows_atomic_dq`).
  atomic_dq: bool | None = None
  # Split-KV decode kernel (split_kv.py; decode-shaped and paged calls): key blocks of
  # block_kv_split through a ring of num_stages_split slots, over one of num_splits runs
  # of a row's keys (None: planned for the call, `split_kv_plan`).
  block_kv_split: int | None = None
  num_stages_split: int | None = None
  num_splits: int | None = None
  switches = ("overlap_softmax", "dkv_ping_pong", "atomic_dq")

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
    if self.block_kv_split is not None and self.block_kv_split % WGMMA_ROWS:
      raise ValueError(f"{type(self).__name__}.block_kv_split={self.block_kv_split} must be a "
                       f"multiple of {WGMMA_ROWS}")
    if self.num_splits is not None and self.num_splits > split_kv.MAX_SPLITS:
      raise ValueError(f"{type(self).__name__}.num_splits={self.num_splits} must be at most "
                       f"{split_kv.MAX_SPLITS}")


# Fields of a table entry that are no MosaicGPUBlockSizes field: how `split_kv_plan`
# picks a call's number of splits (split_kv.num_splits).
PLAN_FIELDS = ("split_programs_per_multiprocessor", "split_min_blocks")


def _check_table_fields(fields: dict) -> None:
  """A tuning entry's config fields as MosaicGPUBlockSizes and `resolve` take them."""
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


_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(MosaicGPUBlockSizes))
# The defaults are data: kernels/mosaic_gpu/tuning/<device kind>.json, one file per GPU,
# each entry with the measurement behind it (flash_jax/tuning.py reads them).
TUNING = tuning.Schema(
    implementation="mosaic_gpu",
    directory=pathlib.Path(__file__).parent / "tuning",
    keys={"head_dim": TABLE_HEAD_DIMS, "causal": (False, True),
          "dtype": ("bfloat16", "float16")},
    key=table_key,
    fields=_CONFIG_FIELDS + PLAN_FIELDS,
    # num_splits depends on the call's shape: planned unless a table fixes it.
    required=tuple(name for name in _CONFIG_FIELDS if name != "num_splits") + PLAN_FIELDS,
    check=_check_table_fields,
    plan_fields=PLAN_FIELDS)

def default_config(spec: AttentionSpec) -> MosaicGPUBlockSizes:
  """The tuning table's config for this call on the current device, its number of
  splits planned for the call (`split_kv_plan`) unless the table fixes it."""
  fields = tuning.lookup(TUNING, table_key(spec)).fields
  config = {name: value for name, value in fields.items() if name not in PLAN_FIELDS}
  if config.get("num_splits") is None:
    config["num_splits"] = split_kv_plan(spec, block_kv=config["block_kv_split"], **{
        name: fields[name] for name in PLAN_FIELDS})
  return MosaicGPUBlockSizes(**config)


def split_kv_plan(spec: AttentionSpec, *, block_kv: int, split_programs_per_multiprocessor: int,
                  split_min_blocks: int) -> int:
  """Splits per (batch row, K/V head, row tile) of a split-KV call: about
  `split_programs_per_multiprocessor` CTAs per multiprocessor, each streaming at least
  `split_min_blocks` key blocks (split_kv.num_splits)."""
  row_tiles = -(-spec.packed_rows // WGMMA_ROWS)
  return split_kv.num_splits(
      programs=spec.batch * spec.num_kv_heads * row_tiles, kv_blocks=-(-spec.kv_len // block_kv),
      per_multiprocessor=split_programs_per_multiprocessor, min_blocks_per_split=split_min_blocks)


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
