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

Per step, the queries' global positions against the visiting block's give the kernel's
`q_offset` (see ring_layout for the layouts); a block that no query of a piece can see
(causal future, outside the window) is skipped with `lax.cond`. A row that sees no key
of a block contributes lse -inf, which the merge turns into weight 0, never NaN.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from flash_jax import dispatch, masking, spec as spec_lib
from flash_jax.config import BlockSizes
from flash_jax.implementation import BlockwiseImplementation
from flash_jax.ring_layout import Piece, check_layout, pieces


@dataclasses.dataclass(frozen=True)
class _RingPlan:
  """Everything static about one ring attention call."""

  axis_name: Any
  num_shards: int
  local_len: int
  layout: str
  causal: bool
  window: tuple[int | None, int | None] | None
  softcap: float | None
  scale: float
  implementation: str | None
  block_sizes: BlockSizes | None
  interpret: bool

  @property
  def positional(self) -> bool:
    """Whether key visibility depends on positions (otherwise layouts do not matter)."""
    return self.causal or self.window is not None

  def pieces(self, shard) -> tuple[Piece, ...]:
    if not self.positional:
      return (Piece(0, self.local_len, 0),)
    return pieces(self.layout, shard, self.num_shards, self.local_len)

  def send(self, tree):
    """Each device's `tree` to the next device of the ring."""
    n = self.num_shards
    return jax.lax.ppermute(tree, self.axis_name, [(i, (i + 1) % n) for i in range(n)])


# ---- one (query piece, key/value piece) pair: a single-device kernel call ---------------

@dataclasses.dataclass(frozen=True)
class _Call:
  """One normalized single-device call: its spec, mask arrays and implementation."""

  spec: spec_lib.AttentionSpec
  arrays: spec_lib.AttentionArrays
  impl: BlockwiseImplementation
  config: Any

  @classmethod
  def make(cls, plan: _RingPlan, q, k, v, segment_ids, *, positional, q_offset=None):
    spec, *_, arrays = spec_lib.normalize(
        q, k, v, causal=plan.causal and positional, scale=plan.scale,
        window=plan.window if positional else None, softcap=plan.softcap,
        segment_ids=segment_ids, q_offset=q_offset)
    impl = _select(spec, plan)
    return cls(spec, arrays, impl, _config(impl, spec, plan))


@dataclasses.dataclass(frozen=True)
class _Pair:
  """A query piece against a visiting key/value piece.

  With positional rules (causal, window) a pair is, depending on the traced positions,
  invisible (skipped), partly visible (`masked`: a call with causal/window and q_offset)
  or fully visible (`unmasked`: the same call without positional rules, which the
  fastest kernels serve). Without positional rules every pair is one unmasked call.
  """

  q_piece: Piece
  kv_piece: Piece
  masked: _Call | None
  unmasked: _Call
  branch: jax.Array | None  # traced int32: 0 invisible, 1 masked, 2 unmasked

  @classmethod
  def make(cls, plan: _RingPlan, q_piece, kv_piece, q, k, v, q_ids, kv_ids):
    q_p, k_p, v_p = q_piece.take(q), kv_piece.take(k), kv_piece.take(v)
    segment_ids = None if q_ids is None else (q_piece.take(q_ids), kv_piece.take(kv_ids))
    unmasked = _Call.make(plan, q_p, k_p, v_p, segment_ids, positional=False)
    if not plan.positional:
      return cls(q_piece, kv_piece, None, unmasked, None)
    # Positions g_q + s*i and g_k + s*j: j <= i + (g_q - g_k) / s, exact for s = 1 and
    # for causal (floor) with any stride; windows need s = 1 (checked up front).
    q_offset = jnp.floor_divide(q_piece.global_start - kv_piece.global_start,
                                q_piece.stride).astype(jnp.int32)
    masked = _Call.make(plan, q_p, k_p, v_p, segment_ids, positional=True, q_offset=q_offset)
    rules = dict(causal=masked.spec.causal, window=masked.spec.window, q_offset=q_offset)
    q_len, kv_len = q_piece.length, kv_piece.length
    k_lo, k_hi = masking.visible_kv_range(0, q_len, kv_len=kv_len, **rules)
    full = masking.tile_fully_visible(0, q_len, 0, kv_len, kv_len=kv_len, **rules)
    branch = jnp.where(full, 2, jnp.where(k_hi > k_lo, 1, 0)).astype(jnp.int32)
    return cls(q_piece, kv_piece, masked, unmasked, branch)

  def run(self, compute, skipped):
    """compute(call) with the call this pair needs, or skipped() when it is invisible."""
    if self.branch is None:
      return compute(self.unmasked)
    return jax.lax.switch(self.branch, [skipped, lambda: compute(self.masked),
                                        lambda: compute(self.unmasked)])


