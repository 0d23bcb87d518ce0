"""Backward kernels for Hopper (sm90): dK/dV and dQ, deterministic (no atomics), or
dK/dV alone adding dQ up (unordered, `atomic_dq`).

FlashAttention-2 Algorithm 2 split into two passes that each own their output, as in
FlashAttention-3 section 3 (backward): probabilities are recomputed from the forward's
lse, P = exp(logits - lse), and with delta = rowsum(dO * O) - dlse:
    dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta),  dK = scale * dS^T Q,
    dQ = scale * dS K                     (softcap multiplies dS by 1 - tanh^2;
dropout's multiplier Z scales P in dV = (P Z)^T dO and dP in dS = P * (Z dP - delta)).
Both kernels use the forward's layout: a producer warpgroup streams blocks through a
TMA ring (`pipeline`), two consumer warpgroups (one above head dim 128, for shared
memory) each own 64 rows of the output and issue wgmma with float32 accumulators in
registers; each step issues its independent wgmmas in one scope (S with dP, then dV
with dK) so it waits on the tensor cores twice, not four times.
  * dK/dV: a CTA owns 2 x 64 key rows of one (batch, query head) and streams the
    query blocks that see them (Q, dO, lse, delta: one stream, one barrier pair per
    slot). With GQA each query head writes its own dK/dV, summed over the group
    afterwards in float32.
  * dQ: a CTA owns 2 x 64 query rows and streams the visible key blocks (K, V).
  * Unordered (`fuses_dq`): no dQ kernel; each dK/dV step also adds its dS K into a
    float32 dQ in global memory with a TMA reduce-add (5 matmuls per tile pair, not 7).
Blocks outside the visible range of the CTA's batch row (q_offset, lengths: see
`features`) are skipped by loop bounds; fully visible blocks run without mask
arithmetic. With segment ids every visited block is masked; the ids of the resident
rows are copied beside them, those of the streamed blocks ride the ring.
Statistics are in base 2 (natural units with a bias), as in the forward. Bias and dense
mask tiles: see `dense`; with a bias the dQ kernel also writes dS = d loss / d logits.
Where one warpgroup cannot hold both float32 accumulators, 64 x H of dK and 64 x Hv of
dV (H + Hv > 256), dK and dV run as two launches of the same kernel (`dkv_launches`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from flash_jax import masking, tiles, vmapping
from flash_jax.spec import AttentionSpec
from flash_jax.kernels.mosaic_gpu import compat, dense, features, pipeline, ranges
from flash_jax.kernels.mosaic_gpu.config import NUM_COMPUTE_WGS, MosaicGPUBlockSizes

LOG2E = math.log2(math.e)


def _kernel_logits(qk, spec: AttentionSpec, bias=None):
  """float32 q.k^T (and its bias tile) -> (logits in the kernels' units: natural with a
  bias, base 2 otherwise, as in the forward; softcap derivative or None)."""
  if spec.softcap is None and bias is None:
    return masking.transform_logits(qk, scale=spec.scale * LOG2E), None
  logits = masking.transform_logits(qk, scale=spec.scale, bias=bias, softcap=spec.softcap)
  return (logits if spec.has_bias else logits * LOG2E), masking.softcap_grad(logits, spec.softcap)


def _probabilities(s, lse, spec: AttentionSpec):
  """P = 2 ** (s - lse) in base 2, from logits and lse in the kernels' units (with a bias
  the difference comes first: see the forward's `exp2_minus`)."""
  if spec.has_bias:
    return jnp.exp2((s - lse) * LOG2E)
  return jnp.exp2(s - lse)


def consumer_warpgroups(spec: AttentionSpec) -> int:
  """Consumers per CTA: two, except at head dims above 128 (H or Hv), where the shared
  memory of two consumers' resident tiles (K and V, or Q and dO) plus a 2-slot ring
  exceeds 227 KiB."""
  return 1 if max(spec.head_dim, spec.head_dim_v) > 128 else NUM_COMPUTE_WGS


def dkv_launches(spec: AttentionSpec) -> tuple[tuple[str, ...], ...]:
  """The dK/dV kernel's launches, each with the outputs it accumulates: one launch for
  both where one warpgroup holds both float32 accumulators, 64 x H and 64 x Hv (H + Hv
  <= 256), two launches otherwise."""
  return ((("dk", "dv"),) if spec.head_dim + spec.head_dim_v <= 256
          else (("dk",), ("dv",)))


