"""Pallas kernels of flash_jax, one folder per backend; installed as `flash_jax.kernels`.

Nothing here is imported when `flash_jax` is imported: `flash_jax.dispatch` loads a
backend the first time it is asked for.
"""
