"""The implementations the shared suite runs, and how (natively or in interpret mode).

A backend joins every shared test by adding one `Target` here. On CPU, Pallas backends
run in interpret mode with small shapes; `gpu`-marked targets run natively on a GPU
(`pytest -m gpu`). `max_tokens` bounds the T*S of the cases a slow target takes.
"""

from __future__ import annotations

import dataclasses

from flash_jax import BlockSizes
from flash_jax.kernels.mosaic_gpu.config import MosaicGPUBlockSizes
from flash_jax.kernels.triton import TritonConfig

# The shared tests that take gradients: what a variant of the backward alone joins.
GRADIENT_TESTS = ("test_gradients", "test_constant_bias_skips_dbias", "test_jax_transformations",
                  "test_rows_that_see_nothing", "test_rows_that_see_nothing_with_sinks",
                  "test_junk_in_unseen_keys_has_no_effect",
                  "test_rows_of_huge_negative_or_infinite_bias")


@dataclasses.dataclass(frozen=True)
class Target:
  name: str  # the implementation name passed to flash_attention
  interpret: bool = False
  platform: str = "cpu"  # "cpu": runs in CI; "gpu": only under `pytest -m gpu`
  max_tokens: int | None = None  # skip cases whose T * S exceeds this (slow interpreters)
  dtypes: tuple[str, ...] = ("bfloat16", "float16", "float32")
  block_sizes: BlockSizes | None = None  # None: the implementation's default config
  label: str = ""  # tells apart two targets of one implementation
  # False where jax.checkpoint cannot wrap the calls (the TPU interpreter's IO effects).
  checkpointable: bool = True
  # The shared tests it joins (None: all). A variant of one pass joins the tests of that
  # pass, so that the suite does not run the rest twice.
  tests: tuple[str, ...] | None = None
  # False where the backward sums in no fixed order (atomics): gradients of two calls
  # may differ in their last bits.
  ordered_backward: bool = True

  @property
  def id(self) -> str:
    suffix = "-interpret" if self.interpret else ("-gpu" if self.platform == "gpu" else "")
    return self.name + (f"-{self.label}" if self.label else "") + suffix


TARGETS: tuple[Target, ...] = (
    Target("xla"),
    Target("chunked"),
    # TPU interpret mode; float16 runs as float32 inside (tests/test_mosaic_tpu.py covers it).
    # JAX's remat rejects the TPU interpreter's IO effects; compiled calls checkpoint fine.
    Target("mosaic_tpu", interpret=True, max_tokens=17000, dtypes=("bfloat16", "float32"),
           checkpointable=False),
    Target("triton", interpret=True, max_tokens=20000),
    Target("triton", platform="gpu"),
    # The unordered backwards: dQ added up by the dK/dV kernel with atomics.
    Target("triton", interpret=True, max_tokens=20000, block_sizes=TritonConfig(atomic_dq=True),
           label="atomic_dq", tests=GRADIENT_TESTS, ordered_backward=False),
    Target("triton", platform="gpu", block_sizes=TritonConfig(atomic_dq=True),
           label="atomic_dq", tests=GRADIENT_TESTS, ordered_backward=False),
    Target("mosaic_gpu", platform="gpu", dtypes=("bfloat16", "float16")),
    Target("mosaic_gpu", platform="gpu", dtypes=("bfloat16", "float16"),
           block_sizes=MosaicGPUBlockSizes(atomic_dq=True), label="atomic_dq",
           tests=GRADIENT_TESTS, ordered_backward=False),
    # Many key/value chunks with a ragged tail: the online-softmax merge path.
    Target("chunked", block_sizes=BlockSizes(block_kv=48), label="bkv48"),
)
