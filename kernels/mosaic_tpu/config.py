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


@dataclasses.dataclass(frozen=True)
class MosaicTpuBlockSizes(BlockSizes):
  """`BlockSizes` for the Mosaic TPU kernels (all multiples of 128), plus a VMEM limit.

  vmem_limit_bytes: passed to Mosaic as the kernel's scoped VMEM limit; None keeps the
    compiler's default (large blocks with head_dim 256 may need more).
  """

  vmem_limit_bytes: int | None = None

  def __post_init__(self):
    super().__post_init__()
    self.require_multiple(LANES)
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
# grid step, so fewer, larger steps are faster there too).
_FALLBACK_DEFAULTS = GenerationDefaults(256, 512, 256, 256)


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
