"""The producer side of a warp-specialized kernel: a TMA ring of shared-memory slots.

FlashAttention-3 section 3.1: one producer warpgroup with few registers issues TMA
copies of the blocks that the consumer warpgroups walk, `stages` slots deep. A stream
carries one or more operands that are read and released together; it has, per slot, a
`ready` barrier (completed by the TMA transactions of its operands) and a `free` barrier
(one arrival per consumer warpgroup once it has read the slot). Operands released at
different times (the forward's K and V) take one stream each. Consumers read block
`step` from slot `step % stages`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

PRODUCER_REGISTERS = 40
CONSUMER_REGISTERS = 232  # 2 x 232 + 40 registers x 128 threads fits the 64K register file


@dataclasses.dataclass(frozen=True)
class Stream:
  """Operands streamed block by block under one pair of barriers."""

  sources: tuple[Callable[[Any], Any], ...]  # per operand: step -> GMEM ref view of its block
  rings: tuple[Any, ...]  # per operand: SMEM ref [stages, *block]
  ready: Any  # Barrier ref [stages], num_arrivals = len(rings)
  free: Any  # Barrier ref [stages], num_arrivals = consumer warpgroups


def kv_streams(k_ref, v_ref, kv_ids_ref, *, batch, kv_head, first_block, block_kv: int,
               k, v, ids=None) -> tuple[Stream, ...]:
  """The K and V blocks [block_kv, H] (and their segment ids [block_kv], when `kv_ids_ref`
  is not None) from block `first_block` on; k, v, ids: (ring, ready, free) of each."""
  rows = lambda step: pl.ds((first_block + step) * block_kv, block_kv)
  one = lambda source, ring, ready, free: Stream((source,), (ring,), ready, free)
  streams = (one(lambda step: k_ref.at[batch, rows(step), kv_head], *k),
             one(lambda step: v_ref.at[batch, rows(step), kv_head], *v))
  if kv_ids_ref is not None:
    streams += (one(lambda step: kv_ids_ref.at[batch, rows(step)], *ids),)
  return streams


def slot_of(step, stages: int):
  return lax.rem(step, jnp.int32(stages))


def produce(streams: tuple[Stream, ...], num_steps, stages: int) -> None:
  """Producer warpgroup body: fills the ring, then refills each slot once it is free."""
  plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")

  def issue(step, slot, wait_free: bool):
    # The sources first: a paged block's page id is a scalar load, which then runs
    # while the producer waits for the slot.
    views = [[source(step) for source in stream.sources] for stream in streams]
    for stream, stream_views in zip(streams, views):
      if wait_free:
        plgpu.barrier_wait(stream.free.at[slot])
      for view, ring in zip(stream_views, stream.rings):
        plgpu.copy_gmem_to_smem(view, ring.at[slot], stream.ready.at[slot])

  for i in range(stages):
    pl.when(i < num_steps)(functools.partial(issue, jnp.int32(i), i, False))

  @pl.loop(stages, jnp.maximum(num_steps, stages))
  def _refill(step):
    issue(step, slot_of(step, stages), True)


def release(streams: tuple[Stream, ...], slot) -> None:
  """Consumer side: this warpgroup is done reading `slot` of every stream."""
  for stream in streams:
    plgpu.barrier_arrive(stream.free.at[slot])


def rendezvous(barrier) -> None:
  """Both consumer warpgroups arrive on `barrier` (two arrivals); neither leaves before
  the other came. The ping-pong schedules hand the tensor cores over with it."""
  plgpu.barrier_arrive(barrier)
  plgpu.barrier_wait(barrier)


def ring_barriers(stages: int, num_consumers: int, num_operands: int = 1):
  """(ready, free) barrier scratch types for one stream of `num_operands` operands."""
  return (plgpu.Barrier(num_arrivals=num_operands, num_barriers=stages),
          plgpu.Barrier(num_arrivals=num_consumers, num_barriers=stages))
