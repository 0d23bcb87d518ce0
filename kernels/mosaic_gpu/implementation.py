"""The "mosaic_gpu" implementation: Pallas Mosaic GPU kernels for Hopper (sm90).

Forward: `forward.py` (FlashAttention-3 warp specialization and ping-pong). Backward:
`backward.py` (dK/dV and dQ kernels, deterministic). `check_spec` raises
NotImplementedError for every call these kernels do not serve, so that dispatch with
implementation=None moves on to the next implementation (Triton, chunked).
"""

from __future__ import annotations

import jax

from flash_jax import versions
from flash_jax.implementation import BlockwiseImplementation, unsupported
from flash_jax.spec import AttentionSpec
from flash_jax.kernels.mosaic_gpu import backward as backward_kernels
from flash_jax.kernels.mosaic_gpu import compat, config as config_lib
from flash_jax.kernels.mosaic_gpu import forward as forward_kernel

SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_DTYPES = ("bfloat16", "float16")
# Features whose arrays the kernels do not read yet. (q_offset, segment ids and the
# per-batch lengths reach the kernels through `features`.)
UNSUPPORTED_FEATURES = ("bias", "mask", "dropout", "paged")


class MosaicGPUImplementation(BlockwiseImplementation):
  name = "mosaic_gpu"
  platforms = ("gpu",)
  interpretable = False  # the Mosaic GPU interpreter lacks layout_cast and run_state
  differentiable_backward = False  # Pallas Mosaic GPU kernels have no JVP
  config_type = config_lib.MosaicGPUBlockSizes

  def check_spec(self, spec: AttentionSpec) -> None:
    if not compat.is_hopper():
      raise unsupported(self.name, "devices other than sm90 (Hopper) GPUs")
    missing = compat.missing_api()
    if missing:
      raise unsupported(self.name, f"JAX {jax.__version__}, whose Pallas lacks "
                        f"{', '.join(missing)}")
    for feature in spec.features():
      if feature in UNSUPPORTED_FEATURES:
        raise unsupported(self.name, feature)
    if spec.dtype not in SUPPORTED_DTYPES:
      raise unsupported(self.name, f"dtype {spec.dtype} (only {', '.join(SUPPORTED_DTYPES)})")
    if spec.head_dim not in SUPPORTED_HEAD_DIMS:
      raise unsupported(self.name, f"head_dim={spec.head_dim} (only {SUPPORTED_HEAD_DIMS})")
    if spec.head_dim_v != spec.head_dim:
      raise unsupported(self.name, f"head_dim_v={spec.head_dim_v} != head_dim={spec.head_dim}")

  def check_config(self, config) -> None:
    if not isinstance(config, config_lib.BlockSizes):
      raise TypeError(f"block_sizes for {self.name!r} must be a MosaicGPUBlockSizes, "
                      f"got {type(config).__name__}")

  def default_config(self, spec: AttentionSpec) -> config_lib.MosaicGPUBlockSizes:
    return config_lib.default_config(spec)

  @versions.names_jax_version
  def forward(self, q, k, v, bias, arrays, spec, config, interpret):
    del bias, interpret  # check_spec rejected bias
    return forward_kernel.forward(q, k, v, arrays, spec, config_lib.resolve(config, spec))

  @versions.names_jax_version
  def backward(self, q, k, v, bias, arrays, out, lse, dout, delta, spec, config, interpret):
    del bias, out, interpret
    dq, dk, dv = backward_kernels.backward(q, k, v, lse, dout, delta, arrays, spec,
                                           config_lib.resolve(config, spec))
    return dq, dk, dv, None


IMPLEMENTATION = MosaicGPUImplementation()
