"""The "triton" implementation of flash_jax: Pallas kernels through the Triton lowering.

Loaded by flash_jax.dispatch on first use, never at `import flash_jax`.

JAX 0.12 deprecates the Pallas Triton lowering and warns at every kernel it lowers.
flash_jax's users cannot act on that warning, so it is silenced here (that message
only); the plan for the portable GPU path once the lowering is removed is in
docs/compatibility.md.
"""

import warnings

warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated",
                        category=DeprecationWarning)

from flash_jax.kernels.triton.config import TritonConfig  # noqa: E402
from flash_jax.kernels.triton.implementation import IMPLEMENTATION  # noqa: E402

__all__ = ["IMPLEMENTATION", "TritonConfig"]
