"""Block sizes of the Mosaic TPU kernels, with per-generation defaults.

TPU vector registers are [8 sublanes, 128 lanes]; every tile of these kernels keeps a
block size on the lane dimension (the key block of a [block_q, block_kv] logits tile,
the query block of the transposed tiles of the dK/dV pass), so all block sizes are
multiples of 128. Sequences are padded up to whole blocks and the padding is masked.
"""

from __future__ import annotations

import dataclasses

import jax

from flash_jax.config import BlockSizes
from flash_jax.spec import AttentionSpec
from flash_jax.tiles import round_up

LANES = 128  # lanes of a TPU vector register: block sizes and head dims are padded to it
SUBLANES = 8  # sublanes of a TPU vector register


# Packed query rows come in multiples of 16: a bfloat16 vreg holds 16 rows (8 of float32).
ROW_MULTIPLE = 16
MAX_PAGES_PER_STEP = 16  # page streams of the decode kernel (each a K and a V operand)
MAX_DECODE_ROWS = 256  # default rows of a decode row block (T * G packed rows)


@dataclasses.dataclass(frozen=True)
class MosaicTpuBlockSizes(BlockSizes):
  """`BlockSizes` for the Mosaic TPU kernels (all multiples of 128), plus a VMEM limit
  and the decode kernel's tiling (`paged.py`).

  vmem_limit_bytes: passed to Mosaic as the kernel's scoped VMEM limit; None keeps the
    compiler's default (large blocks with head_dim 256 may need more).
  pages_per_step: pages of the paged cache each decode grid step DMAs (<= 16).
  block_rows_decode: packed query rows (T * G) of a decode row block, a multiple of 16.
  Contiguous decode-shaped calls read their cache in chunks of block_kv keys.
  """

  vmem_limit_bytes: int | None = None
  pages_per_step: int | None = None
  block_rows_decode: int | None = None

  def __post_init__(self):
    super().__post_init__()
    self.require_multiple(LANES)
    if self.pages_per_step is not None and self.pages_per_step > MAX_PAGES_PER_STEP:
      raise ValueError(f"MosaicTpuBlockSizes.pages_per_step={self.pages_per_step} must be at "
                       f"most {MAX_PAGES_PER_STEP}")
    if self.block_rows_decode is not None and self.block_rows_decode % ROW_MULTIPLE:
      raise ValueError(f"MosaicTpuBlockSizes.block_rows_decode={self.block_rows_decode} must "
                       f"be a multiple of {ROW_MULTIPLE}")
    if self.vmem_limit_bytes is not None and (
        isinstance(self.vmem_limit_bytes, bool) or not isinstance(self.vmem_limit_bytes, int)
        or self.vmem_limit_bytes <= 0):
      raise ValueError(f"MosaicTpuBlockSizes.vmem_limit_bytes must be a positive int, "
                       f"got {self.vmem_limit_bytes!r}")


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
  """Default (block_q, block_kv) of one TPU generation, for forward and backward."""

  block_q: int
  block_kv: int
  block_q_bwd: int
  block_kv_bwd: int
  # Decode kernel: about this many K and V bytes a grid step (a step's fixed cost, about
  # 0.35 us, stays small beside its DMAs), in at most this many page streams.
  decode_bytes_per_step: int = 1 << 20
  max_pages_per_step: int = MAX_PAGES_PER_STEP


