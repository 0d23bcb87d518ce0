"""The few Pallas Mosaic GPU spellings that differ between the JAX versions we support.

flash_jax supports JAX 0.10.2 to 0.12.x (the GPU machines run 0.11.2). Everything
version-sensitive the kernels touch goes through here, probed by feature, not by
version number.
"""

from __future__ import annotations

import inspect

import jax.numpy as jnp
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from flash_jax import device

SWIZZLE_BYTES = 128  # the widest TMA/wgmma swizzle: conflict-free rows of 128 bytes


def wgmma_layout():
  """Register layout of a wgmma accumulator [64k, n]."""
  return plgpu.Layout.WGMMA


def row_layout():
  """Layout of one value per accumulator row (row max, row sum, lse) [64k]."""
  layout = plgpu.Layout.WGMMA
  if hasattr(layout, "reduce"):
    return layout.reduce(1)
  return plgpu.Layout.WGMMA_ROW  # older spelling


def col_layout():
  """Layout of one value per accumulator column [n]."""
  layout = plgpu.Layout.WGMMA
  if hasattr(layout, "reduce"):
    return layout.reduce(0)
  return plgpu.Layout.WGMMA_COL


def layout_cast(x, layout):
  return plgpu.layout_cast(x, layout)


def load(ref, layout, *, optimized: bool = True):
  """Loads a whole ref into registers with `layout`. optimized=False lets a tile of
  global memory load where no vectorized access pattern fits (each thread's pair of
  2-byte columns is less than a 32-byte sector per row). The index argument was
  required (0.10.2), then optional and deprecated (0.11.2), then removed (0.12)."""
  idx = inspect.signature(plgpu.load).parameters.get("idx")
  if idx is not None and idx.default is inspect.Parameter.empty:
    return plgpu.load(ref, (), layout=layout, optimized=optimized)
  return plgpu.load(ref, layout=layout, optimized=optimized)


def store_tile(ref, value):
  """Stores a register array into a whole ref (global memory included), element by
  element where no vectorized access pattern fits. (`plgpu.store` is new in 0.11.)"""
  if hasattr(plgpu, "store"):
    plgpu.store(ref, value, optimized=False)
  else:
    ref[...] = value


def iota(shape, dimension: int):
  """int32 broadcasted iota in the wgmma accumulator layout."""
  return plgpu.broadcasted_iota(jnp.int32, shape, dimension, layout=wgmma_layout())


def accumulate(matmul, acc):
  """Runs `matmul(acc_ref)` (which issues wgmma into acc_ref) on an accumulator that
  starts from the register array `acc`; returns the new accumulator."""
  return pl.run_state(matmul)(plgpu.ACC.init(acc))


def accumulate_all(matmul, accs):
  """`accumulate` for several accumulators issued in one scope (one wgmma wait):
  `matmul` takes a tuple of refs; returns the tuple of new accumulators."""
  return tuple(pl.run_state(matmul)(tuple(plgpu.ACC.init(acc) for acc in accs)))


def smem_transforms(dtype):
  """Tiling + 128-byte swizzle for a 2-byte operand in shared memory (TMA and wgmma)."""
  elems = SWIZZLE_BYTES // jnp.dtype(dtype).itemsize
  return (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(SWIZZLE_BYTES))


def kernel_on_refs(body, *, out_type, scratch_types, grid, grid_names, num_threads,
                   thread_name, name):
  """`plgpu.kernel` for calls that pass a mutable `jax.new_ref` operand, which the kernel
  writes in place (the unordered backward's float32 dQ). plgpu.kernel's vmap wrapper
  loses such a ref's write effect under JAX 0.10.2, so this builds the same launch from
  pl.kernel and a plgpu.Mesh: the body takes operand refs, output refs, then scratch."""
  mesh = plgpu.Mesh(grid=grid, grid_names=grid_names, num_threads=num_threads,
                    thread_name=thread_name)

  def with_scratch(*refs):
    pl.run_scoped(lambda *scratch: body(*refs, *scratch), *scratch_types,
                  collective_axes=thread_name)

  return pl.kernel(with_scratch, out_type=out_type, mesh=mesh,
                   compiler_params=compiler_params(), name=name)


def compiler_params():
  # approx_math: exp2 / log2 / division through the fast MUFU approximations.
  # reduction_scratch_bytes=0: the kernels reduce only along the rows of wgmma-layout
  # tiles, which stay inside a warp (shuffles); the 2 KiB Pallas reserves by default for
  # cross-warp reductions would keep a third K/V slot out of the d128 forward.
  return plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0)


# Everything the kernels take from Pallas Mosaic GPU, checked before a call is accepted, so
# that a JAX without one is declined (dispatch moves on) instead of failing mid-trace.
_PLGPU_API = ("SMEM", "Barrier", "ACC", "Layout", "TilingTransform", "SwizzleTransform",
              "CompilerParams", "kernel", "barrier_wait", "barrier_arrive", "wgmma",
              "wgmma_accumulator_load", "copy_gmem_to_smem", "copy_smem_to_gmem",
              "wait_smem_to_gmem", "commit_smem", "set_max_registers", "load", "layout_cast",
              "broadcasted_iota", "Mesh")
_PL_API = ("ds", "when", "run_state", "run_scoped", "loop", "kernel")


def missing_api() -> tuple[str, ...]:
  """The Pallas names these kernels use that the installed JAX lacks (empty when none)."""
  missing = tuple(f"plgpu.{name}" for name in _PLGPU_API if not hasattr(plgpu, name))
  missing += tuple(f"pl.{name}" for name in _PL_API if not hasattr(pl, name))
  if hasattr(plgpu, "Layout") and not hasattr(plgpu.Layout, "WGMMA"):
    missing += ("plgpu.Layout.WGMMA",)
  return missing


def is_hopper() -> bool:
  """True when the default device is an sm90 GPU (H100/H200)."""
  return device.compute_capability() == (9, 0)
