"""Forward kernel for Hopper (sm90), after FlashAttention-3 (Shah et al., 2024).

One CTA owns 2 * block_q query rows of one (batch, query head) and runs three
warpgroups (FlashAttention-3 section 3.1, warp specialization):
  * warpgroup 2, the producer, keeps few registers (setmaxnreg 40) and streams the
    key/value blocks the tile visits through a ring of `num_stages` shared-memory
    slots with TMA copies, refilling a slot once both consumers released it;
  * warpgroups 0 and 1, the consumers, each own block_q = 64 query rows, issue
    wgmma for S = Q K^T and O += P V with float32 accumulators in registers and run
    the online softmax (FlashAttention-2 section 3.1.1) in registers.
The consumers run one of two schedules (`MosaicGPUBlockSizes.overlap_softmax`; the
measured default per head dim is in `config`):
  * sequential: S(j), softmax(j), then O += P(j) V(j). A two-arrival "schedule"
    barrier staggers the consumers by half an iteration so that the softmax of one
    overlaps the matmuls of the other (FlashAttention-3 section 3.2, ping-pong); each
    consumer waits for the next key block while its PV wgmma runs.
  * overlapped: S(j) and O += P(j-1) V(j-1) are issued together and softmax(j) runs
    while the PV wgmma is still in flight (section 3.2, intra-warpgroup overlapping);
    the consumers take strict turns issuing through two `turn` barriers.

Dropout (`features.Dropout`) scales P after the row sum, before the PV matmul. A bias
tile joins the logits and a dense-mask tile their visibility (`dense`: both loaded from
global memory beside the Q K^T wgmma).
Masking: the CTA visits only key blocks inside `masking.visible_kv_range` of its batch
row (q_offset shifts the causal and window bounds; blocks at or past kv_length are
never loaded; a tile whose rows all lie at or past q_length visits none); blocks that
all of a consumer's rows fully see run without mask arithmetic, the others (causal
diagonal, window edges, length boundaries, the key tail) apply
`masking.key_visibility`. With segment ids every visited block is masked: the key
ids stream through the ring beside K and V, the query ids sit beside Q.
Both consumers walk the same blocks, so their barrier counts always match.
Softmax statistics are kept in base 2 (logits times log2(e)) so exp2 does the work; without
a softcap or bias the row max is taken on q.k^T itself and the scale enters exp2's
argument, one fused multiply-add per score (`softmax.SoftmaxUnits`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from flash_jax import masking, tiles
from flash_jax.spec import AttentionSpec
from flash_jax.kernels.mosaic_gpu import compat, dense, features, pipeline, ranges, softmax
from flash_jax.kernels.mosaic_gpu.config import NUM_COMPUTE_WGS, MosaicGPUBlockSizes


def forward(q, k, v, bias, arrays, spec: AttentionSpec, config: MosaicGPUBlockSizes):
  """q [B, T, Nq, H], k [B, S, Nkv, H], v [B, S, Nkv, Hv] -> out [B, T, Nq, Hv],
  lse [B, Nq, T] float32 and, with a bias, the rows' (max, sum) [B, Nq, T] float32 (max
  in natural units; None without a bias). H and Hv: multiples of 64 (the implementation
  pads others).

  `arrays`: the call's AttentionArrays (offsets, lengths, segment ids, dropout seed; see
  `features`); bias [B?, Nq?, T?, S?] and arrays.mask: see `dense`.
  """
  block_q, block_kv, stages = config.block_q, config.block_kv, config.num_stages
  rows_per_cta = NUM_COMPUTE_WGS * block_q
  t_pad = tiles.round_up(spec.q_len, rows_per_cta)
  s_pad = tiles.round_up(spec.kv_len, block_kv)
  # Tails: padded query rows are computed and dropped; padded keys are masked
  # (kv_bound) on the last block, which `ranges` never counts as unmasked.
  q = tiles.pad_axis(q, 1, t_pad)  # [B, T_pad, Nq, H]
  k = tiles.pad_axis(k, 1, s_pad)  # [B, S_pad, Nkv, H]
  v = tiles.pad_axis(v, 1, s_pad)
  num_q_tiles = t_pad // rows_per_cta
  head_dim, head_dim_v, dtype = spec.head_dim, spec.head_dim_v, q.dtype
  # The output tile is staged in Q's shared memory where the shapes agree, else in its own.
  own_out_tile = head_dim_v != head_dim
  kv_bound = spec.kv_len if s_pad > spec.kv_len else None
  feature_names, feature_arrays = features.inputs(arrays, spec, t_pad=t_pad, s_pad=s_pad)
  dense_names, dense_arrays = dense.inputs(bias, arrays.mask, spec, t_pad=t_pad, s_pad=s_pad,
                                           rows_per_cta=rows_per_cta, block_cols=block_kv)
  feature_names, feature_arrays = feature_names + dense_names, feature_arrays + dense_arrays
  segments = spec.has_segment_ids
  # Ids and dense masks are not positional: every visited block is masked.
  mask_every_block = segments or spec.has_mask
  with_stats = spec.has_bias  # the backward's exact (max, sum) for rows of huge biases

  units = softmax.SoftmaxUnits.of(spec)  # base-2 statistics; see softmax.py

  def kernel(*refs):
    (q_ref, k_ref, v_ref), feature_refs, refs = features.split_refs(refs, feature_names, 3)
    out_ref, lse_ref, *refs = refs
    if with_stats:
      max_ref, sum_ref, *refs = refs
    (qo_smem2, k_smem, v_smem, lse_smem2, q_ready, k_ready, k_free,
     v_ready, v_free, schedule, turn, *segment_scratch) = refs
    if own_out_tile:  # (the optional scratch, in the order of `scratch` below)
      out_smem2, *segment_scratch = segment_scratch
    else:
      out_smem2 = qo_smem2
    if with_stats:
      max_smem2, sum_smem2, *segment_scratch = segment_scratch
    if segments:
      q_seg_smem2, kv_seg_ring, seg_ready, seg_free = segment_scratch
    batch, head = lax.axis_index("batch"), lax.axis_index("heads")
    rules = features.BatchRules.read(spec, feature_refs, batch, kv_bound=kv_bound)
    dropout = features.Dropout.read(spec, feature_refs, batch, head)
    dense_tiles = dense.DenseTiles.read(spec, feature_refs, batch, head)
    # Longest causal tiles first, so the short ones fill the tail of the launch.
    tile = (num_q_tiles - 1) - lax.axis_index("q_tiles")
    wg = lax.axis_index("wg")
    cta_q_lo = tile * rows_per_cta
    lo, hi = ranges.visited_kv_blocks(
        cta_q_lo, jnp.minimum(cta_q_lo + rows_per_cta, spec.q_len), block_kv=block_kv,
        kv_len=spec.kv_len, **rules.positional)
    lo, hi = dense_tiles.block_range(tile, lo, hi)
    num_steps = hi - lo

    rendezvous = functools.partial(pipeline.rendezvous, schedule)

    @pl.when(wg < NUM_COMPUTE_WGS)
    def _consumer():
      plgpu.set_max_registers(pipeline.CONSUMER_REGISTERS, action="increase")
      q_smem = qo_smem2.at[wg]  # [block_q, H]
      out_smem = out_smem2.at[wg]  # [block_q, Hv]: q_smem itself when Hv == H
      q_lo = cta_q_lo + wg * block_q
      plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(q_lo, block_q), head], q_smem,
                              q_ready.at[wg])
      if segments:
        plgpu.copy_gmem_to_smem(feature_refs["q_segment_ids"].at[batch, pl.ds(q_lo, block_q)],
                                q_seg_smem2.at[wg], q_ready.at[wg])
      plgpu.barrier_wait(q_ready.at[wg])
      if segments:
        q_seg_rows = compat.load(q_seg_smem2.at[wg], compat.row_layout())  # [block_q]
      if mask_every_block:
        f_lo = f_hi = hi
      else:
        f_lo, f_hi = ranges.unmasked_kv_blocks(
            q_lo, q_lo + block_q, lo, hi, block_kv=block_kv, kv_len=spec.kv_len,
            **rules.positional)

      drop_rows = None if dropout is None else dropout.row_hashes(q_lo, block_q)
      start_max = compat.layout_cast(jnp.full((block_q,), masking.MASK_VALUE, jnp.float32),
                                     compat.row_layout())  # [block_q], base 2
      start_sum = compat.layout_cast(jnp.zeros((block_q,), jnp.float32), compat.row_layout())
      start_acc = compat.layout_cast(jnp.zeros((block_q, head_dim_v), jnp.float32),
                                     compat.wgmma_layout())  # [block_q, Hv]
      slot_of = lambda j: pipeline.slot_of(j - lo, stages)

      def dense_tile(j):
        """Key block j's (bias tile, mask visibility), each None without; called once
        its Q K^T wgmma is issued, so that the loads overlap the matmul. (The clamp keeps
        the prologue of a CTA that visits no block in bounds; it discards the tile.)"""
        args = (q_lo, block_q, jnp.minimum(j, s_pad // block_kv - 1) * block_kv, block_kv)
        return dense_tiles.bias_tile(*args), dense_tiles.visible(*args)

      def online_softmax(qk, j, row_max, row_sum, *, masked: bool, extra_visible=None,
                         active=None, dense_tile=(None, None)):
        """Scores of key block j -> (P [block_q, block_kv] in the input dtype, new row
        max, rescale of the old accumulator, new row sum). FlashAttention-2 section
        3.1.1, in base 2. `active`: see `features.read_ring_slot`."""
        bias, dense_visible = dense_tile
        s = units.max_units(qk, bias)  # [block_q, block_kv]
        visible = None
        if masked:
          read_segment_ids = lambda: (  # this block's key ids ride the K/V ring
              q_seg_rows, features.read_ring_slot(kv_seg_ring, seg_ready, seg_free,
                                                  slot_of(j), active))
          visible = rules.tile_visible(s.shape, q_lo=q_lo, k_lo=j * block_kv,
                                       read_segment_ids=read_segment_ids if segments else None)
        visible = masking.visible_and(masking.visible_and(visible, dense_visible),
                                      extra_visible)
        p, new_max, rescale, row_sum = units.step(s, visible, row_max, row_sum)
        if dropout is not None:  # the normalizer counts every key; dropout scales P only
          p = p * dropout.multiplier(drop_rows, p.shape, k_lo=j * block_kv)
        return p.astype(dtype), new_max, rescale, row_sum

      def rescaled(acc, rescale):
        return acc * lax.broadcast_in_dim(rescale, acc.shape, [0])

      def when_any(f):  # barrier traffic of a CTA that visits no key block is skipped
        pl.when(num_steps > 0)(f)

      def scores(slot, j, *, hand_over):
        """(Q K^T [block_q, block_kv], dense tile) for key block j in ring slot `slot`;
        `hand_over` runs once the wgmma is issued, before the wait."""
        def qk_matmul(s_ref):
          plgpu.wgmma(s_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
          hand_over()
          tile = dense_tile(j)
          return s_ref[...], tile
        return pl.run_scoped(qk_matmul, plgpu.ACC((block_q, block_kv), jnp.float32))

      def step(j, carry, *, masked: bool):
        """Sequential schedule: S(j), softmax(j), then O += P(j) V(j)."""
        acc, row_max, row_sum = carry
        slot = slot_of(j)

        qk, tile = scores(slot, j, hand_over=rendezvous)  # the other consumer may now issue
        plgpu.barrier_arrive(k_free.at[slot])  # reading the accumulator waited on wgmma
        p16, new_max, rescale, row_sum = online_softmax(qk, j, row_max, row_sum, masked=masked,
                                                        dense_tile=tile)
        acc = rescaled(acc, rescale)
        if max(head_dim, head_dim_v) <= 128:
          # Finish the softmax before handing the tensor cores over (FA3 section 3.2).
          acc, row_sum, new_max, p16 = lax.optimization_barrier((acc, row_sum, new_max, p16))
        plgpu.barrier_arrive(schedule)  # softmax done
        plgpu.barrier_wait(v_ready.at[slot])
        plgpu.barrier_wait(schedule)  # the other consumer issued its matmul

        def pv_matmul(acc_ref):
          plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
          # While it runs, wait for the next key block (intra-warpgroup overlap).
          @pl.when(j + 1 < hi)
          def _():
            plgpu.barrier_wait(k_ready.at[slot_of(j + 1)])

        acc = compat.accumulate(pv_matmul, acc)
        plgpu.barrier_arrive(v_free.at[slot])
        return acc, new_max, row_sum

      def sequential():
        when_any(lambda: plgpu.barrier_wait(k_ready.at[0]))
        pl.when(wg == 1)(rendezvous)  # consumer 1 starts half an iteration behind
        carry = (start_acc, start_max, start_sum)
        carry = lax.fori_loop(lo, f_lo, functools.partial(step, masked=True), carry)
        carry = lax.fori_loop(f_lo, f_hi, functools.partial(step, masked=False), carry)
        carry = lax.fori_loop(f_hi, hi, functools.partial(step, masked=True), carry)
        pl.when(wg == 0)(rendezvous)  # matches consumer 1's extra arrival at the start
        return carry

      # Overlapped schedule (FlashAttention-3 section 3.2, intra-warpgroup overlapping):
      # step j issues S(j) = Q K(j)^T and O += P(j-1) V(j-1) back to back, waits for
      # S(j) only, and runs softmax(j) while the PV matmul is still on the tensor
      # cores. The consumers take turns issuing (ping-pong): consumer w waits on
      # turn[w] before issuing and arrives on turn[1 - w] after.
      def take_turn():
        plgpu.barrier_wait(turn.at[wg])

      def pass_turn():
        plgpu.barrier_arrive(turn.at[1 - wg])

      def overlapped_step(j, carry, *, masked: bool):
        acc, row_max, row_sum, p16 = carry  # p16: P(j - 1)
        slot, prev = slot_of(j), slot_of(j - 1)
        # Loaded before the wgmmas are issued (inside run_state the loads' constant
        # indices do not lower); the registers are first read after S(j) arrives.
        tile = dense_tile(j)
        plgpu.barrier_wait(k_ready.at[slot])
        plgpu.barrier_wait(v_ready.at[prev])
        take_turn()

        def body(refs):
          s_ref, o_ref, p_ref, max_ref, sum_ref, rescale_ref = refs
          plgpu.wgmma(s_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
          plgpu.wgmma(o_ref, p_ref[...], v_smem.at[prev])
          pass_turn()
          # S(j) done; PV runs on. Masked blocks wait for both: their softmax needs more
          # registers than fit beside an accumulator in flight.
          qk = plgpu.wgmma_accumulator_load(s_ref, wait_n=0 if masked else 1)
          plgpu.barrier_arrive(k_free.at[slot])
          p_ref[...], max_ref[...], rescale_ref[...], sum_ref[...] = online_softmax(
              qk, j, max_ref[...], sum_ref[...], masked=masked, dense_tile=tile)

        s_init = compat.layout_cast(jnp.zeros((block_q, block_kv), jnp.float32),
                                    compat.wgmma_layout())
        _, acc, p16, row_max, row_sum, rescale = pl.run_state(body)(
            (plgpu.ACC.init(s_init), plgpu.ACC.init(acc), p16, row_max, row_sum, row_max))
        plgpu.barrier_arrive(v_free.at[prev])
        return rescaled(acc, rescale), row_max, row_sum, p16

      def overlapped():
        pl.when(wg == 1)(lambda: plgpu.barrier_arrive(turn.at[0]))  # consumer 0 issues first
        # Prologue: S(lo) and softmax(lo), masked. A CTA that visits no block still runs
        # it (and the epilogue) on whatever the ring holds, with every key hidden, so that
        # both consumers take the same turns; its output rows are zeroed at the end.
        when_any(lambda: plgpu.barrier_wait(k_ready.at[0]))
        take_turn()

        qk, tile = scores(0, lo, hand_over=pass_turn)
        when_any(lambda: plgpu.barrier_arrive(k_free.at[0]))
        any_block = compat.iota((block_q, block_kv), 1) < jnp.where(num_steps > 0, block_kv, 0)
        p16, first_max, _, first_sum = online_softmax(qk, lo, start_max, start_sum, masked=True,
                                                      extra_visible=any_block,
                                                      active=num_steps > 0, dense_tile=tile)
        carry = (start_acc, first_max, first_sum, p16)
        first = lo + 1
        masked_head_end, body_end = jnp.maximum(first, f_lo), jnp.maximum(first, f_hi)
        carry = lax.fori_loop(first, masked_head_end,
                              functools.partial(overlapped_step, masked=True), carry)
        carry = lax.fori_loop(masked_head_end, body_end,
                              functools.partial(overlapped_step, masked=False), carry)
        acc, last_max, last_sum, p16 = lax.fori_loop(
            body_end, hi, functools.partial(overlapped_step, masked=True), carry)
        # Epilogue: O += P(hi - 1) V(hi - 1).
        last = slot_of(jnp.maximum(hi - 1, lo))
        when_any(lambda: plgpu.barrier_wait(v_ready.at[last]))
        take_turn()

        def pv_matmul(acc_ref):
          plgpu.wgmma(acc_ref, p16, v_smem.at[last])
          pass_turn()

        acc = compat.accumulate(pv_matmul, acc)
        when_any(lambda: plgpu.barrier_arrive(v_free.at[last]))
        return acc, last_max, last_sum

      acc, row_max, row_sum = overlapped() if config.overlap_softmax else sequential()

      # A row that saw no key (row_sum == 0) gets output 0 and lse -inf.
      seen = row_sum > 0
      safe_sum = jnp.where(seen, row_sum, 1.0)
      inv_sum = jnp.where(seen, 1.0 / safe_sum, 0.0)
      # (where, not a product: an empty CTA's accumulator may hold junk, NaN included)
      out = jnp.where(lax.broadcast_in_dim(seen, acc.shape, [0]),
                      acc * lax.broadcast_in_dim(inv_sum, acc.shape, [0]), 0.0)
      out_smem[...] = out.astype(dtype)
      lse_smem = lse_smem2.at[wg]
      lse_smem[...] = jnp.where(seen, units.lse(row_max, safe_sum), -jnp.inf)
      if with_stats:
        max_smem2.at[wg][...] = row_max  # natural units
        sum_smem2.at[wg][...] = row_sum
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(out_smem, out_ref.at[batch, pl.ds(q_lo, block_q), head])
      plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[batch, head, pl.ds(q_lo, block_q)])
      if with_stats:
        for smem2, ref in ((max_smem2, max_ref), (sum_smem2, sum_ref)):
          plgpu.copy_smem_to_gmem(smem2.at[wg], ref.at[batch, head, pl.ds(q_lo, block_q)])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == NUM_COMPUTE_WGS)
    def _producer():
      streams = pipeline.kv_streams(
          k_ref, v_ref, feature_refs["kv_segment_ids"] if segments else None, batch=batch,
          kv_head=lax.div(head, jnp.int32(spec.group_size)), first_block=lo,
          block_kv=block_kv, k=(k_smem, k_ready, k_free), v=(v_smem, v_ready, v_free),
          ids=(kv_seg_ring, seg_ready, seg_free) if segments else None)
      pipeline.produce(streams, num_steps, stages)

  transforms = compat.smem_transforms(dtype)
  scratch = [
      plgpu.SMEM((NUM_COMPUTE_WGS, block_q, head_dim), dtype, transforms=transforms),
      plgpu.SMEM((stages, block_kv, head_dim), dtype, transforms=transforms),
      plgpu.SMEM((stages, block_kv, head_dim_v), dtype, transforms=transforms),
      plgpu.SMEM((NUM_COMPUTE_WGS, block_q), jnp.float32),
      plgpu.Barrier(num_arrivals=2 if segments else 1, num_barriers=NUM_COMPUTE_WGS),
      *pipeline.ring_barriers(stages, NUM_COMPUTE_WGS),  # K: ready, free
      *pipeline.ring_barriers(stages, NUM_COMPUTE_WGS),  # V: ready, free
      plgpu.Barrier(num_arrivals=NUM_COMPUTE_WGS),  # schedule (sequential ping-pong)
      plgpu.Barrier(num_barriers=NUM_COMPUTE_WGS),  # turn[w] (overlapped ping-pong)
  ]
  if own_out_tile:
    scratch.append(plgpu.SMEM((NUM_COMPUTE_WGS, block_q, head_dim_v), dtype,
                              transforms=transforms))
  if with_stats:
    scratch += [plgpu.SMEM((NUM_COMPUTE_WGS, block_q), jnp.float32)] * 2  # max, sum
  if segments:
    scratch += [plgpu.SMEM((NUM_COMPUTE_WGS, block_q), jnp.int32),
                plgpu.SMEM((stages, block_kv), jnp.int32),
                *pipeline.ring_barriers(stages, NUM_COMPUTE_WGS)]
  row_stats = jax.ShapeDtypeStruct((spec.batch, spec.num_q_heads, t_pad), jnp.float32)
  kernel.__name__ = "flash_jax_mosaic_gpu_fwd"
  out, lse, *stats = plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct(q.shape[:3] + (head_dim_v,), dtype), row_stats,
                *((row_stats, row_stats) if with_stats else ())),
      scratch_types=scratch,
      grid=(spec.num_q_heads, num_q_tiles, spec.batch),
      grid_names=("heads", "q_tiles", "batch"),
      num_threads=NUM_COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=compat.compiler_params(),
  )(q, k, v, *feature_arrays)
  rows = lambda x: x[:, :, :spec.q_len]
  return out[:, :spec.q_len], rows(lse), (tuple(map(rows, stats)) if with_stats else None)