# Starting points in the spirit of splash attention's defaults: larger key blocks on
# chips with more VMEM per core (v5p, v6e, 7x: 128 MiB+; v4 and v5e: 16-32 MiB scoped by
# default). They are untuned: no TPU was at hand (see docs/mosaic_tpu.md).
_GENERATION_DEFAULTS = {
    "TPU v4": GenerationDefaults(512, 512, 256, 512),
    "TPU v5 lite": GenerationDefaults(512, 512, 256, 512),
    "TPU v5e": GenerationDefaults(512, 512, 256, 512),
    "TPU v5": GenerationDefaults(512, 1024, 512, 512),
    "TPU v5p": GenerationDefaults(512, 1024, 512, 512),
    "TPU v6 lite": GenerationDefaults(512, 1024, 512, 512),
    "TPU v6e": GenerationDefaults(512, 1024, 512, 512),
    "TPU7x": GenerationDefaults(512, 1024, 512, 512),
}
# Unknown chips and CPU interpret mode: moderate blocks (the interpreter's cost is per
# grid step, so fewer, larger steps are faster there too), and two page streams at most
# (the interpreter compiles one kernel body per stream).
_FALLBACK_DEFAULTS = GenerationDefaults(256, 512, 256, 256, max_pages_per_step=2)


def device_kind() -> str:
  return jax.devices()[0].device_kind


def generation_defaults(kind: str | None = None) -> GenerationDefaults:
  return _GENERATION_DEFAULTS.get(device_kind() if kind is None else kind, _FALLBACK_DEFAULTS)


def default_block_sizes(spec: AttentionSpec, kind: str | None = None) -> MosaicTpuBlockSizes:
  """The generation's defaults, shrunk to the padded sequence lengths of this call."""
  d = generation_defaults(kind)
  fit_q = lambda b: min(b, round_up(spec.q_len, LANES))
  fit_kv = lambda b: min(b, round_up(spec.kv_len, LANES))
  return MosaicTpuBlockSizes(
      block_q=fit_q(d.block_q), block_kv=fit_kv(d.block_kv),
      block_q_dkv=fit_q(d.block_q_bwd), block_kv_dkv=fit_kv(d.block_kv_bwd),
      block_q_dq=fit_q(d.block_q_bwd), block_kv_dq=fit_kv(d.block_kv_bwd))


def decode_tiling(config: MosaicTpuBlockSizes, spec: AttentionSpec,
                  kind: str | None = None) -> tuple[int, int, int]:
  """(page_size, pages_per_step, block_rows) of the decode kernel for a resolved config.

  Paged calls read the pool's pages; contiguous ones chunks of block_kv keys, one a step.
  Defaults: about the generation's decode_bytes_per_step of K and V a step (fewer, larger
  DMAs than one small page each) and every packed row (T * G) in one block, up to
  MAX_DECODE_ROWS.
  """
  page_size = spec.page_size if spec.paged else min(config.block_kv, spec.kv_len)
  slots = -(-spec.kv_len // page_size)
  pages = config.pages_per_step
  if pages is None:
    d = generation_defaults(kind)
    page_bytes = (page_size * spec.num_kv_heads * (spec.head_dim + spec.head_dim_v)
                  * spec.jnp_dtype.itemsize)
    pages = max(1, min(d.decode_bytes_per_step // page_bytes, d.max_pages_per_step))
  pages = min(pages, slots) if spec.paged else 1
  rows = config.block_rows_decode or MAX_DECODE_ROWS
  return page_size, pages, min(rows, round_up(spec.packed_rows, ROW_MULTIPLE))


def resolve(config: BlockSizes, spec: AttentionSpec) -> MosaicTpuBlockSizes:
  """Any `BlockSizes` -> a complete `MosaicTpuBlockSizes` (None fields take the defaults).

  A backward block size left None follows the forward one the user set, else the default.
  """
  if not isinstance(config, MosaicTpuBlockSizes):
    config = MosaicTpuBlockSizes(**config.block_fields())  # validates the multiples of 128
  defaults = default_block_sizes(spec)
  block_q = config.block_q or defaults.block_q
  block_kv = config.block_kv or defaults.block_kv
  follow = lambda user, default: default if user is None else user
  return config.fill(
      block_q=block_q, block_kv=block_kv,
      block_q_dkv=follow(config.block_q, defaults.block_q_dkv),
      block_kv_dkv=follow(config.block_kv, defaults.block_kv_dkv),
      block_q_dq=follow(config.block_q, defaults.block_q_dq),
      block_kv_dq=follow(config.block_kv, defaults.block_kv_dq))
