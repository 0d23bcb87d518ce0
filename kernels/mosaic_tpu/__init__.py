"""Pallas Mosaic TPU kernels (flash_jax implementation "mosaic_tpu").

Loaded only when dispatch asks for it; see docs/mosaic_tpu.md for what was verified.
"""

from flash_jax.kernels.mosaic_tpu.config import MosaicTpuBlockSizes
from flash_jax.kernels.mosaic_tpu.implementation import IMPLEMENTATION, MosaicTpuImplementation

__all__ = ["IMPLEMENTATION", "MosaicTpuBlockSizes", "MosaicTpuImplementation"]
