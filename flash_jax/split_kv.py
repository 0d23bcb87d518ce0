"""Split-KV attention (FlashDecoding): how many key/value splits, and how they combine.

A decode-shaped call (a few query rows against a long K/V cache) has too few
(batch, K/V head) pairs to fill a GPU. Split-KV kernels divide each row's visible keys
into `num_splits` ranges, one program each, and write a float32 partial output and lse
per range; `merge` combines them by lse, exactly (FlashAttention-2 section 3.1.1's
online-softmax rescaling, applied once across the splits). Ring attention merges the
results of its visiting K/V blocks with the same function.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from flash_jax import device

# Most splits a call may take: past this the partial results' traffic and the combine
# outgrow what the extra programs win (FlashAttention-3 caps its num_splits at 128).
MAX_SPLITS = 128


def merge(outs, lses, axis: int = 0):
  """Softmax results over disjoint key sets -> the result over their union.

  outs: [..., Hv] outputs, each normalized over its own key set; lses: natural-log lse of
  shape outs.shape[:-1], -inf where a set saw no key (it then weighs 0). The sets lie
  along `axis`. Returns (out float32 [... without axis, Hv], lse); a row no set saw
  gives out 0 and lse -inf, never NaN.
  """
  top = jnp.max(lses, axis=axis, keepdims=True)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  weights = jnp.where(jnp.isfinite(lses), jnp.exp(lses - top), 0.0)  # like lses
  total = jnp.sum(weights, axis=axis, keepdims=True)
  seen = total > 0
  total = jnp.where(seen, total, 1.0)
  lse = jnp.where(seen, top + jnp.log(total), -jnp.inf)
  out = jnp.sum(outs.astype(jnp.float32) * (weights / total)[..., None], axis=axis)
  return out, jnp.squeeze(lse, axis)


# Multiprocessors a split plan assumes where no GPU is seen (interpret mode, lowering on
# CPU): an H100/H200 SXM's.
DEFAULT_MULTIPROCESSORS = 132


def num_splits(*, programs: int, kv_blocks: int, per_multiprocessor: int,
               min_blocks_per_split: int, multiprocessors: int | None = None) -> int:
  """Splits per (batch row, K/V head): about `per_multiprocessor` programs per multiprocessor.

  programs: the programs of one split (batch x K/V heads x query-row tiles); kv_blocks:
  key/value blocks of the longest row; multiprocessors: None for the default GPU's
  (DEFAULT_MULTIPROCESSORS where none is seen). The count is a power of two (the largest
  at or under the target), at least 1, and leaves each split `min_blocks_per_split`
  blocks, so that its query tile and epilogue stay small beside its streaming.
  """
  if multiprocessors is None:
    multiprocessors = device.multiprocessor_count() or DEFAULT_MULTIPROCESSORS
  wanted = per_multiprocessor * multiprocessors / max(programs, 1)
  splits = 1
  while splits * 2 <= min(wanted, MAX_SPLITS, kv_blocks / max(min_blocks_per_split, 1)):
    splits *= 2
  return splits


def split_part(lo, hi, part, parts: int):
  """Blocks [lo, hi) (int32 scalars) -> the blocks of part `part` of `parts` near-equal
  runs of whole blocks: the run one split takes; may be empty."""
  if parts == 1:
    return lo, hi
  share = lax.div(hi - lo + (parts - 1), jnp.int32(parts))
  part_lo = jnp.minimum(lo + part * share, hi)
  return part_lo, jnp.minimum(part_lo + share, hi)


# Query rows per K/V head (T x G) up to which a call is decode-shaped: one packed tile.
MAX_PACKED_ROWS = 128


def decode_shaped(spec) -> bool:
  """Whether split-KV kernels serve `spec` best: every paged call, and contiguous calls
  with at most MAX_PACKED_ROWS query rows per K/V head against a longer key sequence and
  no feature those kernels do not read (bias, dense mask, dropout, segment ids)."""
  if spec.paged:
    return True
  return (spec.packed_rows <= MAX_PACKED_ROWS and spec.q_len < spec.kv_len
          and not (spec.has_bias or spec.has_mask or spec.has_dropout or spec.has_segment_ids))