def backward(q, k, v, bias, lse, dout, delta, arrays, spec: AttentionSpec,
             config: MosaicGPUBlockSizes, stats=None):
  """q [B, T, Nq, H], k [B, S, Nkv, H], v [B, S, Nkv, Hv], dout [B, T, Nq, Hv] -> dq, dk,
  dv of the inputs' shapes and dtype, and d loss / d logits [B, Nq, T, S] float32 where
  the bias wants its gradient (`spec.computes_dbias`; None otherwise); stats: the
  forward's (natural max, log2 sum) or None."""
  operands, t_pad, s_pad = kernel_operands(q, k, v, lse, dout, delta, arrays, spec, config,
                                           stats=stats)
  dense_args = dict(bias=bias, mask=arrays.mask)
  fused = fuses_dq(spec, config)
  grads = {}
  for outputs in dkv_launches(spec):
    adds_dq = fused and "dk" in outputs  # the launch that computes dS
    results = _dkv(*operands, spec=spec, config=config, s_pad=s_pad, outputs=outputs,
                   adds_dq=adds_dq, **dense_args)
    grads.update(zip(outputs + (("dq",) if adds_dq else ()), results))
  dk, dv = grads["dk"], grads["dv"]
  if fused:  # dS K summed over key blocks in float32
    dq, dlogits = (grads["dq"] * spec.scale).astype(q.dtype), None
  else:
    dq, dlogits = _dq(*operands, spec=spec, config=config, t_pad=t_pad, **dense_args)
  if dlogits is not None:
    dlogits = dlogits[:, :, :spec.q_len, :spec.kv_len]
  if spec.group_size > 1:  # [B, S, Nq, H] -> [B, S, Nkv, H]: sum each group in float32
    group = lambda x: x.reshape(spec.batch, s_pad, spec.num_kv_heads, spec.group_size,
                                x.shape[-1]).astype(jnp.float32).sum(axis=3).astype(k.dtype)
    dk, dv = group(dk), group(dv)
  return dq[:, :spec.q_len], dk[:, :spec.kv_len], dv[:, :spec.kv_len], dlogits


def fuses_dq(spec: AttentionSpec, config: MosaicGPUBlockSizes) -> bool:
  """Whether the dK/dV kernel also adds up dQ (`_dkv(adds_dq=True)`): where the config
  asks for it, the call allows an unordered sum (`spec.allows_atomic_dq`), and one
  consumer's registers hold dQ's rows beside dK and dV (head dims up to 128; at 256 the
  dK launch alone fills them)."""
  return (bool(config.atomic_dq) and spec.allows_atomic_dq
          and max(spec.head_dim, spec.head_dim_v) <= 128)


def kernel_operands(q, k, v, lse, dout, delta, arrays, spec: AttentionSpec,
                    config: MosaicGPUBlockSizes, stats=None):
  """The dK/dV and dQ kernels' operands (q, k, v, dout, lse2, delta, feature names,
  feature arrays), padded, with t_pad and s_pad. (Also used by the per-kernel timing in
  benchmarks/mosaic_gpu.py.)

  With the forward's stats (m, log2 l), P = 2^(s - m) / l is computed exactly where
  lse = m + log l would round log l away (a row of -1e9 biases): the kernels take m in
  place of lse and dO / l, delta / l in place of dO, delta, which gives P' = P l,
  dV = P'^T (dO / l) = P^T dO, dS = P' (dP / l - delta / l) = P (dP - delta).
  """
  wgs = consumer_warpgroups(spec)
  rows_dkv, rows_dq = wgs * config.block_kv_dkv, wgs * config.block_q_dq
  t_pad = tiles.round_up(spec.q_len, math.lcm(rows_dq, config.block_q_dkv))
  s_pad = tiles.round_up(spec.kv_len, math.lcm(rows_dkv, config.block_kv_dq))
  # Padded query rows have dO = 0 and delta = 0, so they add nothing; padded keys are
  # hidden (kv_bound). Rows that saw no key have lse = -inf: base 0 keeps exp2 finite,
  # and the mask zeroes their P (every key they could pair with is masked).
  if stats is None:  # in the kernels' units (`_kernel_logits`)
    lse_units = lse if spec.has_bias else lse * LOG2E
    lse2 = jnp.where(jnp.isfinite(lse), lse_units, 0.0).astype(jnp.float32)
  else:
    lse2, log_sum2 = stats  # natural max, log2 sum [B, Nq, T]; (0, 0) on rows that saw nothing
    inv_sum = jnp.exp2(-log_sum2.astype(jnp.float32))
    dout = (dout * jnp.swapaxes(inv_sum, 1, 2)[..., None]).astype(dout.dtype)
    delta = delta * inv_sum
  q, dout = tiles.pad_axis(q, 1, t_pad), tiles.pad_axis(dout, 1, t_pad)  # [B, T_pad, Nq, H|Hv]
  k, v = tiles.pad_axis(k, 1, s_pad), tiles.pad_axis(v, 1, s_pad)  # [B, S_pad, Nkv, H|Hv]
  lse2 = tiles.pad_axis(lse2, 2, t_pad)  # [B, Nq, T_pad], the kernels' units
  delta = tiles.pad_axis(delta.astype(jnp.float32), 2, t_pad)  # [B, Nq, T_pad]
  names, feature_arrays = features.inputs(arrays, spec, t_pad=t_pad, s_pad=s_pad)
  return (q, k, v, dout, lse2, delta, names, feature_arrays), t_pad, s_pad


