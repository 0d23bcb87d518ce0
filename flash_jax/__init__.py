"""flash_jax: exact FlashAttention for JAX, with Pallas kernels for GPU and TPU.

Importing this package imports no GPU- or TPU-only module: kernels load on first use.
"""

from flash_jax.api import (dot_product_attention, flash_attention, paged_attention,
                           which_implementation)
from flash_jax.config import BlockSizes
from flash_jax.dispatch import implementation_names
from flash_jax.paged import write_kv_pages
from flash_jax.ring import ring_attention, sharded_ring_attention
from flash_jax.ring_layout import from_ring_layout, to_ring_layout
from flash_jax.spec import AttentionSpec
from flash_jax import tuning  # noqa: F401  (flash_jax.tuning.use_table: the tuning tables)

__all__ = [
    "AttentionSpec",
    "BlockSizes",
    "dot_product_attention",
    "flash_attention",
    "from_ring_layout",
    "implementation_names",
    "paged_attention",
    "ring_attention",
    "sharded_ring_attention",
    "to_ring_layout",
    "which_implementation",
    "write_kv_pages",
]
__version__ = "0.2.0"  # the one place: pyproject.toml reads it at build time
