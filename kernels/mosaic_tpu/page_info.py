"""What the paged decode kernel reads at each grid step, computed ahead of it in jnp.

The paged kernel (`paged.py`) walks the table slots of a sequence, `pages_per_step`
pages per grid step, one K and one V block per page. For each (batch row, row block)
this module gives, from the masking rules (`masking.visible_kv_range`,
`masking.tile_fully_visible`):

    live slots  [live_lo, live_hi)   some packed row sees a key of the page
    full slots  [full_lo, full_hi)   every row sees every key of the page (no mask)

and, per grid step and page stream, the *fetch table*: the pool page whose block the
index map names. A live slot names its table entry; any other slot repeats the page the
same stream named at the step before (in grid order), so the pipeline sees an unchanged
block index and issues no DMA; slots before the first live one name the first live page
(prefetched once, for the step that uses it); a stream without any live slot names a
page that another stream uses. Table entries of slots that are not live
(past the sequence's last page, before a window, or of an empty sequence) are never used
as page ids, so unused entries may hold anything.

    page_size 4, kv_length 10, 2 pages a step   slots   0 1 | 2 3 | 4 5
                                                live    x x | x . | . .
                                                fetch  t0 t1|t2 t1|t2 t1   (t = table entry)

The same function serves a contiguous cache read in chunks: its "table" is each
sequence's chunk index.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from flash_jax import masking
from flash_jax.spec import AttentionArrays, AttentionSpec
from flash_jax.tiles import round_up


@dataclasses.dataclass(frozen=True)
class PagedGeometry:
  """Static tiling of one decode call: packed query rows by pages of keys.

  Rows: the T tokens x G query heads of one K/V head (row r = token r // G, head r % G
  of the group), padded to whole blocks of `block_rows`. Keys: table slots of
  `page_size` tokens, `pages_per_step` slots per grid step.
  """

  spec: AttentionSpec
  page_size: int  # tokens per page (a contiguous cache: per chunk)
  pages_per_step: int
  block_rows: int

  @property
  def rows(self) -> int:
    return self.spec.packed_rows

  @property
  def rows_padded(self) -> int:
    return round_up(self.rows, self.block_rows)

  @property
  def num_row_blocks(self) -> int:
    return self.rows_padded // self.block_rows

  @property
  def num_slots(self) -> int:
    """Table slots of one sequence (pages of the pool, or chunks of a contiguous cache)."""
    return -(-self.spec.kv_len // self.page_size)

  @property
  def num_steps(self) -> int:
    return -(-self.num_slots // self.pages_per_step)

  def row_tokens(self):
    """(first token, one past the last token) int32 [RB] of each row block's real rows."""
    r_lo = np.arange(self.num_row_blocks) * self.block_rows
    r_hi = np.minimum(r_lo + self.block_rows, self.rows)  # padded rows are sliced off
    group = self.spec.group_size
    return (jnp.asarray(r_lo // group, jnp.int32), jnp.asarray(-(-r_hi // group), jnp.int32))


# Scalar-prefetched words the decode kernel may take: half of the 1 MiB of SMEM of TPU v4
# and later (a 1 MiB fetch table fails to compile for v5e; 512 KiB compiles).
MAX_SCALAR_WORDS = 128 * 1024


def scalar_words(geo: PagedGeometry) -> int:
  """int32 words the kernel prefetches: fetch table, slot ranges, per-batch scalars."""
  grid = geo.spec.batch * geo.num_row_blocks
  return grid * geo.num_steps * geo.pages_per_step + grid * NUM_RANGE_FIELDS + 3 * geo.spec.batch


# Columns of the per-(batch, row block) range table.
LIVE_LO, LIVE_HI, FULL_LO, FULL_HI = 0, 1, 2, 3
NUM_RANGE_FIELDS = 4


def slot_ranges(spec: AttentionSpec, arrays: AttentionArrays, geo: PagedGeometry):
  """int32 [B, RB, 4]: (live_lo, live_hi, full_lo, full_hi) slots of each row block."""
  t_lo, t_hi = geo.row_tokens()  # [RB]
  per_batch = lambda x: None if x is None else x[:, None]  # [B] -> [B, 1]
  q_offset, kv_length = per_batch(arrays.q_offset), per_batch(arrays.kv_lengths)
  q_length = per_batch(arrays.q_lengths)
  k_lo, k_hi = masking.visible_kv_range(
      t_lo[None, :], t_hi[None, :], kv_len=spec.kv_len, causal=spec.causal,
      window=spec.window, q_offset=q_offset, kv_length=kv_length)  # [B|1, RB]
  seen = k_hi > k_lo
  live_lo = jnp.where(seen, k_lo // geo.page_size, 0)
  live_hi = jnp.where(seen, -(-k_hi // geo.page_size), 0)

  # Fully visible slots: an interval, since each rule bounds the keys from one side.
  slot = jnp.arange(geo.num_slots, dtype=jnp.int32)
  s_lo = (slot * geo.page_size)[None, None, :]  # [1, 1, slots]
  full = masking.tile_fully_visible(
      t_lo[None, :, None], t_hi[None, :, None], s_lo, s_lo + geo.page_size,
      kv_len=spec.kv_len, causal=spec.causal, window=spec.window,
      q_offset=None if q_offset is None else q_offset[:, :, None],
      q_length=None if q_length is None else q_length[:, :, None],
      kv_length=None if kv_length is None else kv_length[:, :, None])
  full = jnp.broadcast_to(full, (spec.batch, geo.num_row_blocks, geo.num_slots))
  full_lo = jnp.argmax(full, axis=-1).astype(jnp.int32)
  full_hi = full_lo + jnp.sum(full, axis=-1, dtype=jnp.int32)
  columns = (live_lo, live_hi, full_lo, full_hi)
  shape = (spec.batch, geo.num_row_blocks)
  return jnp.stack([jnp.broadcast_to(c, shape).astype(jnp.int32) for c in columns], axis=-1)


def fetch_table(tables, ranges, geo: PagedGeometry, num_pages: int, *, shared_pool=True):
  """int32 [B, RB, steps, pages_per_step]: the page (or chunk) each stream names.

  tables: int32 [B, >= slots] page ids (any value outside live slots); ranges: from
  `slot_ranges`. Grid order is (batch, row block, step); stream i loads slot
  step * pages_per_step + i. Ids are clipped into [0, num_pages). shared_pool: pages
  come from one pool (a dead slot may repeat another sequence's page); False for a
  contiguous cache, whose block index also names the batch row: there dead slots repeat
  pages of their own (batch, row block), or its chunk 0 when it has none.
  """
  b, rb, n = ranges.shape[0], ranges.shape[1], geo.pages_per_step
  slots = geo.num_steps * n
  slot = jnp.arange(slots, dtype=jnp.int32)[None, None, :]  # [1, 1, slots]
  live = ((slot >= ranges[:, :, LIVE_LO, None])
          & (slot < ranges[:, :, LIVE_HI, None]))  # [B, RB, slots]
  tables = tables[:, :min(slots, tables.shape[1])]
  tables = jnp.pad(tables, ((0, 0), (0, slots - tables.shape[1])))
  pages = jnp.broadcast_to(jnp.clip(tables, 0, num_pages - 1)[:, None, :], live.shape)

  def per_stream(x):  # [B, RB, steps * n] -> [n, B * RB * steps] in grid order
    return jnp.moveaxis(x.reshape(b, rb, geo.num_steps, n), 3, 0).reshape(n, -1)

  live, pages = per_stream(live), per_stream(pages)  # [n, L]
  if not shared_pool:  # fill within each (batch, row block): [n * B * RB, steps]
    live, pages = (x.reshape(-1, geo.num_steps) for x in (live, pages))
  order = jnp.arange(live.shape[1], dtype=jnp.int32)
  last_live = jax.lax.cummax(jnp.where(live, order, -1), axis=1)
  first_live = jnp.argmax(live, axis=1).astype(jnp.int32)[:, None]
  source = jnp.where(last_live >= 0, last_live, first_live)
  fetched = jnp.take_along_axis(pages, source, axis=1)
  # A stream with no live slot at all still loads one block (its first): a page that
  # another stream uses, or page 0 when no sequence has a key.
  any_page = jnp.where(jnp.any(live), pages.reshape(-1)[jnp.argmax(live.reshape(-1))], 0)
  fetched = jnp.where(jnp.any(live, axis=1, keepdims=True), fetched,
                      any_page if shared_pool else 0)
  return jnp.moveaxis(fetched.reshape(n, b, rb, geo.num_steps), 0, 3)