def _dkv(q, k, v, dout, lse2, delta, feature_names, feature_arrays, *, spec: AttentionSpec,
         config: MosaicGPUBlockSizes, s_pad: int, outputs: tuple[str, ...], bias=None,
         mask=None, adds_dq: bool = False, pairs_dq: bool | None = None):
  """dK [B, S_pad, Nq, H] and/or dV [B, S_pad, Nq, Hv] per query head; adds_dq (with
  dK): and dS K summed over key blocks, float32 [B, T_pad, Nq, H] (dQ before the scale).

  With adds_dq each step adds its query block's dS K [block_q, H] into that float32 sum
  in global memory with a TMA reduce-add, in no fixed order (FlashAttention-2 Algorithm
  2 line 21; FlashAttention-3 section 3.1's dQ accumulation), so no dQ kernel runs."""
  block_kv, block_q, stages = config.block_kv_dkv, config.block_q_dkv, config.num_stages_dkv
  wgs = consumer_warpgroups(spec)
  rows_per_cta = wgs * block_kv
  num_kv_tiles = s_pad // rows_per_cta
  head_dim, head_dim_v, dtype = spec.head_dim, spec.head_dim_v, q.dtype
  dims = {"dk": head_dim, "dv": head_dim_v}
  need_dk, need_dv = "dk" in outputs, "dv" in outputs
  segments = spec.has_segment_ids
  kv_bound = spec.kv_len if s_pad > spec.kv_len else None
  ping_pong = config.dkv_ping_pong and wgs == 2
  # The unordered backward of a call that masks no block: each CTA walks the query
  # blocks from its own offset, so that the CTAs of one head that run side by side do
  # not add into the same dQ rows at once (reduce-adds to one address serialize in L2).
  # Causal calls' walks start apart already.
  staggered = adds_dq and not (spec.has_structured_mask or spec.has_mask
                               or kv_bound is not None)
  # dQ's matmul in the update's scope (one wgmma wait a step) where its accumulator fits
  # beside dK's and dV's. At d128 the three take 192 registers a thread, and the kernel
  # ran 9% (full) and 32% (causal) slower than with dQ's matmul in a scope of its own
  # (H200, d128 s16384, 2026-12-01).
  # The two consumers' dQ rows of a step are summed in shared memory before one
  # reduce-add (FlashAttention-3 sums dQ over a CTA's keys too): consumer 0 leaves its
  # rows in its stage, consumer 1 starts its dS K from them and adds the sum. This halves
  # the reduce-add traffic, without a barrier that holds consumer 0 back: it waits only
  # for consumer 1 to have read its last rows.
  pairs_dq = adds_dq and wgs == 2 if pairs_dq is None else pairs_dq
  dq_in_update = adds_dq and head_dim <= 64 and not pairs_dq
  dense_names, dense_arrays = dense.inputs(bias, mask, spec, t_pad=q.shape[1], s_pad=s_pad,
                                           rows_per_cta=rows_per_cta, block_cols=block_q,
                                           transposed=True)
  feature_names, feature_arrays = feature_names + dense_names, feature_arrays + dense_arrays

  def kernel(*refs):
    tensors, feature_refs, refs = features.split_refs(refs, feature_names, 6)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = tensors
    if adds_dq:
      dq_ref, *refs = refs  # the operand ref after the feature arrays
    out_refs, refs = refs[:len(outputs)], refs[len(outputs):]
    kv_smem2, v_smem2, q_ring, do_ring, lse_ring, delta_ring, kv_ready, *barriers = refs
    if adds_dq:
      ds_smem2, dq_stage2, *barriers = barriers
    if pairs_dq:
      dq_ready, dq_free, *barriers = barriers
    if segments:
      kv_seg_smem2, q_seg_ring, *barriers = barriers
    if ping_pong:
      *barriers, schedule = barriers
      rendezvous = functools.partial(pipeline.rendezvous, schedule)
    batch, head = lax.axis_index("batch"), lax.axis_index("heads")
    rules = features.BatchRules.read(spec, feature_refs, batch, kv_bound=kv_bound)
    dropout = features.Dropout.read(spec, feature_refs, batch, head)
    dense_tiles = dense.DenseTiles.read(spec, feature_refs, batch, head, transposed=True)
    wg = lax.axis_index("wg")
    kv_head = lax.div(head, jnp.int32(spec.group_size))
    cta_k_lo = lax.axis_index("kv_tiles") * rows_per_cta
    q_lo_blk, q_hi_blk = ranges.visited_q_blocks(
        cta_k_lo, cta_k_lo + rows_per_cta, block_q=block_q, q_len=spec.q_len,
        kv_len=spec.kv_len, **rules.positional)
    q_lo_blk, q_hi_blk = dense_tiles.block_range(lax.axis_index("kv_tiles"), q_lo_blk,
                                                 q_hi_blk)
    num_steps = q_hi_blk - q_lo_blk
    if staggered:  # step -> query block: this CTA's walk starts at its own offset
      offset = lax.div(lax.axis_index("kv_tiles") * num_steps, jnp.int32(num_kv_tiles))
      block_of = lambda step: q_lo_blk + lax.rem(step + offset, jnp.maximum(num_steps, 1))
    else:
      block_of = lambda step: q_lo_blk + step
    rows_of = lambda step: pl.ds(block_of(step) * block_q, block_q)
    rings = (q_ring, do_ring, lse_ring, delta_ring)
    sources = (
        lambda step: q_ref.at[batch, rows_of(step), head],
        lambda step: do_ref.at[batch, rows_of(step), head],
        lambda step: lse_ref.at[batch, head, rows_of(step)],
        lambda step: delta_ref.at[batch, head, rows_of(step)],
    )
    if segments:
      q_ids_ref = feature_refs["q_segment_ids"]
      rings += (q_seg_ring,)
      sources += (lambda step: q_ids_ref.at[batch, rows_of(step)],)
    # One stream: a step's operands are read and released together, so one barrier pair
    # serves them all (a wait and an arrival per step, not one per operand).
    streams = (pipeline.Stream(sources, rings, *barriers),)

    @pl.when(wg < wgs)
    def _consumer():
      plgpu.set_max_registers(pipeline.CONSUMER_REGISTERS, action="increase")
      k_lo = cta_k_lo + wg * block_kv
      k_smem, v_smem = kv_smem2.at[wg], v_smem2.at[wg]  # [block_kv, H], [block_kv, Hv]
      rows = (batch, pl.ds(k_lo, block_kv), kv_head)
      plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem, kv_ready.at[wg])
      plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem, kv_ready.at[wg])
      if segments:
        plgpu.copy_gmem_to_smem(feature_refs["kv_segment_ids"].at[batch, pl.ds(k_lo, block_kv)],
                                kv_seg_smem2.at[wg], kv_ready.at[wg])
      plgpu.barrier_wait(kv_ready.at[wg])
      if segments:
        kv_seg_rows = compat.load(kv_seg_smem2.at[wg], compat.row_layout())  # [block_kv]
      if segments or dense_tiles.has_mask:  # not positional: every visited block is masked
        f_lo = f_hi = q_hi_blk
      else:
        f_lo, f_hi = ranges.unmasked_q_blocks(k_lo, k_lo + block_kv, q_lo_blk, q_hi_blk,
                                              block_q=block_q, kv_len=spec.kv_len,
                                              **rules.positional)
      zeros = lambda name: compat.layout_cast(jnp.zeros((block_kv, dims[name]), jnp.float32),
                                              compat.wgmma_layout())
      if adds_dq:
        ds_smem, dq_stage = ds_smem2.at[wg], dq_stage2.at[wg]  # [block_kv, block_q], [block_q, H]
        zeros_dq = lambda: compat.layout_cast(jnp.zeros((block_q, head_dim), jnp.float32),
                                              compat.wgmma_layout())

      def step(n, carry, *, masked: bool):  # the CTA's n-th step: query block i
        i, slot = block_of(n), pipeline.slot_of(n, stages)
        for stream in streams:
          plgpu.barrier_wait(stream.ready.at[slot])
        q_smem, do_smem = q_ring.at[slot], do_ring.at[slot]  # [block_q, H], [block_q, Hv]

        def scores(refs):  # S^T = K Q^T and dP^T = V dO^T [block_kv, block_q]: one wait
          plgpu.wgmma(refs[0], k_smem, q_smem.transpose((1, 0)))
          if need_dk:
            plgpu.wgmma(refs[1], v_smem, do_smem.transpose((1, 0)))
          if ping_pong:  # issued: the other consumer may now issue its update
            rendezvous()
          tile_args = (k_lo, block_kv, i * block_q, block_q)  # loads overlap the wgmma
          dense_tile = dense_tiles.bias_tile(*tile_args), dense_tiles.visible(*tile_args)
          return tuple(ref[...] for ref in refs), dense_tile

        tile = plgpu.ACC((block_kv, block_q), jnp.float32)
        (st, *dpt), (bias_t, dense_visible_t) = pl.run_scoped(
            scores, (tile, tile) if need_dk else (tile,))
        st, softcap_grad = _kernel_logits(st, spec, bias_t)
        lse_cols = compat.load(lse_ring.at[slot], compat.col_layout())  # [block_q]
        pt = _probabilities(st, lax.broadcast_in_dim(lse_cols, st.shape, [1]), spec)
        if masked:
          read_segment_ids = lambda: (  # this block's query ids ([block_q]) ride its ring
              compat.load(q_seg_ring.at[slot], compat.col_layout()), kv_seg_rows)
          visible = rules.tile_visible(pt.shape, q_lo=i * block_q, k_lo=k_lo, q_axis=1,
                                       read_segment_ids=read_segment_ids if segments else None)
          visible = masking.visible_and(visible, dense_visible_t)
          pt = pt if visible is None else jnp.where(visible, pt, 0.0)
        # Dropout: dV += (P Z)^T dO and dP^T = Z (V dO^T), Z = keep / (1 - rate).
        zt = (None if dropout is None else dropout.multiplier(
            dropout.row_hashes(i * block_q, block_q, q_axis=1), pt.shape, k_lo=k_lo, q_axis=1))
        operands = {}  # output -> (A in registers, B in shared memory) of its wgmma
        if need_dv:
          kept_pt = pt if zt is None else pt * zt
          operands["dv"] = (kept_pt.astype(dtype), do_smem)  # dV += P^T dO
        if need_dk:
          delta_cols = compat.load(delta_ring.at[slot], compat.col_layout())
          dp_t = dpt[0] if zt is None else dpt[0] * zt
          dst = pt * (dp_t - lax.broadcast_in_dim(delta_cols, pt.shape, [1]))
          if softcap_grad is not None:
            dst = dst * softcap_grad
          operands["dk"] = (dst.astype(dtype), q_smem)  # dK += dS^T Q (scaled at the end)
        if ping_pong:
          # Finish the elementwise step before handing the tensor cores over, then wait
          # until the other consumer has issued its scores (the forward's schedule).
          a_tiles = lax.optimization_barrier(tuple(a for a, _ in operands.values()))
          operands = {name: (a, b) for (name, (_, b)), a in zip(operands.items(), a_tiles)}
          plgpu.barrier_arrive(schedule)
          plgpu.barrier_wait(schedule)

        if adds_dq:  # dS^T to shared memory: the A operand (read transposed) of dS K
          ds_smem[...] = operands["dk"][0]
          plgpu.commit_smem()
          dq_matmul = lambda ref: plgpu.wgmma(ref, ds_smem.transpose((1, 0)), k_smem)

        def update(refs):  # all accumulations in one scope: one wgmma wait
          for ref, name in zip(refs, outputs):
            plgpu.wgmma(ref, *operands[name])
          if dq_in_update:  # this query block's dQ rows: dS K [block_q, H]
            dq_matmul(refs[-1])

        accs = compat.accumulate_all(
            update, [carry[n] for n in outputs] + ([zeros_dq()] if dq_in_update else []))
        carry = dict(zip(outputs, accs))
        def add_dq(dq_part):  # stage the rows, add them to the float32 dQ in global memory
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last step's add read the stage
          dq_stage[...] = dq_part
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(dq_stage, dq_ref.at[batch, pl.ds(i * block_q, block_q), head],
                                  reduction_op="add")

        if pairs_dq:
          @pl.when(wg == 0)
          def _hand_over():  # its rows [block_q, H] to consumer 1, through its stage
            dq_part = compat.accumulate(dq_matmul, zeros_dq())
            if pairs_dq != "nowait":
              plgpu.barrier_wait(dq_free)
            dq_stage[...] = dq_part
            if pairs_dq != "nowait":
              plgpu.barrier_arrive(dq_ready)

          @pl.when(wg == 1)
          def _add_both():
            if pairs_dq != "nowait":
              plgpu.barrier_wait(dq_ready)
            partner = (zeros_dq() if pairs_dq == "noload"
                       else compat.load(dq_stage2.at[0], compat.wgmma_layout()))
            if pairs_dq != "nowait":
              plgpu.barrier_arrive(dq_free)
            add_dq(compat.accumulate(dq_matmul, partner))
        elif adds_dq:
          add_dq(accs[-1] if dq_in_update else compat.accumulate(dq_matmul, zeros_dq()))
        pipeline.release(streams, slot)
        return carry

      carry = {name: zeros(name) for name in outputs}
      if pairs_dq and pairs_dq != "nowait":  # consumer 0's stage starts free
        pl.when(wg == 1)(lambda: plgpu.barrier_arrive(dq_free))
      if ping_pong:
        pl.when(wg == 1)(rendezvous)  # consumer 1 starts half a step behind
      # Steps over the masked blocks below f_lo, the unmasked ones, the masked ones above
      # (a staggered walk masks nothing: f_lo = q_lo_blk, f_hi = q_hi_blk).
      f_lo, f_hi = f_lo - q_lo_blk, f_hi - q_lo_blk
      carry = lax.fori_loop(0, f_lo, functools.partial(step, masked=True), carry)
      carry = lax.fori_loop(f_lo, f_hi, functools.partial(step, masked=False), carry)
      carry = lax.fori_loop(f_hi, num_steps, functools.partial(step, masked=True), carry)
      if ping_pong:
        pl.when(wg == 0)(rendezvous)  # matches consumer 1's extra arrival at the start
      staging = {"dk": k_smem, "dv": v_smem}
      for name, out_ref in zip(outputs, out_refs):
        result = carry[name] * spec.scale if name == "dk" else carry[name]
        staging[name][...] = result.astype(dtype)
      plgpu.commit_smem()
      for name, out_ref in zip(outputs, out_refs):
        plgpu.copy_smem_to_gmem(staging[name], out_ref.at[batch, pl.ds(k_lo, block_kv), head])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == wgs)
    def _producer():
      pipeline.produce(streams, num_steps, stages)

  transforms = compat.smem_transforms(dtype)
  scratch = [
      plgpu.SMEM((wgs, block_kv, head_dim), dtype, transforms=transforms),
      plgpu.SMEM((wgs, block_kv, head_dim_v), dtype, transforms=transforms),
      plgpu.SMEM((stages, block_q, head_dim), dtype, transforms=transforms),
      plgpu.SMEM((stages, block_q, head_dim_v), dtype, transforms=transforms),
      plgpu.SMEM((stages, block_q), jnp.float32),
      plgpu.SMEM((stages, block_q), jnp.float32),
      plgpu.Barrier(num_arrivals=3 if segments else 2, num_barriers=wgs),  # K, V (ids) rows
  ]
  if adds_dq:  # each consumer's dS^T (bf16) and dQ rows (float32) on their way out
    scratch += [plgpu.SMEM((wgs, block_kv, block_q), dtype, transforms=transforms),
                plgpu.SMEM((wgs, block_q, head_dim), jnp.float32,
                           transforms=compat.smem_transforms(jnp.float32))]
  if pairs_dq:  # consumer 0's dQ rows: ready for consumer 1; read by it
    scratch += [plgpu.Barrier(num_arrivals=1), plgpu.Barrier(num_arrivals=1)]
  if segments:
    scratch += [plgpu.SMEM((wgs, block_kv), jnp.int32), plgpu.SMEM((stages, block_q), jnp.int32)]
  scratch += pipeline.ring_barriers(stages, wgs, num_operands=5 if segments else 4)
  if ping_pong:
    scratch.append(plgpu.Barrier(num_arrivals=2))  # schedule
  kernel.__name__ = "flash_jax_mosaic_gpu_bwd_" + "".join(outputs) + ("_dq" if adds_dq else "")
  out_type = tuple(jax.ShapeDtypeStruct((spec.batch, s_pad, spec.num_q_heads, dims[name]), dtype)
                   for name in outputs)
  if adds_dq:
    return _launch_adding_dq(kernel, out_type=out_type, scratch=scratch, spec=spec,
                             num_kv_tiles=num_kv_tiles, wgs=wgs)(
        q, k, v, dout, lse2, delta, *feature_arrays)
  return plgpu.kernel(
      kernel, out_type=out_type, scratch_types=scratch,
      grid=(spec.num_q_heads, num_kv_tiles, spec.batch),
      grid_names=("heads", "kv_tiles", "batch"),
      num_threads=wgs + 1, thread_name="wg",
      compiler_params=compat.compiler_params(),
  )(q, k, v, dout, lse2, delta, *feature_arrays)


