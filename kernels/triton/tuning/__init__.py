"""Tuning tables of the triton kernels, one JSON file per device kind (read by flash_jax/tuning.py)."""
