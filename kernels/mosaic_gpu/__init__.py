"""Pallas Mosaic GPU kernels for Hopper (sm90): the "mosaic_gpu" implementation."""

from flash_jax.kernels.mosaic_gpu.implementation import IMPLEMENTATION

__all__ = ["IMPLEMENTATION"]
