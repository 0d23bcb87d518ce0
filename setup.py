"""Package discovery: `kernels/` (and every backend folder in it) installs as flash_jax.kernels.

The mapping keeps a top-level module named `kernels` out of site-packages, where it would
collide with an unrelated PyPI package. Metadata lives in pyproject.toml.
"""

from setuptools import find_packages, setup

kernel_packages = ["flash_jax.kernels"] + [
    f"flash_jax.kernels.{name}" for name in find_packages("kernels")]

setup(
    packages=find_packages(include=["flash_jax", "flash_jax.*"]) + kernel_packages,
    package_dir={"flash_jax.kernels": "kernels"},
    # PEP 561: flash_jax ships its type annotations (covers flash_jax.kernels too); the GPU
    # backends ship their tuning tables (flash_jax/tuning.py).
    package_data={"flash_jax": ["py.typed"],
                  "flash_jax.kernels.mosaic_gpu.tuning": ["*.json"],
                  "flash_jax.kernels.triton.tuning": ["*.json"]},
)
