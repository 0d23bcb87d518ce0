"""Tile sizes, warps and pipeline stages of the Triton kernels, and their heuristic.

`TritonConfig` extends the shared `BlockSizes` with the Triton knobs of each of the
three kernels (forward, dK/dV, dQ) and of the split-KV kernel. It is frozen and
hashable, so it is a static argument of the custom VJP; fields left None are filled by
`resolve` from `heuristic_config`: the device's tuning table (kernels/triton/tuning/),
fitted to the call and to the GPU's shared memory.
"""

from __future__ import annotations

import dataclasses
import pathlib

from flash_jax import device, split_kv, tuning
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
  Split-KV forward (decode-shaped and paged calls, split_kv.py): a tile of block_q_split
           packed query rows walks key blocks of block_kv_split over one of num_splits
           ranges of a row's keys.
  """

  num_warps: int | None = None
  num_stages: int | None = None
  num_warps_dkv: int | None = None
  num_stages_dkv: int | None = None
  num_warps_dq: int | None = None
  num_stages_dq: int | None = None
  block_q_split: int | None = None
  block_kv_split: int | None = None
  num_warps_split: int | None = None
  num_stages_split: int | None = None
  num_splits: int | None = None
  # Paged tiles that slice one page: read the next tile's page id one step ahead.
  prefetch_pages: bool | None = None
  # The unordered backward: the dK/dV kernel adds dQ up with atomics and no dQ kernel
  # runs. Only where the call allows it (`implementation.fuses_dq`): deterministic=True
  # and a bias gradient keep the two kernels whatever this says.
  atomic_dq: bool | None = None
  switches = ("prefetch_pages", "atomic_dq")

  def __post_init__(self):
    super().__post_init__()
    blocks = dict(self.block_fields(), block_q_split=self.block_q_split,
                  block_kv_split=self.block_kv_split)
    for name, value in blocks.items():
      if value is not None and (value < MIN_BLOCK or value & (value - 1)):
        raise ValueError(f"TritonConfig.{name}={value} must be a power of two >= {MIN_BLOCK}")
    for name in ("num_warps", "num_warps_dkv", "num_warps_dq", "num_warps_split"):
      value = getattr(self, name)
      if value is not None and value not in ALLOWED_WARPS:
        raise ValueError(f"TritonConfig.{name}={value} must be one of {ALLOWED_WARPS}")
    for name in ("num_stages", "num_stages_dkv", "num_stages_dq", "num_stages_split"):
      value = getattr(self, name)
      if value is not None and value > MAX_STAGES:
        raise ValueError(f"TritonConfig.{name}={value} must be at most {MAX_STAGES}")
    for name in self.switches:
      value = getattr(self, name)
      if value is not None and not isinstance(value, bool):
        raise ValueError(f"TritonConfig.{name} must be a bool or None, got {value!r}")
    if self.num_splits is not None and self.num_splits > split_kv.MAX_SPLITS:
      raise ValueError(f"TritonConfig.num_splits={self.num_splits} must be at most "
                       f"{split_kv.MAX_SPLITS}")


def padded_head_dim(head_dim: int) -> int:
  """The head dim a kernel tile carries: a power of two >= 16 (tails masked on load)."""
  return max(MIN_BLOCK, next_power_of_two(head_dim))


def gpu_major_version() -> int | None:
  capability = device.compute_capability()
  return None if capability is None else capability[0]


# Shared memory one program may take (bytes), by compute capability.
_SHARED_MEMORY = {(9, 0): 232448, (8, 0): 166912, (8, 7): 166912}
_SHARED_MEMORY_DEFAULT = 101376  # sm_86 / sm_89


def shared_memory_budget() -> int:
  capability = device.compute_capability() or (9, 0)  # interpret mode: plan as for Hopper
  if capability[0] >= 9:
    return _SHARED_MEMORY[(9, 0)]
  return _SHARED_MEMORY.get(capability, _SHARED_MEMORY_DEFAULT)


def _feature_tile_bytes(spec: AttentionSpec, rows: int, cols: int) -> int:
  """Shared memory of one stage's bias / dense-mask / segment-id tiles of [rows, cols]."""
  total = 0
  for shape, itemsize in ((spec.bias_shape, spec.jnp_dtype.itemsize), (spec.mask_shape, 1)):
    if shape is not None:
      total += (rows if shape[2] > 1 else 1) * (cols if shape[3] > 1 else 1) * itemsize
  if spec.has_segment_ids:
    total += 4 * cols
  return total


def shared_memory_estimate(config: TritonConfig, spec: AttentionSpec, kernel: str) -> int:
  """Bytes of shared memory a kernel asks for: its streamed tiles once per pipeline stage,
  its resident tiles once, and the feature tiles three times more (layout conversions,
  transposes; kept on the safe side). It matches the H100's reports: the forward at
  128x128, H=128, bf16 takes 64 KiB a stage plus 32 KiB; with a bias, segment ids and
  H=72 about 353 KiB."""
  width = (padded_head_dim(spec.head_dim) + padded_head_dim(spec.head_dim_v))
  item = spec.jnp_dtype.itemsize
  if kernel == "fwd":
    bq, bk, stages = config.block_q, config.block_kv, config.num_stages
    streamed, resident = bk * width * item, bq * padded_head_dim(spec.head_dim) * item
  elif kernel == "dq":
    bq, bk, stages = config.block_q_dq, config.block_kv_dq, config.num_stages_dq
    streamed, resident = bk * width * item, bq * width * item
  else:
    bq, bk, stages = config.block_q_dkv, config.block_kv_dkv, config.num_stages_dkv
    streamed, resident = bq * width * item + 8 * bq, bk * width * item
  features = _feature_tile_bytes(spec, bq, bk)
  return stages * (streamed + features) + resident + 3 * features