def _select(spec, plan: _RingPlan) -> BlockwiseImplementation:
  """The named implementation, or the first registered blockwise one that serves `spec`."""
  if plan.implementation is not None:
    impl = dispatch.select(spec, plan.implementation, interpret=plan.interpret)
    if not isinstance(impl, BlockwiseImplementation):
      raise NotImplementedError(
          f"ring_attention needs a blockwise implementation (forward and backward from the "
          f"lse); implementation {plan.implementation!r} has none")
    return impl
  platform, reasons = dispatch.current_platform(), []
  for entry in dispatch.REGISTRY:
    if platform not in entry.platforms:
      continue
    if not isinstance(dispatch.get_implementation(entry.name), BlockwiseImplementation):
      continue
    try:
      return dispatch.select(spec, entry.name)
    except NotImplementedError as e:
      reasons.append(str(e))
  raise NotImplementedError(f"no blockwise implementation serves ring_attention's blocks on "
                            f"{platform}: {reasons}")


def _config(impl, spec, plan: _RingPlan):
  if plan.block_sizes is None:
    return impl.default_config(spec)
  impl.check_config(plan.block_sizes)
  return plan.block_sizes


# ---- the partial results of one visiting block --------------------------------------------

def _filled(like, shape, value, dtype=jnp.float32):
  """A constant array that varies over the same shard_map axes as `like`, so loop carries
  and cond branches type-check under shard_map(check_vma=True)."""
  return jnp.full_like(like, value, dtype=dtype, shape=shape)


def _merge(out_a, lse_a, out_b, lse_b):
  """Softmax results over two disjoint key sets -> over their union, in float32.

  out [B, L, Nq, Hv] (normalized), lse [B, Nq, L]; lse -inf (no key seen) weighs 0.
  """
  top = jnp.maximum(lse_a, lse_b)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  w_a = jnp.where(jnp.isfinite(lse_a), jnp.exp(lse_a - top), 0.0)  # [B, Nq, L]
  w_b = jnp.where(jnp.isfinite(lse_b), jnp.exp(lse_b - top), 0.0)
  total = w_a + w_b
  seen = total > 0
  total = jnp.where(seen, total, 1.0)
  lse = jnp.where(seen, top + jnp.log(total), -jnp.inf)
  as_rows = lambda w: jnp.swapaxes(w / total, 1, 2)[..., None]  # -> [B, L, Nq, 1]
  out = out_a.astype(jnp.float32) * as_rows(w_a) + out_b.astype(jnp.float32) * as_rows(w_b)
  return out, lse


def _attend_block(plan: _RingPlan, q, q_ids, kv, q_shard, kv_shard):
  """Local queries against one visiting K/V block -> (out [B, L, Nq, Hv] f32, lse [B, Nq, L]).

  kv = (k [B, L, Nkv, H], v [B, L, Nkv, Hv], kv_ids [B, L] or None) of device `kv_shard`.
  """
  k, v, kv_ids = kv
  batch, _, num_q_heads, _ = q.shape
  outs, lses = [], []
  for q_piece in plan.pieces(q_shard):
    rows = (batch, q_piece.length, num_q_heads)
    out = _filled(q, rows + (v.shape[-1],), 0.0)
    lse = _filled(q, (batch, num_q_heads, q_piece.length), -jnp.inf)
    for kv_piece in plan.pieces(kv_shard):
      pair = _Pair.make(plan, q_piece, kv_piece, q, k, v, q_ids, kv_ids)
      args = (q_piece.take(q), kv_piece.take(k), kv_piece.take(v), None)
      pair_out, pair_lse = pair.run(
          lambda call: call.impl.forward(*args, call.arrays, call.spec, call.config,
                                         plan.interpret),
          lambda: (_filled(q, rows + (v.shape[-1],), 0.0, q.dtype),
                   _filled(q, lse.shape, -jnp.inf)))
      out, lse = _merge(out, lse, pair_out, pair_lse)
    outs.append(out)
    lses.append(lse)
  return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=2)


def _block_grads(plan: _RingPlan, q, q_ids, kv, out, lse, dout, delta, q_shard, kv_shard):
  """Gradient contributions of one visiting K/V block -> float32 (dq, dk, dv)."""
  k, v, kv_ids = kv
  zeros = lambda x, piece: _filled(x, x.shape[:1] + (piece.length,) + x.shape[2:], 0.0)
  q_pieces, kv_pieces = plan.pieces(q_shard), plan.pieces(kv_shard)
  dq = [zeros(q, p) for p in q_pieces]
  dk = [zeros(k, p) for p in kv_pieces]
  dv = [zeros(v, p) for p in kv_pieces]
  for i, q_piece in enumerate(q_pieces):
    for j, kv_piece in enumerate(kv_pieces):
      pair = _Pair.make(plan, q_piece, kv_piece, q, k, v, q_ids, kv_ids)

      def compute(call, q_piece=q_piece, kv_piece=kv_piece):
        rows = lambda x: q_piece.take(x, axis=1)
        stats = lambda x: q_piece.take(x, axis=2)
        grads = call.impl.backward(rows(q), kv_piece.take(k), kv_piece.take(v), None,
                                   call.arrays, rows(out), stats(lse), rows(dout), stats(delta),
                                   call.spec, call.config, plan.interpret)
        return tuple(g.astype(jnp.float32) for g in grads[:3])

      pair_dq, pair_dk, pair_dv = pair.run(
          compute, lambda i=i, j=j: (jnp.zeros_like(dq[i]), jnp.zeros_like(dk[j]),
                                     jnp.zeros_like(dv[j])))
      dq[i], dk[j], dv[j] = dq[i] + pair_dq, dk[j] + pair_dk, dv[j] + pair_dv
  join = lambda parts: jnp.concatenate(parts, axis=1)
  return join(dq), join(dk), join(dv)


