"""vmap for kernel launches that Pallas' own batching rule cannot take."""

from __future__ import annotations

import jax


def map_when_vmapped(fn):
  """`fn` (positional array arguments) that, under vmap, runs once per element of the
  mapped arguments (`lax.map`) instead of being batched.

  For launches whose batching fails: TPU interpret mode (JAX 0.10 and 0.11) rejects a
  vmapped pallas_call whose grid has dimension semantics (the batching rule prepends a
  grid axis that the interpreter's semantics check does not count), and a Mosaic GPU
  mesh kernel that writes a `jax.new_ref` in place batches only at size 1.
  """
  @jax.custom_batching.custom_vmap
  def mapped(*args):
    return fn(*args)

  @mapped.def_vmap
  def _rule(axis_size, in_batched, *args):
    del axis_size
    batched = [i for i, is_batched in enumerate(in_batched) if is_batched]

    def one(elements):
      full = list(args)
      for i, x in zip(batched, elements):
        full[i] = x
      return mapped(*full)

    outs = jax.lax.map(one, [args[i] for i in batched])
    return outs, jax.tree.map(lambda _: True, outs)

  return mapped