_STREAMED_BLOCK = {"fwd": ("block_kv", "num_stages"), "dq": ("block_kv_dq", "num_stages_dq"),
                   "dkv": ("block_q_dkv", "num_stages_dkv")}


def fit_shared_memory(config: TritonConfig, spec: AttentionSpec) -> TritonConfig:
  """Fewer stages (down to 2), then smaller streamed blocks (down to 32), then one stage,
  until every kernel's estimate fits the device's shared memory."""
  budget = shared_memory_budget()
  for kernel, (block, stages) in _STREAMED_BLOCK.items():
    while shared_memory_estimate(config, spec, kernel) > budget:
      if getattr(config, stages) > 2:
        config = dataclasses.replace(config, **{stages: getattr(config, stages) - 1})
      elif getattr(config, block) > 32:
        config = dataclasses.replace(config, **{block: getattr(config, block) // 2})
      elif getattr(config, stages) > 1:
        config = dataclasses.replace(config, **{stages: 1})
      elif getattr(config, block) > MIN_BLOCK:
        config = dataclasses.replace(config, **{block: getattr(config, block) // 2})
      else:
        break  # nothing left to shrink; the compiler will report what it needs
  return config


def heuristic_config(spec: AttentionSpec) -> TritonConfig:
  """The device's tuning table (kernels/triton/tuning/, flash_jax/tuning.py) fitted to
  the call: its split-KV split count planned for the call's shape, then stages and
  streamed blocks shrunk until each kernel fits the GPU's shared memory."""
  fields = tuning.lookup(TUNING, table_key(spec)).fields
  kernel_fields = {name: value for name, value in fields.items() if name not in PLAN_FIELDS}
  config = TritonConfig(**{**kernel_fields, **split_kv_config(spec, fields)})
  return fit_shared_memory(config, spec)


def split_kv_config(spec: AttentionSpec, fields: dict | None = None) -> dict:
  """The split-KV kernel's fields for this call: the table's (`fields`, default: the
  lookup's) with blocks fitted to the call, and num_splits, unless the table fixes it,
  planned for about `split_programs_per_multiprocessor` programs per multiprocessor, and
  `num_stages_one_split` stages where that plan takes one split."""
  if fields is None:
    fields = tuning.lookup(TUNING, table_key(spec)).fields
  rows = _fit(fields["block_q_split"], spec.packed_rows)
  block_kv = _fit(fields["block_kv_split"], spec.kv_len)
  splits = fields.get("num_splits")
  if splits is None:
    splits = split_kv.num_splits(
        programs=spec.batch * spec.num_kv_heads * -(-spec.packed_rows // rows),
        kv_blocks=-(-spec.kv_len // block_kv),
        per_multiprocessor=fields["split_programs_per_multiprocessor"],
        min_blocks_per_split=fields["split_min_blocks"])
  # One split: the call has programs enough without splitting, each streaming its whole
  # row; the table may pipeline those deeper (fewer programs share a multiprocessor).
  stages = fields["num_stages_one_split" if splits == 1 else "num_stages_split"]
  return dict(block_q_split=rows, block_kv_split=block_kv,
              num_warps_split=fields["num_warps_split"], num_stages_split=stages,
              num_splits=splits, prefetch_pages=fields["prefetch_pages"])


# ---- the tuning table ------------------------------------------------------------------
# The defaults are data: kernels/triton/tuning/<device kind>.json, one file per GPU,
# each entry with the measurement behind it (flash_jax/tuning.py reads them).

# Fields of a table entry that are no TritonConfig field: how split_kv_config plans the
# number of splits of a call (split_kv.num_splits), and the split-KV kernel's stages
# when the plan takes one split.
PLAN_FIELDS = ("split_programs_per_multiprocessor", "split_min_blocks", "num_stages_one_split")
TILE_HEAD_DIMS = (16, 32, 64, 128, 256)  # padded_head_dim of every head dim up to 256


def table_key(spec: AttentionSpec) -> dict:
  """What a tuning entry can match on: the tile head dim (padded_head_dim of the larger
  of H and Hv), the dtype, causal, and whether the call is decode-shaped (the split-KV
  kernel serves it) or paged."""
  return dict(head_dim=padded_head_dim(max(spec.head_dim, spec.head_dim_v)), dtype=spec.dtype,
              causal=spec.causal, decode=split_kv.decode_shaped(spec), paged=spec.paged)


_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(TritonConfig))
TUNING = tuning.Schema(
    implementation="triton",
    directory=pathlib.Path(__file__).parent / "tuning",
    keys={"head_dim": TILE_HEAD_DIMS, "dtype": ("bfloat16", "float16", "float32"),
          "causal": (False, True), "decode": (False, True), "paged": (False, True)},
    key=table_key,
    fields=_CONFIG_FIELDS + PLAN_FIELDS,
    # num_splits depends on the call's shape: planned unless a table fixes it.
    required=tuple(name for name in _CONFIG_FIELDS if name != "num_splits") + PLAN_FIELDS,
    check=lambda fields: TritonConfig(**fields),
    plan_fields=PLAN_FIELDS)


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
  block_kv_split = _fit(config.block_kv_split, s)
  return dataclasses.replace(
      config, block_q=_fit(config.block_q, t), block_kv=_fit(config.block_kv, s),
      block_q_dkv=_fit(config.block_q_dkv, t), block_kv_dkv=_fit(config.block_kv_dkv, s),
      block_q_dq=_fit(config.block_q_dq, t), block_kv_dq=_fit(config.block_kv_dq, s),
      block_q_split=_fit(config.block_q_split, spec.packed_rows), block_kv_split=block_kv_split)
