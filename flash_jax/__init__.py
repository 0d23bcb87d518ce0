"""flash_jax: exact FlashAttention for JAX, with Pallas kernels for GPU and TPU.

Importing this package imports no GPU- or TPU-only module: kernels load on first use.
"""

from flash_jax.api import dot_product_attention, flash_attention, which_implementation
from flash_jax.config import BlockSizes
from flash_jax.dispatch import implementation_names
from flash_jax.spec import AttentionSpec

__all__ = [
    "AttentionSpec",
    "BlockSizes",
    "dot_product_attention",
    "flash_attention",
    "implementation_names",
    "which_implementation",
]
__version__ = "0.1.0"
