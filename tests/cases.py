"""Curated attention cases: a sample of shapes x features x dtypes, and their inputs.

The space (lengths 1..1025 with T != S, head dims 16..256, MHA/GQA/MQA, every mask
feature alone and combined, fully masked rows, three dtypes) is sampled, not
multiplied out: each case exercises a few axes at once.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Case:
  batch: int
  q_len: int
  kv_len: int
  num_q_heads: int
  num_kv_heads: int
  head_dim: int
  dtype: str
  features: tuple[str, ...] = ()
  head_dim_v: int | None = None

  @property
  def tokens(self) -> int:
    return self.q_len * self.kv_len

  @property
  def id(self) -> str:
    heads = f"{self.num_q_heads}x{self.num_kv_heads}"
    hv = "" if self.head_dim_v is None else f"v{self.head_dim_v}"
    feats = "+".join(self.features) or "plain"
    return (f"b{self.batch}-t{self.q_len}-s{self.kv_len}-h{heads}-d{self.head_dim}{hv}-"
            f"{self.dtype}-{feats}")


CASES = (
    Case(1, 1, 1, 1, 1, 16, "float32"),
    Case(2, 7, 7, 2, 2, 40, "bfloat16", ("causal",)),
    Case(1, 97, 130, 4, 2, 64, "float16", ("causal", "q_offset_array")),
    Case(2, 130, 97, 4, 1, 72, "float32", ("window",)),
    Case(1, 97, 97, 2, 2, 128, "bfloat16", ("segment_ids",)),
    Case(2, 64, 130, 2, 2, 64, "float32", ("bias",), head_dim_v=40),
    Case(1, 33, 130, 4, 4, 40, "bfloat16", ("bias_broadcast", "mask")),
    Case(2, 97, 97, 2, 1, 64, "float16", ("lengths", "scale_negative")),
    Case(1, 65, 65, 2, 2, 256, "bfloat16", ("causal", "softcap")),
    Case(1, 1025, 1025, 2, 1, 64, "bfloat16", ("causal", "window")),
    Case(1, 130, 130, 4, 2, 64, "float32", ("dropout",)),
    Case(2, 97, 130, 2, 2, 64, "bfloat16", ("empty_rows",)),
    Case(1, 7, 1025, 2, 2, 128, "float32", ("causal", "q_offset_int")),
    Case(1, 130, 130, 2, 2, 72, "bfloat16",
         ("causal", "window", "segment_ids", "softcap", "bias", "dropout")),
    Case(1, 1, 97, 4, 2, 64, "bfloat16", ("causal", "decode")),
    Case(1, 256, 256, 2, 2, 16, "float16", ("mask", "dropout")),
    Case(2, 128, 128, 4, 2, 128, "bfloat16", ("causal", "segment_ids", "lengths", "scale_large")),
    # Decode-shaped (split-KV kernels): new tokens at the end of ragged caches (junk past
    # the lengths; S = 296: a partial last key block that TMA reads past the cache's end).
    Case(3, 1, 296, 8, 2, 64, "bfloat16", ("causal", "decode_lengths", "junk_kv")),
    Case(2, 16, 257, 8, 2, 128, "float16", ("causal", "decode_lengths", "softcap")),
    Case(3, 7, 160, 4, 1, 40, "float32", ("causal", "decode_lengths", "window")),
    # Attention sinks: with rows that see no key (all mass on the sink), GQA, MQA.
    Case(2, 97, 130, 2, 2, 64, "bfloat16", ("empty_rows", "sinks")),
    Case(2, 97, 130, 4, 2, 64, "float16", ("causal", "window", "lengths", "sinks")),
    Case(1, 64, 97, 4, 1, 40, "float32", ("bias", "dropout", "softcap", "sinks")),
    # NaN and inf in every key no row sees (a reused KV cache): past kv_lengths, and past
    # the last query position of a causal decode step.
    Case(2, 40, 97, 4, 2, 32, "float32", ("causal", "q_offset_array", "lengths", "junk_kv")),
    Case(2, 1, 130, 4, 1, 64, "bfloat16", ("causal", "q_offset_array", "junk_kv")),
    # Head dims the Hopper kernels serve zero-padded: 80, and MLA's 192 with Hv = 128.
    Case(2, 97, 97, 2, 1, 80, "float16", ("lengths", "junk_kv")),
    Case(1, 130, 200, 4, 2, 192, "bfloat16", ("causal", "q_offset_int"), head_dim_v=128),
    # Dropout without bias or mask, in the dtypes the Hopper kernels take.
    Case(2, 97, 130, 4, 2, 64, "bfloat16", ("causal", "q_offset_array", "dropout")),
    Case(1, 130, 130, 2, 1, 128, "float16", ("lengths", "softcap", "dropout")),
    # Bias and dense masks in the dtypes and head dims the Hopper kernels take.
    Case(2, 200, 333, 4, 2, 128, "bfloat16", ("causal", "lengths", "bias", "mask")),
    Case(2, 97, 130, 2, 2, 64, "float16", ("bias_broadcast", "softcap", "empty_rows")),
    Case(2, 130, 200, 4, 2, 128, "bfloat16", ("causal", "mask_keys", "bias_broadcast")),
    Case(2, 130, 200, 4, 2, 64, "float16", ("causal", "mask_queries", "bias_broadcast")),
)


def make_inputs(case: Case, seed: int):
  """Fresh random q, k, v and flash_attention keyword arguments for `case`."""
  keys = iter(jax.random.split(jax.random.PRNGKey(seed), 12))
  dtype = jnp.dtype(case.dtype)
  b, t, s = case.batch, case.q_len, case.kv_len
  hv = case.head_dim_v or case.head_dim
  q = jax.random.normal(next(keys), (b, t, case.num_q_heads, case.head_dim), dtype)
  k = jax.random.normal(next(keys), (b, s, case.num_kv_heads, case.head_dim), dtype)
  v = jax.random.normal(next(keys), (b, s, case.num_kv_heads, hv), dtype)
  kwargs = {}
  f = set(case.features)
  if "causal" in f:
    kwargs["causal"] = True
  if "q_offset_array" in f:
    kwargs["q_offset"] = jax.random.randint(next(keys), (b,), 0, s - t + 1)
  if "q_offset_int" in f or "decode" in f:
    kwargs["q_offset"] = s - t
  if "window" in f:
    kwargs["window"] = (int(min(s, 96) // 3), None if "causal" in f else 5)
  if "segment_ids" in f:
    # Three packed documents; keys sit at proportional positions when T != S.
    bounds = jnp.sort(jax.random.randint(next(keys), (b, 3), 1, max(t, 2)), axis=-1)
    segment = lambda pos: jnp.sum(pos[None, :, None] >= bounds[:, None, :], axis=-1)
    q_ids, kv_ids = segment(jnp.arange(t)), segment(jnp.arange(s) * t // s)
    kwargs["segment_ids"] = q_ids if t == s else (q_ids, kv_ids)
  if "lengths" in f:
    kwargs["kv_lengths"] = jax.random.randint(next(keys), (b,), 1, s + 1)
    kwargs["q_lengths"] = jax.random.randint(next(keys), (b,), 1, t + 1)
  if "softcap" in f:
    kwargs["softcap"] = 2.5
  # Scales that kernels folding the scale into exp2 must still handle: a large one makes
  # MASK_VALUE * scale overflow float32, a negative one flips which logit is the max.
  if "scale_large" in f:
    kwargs["scale"] = 1.5
  if "scale_negative" in f:
    kwargs["scale"] = -0.2
  if "bias" in f:
    kwargs["bias"] = jax.random.normal(next(keys), (b, case.num_q_heads, t, s), jnp.float32)
  if "bias_broadcast" in f:
    kwargs["bias"] = jax.random.normal(next(keys), (1, case.num_q_heads, 1, s), dtype)
  if "mask" in f:
    kwargs["mask"] = jax.random.bernoulli(next(keys), 0.7, (b, 1, t, s))
  if "bias_queries" in f:  # one value per query, [1, N, T, 1]: the softmax ignores it
    kwargs["bias"] = jax.random.normal(next(keys), (1, case.num_q_heads, t, 1), dtype)
  if "mask_queries" in f:  # query padding: [B, 1, T, 1], rows that see no key
    kwargs["mask"] = jax.random.bernoulli(next(keys), 0.8, (b, 1, t, 1)).at[:, :, 0].set(False)
  if "mask_keys" in f:  # key padding: [B, 1, 1, S], and a batch row that sees no key
    kwargs["mask"] = jax.random.bernoulli(next(keys), 0.8, (b, 1, 1, s)).at[-1].set(False)
  if "dropout" in f:
    kwargs["dropout_rate"] = 0.25
    kwargs["dropout_rng"] = next(keys)
  if "decode_lengths" in f:
    # Ragged caches with the T new tokens last; lengths 0 and 1 where the batch allows.
    lengths = jax.random.randint(next(keys), (b,), t, s + 1).at[0].set(s)
    if b > 2:
      lengths = lengths.at[1].set(0).at[2].set(1)
    kwargs["kv_lengths"] = lengths
    kwargs["q_offset"] = lengths - t
  if "empty_rows" in f:
    # Query segments 0..2, key segments 1..2 only: rows of segment 0 see no key.
    q_ids = jnp.where(jnp.arange(t) < t // 4, 0, 1 + (jnp.arange(t) % 2))
    kv_ids = 1 + (jnp.arange(s) % 2)
    kwargs["segment_ids"] = (jnp.broadcast_to(q_ids, (b, t)), jnp.broadcast_to(kv_ids, (b, s)))
    kwargs["kv_lengths"] = jnp.array([s, s // 2][:b])
  if "sinks" in f:
    # float32 [Nq], near the rows' lse (about log S) so that the sink takes a real share.
    kwargs["sinks"] = np.log(s) + 2.0 * jax.random.normal(next(keys), (case.num_q_heads,))
  if "junk_kv" in f:
    k, v = poison_unseen_keys(k, v, kwargs, t)
  return q, k, v, kwargs


def unseen_keys(kwargs, batch: int, q_len: int, kv_len: int) -> np.ndarray:
  """Bool [B, S]: keys that no query row sees by position (kv_lengths, q_lengths, causal
  with q_offset), the keys that may hold junk."""
  j = np.arange(kv_len)[None, :]
  hidden = np.zeros((batch, kv_len), bool)
  if kwargs.get("kv_lengths") is not None:
    hidden |= j >= np.asarray(kwargs["kv_lengths"])[:, None]
  if kwargs.get("causal"):
    offset = np.broadcast_to(np.asarray(kwargs.get("q_offset", 0)), (batch,))
    rows = np.asarray(kwargs["q_lengths"]) if kwargs.get("q_lengths") is not None else q_len
    hidden |= j > (np.broadcast_to(rows, (batch,)) - 1 + offset)[:, None]
  return hidden


def poison_unseen_keys(k, v, kwargs, q_len: int):
  """k, v with NaN, +inf and -inf in the keys of `unseen_keys`."""
  batch, kv_len = k.shape[:2]
  hidden = jnp.asarray(unseen_keys(kwargs, batch, q_len, kv_len))[:, :, None, None]
  junk = jnp.asarray([jnp.nan, jnp.inf, -jnp.inf])[jnp.arange(kv_len) % 3][None, :, None, None]
  return (jnp.where(hidden, junk, k).astype(k.dtype),
          jnp.where(hidden, jnp.roll(junk, 1, axis=1), v).astype(v.dtype))


def visible_rows(lse) -> np.ndarray:
  """Bool [B, T, Nq]: rows that see at least one key (finite lse [B, Nq, T])."""
  return np.isfinite(np.asarray(lse)).transpose(0, 2, 1)


@dataclasses.dataclass(frozen=True)
class PagedCase:
  """A paged-cache call: T new tokens per sequence over pages of `page_size` tokens."""

  batch: int
  q_len: int
  num_q_heads: int
  num_kv_heads: int
  head_dim: int
  page_size: int
  pages_per_seq: int
  dtype: str
  features: tuple[str, ...] = ()
  head_dim_v: int | None = None

  @property
  def kv_len(self) -> int:
    return self.page_size * self.pages_per_seq

  @property
  def tokens(self) -> int:
    return self.q_len * self.kv_len

  @property
  def id(self) -> str:
    hv = "" if self.head_dim_v is None else f"v{self.head_dim_v}"
    return (f"b{self.batch}-t{self.q_len}-h{self.num_q_heads}x{self.num_kv_heads}-"
            f"d{self.head_dim}{hv}-page{self.page_size}x{self.pages_per_seq}-{self.dtype}-"
            f"{'+'.join(self.features) or 'plain'}")


PAGED_CASES = (
    PagedCase(3, 1, 8, 2, 64, 16, 9, "bfloat16"),
    PagedCase(3, 7, 4, 1, 40, 8, 7, "float32", ("window", "sinks")),
    PagedCase(4, 16, 8, 8, 128, 64, 3, "float16", ("softcap",)),
    PagedCase(3, 2, 6, 2, 72, 128, 2, "bfloat16", ("scale",), head_dim_v=40),
    PagedCase(2, 3, 4, 2, 32, 5, 9, "float32", ("not_causal",)),  # a page size of 5
)


def make_paged_inputs(case: PagedCase, seed: int):
  """q, the page pools, tables, lengths, paged_attention kwargs and the contiguous
  caches (k, v [B, S, Nkv, H]) holding the same tokens. Lengths are ragged (0 and 1
  where the batch allows); unused pages hold NaN/-inf and unused table entries point
  outside the pool, so that a stray read shows."""
  import flash_jax  # pylint: disable=import-outside-toplevel
  keys = iter(jax.random.split(jax.random.PRNGKey(seed), 8))
  rng = np.random.RandomState(seed)
  dtype = jnp.dtype(case.dtype)
  b, t, s, ps = case.batch, case.q_len, case.kv_len, case.page_size
  hv = case.head_dim_v or case.head_dim
  q = jax.random.normal(next(keys), (b, t, case.num_q_heads, case.head_dim), dtype)
  k = jax.random.normal(next(keys), (b, s, case.num_kv_heads, case.head_dim), dtype)
  v = jax.random.normal(next(keys), (b, s, case.num_kv_heads, hv), dtype)
  lengths = rng.randint(t, s + 1, b)
  lengths[0] = s - 1  # ends inside the last page
  if b > 2:
    lengths[1], lengths[2] = 0, 1
  pool = b * case.pages_per_seq + 2
  tables = rng.permutation(pool)[:b * case.pages_per_seq].reshape(b, case.pages_per_seq)
  used = -(-lengths // ps)
  tables = np.where(np.arange(case.pages_per_seq)[None, :] < used[:, None], tables, pool + 9)
  lengths, tables = jnp.asarray(lengths, jnp.int32), jnp.asarray(tables, jnp.int32)
  k_pages = jnp.full((pool, ps, case.num_kv_heads, case.head_dim), jnp.nan, dtype)
  v_pages = jnp.full((pool, ps, case.num_kv_heads, hv), -jnp.inf, dtype)
  k_pages, v_pages = flash_jax.write_kv_pages(k_pages, v_pages, tables, 0, k, v, lengths=lengths)
  kwargs = {"causal": "not_causal" not in case.features}
  if "window" in case.features:
    kwargs["window"] = (11, 0)
  if "softcap" in case.features:
    kwargs["softcap"] = 2.5
  if "scale" in case.features:
    kwargs["scale"] = 0.3
  if "sinks" in case.features:
    kwargs["sinks"] = jax.random.normal(next(keys), (case.num_q_heads,), jnp.float32)
  return q, k_pages, v_pages, tables, lengths, kwargs, (k, v)