# ---- the rings -----------------------------------------------------------------------------

def _ring_forward(plan: _RingPlan, q, k, v, q_ids, kv_ids):
  """-> (out [B, L, Nq, Hv] in q.dtype, lse [B, Nq, L] float32)."""
  shard = jax.lax.axis_index(plan.axis_name)
  batch, length, num_q_heads, _ = q.shape

  def step(carry, t, send_on):
    kv, out, lse = carry
    if send_on:
      next_kv = plan.send(kv)  # in flight while this block is computed
    block_out, block_lse = _attend_block(plan, q, q_ids, kv, shard,
                                         (shard - t) % plan.num_shards)
    out, lse = _merge(out, lse, block_out, block_lse)
    return (next_kv if send_on else kv, out, lse)

  init = ((k, v, kv_ids), _filled(q, (batch, length, num_q_heads, v.shape[-1]), 0.0),
          _filled(q, (batch, num_q_heads, length), -jnp.inf))
  carry, _ = jax.lax.scan(lambda c, t: (step(c, t, True), None), init,
                          jnp.arange(plan.num_shards - 1))
  _, out, lse = step(carry, plan.num_shards - 1, False)
  return out.astype(q.dtype), lse


def _ring_backward(plan: _RingPlan, q, k, v, q_ids, kv_ids, out, lse, dout, delta):
  """-> float32 (dq, dk, dv) for the local shards."""
  shard = jax.lax.axis_index(plan.axis_name)
  n = plan.num_shards

  def step(carry, t, *, receive, send_on):
    kv, dq, dkv_pending = carry
    # dK/dV of the block now held arrive from the previous device (sent one step late,
    # so the transfer overlaps this step's compute); the next K/V block is in flight too.
    dk, dv = plan.send(dkv_pending) if receive else dkv_pending
    next_kv = plan.send(kv) if send_on else kv
    block_dq, block_dk, block_dv = _block_grads(plan, q, q_ids, kv, out, lse, dout, delta,
                                                shard, (shard - t) % n)
    return next_kv, dq + block_dq, (dk + block_dk, dv + block_dv)

  zeros = lambda x: _filled(x, x.shape, 0.0)
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
                   block_sizes=None, interpret=False, return_lse=False):
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

  Returns:
    out [B, L, Nq, Hv] in q's dtype (and lse if return_lse), this device's shard.
  """
  spec, q, k, v, _, arrays = spec_lib.normalize(q, k, v, causal=causal, scale=scale,
                                                segment_ids=segment_ids, window=window,
                                                softcap=softcap)
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
  plan = _RingPlan(axis_name=axis_name, num_shards=num_shards, local_len=spec.q_len,
                   layout=layout, causal=spec.causal, window=spec.window,
                   softcap=spec.softcap, scale=spec.scale, implementation=implementation,
                   block_sizes=block_sizes, interpret=interpret)
  out, lse = _ring(plan, q, k, v, arrays.q_segment_ids, arrays.kv_segment_ids)
  return (out, lse) if return_lse else out


def sharded_ring_attention(q, k, v, *, mesh, seq_axis, batch_axis=None, head_axis=None,
                           segment_ids=None, return_lse=False, **ring_kwargs):
  """`ring_attention` on global arrays, without writing shard_map.

  q [B, T, Nq, H], k [B, T, Nkv, H], v [B, T, Nkv, Hv] (and segment_ids [B, T] or a
  pair) are global, their sequence in `ring_kwargs['layout']` order (`to_ring_layout`).
  The sequence is split over the mesh axis `seq_axis`; batch and heads may be split over
  `batch_axis` / `head_axis` (Nkv must divide by its size). Returns global arrays,
  sharded the same way. Other keywords are `ring_attention`'s.
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

  def body(q, k, v, *ids_shards):
    local_ids = None
    if ids_shards:
      local_ids = tuple(ids_shards) if pair else ids_shards[0]
    return ring_attention(q, k, v, axis_name=seq_axis, segment_ids=local_ids,
                          return_lse=True, **ring_kwargs)

  out, lse = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=(rows, stats),
                           check_vma=False)(*operands)
  return (out, lse) if return_lse else out
