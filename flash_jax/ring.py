"""Ring attention: exact attention over a sequence split across the devices of a mesh axis.

Inside `shard_map`, every device holds one shard of q, k and v along the sequence
(Ring Attention, Liu et al. 2023). K/V blocks travel around the ring with
`lax.ppermute`; at each of the n steps a device attends its queries to the block at
hand with the single-device implementation's forward (which returns the log-sum-exp),
while the next block is already in flight, and merges the partial result through its
lse: the online softmax of FlashAttention-2 (section 3.1.1), one level up.

The backward is a ring too (FlashAttention-2 section 3.2 per block, recomputing from the
global lse and delta = rowsum(dO * O) - dlse): K/V travel again, and each block's
dK/dV accumulators travel with it, one step behind, so they are sent while the next
block is computed; after n steps they arrive home. Nothing of size T x S, and no K/V
but the block at hand, is ever held: residuals are the local q, k, v, out and lse.

Per step (ring_blocks), the queries' global positions against the visiting block's give
the kernel's `q_offset` (ring_layout has the layouts); `lax.switch` skips a block no
query can see (causal future, outside the window) and runs fully visible blocks
unmasked. A row that sees no key of a block contributes lse -inf, which the merge turns
into weight 0, never NaN.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from flash_jax import sinks as sinks_lib, spec as spec_lib
from flash_jax.config import BlockSizes
from flash_jax.ring_blocks import RingPlan, attend_block, block_grads, filled
from flash_jax.ring_layout import check_layout


# ---- the rings -----------------------------------------------------------------------------

def _ring_forward(plan: RingPlan, q, k, v, q_ids, kv_ids):
  """-> (out [B, L, Nq, Hv] in q.dtype, lse [B, Nq, L] float32)."""
  shard = jax.lax.axis_index(plan.axis_name)
  batch, length, num_q_heads, _ = q.shape

  def step(carry, t, send_on):
    kv, out, lse = carry
    if send_on:
      next_kv = plan.send(kv)  # in flight while this block is computed
    out, lse = attend_block(plan, q, q_ids, kv, shard, (shard - t) % plan.num_shards,
                            out, lse)
    return (next_kv if send_on else kv, out, lse)

  init = ((k, v, kv_ids), filled(q, (batch, length, num_q_heads, v.shape[-1]), 0.0),
          filled(q, (batch, num_q_heads, length), -jnp.inf))
  carry, _ = jax.lax.scan(lambda c, t: (step(c, t, True), None), init,
                          jnp.arange(plan.num_shards - 1))
  _, out, lse = step(carry, plan.num_shards - 1, False)
  return out.astype(q.dtype), lse


def _ring_backward(plan: RingPlan, q, k, v, q_ids, kv_ids, out, lse, dout, delta):
  """-> float32 (dq, dk, dv) for the local shards."""
  shard = jax.lax.axis_index(plan.axis_name)
  n = plan.num_shards

  def step(carry, t, *, receive, send_on):
    kv, dq, dkv_pending = carry
    # dK/dV of the block now held arrive from the previous device (sent one step late,
    # so the transfer overlaps this step's compute); the next K/V block is in flight too.
    dk, dv = plan.send(dkv_pending) if receive else dkv_pending
    next_kv = plan.send(kv) if send_on else kv
    dq, dk, dv = block_grads(plan, q, q_ids, kv, out, lse, dout, delta, shard,
                             (shard - t) % n, dq, dk, dv)
    return next_kv, dq, (dk, dv)

  zeros = lambda x: filled(x, x.shape, 0.0)
  carry = ((k, v, kv_ids), zeros(q), (zeros(k), zeros(v)))
  carry = step(carry, 0, receive=False, send_on=n > 1)
  if n > 2:
    carry, _ = jax.lax.scan(lambda c, t: (step(c, t, receive=True, send_on=True), None),
                            carry, jnp.arange(1, n - 1))
  if n > 1:
    carry = step(carry, n - 1, receive=True, send_on=False)
  _, dq, dkv = carry
  dk, dv = plan.send(dkv) if n > 1 else dkv  # the last hop brings dK/dV home
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(plan, q, k, v, q_ids, kv_ids):
  return _ring_forward(plan, q, k, v, q_ids, kv_ids)


def _ring_fwd(plan, q, k, v, q_ids, kv_ids):
  out, lse = _ring_forward(plan, q, k, v, q_ids, kv_ids)
  return (out, lse), (q, k, v, q_ids, kv_ids, out, lse)


def _ring_bwd(plan, residuals, cotangents):
  q, k, v, q_ids, kv_ids, out, lse = residuals
  dout, dlse = cotangents
  delta = jnp.einsum("blnh,blnh->bnl", dout.astype(jnp.float32), out.astype(jnp.float32))
  delta = delta - dlse.astype(jnp.float32)  # [B, Nq, L]: dS = P * (dP - delta)
  dq, dk, dv = _ring_backward(plan, q, k, v, q_ids, kv_ids, out, lse, dout, delta)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


# ---- public entry points -------------------------------------------------------------------

def _ring_size(axis_name) -> int:
  try:
    return jax.lax.axis_size(axis_name)
  except NameError:
    raise ValueError(f"ring_attention runs inside jax.shard_map with the sequence axis of "
                     f"q, k, v split over axis_name={axis_name!r}, which is not bound here; "
                     f"sharded_ring_attention wraps it for a Mesh") from None


def ring_attention(q, k, v, *, axis_name, causal=False, segment_ids=None, scale=None,
                   window=None, softcap=None, layout="contiguous", implementation=None,
                   block_sizes=None, interpret=False, return_lse=False, sinks=None):
  """Exact self-attention over a sequence split across the devices of `axis_name`.

  Call inside `jax.shard_map` (see `sharded_ring_attention` for a wrapper). Every device
  passes its own shard, in `layout` order (see `to_ring_layout`):

  Args:
    q: [B, L, Nq, H] this device's queries; k: [B, L, Nkv, H]; v: [B, L, Nkv, Hv]; the
      global sequence is n * L long (n devices along `axis_name`). GQA as flash_attention.
    axis_name: the mesh axis (or tuple of axes) the sequence is split over.
    causal, scale, window, softcap: as `flash_attention`, on global positions.
    segment_ids: int [B, L] (this shard's ids of q and k) or a pair (q_ids, kv_ids).
    layout: "contiguous" (device r holds rows [r*L, (r+1)*L)), or a load-balanced
      layout for causal attention: "zigzag" or "striped" (no window).
    implementation: a blockwise single-device implementation (None: the first that
      serves each block on this platform: a kernel on GPU/TPU, "chunked" on CPU).
    block_sizes, interpret: passed to the implementation.
    return_lse: also return the lse [B, Nq, L] float32 (differentiable).
    sinks: float [Nq] (this device's query heads): attention sinks, as flash_attention;
      merged once, after the ring's last lse merge.

  Returns:
    out [B, L, Nq, Hv] in q's dtype (and lse if return_lse), this device's shard.
  """
  spec, q, k, v, _, arrays = spec_lib.normalize(q, k, v, causal=causal, scale=scale,
                                                segment_ids=segment_ids, window=window,
                                                softcap=softcap)
  sinks = sinks_lib.check_sinks(sinks, spec.num_q_heads)
  if spec.q_len != spec.kv_len:
    raise ValueError(f"ring_attention is self-attention: q and k shards must have one "
                     f"length, got q={q.shape}, k={k.shape}")
  num_shards = _ring_size(axis_name)
  check_layout(layout, local_len=spec.q_len)
  if layout == "striped" and spec.window is not None:
    raise NotImplementedError("ring_attention with layout='striped' does not support window "
                              "(strided positions); use layout='zigzag' or 'contiguous'")
  if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
    raise TypeError(f"block_sizes must be a BlockSizes, got {type(block_sizes).__name__}")
  plan = RingPlan(axis_name=axis_name, num_shards=num_shards, local_len=spec.q_len,
                   layout=layout, causal=spec.causal, window=spec.window,
                   softcap=spec.softcap, scale=spec.scale, implementation=implementation,
                   block_sizes=block_sizes, interpret=interpret)
  out, lse = _ring(plan, q, k, v, arrays.q_segment_ids, arrays.kv_segment_ids)
  if sinks is not None:  # once, over all keys: the sink is one more key of the softmax
    out, lse = sinks_lib.apply_sinks(out, lse, sinks)
  return (out, lse) if return_lse else out


def sharded_ring_attention(q, k, v, *, mesh, seq_axis, batch_axis=None, head_axis=None,
                           segment_ids=None, return_lse=False, sinks=None, **ring_kwargs):
  """`ring_attention` on global arrays, without writing shard_map.

  q [B, T, Nq, H], k [B, T, Nkv, H], v [B, T, Nkv, Hv] (and segment_ids [B, T] or a
  pair) are global, their sequence in `ring_kwargs['layout']` order (`to_ring_layout`).
  The sequence is split over the mesh axis `seq_axis`; batch and heads may be split over
  `batch_axis` / `head_axis` (Nkv must divide by its size); sinks [Nq] split with the
  heads. Returns global arrays, sharded the same way. Other keywords are
  `ring_attention`'s.
  """
  names = tuple(mesh.axis_names)
  for label, axis in (("seq_axis", seq_axis), ("batch_axis", batch_axis),
                      ("head_axis", head_axis)):
    for part in () if axis is None else (axis if isinstance(axis, tuple) else (axis,)):
      if part not in names:
        raise ValueError(f"{label}={axis!r} is not an axis of the mesh {names}")
  rows = PartitionSpec(batch_axis, seq_axis, head_axis, None)  # [B, T, N, H]
  ids = PartitionSpec(batch_axis, seq_axis)  # [B, T]
  stats = PartitionSpec(batch_axis, head_axis, seq_axis)  # [B, Nq, T]
  pair = isinstance(segment_ids, (tuple, list))
  operands = (q, k, v) + (() if segment_ids is None else
                          tuple(segment_ids) if pair else (segment_ids,))
  in_specs = (rows, rows, rows) + (ids,) * (len(operands) - 3)
  if sinks is not None:
    if jnp.ndim(q) == 4:  # else ring_attention names the bad q
      sinks = sinks_lib.check_sinks(sinks, jnp.shape(q)[2])
    operands, in_specs = operands + (sinks,), in_specs + (PartitionSpec(head_axis),)

  def body(q, k, v, *rest):
    ids_shards, local_sinks = (rest[:-1], rest[-1]) if sinks is not None else (rest, None)
    local_ids = None
    if ids_shards:
      local_ids = tuple(ids_shards) if pair else ids_shards[0]
    return ring_attention(q, k, v, axis_name=seq_axis, segment_ids=local_ids,
                          return_lse=True, sinks=local_sinks, **ring_kwargs)

  out, lse = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=(rows, stats),
                           check_vma=False)(*operands)
  return (out, lse) if return_lse else out