def _launch_adding_dq(kernel, *, out_type, scratch, spec: AttentionSpec, num_kv_tiles: int,
                      wgs: int):
  """The dK/dV launch whose kernel adds into a float32 dQ sum: operands -> its outputs
  and that sum [B, T_pad, Nq, H]. The kernel writes the sum in place, a ref that starts
  at zero (its last operand), inside `pl.run_state`, so that no ref outlives this call
  (refs cannot cross the custom_jvp that guards the backward against differentiation).
  Under vmap, one launch per element: Pallas batches a kernel that writes a ref only at
  size 1."""
  launch = compat.kernel_on_refs(
      kernel, out_type=out_type, scratch_types=scratch,
      grid=(spec.num_q_heads, num_kv_tiles, spec.batch),
      grid_names=("heads", "kv_tiles", "batch"), num_threads=wgs + 1, thread_name="wg",
      name=kernel.__name__)

  @vmapping.map_when_vmapped
  def run(*operands):
    q = operands[0]  # [B, T_pad, Nq, H]

    def body(refs):  # the kernel's outputs leave through refs too, overwritten whole
      dq_sum, *out_refs = refs
      for ref, value in zip(out_refs, launch(*operands, dq_sum)):
        ref[...] = value

    initial = (jnp.zeros(q.shape, jnp.float32),) + tuple(
        jnp.zeros(o.shape, o.dtype) for o in out_type)  # the outputs' are dead: DCE
    dq_sum, *outputs = pl.run_state(body)(initial)
    return (*outputs, dq_sum)

  return run


