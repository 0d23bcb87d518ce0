"""The "triton" implementation of flash_jax: Pallas kernels through the Triton lowering.

Loaded by flash_jax.dispatch on first use, never at `import flash_jax`.
"""

from flash_jax.kernels.triton.config import TritonConfig
from flash_jax.kernels.triton.implementation import IMPLEMENTATION

__all__ = ["IMPLEMENTATION", "TritonConfig"]
