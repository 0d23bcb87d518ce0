"""One step of ring attention: the local queries against one visiting K/V block.

A shard's rows form pieces (see ring_layout) whose global positions are arithmetic
progressions, so each (query piece, key/value piece) pair is one single-device call
with a `q_offset`: skipped when no query sees any key, unmasked when all do, masked
otherwise. Forward partial results merge through their lse (FlashAttention-2 section
3.1.1, one level up); backward contributions are the implementation's blockwise
backward on the global lse and delta (FlashAttention-2 section 3.2).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from flash_jax import dispatch, masking, spec as spec_lib, split_kv
from flash_jax.config import BlockSizes
from flash_jax.implementation import BlockwiseImplementation
from flash_jax.ring_layout import Piece, pieces


@dataclasses.dataclass(frozen=True)
class RingPlan:
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
  def make(cls, plan: RingPlan, q, k, v, segment_ids, *, positional, q_offset=None):
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
  def make(cls, plan: RingPlan, q_piece, kv_piece, q, k, v, q_ids, kv_ids):
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


def _select(spec, plan: RingPlan) -> BlockwiseImplementation:
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


def _config(impl, spec, plan: RingPlan):
  if plan.block_sizes is None:
    return impl.default_config(spec)
  impl.check_config(plan.block_sizes)
  return plan.block_sizes


# ---- the partial results of one visiting block --------------------------------------------

def filled(like, shape, value, dtype=jnp.float32):
  """A constant array that varies over the same shard_map axes as `like`, so loop carries
  and cond branches type-check under shard_map(check_vma=True)."""
  return jnp.full_like(like, value, dtype=dtype, shape=shape)


def merge(out_a, lse_a, out_b, lse_b):
  """Softmax results over two disjoint key sets -> over their union, in float32.

  out [B, L, Nq, Hv] (normalized), lse [B, Nq, L]; lse -inf (no key seen) weighs 0.
  """
  rows = lambda lse: jnp.swapaxes(lse, 1, 2)  # [B, Nq, L] -> [B, L, Nq], as out's rows
  out, lse = split_kv.merge(jnp.stack([out_a.astype(jnp.float32), out_b.astype(jnp.float32)]),
                            jnp.stack([rows(lse_a), rows(lse_b)]))
  return out, rows(lse)


def _for_each_pair(plan: RingPlan, q_shard, kv_shard, body, carry):
  """carry = body(q_piece, kv_piece, carry) for every (query piece, key/value piece) pair.

  The pairs run in a loop, so whatever the scheduler does, one pair's operand slices and
  results are held at a time (unrolled, XLA may run every pair's kernel before the first
  update and hold all their slices and results at once). A shard's pieces have one
  length, so the loop picks pair p's pieces by traced index.
  """
  q_pieces, kv_pieces = plan.pieces(q_shard), plan.pieces(kv_shard)
  if len(q_pieces) * len(kv_pieces) == 1:
    return body(q_pieces[0], kv_pieces[0], carry)

  def piece(pieces, i):  # [B, L] rows of equal pieces, back to back: piece i by index
    length, stride = pieces[0].length, pieces[0].stride
    assert all(p.length == length and p.stride == stride and p.local_start == index * length
               for index, p in enumerate(pieces)), pieces
    starts = jnp.stack([jnp.asarray(p.global_start, jnp.int32) for p in pieces])
    return Piece(i * length, length, starts[i], stride)

  def step(p, carry):
    i, j = jnp.divmod(p, len(kv_pieces))
    return body(piece(q_pieces, i), piece(kv_pieces, j), carry)

  return jax.lax.fori_loop(0, len(q_pieces) * len(kv_pieces), step, carry)


def attend_block(plan: RingPlan, q, q_ids, kv, q_shard, kv_shard, out, lse):
  """Merges the local queries' attention to one visiting K/V block into the running
  result (out [B, L, Nq, Hv] float32, lse [B, Nq, L]) -> the updated (out, lse).

  kv = (k [B, L, Nkv, H], v [B, L, Nkv, Hv], kv_ids [B, L] or None) of device `kv_shard`.
  Each pair's result merges straight into its rows of the running result: no partial
  result of the whole block, and no concatenation, is ever held.
  """
  k, v, kv_ids = kv
  batch, _, num_q_heads, _ = q.shape

  def body(q_piece, kv_piece, carry):
    out, lse = carry
    pair = _Pair.make(plan, q_piece, kv_piece, q, k, v, q_ids, kv_ids)
    args = (q_piece.take(q), kv_piece.take(k), kv_piece.take(v), None)
    pair_out, pair_lse = pair.run(
        lambda call: call.impl.forward(*args, call.arrays, call.spec, call.config,
                                       plan.interpret),
        lambda: (filled(q, (batch, q_piece.length, num_q_heads, v.shape[-1]), 0.0, q.dtype),
                 filled(q, (batch, num_q_heads, q_piece.length), -jnp.inf)))
    piece_out, piece_lse = merge(q_piece.take(out), q_piece.take(lse, axis=2),
                                 pair_out, pair_lse)
    return q_piece.put(out, piece_out), q_piece.put(lse, piece_lse, axis=2)

  return _for_each_pair(plan, q_shard, kv_shard, body, (out, lse))


def block_grads(plan: RingPlan, q, q_ids, kv, out, lse, dout, delta, q_shard, kv_shard,
                dq, dk, dv):
  """Adds the gradient contributions of one visiting K/V block to the float32
  accumulators dq [B, L, Nq, H], dk [B, L, Nkv, H], dv [B, L, Nkv, Hv] -> (dq, dk, dv).

  Each pair's gradients (in the implementation's dtype) are added straight into their
  rows of the accumulators: no per-block gradients, and no concatenation, are held.
  """
  k, v, kv_ids = kv

  def body(q_piece, kv_piece, carry):
    dq, dk, dv = carry
    pair = _Pair.make(plan, q_piece, kv_piece, q, k, v, q_ids, kv_ids)
    rows, stats = lambda x: q_piece.take(x), lambda x: q_piece.take(x, axis=2)
    args = (rows(q), kv_piece.take(k), kv_piece.take(v), None)
    residuals = (rows(out), stats(lse), rows(dout), stats(delta))

    def compute(call):
      grads = call.impl.backward(*args, call.arrays, *residuals, call.spec, call.config,
                                 plan.interpret)
      return tuple(grads[:3])

    # A skipped pair gives zeros in the implementation's dtypes (not float32: the
    # switch's result is one pair's gradients, held until they are added).
    shapes = jax.eval_shape(lambda: compute(pair.unmasked))
    pair_dq, pair_dk, pair_dv = pair.run(
        compute, lambda: tuple(filled(q, s.shape, 0.0, s.dtype) for s in shapes))
    add = lambda piece, acc, g: piece.put(acc, piece.take(acc) + g.astype(jnp.float32))
    return add(q_piece, dq, pair_dq), add(kv_piece, dk, pair_dk), add(kv_piece, dv, pair_dv)

  return _for_each_pair(plan, q_shard, kv_shard, body, (dq, dk, dv))