def _dq(q, k, v, dout, lse2, delta, feature_names, feature_arrays, *, spec: AttentionSpec,
        config: MosaicGPUBlockSizes, t_pad: int, bias=None, mask=None):
  """dQ [B, T_pad, Nq, H] and, where `spec.computes_dbias`, dS = d loss / d logits
  [B, Nq, T_pad, S_pad] float32 (entries of blocks no CTA visits are left unwritten;
  None otherwise)."""
  block_q, block_kv, stages = config.block_q_dq, config.block_kv_dq, config.num_stages_dq
  wgs = consumer_warpgroups(spec)
  rows_per_cta = wgs * block_q
  num_q_tiles = t_pad // rows_per_cta
  head_dim, head_dim_v, dtype = spec.head_dim, spec.head_dim_v, q.dtype
  s_pad = k.shape[1]
  kv_bound = spec.kv_len if s_pad > spec.kv_len else None
  segments = spec.has_segment_ids
  dense_names, dense_arrays = dense.inputs(bias, mask, spec, t_pad=t_pad, s_pad=s_pad,
                                           rows_per_cta=rows_per_cta, block_cols=block_kv)
  feature_names, feature_arrays = feature_names + dense_names, feature_arrays + dense_arrays

  def kernel(*refs):
    tensors, feature_refs, refs = features.split_refs(refs, feature_names, 6)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = tensors
    dq_ref, *refs = refs
    if spec.computes_dbias:
      ds_ref, *refs = refs
    (q_smem2, do_smem2, lse_smem2, delta_smem2, k_ring, v_ring, rows_ready, k_ready,
     k_free, v_ready, v_free, *segment_scratch) = refs
    if segments:
      q_seg_smem2, kv_seg_ring, seg_ready, seg_free = segment_scratch
    batch, head = lax.axis_index("batch"), lax.axis_index("heads")
    rules = features.BatchRules.read(spec, feature_refs, batch, kv_bound=kv_bound)
    dropout = features.Dropout.read(spec, feature_refs, batch, head)
    dense_tiles = dense.DenseTiles.read(spec, feature_refs, batch, head)
    wg = lax.axis_index("wg")
    kv_head = lax.div(head, jnp.int32(spec.group_size))
    tile = (num_q_tiles - 1) - lax.axis_index("q_tiles")  # longest causal tiles first
    cta_q_lo = tile * rows_per_cta
    lo, hi = ranges.visited_kv_blocks(
        cta_q_lo, jnp.minimum(cta_q_lo + rows_per_cta, spec.q_len), block_kv=block_kv,
        kv_len=spec.kv_len, **rules.positional)
    lo, hi = dense_tiles.block_range(tile, lo, hi)
    num_steps = hi - lo
    streams = pipeline.kv_streams(
        k_ref, v_ref, feature_refs["kv_segment_ids"] if segments else None, batch=batch,
        kv_head=kv_head, first_block=lo, block_kv=block_kv, k=(k_ring, k_ready, k_free),
        v=(v_ring, v_ready, v_free), ids=(kv_seg_ring, seg_ready, seg_free) if segments else None)

    @pl.when(wg < wgs)
    def _consumer():
      plgpu.set_max_registers(pipeline.CONSUMER_REGISTERS, action="increase")
      q_lo = cta_q_lo + wg * block_q
      q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]  # [block_q, H], [block_q, Hv]
      rows = (batch, pl.ds(q_lo, block_q), head)
      plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem, rows_ready.at[wg])
      plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem, rows_ready.at[wg])
      plgpu.copy_gmem_to_smem(lse_ref.at[batch, head, pl.ds(q_lo, block_q)], lse_smem2.at[wg],
                              rows_ready.at[wg])
      plgpu.copy_gmem_to_smem(delta_ref.at[batch, head, pl.ds(q_lo, block_q)],
                              delta_smem2.at[wg], rows_ready.at[wg])
      if segments:
        plgpu.copy_gmem_to_smem(feature_refs["q_segment_ids"].at[batch, pl.ds(q_lo, block_q)],
                                q_seg_smem2.at[wg], rows_ready.at[wg])
      plgpu.barrier_wait(rows_ready.at[wg])
      lse_rows = compat.load(lse_smem2.at[wg], compat.row_layout())  # [block_q]
      drop_rows = None if dropout is None else dropout.row_hashes(q_lo, block_q)
      delta_rows = compat.load(delta_smem2.at[wg], compat.row_layout())
      if segments:
        q_seg_rows = compat.load(q_seg_smem2.at[wg], compat.row_layout())
      if segments or dense_tiles.has_mask:  # not positional: every visited block is masked
        f_lo = f_hi = hi
      else:
        f_lo, f_hi = ranges.unmasked_kv_blocks(q_lo, q_lo + block_q, lo, hi,
                                               block_kv=block_kv, kv_len=spec.kv_len,
                                               **rules.positional)

      def step(j, dq_acc, *, masked: bool):
        slot = pipeline.slot_of(j - lo, stages)
        plgpu.barrier_wait(k_ready.at[slot])
        plgpu.barrier_wait(v_ready.at[slot])
        k_smem, v_smem = k_ring.at[slot], v_ring.at[slot]  # [block_kv, H], [block_kv, Hv]

        tile_args = (q_lo, block_q, j * block_kv, block_kv)

        def s_and_dp(refs):  # S = Q K^T and dP = dO V^T in one scope: one wgmma wait
          s_ref, dp_ref = refs
          plgpu.wgmma(s_ref, q_smem, k_smem.transpose((1, 0)))
          plgpu.wgmma(dp_ref, do_smem, v_smem.transpose((1, 0)))
          dense_tile = dense_tiles.bias_tile(*tile_args), dense_tiles.visible(*tile_args)
          return s_ref[...], dp_ref[...], dense_tile  # (the loads overlap the wgmma)

        s, dp, (bias, dense_visible) = pl.run_scoped(
            s_and_dp, (plgpu.ACC((block_q, block_kv), jnp.float32),
                       plgpu.ACC((block_q, block_kv), jnp.float32)))
        plgpu.barrier_arrive(v_free.at[slot])
        s, softcap_grad = _kernel_logits(s, spec, bias)
        p = _probabilities(s, lax.broadcast_in_dim(lse_rows, s.shape, [0]), spec)
        if masked:
          read_segment_ids = lambda: (  # this block's key ids ride the K/V ring
              q_seg_rows, features.read_ring_slot(kv_seg_ring, seg_ready, seg_free, slot))
          visible = rules.tile_visible(p.shape, q_lo=q_lo, k_lo=j * block_kv,
                                       read_segment_ids=read_segment_ids if segments else None)
          visible = masking.visible_and(visible, dense_visible)
          p = p if visible is None else jnp.where(visible, p, 0.0)
        if dropout is not None:  # dP = Z (dO V^T)
          dp = dp * dropout.multiplier(drop_rows, dp.shape, k_lo=j * block_kv)
        ds = p * (dp - lax.broadcast_in_dim(delta_rows, dp.shape, [0]))
        if softcap_grad is not None:
          ds = ds * softcap_grad
        if spec.computes_dbias:  # d loss / d bias, before the bias-floor rule (applied outside)
          compat.store_tile(ds_ref.at[batch, head, pl.ds(q_lo, block_q),
                                      pl.ds(j * block_kv, block_kv)], ds)
        dq_acc = compat.accumulate(
            lambda acc_ref: plgpu.wgmma(acc_ref, ds.astype(dtype), k_smem), dq_acc)
        plgpu.barrier_arrive(k_free.at[slot])
        return dq_acc

      dq_acc = compat.layout_cast(jnp.zeros((block_q, head_dim), jnp.float32),
                                  compat.wgmma_layout())
      dq_acc = lax.fori_loop(lo, f_lo, functools.partial(step, masked=True), dq_acc)
      dq_acc = lax.fori_loop(f_lo, f_hi, functools.partial(step, masked=False), dq_acc)
      dq_acc = lax.fori_loop(f_hi, hi, functools.partial(step, masked=True), dq_acc)
      q_smem[...] = (dq_acc * spec.scale).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[rows])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == wgs)
    def _producer():
      pipeline.produce(streams, num_steps, stages)

  transforms = compat.smem_transforms(dtype)
  scratch = [
      plgpu.SMEM((wgs, block_q, head_dim), dtype, transforms=transforms),
      plgpu.SMEM((wgs, block_q, head_dim_v), dtype, transforms=transforms),
      plgpu.SMEM((wgs, block_q), jnp.float32),
      plgpu.SMEM((wgs, block_q), jnp.float32),
      plgpu.SMEM((stages, block_kv, head_dim), dtype, transforms=transforms),
      plgpu.SMEM((stages, block_kv, head_dim_v), dtype, transforms=transforms),
      plgpu.Barrier(num_arrivals=5 if segments else 4, num_barriers=wgs),  # Q, dO, lse, delta (ids)
      *pipeline.ring_barriers(stages, wgs),
      *pipeline.ring_barriers(stages, wgs),
  ]
  if segments:
    scratch += [plgpu.SMEM((wgs, block_q), jnp.int32), plgpu.SMEM((stages, block_kv), jnp.int32),
                *pipeline.ring_barriers(stages, wgs)]
  kernel.__name__ = "flash_jax_mosaic_gpu_bwd_dq"
  out_type = (jax.ShapeDtypeStruct(q.shape, dtype),)
  if spec.computes_dbias:
    out_type += (jax.ShapeDtypeStruct((spec.batch, spec.num_q_heads, t_pad, s_pad),
                                      jnp.float32),)
  dq, *ds = plgpu.kernel(
      kernel, out_type=out_type, scratch_types=scratch,
      grid=(spec.num_q_heads, num_q_tiles, spec.batch),
      grid_names=("heads", "q_tiles", "batch"),
      num_threads=wgs + 1, thread_name="wg",
      compiler_params=compat.compiler_params(),
  )(q, k, v, dout, lse2, delta, *feature_arrays)
  return dq, (ds[0] if ds else None)
