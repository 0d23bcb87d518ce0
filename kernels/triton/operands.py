"""How the kernels receive their arrays: named operands with their BlockSpecs.

Every kernel takes the main tensors (q, k, v, ...) through BlockSpecs that select one
(batch, head) slab of full sequence length, the head dim padded to a power of two
(`config.padded_head_dim`; the kernel masks the padding on load). The optional feature
arrays (per-batch offsets and lengths, segment ids, bias, dense mask, dropout seed)
travel whole; `tile_masking.TileMasking` indexes them inside the kernel.

`call` runs a kernel body that takes its refs by name, so optional operands need no
positional bookkeeping.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from flash_jax.spec import AttentionArrays, AttentionSpec

FEATURE_NAMES = ("q_offset", "q_lengths", "kv_lengths", "q_segment_ids", "kv_segment_ids",
                 "bias", "mask", "dropout_seed")


@dataclasses.dataclass(frozen=True)
class Operand:
  name: str
  array: jax.Array
  spec: pl.BlockSpec


@dataclasses.dataclass(frozen=True)
class Output:
  name: str
  shape: jax.ShapeDtypeStruct
  spec: pl.BlockSpec
  aliases: str | None = None  # name of an input operand whose buffer it reuses


def whole(name: str, array: jax.Array) -> Operand:
  """An operand passed as the whole array (indexed in the kernel)."""
  return Operand(name, array, pl.BlockSpec())


def feature_operands(bias, arrays: AttentionArrays, spec: AttentionSpec) -> list[Operand]:
  """The optional mask/bias/dropout arrays of a call, whole, under their field names.

  The bool mask travels as int8 (Triton pointers to i1 are not loadable) and the
  dropout seed as a uint32 vector of one element.
  """
  operands = []
  for name in ("q_offset", "q_lengths", "kv_lengths", "q_segment_ids", "kv_segment_ids"):
    value = getattr(arrays, name)
    if value is not None:
      operands.append(whole(name, value))
  if bias is not None:
    operands.append(whole("bias", bias))
  if arrays.mask is not None:
    operands.append(whole("mask", arrays.mask.astype(jnp.int8)))
  if spec.has_dropout:
    operands.append(whole("dropout_seed", jnp.reshape(arrays.dropout_seed, (1,))))
  return operands


@dataclasses.dataclass(frozen=True)
class Refs:
  """The kernel's refs by name; a missing optional operand reads as None."""

  refs: dict[str, Any]

  def __getattr__(self, name):
    refs = object.__getattribute__(self, "refs")
    if name in refs:
      return refs[name]
    if name in FEATURE_NAMES:
      return None
    raise AttributeError(name)


def call(body: Callable[[Refs], None], *, inputs: list[Operand], outputs: list[Output],
         grid: tuple[int, ...], name: str, num_warps: int, num_stages: int, interpret: bool):
  """pallas_call over named operands; returns the outputs as a tuple in `outputs` order."""
  names = [op.name for op in inputs] + [out.name for out in outputs]

  def kernel(*refs):
    body(Refs(dict(zip(names, refs))))

  input_index = {op.name: i for i, op in enumerate(inputs)}
  aliases = {input_index[out.aliases]: i for i, out in enumerate(outputs) if out.aliases}
  results = pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=[op.spec for op in inputs],
      out_specs=[out.spec for out in outputs],
      out_shape=[out.shape for out in outputs],
      input_output_aliases=aliases,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name=name,
  )(*[op.array for op in inputs])
  return tuple(results)
