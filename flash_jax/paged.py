"""Paged K/V caches: the layout, its validation, writing new tokens, reading pages.

A cache is a pool of pages shared by every sequence, token-major (the layout of
FlashAttention-3's `flash_attn_with_kvcache`, vLLM and cuDNN):

    k_pages [P, page_size, Nkv, H], v_pages [P, page_size, Nkv, Hv]
    block_tables int32 [B, pages_per_seq]: the pages of sequence b, in order
    kv_lengths int32 [B]: the tokens sequence b holds

Key j of sequence b lives at k_pages[block_tables[b, j // page_size], j % page_size].
Table entries at or past a sequence's last page (index >= ceil(kv_lengths[b] /
page_size)) may hold anything and are never read; nor is anything past kv_lengths[b]
in a sequence's last page.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from flash_jax import spec as spec_lib


def _int_array(name, x, ndim):
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"{name} must be an integer array, got dtype {x.dtype}")
  if x.ndim != ndim:
    raise ValueError(f"{name} must be {ndim}-D, got shape {x.shape}")
  return x.astype(jnp.int32)


def check_pages(k_pages, v_pages):
  """Validates a page pool; returns (num_pages, page_size)."""
  for name, x in (("k_pages", k_pages), ("v_pages", v_pages)):
    if np.ndim(x) != 4:
      raise ValueError(f"{name} must be 4-D [num_pages, page_size, kv_heads, head_dim], got "
                       f"shape {np.shape(x)}")
  if k_pages.shape[:3] != v_pages.shape[:3]:
    raise ValueError(f"k_pages and v_pages must share [num_pages, page_size, kv_heads], got "
                     f"{k_pages.shape} and {v_pages.shape}")
  if k_pages.dtype != v_pages.dtype:
    raise TypeError(f"k_pages and v_pages must share one dtype, got {k_pages.dtype} and "
                    f"{v_pages.dtype}")
  num_pages, page_size = k_pages.shape[:2]
  if num_pages == 0 or page_size == 0:
    raise ValueError(f"k_pages needs at least one page of at least one token, got {k_pages.shape}")
  return num_pages, page_size


def normalize_paged(q, k_pages, v_pages, block_tables, kv_lengths, *, causal=True,
                    q_offset=None, scale=None, window=None, softcap=None):
  """Validates a paged_attention call; returns (spec, q, arrays).

  The spec describes the logical call: keys [B, S, Nkv, H] with S = pages_per_seq *
  page_size, lengths kv_lengths, and q_offset defaulting to kv_lengths - T (the T
  queries are the newest T tokens of each sequence: bottom-right causal alignment).
  """
  k_pages, v_pages = jnp.asarray(k_pages), jnp.asarray(v_pages)
  num_pages, page_size = check_pages(k_pages, v_pages)
  block_tables = _int_array("block_tables", block_tables, 2)
  kv_lengths = _int_array("kv_lengths", kv_lengths, 1)
  batch, pages_per_seq = block_tables.shape
  if np.ndim(q) != 4:
    raise ValueError(f"q must be 4-D [batch, new_tokens, heads, head_dim], got shape {np.shape(q)}")
  if np.shape(q)[0] != batch or kv_lengths.shape != (batch,):
    raise ValueError(f"q, block_tables and kv_lengths must share the batch size, got "
                     f"q={np.shape(q)}, block_tables={block_tables.shape}, "
                     f"kv_lengths={kv_lengths.shape}")
  if pages_per_seq == 0:
    raise ValueError(f"block_tables needs at least one page per sequence, got {block_tables.shape}")
  kv_len = pages_per_seq * page_size
  k_view = jax.ShapeDtypeStruct((batch, kv_len) + k_pages.shape[2:], k_pages.dtype)
  v_view = jax.ShapeDtypeStruct((batch, kv_len) + v_pages.shape[2:], v_pages.dtype)
  if q_offset is None:
    q_offset = kv_lengths - np.shape(q)[1]
  spec, q, _, _, _, arrays = spec_lib.normalize(
      q, k_view, v_view, causal=causal, scale=scale, q_offset=q_offset, window=window,
      softcap=softcap, kv_lengths=kv_lengths)
  spec = dataclasses.replace(spec, page_size=page_size, num_pages=num_pages)
  arrays = dataclasses.replace(arrays, block_tables=block_tables)
  return spec, q, k_pages, v_pages, arrays


def gather_keys(pages, block_tables, kv_lengths, first_page, num_table_pages: int):
  """Keys of table entries [first_page, first_page + n) of every sequence, contiguous:
  [B, n * page_size, Nkv, H]. `first_page` may be traced; n is static.

  The jnp reading of a paged cache (the references use it; the kernels read pages in
  place). Entries the rule above says are never read are not used: table entries past
  a sequence's pages read page 0 instead, and rows at or past kv_lengths come back 0.
  """
  page_size = pages.shape[1]
  tables = jax.lax.dynamic_slice_in_dim(block_tables, first_page, num_table_pages, axis=1)
  slot = first_page + jnp.arange(num_table_pages, dtype=jnp.int32)  # [n] table index
  pages_used = -(-kv_lengths // page_size)  # [B]
  tables = jnp.where(slot[None, :] < pages_used[:, None], tables, 0)
  tables = jnp.clip(tables, 0, pages.shape[0] - 1)
  keys = pages[tables]  # [B, n, page_size, Nkv, H]
  keys = keys.reshape((keys.shape[0], -1) + keys.shape[3:])
  position = first_page * page_size + jnp.arange(keys.shape[1], dtype=jnp.int32)  # [n*ps]
  stored = position[None, :] < kv_lengths[:, None]  # [B, n*ps]
  return jnp.where(stored[:, :, None, None], keys, jnp.zeros((), keys.dtype))


def gather_all(k_pages, v_pages, arrays, spec):
  """A paged call as the equivalent contiguous one: (k, v, arrays, spec) with
  k [B, S, Nkv, H], v [B, S, Nkv, Hv] gathered from the pages."""
  gather = lambda pages: gather_keys(pages, arrays.block_tables, arrays.kv_lengths, 0,
                                     spec.pages_per_seq)
  return (gather(k_pages), gather(v_pages), dataclasses.replace(arrays, block_tables=None),
          dataclasses.replace(spec, page_size=None, num_pages=None))


def write_kv_pages(k_pages, v_pages, block_tables, start, k_new, v_new, *, lengths=None):
  """Writes new tokens into a paged cache; returns the updated (k_pages, v_pages).

  k_new [B, T_new, Nkv, H] and v_new [B, T_new, Nkv, Hv] go to positions
  start[b] + i (i < T_new) of sequence b: page block_tables[b, (start[b] + i) //
  page_size], slot (start[b] + i) % page_size. With `lengths` [B], only the first
  lengths[b] tokens of row b are written (rows of a continuous batch that add fewer
  tokens). Writes that fall outside the table or the pool are dropped.

  Pure: under `jax.jit(write_kv_pages, donate_argnums=(0, 1))` XLA updates the pools in
  place (no copy of the pool).
  """
  k_pages, v_pages = jnp.asarray(k_pages), jnp.asarray(v_pages)
  num_pages, page_size = check_pages(k_pages, v_pages)
  block_tables = _int_array("block_tables", block_tables, 2)
  batch, pages_per_seq = block_tables.shape
  start = jnp.asarray(start)
  if start.ndim == 0:
    start = jnp.broadcast_to(start, (batch,))
  start = _int_array("start", start, 1)
  for name, new, pages in (("k_new", k_new, k_pages), ("v_new", v_new, v_pages)):
    if np.ndim(new) != 4 or np.shape(new)[0] != batch or np.shape(new)[2:] != pages.shape[2:]:
      raise ValueError(f"{name} must be [batch={batch}, new_tokens, {pages.shape[2]}, "
                       f"{pages.shape[3]}], got shape {np.shape(new)}")
  if np.shape(k_new)[1] != np.shape(v_new)[1]:
    raise ValueError(f"k_new and v_new must add the same number of tokens, got "
                     f"{np.shape(k_new)} and {np.shape(v_new)}")
  if start.shape != (batch,):
    raise ValueError(f"start must be an int or int [B={batch}], got shape {start.shape}")
  new_tokens = np.shape(k_new)[1]
  position = start[:, None] + jnp.arange(new_tokens, dtype=jnp.int32)[None, :]  # [B, T_new]
  table_index = position // page_size
  in_table = (position >= 0) & (table_index < pages_per_seq)
  if lengths is not None:
    lengths = _int_array("lengths", lengths, 1)
    in_table &= jnp.arange(new_tokens, dtype=jnp.int32)[None, :] < lengths[:, None]
  page = jnp.take_along_axis(block_tables, jnp.clip(table_index, 0, pages_per_seq - 1), axis=1)
  in_table &= (page >= 0) & (page < num_pages)
  # Dropped writes aim past the pool, where mode="drop" discards them.
  page = jnp.where(in_table, page, num_pages)
  slot = position % page_size

  def scatter(pages, new):
    return pages.at[page, slot].set(jnp.asarray(new, pages.dtype), mode="drop")

  return scatter(k_pages, k_new), scatter(v_pages, v_new)
