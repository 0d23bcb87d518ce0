"""Split-KV decode kernel for Hopper (sm90): GQA packing, contiguous or paged K/V.

For decode-shaped calls (`flash_jax.split_kv.decode_shaped`: a few new tokens against a
long cache) the work is reading K and V once, at the card's bandwidth. Here:

  * GQA packing: the T tokens x G query heads that share one K/V head are the rows of
    one 64-row query tile (row r = token r // G, head r % G of the group), so each K/V
    block is read once per K/V head and both products run as wgmma.
  * Split-KV (FlashDecoding): the key blocks a row tile sees are divided into
    `num_splits` runs of whole blocks, one CTA each: grid (splits x row tiles, B, Nkv).
    Each CTA runs the online softmax (FlashAttention-2 section 3.1.1) over its run and
    writes a float32 partial output and lse; `flash_jax.split_kv.merge` combines them.
  * Warp specialization (FlashAttention-3 section 3.1): a producer warpgroup streams the
    K and V blocks through a `num_stages`-slot TMA ring (`pipeline`); one consumer
    warpgroup computes. Deep rings keep enough bytes in flight per SM.
  * Paged K/V: key j of sequence b lives at page block_tables[b, j // page_size], slot
    j % page_size. The producer reads each block's page id with a scalar load before it
    waits for the slot, and copies the block from the page in place: one TMA copy when
    the page holds whole blocks, one per page when a block spans pages. Table entries at
    or past a sequence's last page are never read (their index is clamped to it).

Junk: keys past kv_lengths (and a page's unused slots) may hold NaN or inf. Their
logits are replaced by the mask value, and on the blocks that hold such keys (the
masked blocks at the ends of the visible range) the V rows that no query sees are
zeroed in shared memory before the P.V matmul, so P = 0 never meets inf. Keys past the
end of a contiguous cache come from TMA's out-of-bounds fill (zeros).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from flash_jax import masking, split_kv, tiles
from flash_jax.spec import AttentionArrays, AttentionSpec
from flash_jax.kernels.mosaic_gpu import compat, features, pipeline, ranges, softmax
from flash_jax.kernels.mosaic_gpu.config import WGMMA_ROWS, MosaicGPUBlockSizes

CONSUMER, PRODUCER = 0, 1  # warpgroup indices


def block_copies(spec: AttentionSpec, block_kv: int) -> int:
  """TMA copies per K (or V) block: one per page a block spans (1 when contiguous or
  when a page holds whole blocks)."""
  if not spec.paged or spec.page_size % block_kv == 0:
    return 1
  return block_kv // spec.page_size


def serves_page_size(page_size: int, block_kv: int) -> bool:
  """Whether blocks of `block_kv` keys tile pages of `page_size` tokens: a page holds
  whole blocks, or a block whole pages of at least 8 rows (the shared-memory tiling)."""
  if page_size % block_kv == 0:
    return True
  return block_kv % page_size == 0 and page_size % 8 == 0


def split_kv_forward(q, k, v, arrays: AttentionArrays, spec: AttentionSpec,
                     config: MosaicGPUBlockSizes):
  """q [B, T, Nq, H]; k, v [B, S, Nkv, H|Hv] or pages [P, page_size, Nkv, H|Hv] -> out
  [B, T, Nq, Hv] in q's dtype, lse [B, Nq, T] float32. H, Hv: multiples of 64."""
  block_kv, stages, splits = config.block_kv_split, config.num_stages_split, config.num_splits
  group, rows = spec.group_size, spec.packed_rows
  row_tiles = -(-rows // WGMMA_ROWS)
  # Rows written back per (batch, K/V head, split): all of them, or with one row tile
  # only the real ones (rounded up to 8: TMA boxes of whole 32-byte sectors).
  stored_rows = tiles.round_up(rows, 8) if row_tiles == 1 else row_tiles * WGMMA_ROWS
  q = tiles.pad_axis(tiles.pack_queries(q, spec), 2, row_tiles * WGMMA_ROWS)  # [B, Nkv, R, H]
  head_dim, head_dim_v, dtype = spec.head_dim, spec.head_dim_v, q.dtype
  kv_len = spec.kv_len
  kv_bound = kv_len if kv_len % block_kv else None  # the last block overhangs the cache
  if spec.paged and not serves_page_size(spec.page_size, block_kv):
    raise ValueError(f"block_kv_split={block_kv} does not tile pages of {spec.page_size} "
                     "tokens: a page must hold whole blocks, or a block whole pages of a "
                     "multiple of 8 tokens")
  copies = block_copies(spec, block_kv)
  feature_names, feature_arrays = features.inputs(arrays, spec, t_pad=spec.q_len, s_pad=kv_len)
  if spec.paged:
    feature_names += ("block_tables",)
    feature_arrays += (arrays.block_tables,)
  units = softmax.SoftmaxUnits.of(spec)  # no bias here: q.k^T or base-2 logits

  def kernel(q_ref, k_ref, v_ref, *refs):
    feature_refs = dict(zip(feature_names, refs))
    (out_ref, lse_ref, q_smem, k_ring, v_ring, out_smem, lse_smem, q_ready, k_ready, k_free,
     v_ready, v_free) = refs[len(feature_names):]
    program, batch, kv_head = (lax.axis_index(name) for name in ("programs", "batch", "kv_heads"))
    split, row_tile = lax.rem(program, jnp.int32(splits)), lax.div(program, jnp.int32(splits))
    wg = lax.axis_index("wg")
    rules = features.BatchRules.read(spec, feature_refs, batch, kv_bound=kv_bound)
    r_lo = row_tile * WGMMA_ROWS
    # This tile's real tokens [t_lo, t_hi) see keys [k_lo, k_hi) and blocks [lo, hi);
    # this CTA takes its share of those blocks.
    t_lo = lax.div(r_lo, jnp.int32(group))
    t_hi = jnp.minimum(lax.div(r_lo + WGMMA_ROWS + group - 1, jnp.int32(group)), spec.q_len)
    key_range = masking.visible_kv_range(t_lo, t_hi, kv_len=kv_len, **rules.positional)
    lo, hi = ranges.visited_kv_blocks(t_lo, t_hi, block_kv=block_kv, kv_len=kv_len,
                                      **rules.positional)
    lo, hi = split_kv.split_part(lo, hi, split, splits)
    num_steps = hi - lo
    slot_of = lambda j: pipeline.slot_of(j - lo, stages)

    @pl.when(wg == CONSUMER)
    def _consumer():
      plgpu.set_max_registers(pipeline.CONSUMER_REGISTERS, action="increase")
      plgpu.copy_gmem_to_smem(q_ref.at[batch, kv_head, pl.ds(r_lo, WGMMA_ROWS)], q_smem, q_ready)
      plgpu.barrier_wait(q_ready)
      f_lo, f_hi = ranges.unmasked_kv_blocks(t_lo, t_hi, lo, hi, block_kv=block_kv,
                                             kv_len=kv_len, **rules.positional)

      def visibility(shape, k_lo):
        """Bool [64, n] of a masked tile: row r is token (r_lo + r) // G."""
        token = lax.div(compat.iota(shape, 0) + r_lo, jnp.int32(group))
        return rules.visible(token, compat.iota(shape, 1) + k_lo)

      def zero_unseen_values(slot, k_lo):
        """Zeroes the rows of V slot `slot` whose key no token of the tile sees."""
        ring = v_ring.at[slot]
        values = compat.load(ring, compat.wgmma_layout())  # [block_kv, Hv]
        seen = masking.keys_in_range(compat.iota(values.shape, 0) + k_lo, key_range)
        ring[...] = jnp.where(seen, values, jnp.zeros((), dtype))
        plgpu.commit_smem()  # the generic-proxy writes, before wgmma reads the slot

      def step(j, carry, *, masked: bool):
        acc, row_max, row_sum = carry  # [64, Hv], [64], [64]
        slot, k_lo = slot_of(j), j * block_kv
        plgpu.barrier_wait(k_ready.at[slot])

        def qk_matmul(s_ref):
          plgpu.wgmma(s_ref, q_smem, k_ring.at[slot].transpose((1, 0)))
          return s_ref[...]

        s = units.max_units(pl.run_scoped(qk_matmul,
                                          plgpu.ACC((WGMMA_ROWS, block_kv), jnp.float32)))
        plgpu.barrier_arrive(k_free.at[slot])
        visible = visibility(s.shape, k_lo) if masked else None
        p, new_max, rescale, row_sum = units.step(s, visible, row_max, row_sum)
        acc = acc * lax.broadcast_in_dim(rescale, acc.shape, [0])
        plgpu.barrier_wait(v_ready.at[slot])
        if masked:
          zero_unseen_values(slot, k_lo)
        p16 = p.astype(dtype)
        acc = compat.accumulate(lambda acc_ref: plgpu.wgmma(acc_ref, p16, v_ring.at[slot]), acc)
        plgpu.barrier_arrive(v_free.at[slot])
        return acc, new_max, row_sum

      carry = (compat.layout_cast(jnp.zeros((WGMMA_ROWS, head_dim_v), jnp.float32),
                                  compat.wgmma_layout()),
               compat.layout_cast(jnp.full((WGMMA_ROWS,), masking.MASK_VALUE, jnp.float32),
                                  compat.row_layout()),
               compat.layout_cast(jnp.zeros((WGMMA_ROWS,), jnp.float32), compat.row_layout()))
      carry = lax.fori_loop(lo, f_lo, functools.partial(step, masked=True), carry)
      carry = lax.fori_loop(f_lo, f_hi, functools.partial(step, masked=False), carry)
      acc, row_max, row_sum = lax.fori_loop(f_hi, hi, functools.partial(step, masked=True), carry)

      # A row this split never saw (row_sum == 0) gets output 0 and lse -inf: it weighs
      # nothing in the merge.
      seen = row_sum > 0
      safe_sum = jnp.where(seen, row_sum, 1.0)
      inv_sum = jnp.where(seen, 1.0 / safe_sum, 0.0)
      out_smem[...] = jnp.where(lax.broadcast_in_dim(seen, acc.shape, [0]),
                                acc * lax.broadcast_in_dim(inv_sum, acc.shape, [0]), 0.0)
      lse_smem[...] = jnp.where(seen, units.lse(row_max, safe_sum), -jnp.inf)
      plgpu.commit_smem()
      stored = pl.ds(0, stored_rows) if row_tiles == 1 else pl.ds(r_lo, WGMMA_ROWS)
      plgpu.copy_smem_to_gmem(out_smem.at[pl.ds(0, min(stored_rows, WGMMA_ROWS))],
                              out_ref.at[batch, kv_head, split, stored])
      plgpu.copy_smem_to_gmem(lse_smem.at[pl.ds(0, min(stored_rows, WGMMA_ROWS))],
                              lse_ref.at[batch, kv_head, split, stored])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == PRODUCER)
    def _producer():
      block_source = functools.partial(_block_source, spec=spec, refs=feature_refs, batch=batch,
                                       kv_head=kv_head, first_block=lo, block_kv=block_kv,
                                       kv_length=rules.kv_length)
      streams = tuple(
          pipeline.Stream(tuple(block_source(ref, copy) for copy in range(copies)),
                          tuple(_ring_part(ring, copy, block_kv // copies) for copy in range(copies)),
                          ready, free)
          for ref, ring, ready, free in ((k_ref, k_ring, k_ready, k_free),
                                         (v_ref, v_ring, v_ready, v_free)))
      pipeline.produce(streams, num_steps, stages)

  transforms = compat.smem_transforms(dtype)
  scratch = [
      plgpu.SMEM((WGMMA_ROWS, head_dim), dtype, transforms=transforms),  # Q tile
      plgpu.SMEM((stages, block_kv, head_dim), dtype, transforms=transforms),  # K ring
      plgpu.SMEM((stages, block_kv, head_dim_v), dtype, transforms=transforms),  # V ring
      plgpu.SMEM((WGMMA_ROWS, head_dim_v), jnp.float32),  # partial output
      plgpu.SMEM((WGMMA_ROWS,), jnp.float32),  # partial lse
      plgpu.Barrier(num_arrivals=1),  # Q ready
      *pipeline.ring_barriers(stages, 1, copies),  # K: ready, free
      *pipeline.ring_barriers(stages, 1, copies),  # V: ready, free
  ]
  partial = (spec.batch, spec.num_kv_heads, splits, stored_rows)
  kernel.__name__ = "flash_jax_mosaic_gpu_split_kv"
  partial_out, partial_lse = plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct(partial + (head_dim_v,), jnp.float32),
                jax.ShapeDtypeStruct(partial, jnp.float32)),
      scratch_types=scratch,
      grid=(splits * row_tiles, spec.batch, spec.num_kv_heads),
      grid_names=("programs", "batch", "kv_heads"),
      num_threads=2,
      thread_name="wg",
      compiler_params=compat.compiler_params(),
  )(q, k, v, *feature_arrays)
  rows_of = lambda x: x[:, :, :, :rows]
  out, lse = split_kv.merge(rows_of(partial_out), rows_of(partial_lse), axis=2)  # [B, Nkv, R, ...]
  return (tiles.unpack_rows(out, spec).astype(dtype),
          jnp.transpose(tiles.unpack_rows(lse, spec), (0, 2, 1)))


def _ring_part(ring, copy: int, rows: int):
  """The rows of every slot of `ring` [stages, block_kv, D] that copy `copy` fills."""
  return ring if rows == ring.shape[1] else ring.at[:, pl.ds(copy * rows, rows)]


def _block_source(ref, copy: int, *, spec: AttentionSpec, refs: dict, batch, kv_head,
                  first_block, block_kv: int, kv_length):
  """step -> the GMEM view that copy `copy` of K/V block first_block + step reads:
  [block_kv / copies, D] of this batch row and K/V head."""
  if not spec.paged:
    return lambda step: ref.at[batch, pl.ds((first_block + step) * block_kv, block_kv), kv_head]
  page_size, tables = spec.page_size, refs["block_tables"]
  rows = min(page_size, block_kv)
  last_page = jnp.maximum(lax.div(kv_length + page_size - 1, jnp.int32(page_size)) - 1, 0)

  def source(step):
    key = (first_block + step) * block_kv + copy * rows  # first key of the copy
    index = jnp.minimum(lax.div(key, jnp.int32(page_size)), last_page)
    return ref.at[tables[batch, index], pl.ds(lax.rem(key, jnp.int32(page_size)), rows), kv_head]

  return source
