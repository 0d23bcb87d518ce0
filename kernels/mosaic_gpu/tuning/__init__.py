"""Tuning tables of the mosaic_gpu kernels, one JSON file per device kind (read by flash_jax/tuning.py)."""
