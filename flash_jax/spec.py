"""One normalized description of an attention call.

`normalize` validates the user's arguments once and splits them into
  * `AttentionSpec`: everything static (shapes, dtype, which mask features are on,
    scale, window, softcap, dropout rate); frozen and hashable, so it can be a
    static argument of `jax.jit` / `jax.custom_vjp` and a key for tuning tables;
  * `AttentionArrays`: the dynamic, non-differentiable arrays that parametrize the
    mask (query offsets, segment ids, lengths, dense bool mask, dropout seed).
The differentiable inputs (q, k, v, bias) travel beside them.

Every implementation reads the same spec, so a feature is parsed in exactly one place.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# float64 (with jax_enable_x64) is served by the jnp implementations only.
SUPPORTED_DTYPES = tuple(jnp.dtype(d) for d in ("bfloat16", "float16", "float32", "float64"))
MIN_HEAD_DIM, MAX_HEAD_DIM = 1, 256

# Positions are int32 in every implementation (masking.py). They never overflow when
# sequence lengths stay below MAX_SEQUENCE_LENGTH, offsets within +-MAX_Q_OFFSET and
# finite window sides below WINDOW_UNBOUNDED: |i + q_offset +- side| < 2**31 with room
# for a tile's padding. A window side at or above WINDOW_UNBOUNDED hides nothing for any
# allowed offset, so it is unbounded (None).
MAX_SEQUENCE_LENGTH = 2**28
MAX_Q_OFFSET = 2**29
WINDOW_UNBOUNDED = 2**30
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
  """Static description of one attention call. Shapes use B, T, S, Nq, Nkv, H, Hv."""

  batch: int
  q_len: int  # T
  kv_len: int  # S
  num_q_heads: int  # Nq
  num_kv_heads: int  # Nkv
  head_dim: int  # H (q and k)
  head_dim_v: int  # Hv (v and the output)
  dtype: str  # name of the input dtype: 'bfloat16' | 'float16' | 'float32' | 'float64'
  scale: float
  causal: bool = False
  # (left, right) in key positions relative to the query's position; None = unbounded.
  window: tuple[int | None, int | None] | None = None
  softcap: float | None = None
  bias_shape: tuple[int, int, int, int] | None = None  # broadcastable to [B, Nq, T, S]
  mask_shape: tuple[int, int, int, int] | None = None  # broadcastable to [B, Nq, T, S]
  has_q_offset: bool = False
  has_segment_ids: bool = False
  has_q_lengths: bool = False
  has_kv_lengths: bool = False
  dropout_rate: float = 0.0
  # Paged K/V (paged_attention): k/v are pools of pages [num_pages, page_size, Nkv, H]
  # and kv_len is the longest sequence a block table can address (pages_per_seq * page_size).
  page_size: int | None = None
  num_pages: int | None = None

  @property
  def computes_dbias(self) -> bool:
    """Whether a backward of this spec returns d bias."""
    return self.has_bias and self.bias_grad

  @property
  def allows_atomic_dq(self) -> bool:
    """Whether a backward may add dQ up across key blocks with atomics (an unordered sum,
    so not bitwise reproducible): when the call is not `deterministic` and no bias
    gradient wants the dQ kernel's d logits."""
    return not self.deterministic and not self.computes_dbias

  @property
  def paged(self) -> bool:
    return self.page_size is not None

  @property
  def pages_per_seq(self) -> int:
    return self.kv_len // self.page_size

  @property
  def packed_rows(self) -> int:
    """Query rows that share one key/value head: T * G. Decode kernels pack them into
    the rows of one tile, so each K/V tile is read once per K/V head (GQA packing)."""
    return self.q_len * self.group_size
  # jax.default_matmul_precision when the call was made (None: the platform default). The
  # jnp implementations pass it to every product, forward and backward alike.
  precision: str | None = None
  # The backward must be bitwise reproducible (`resolve_deterministic`). An unordered
  # one (atomic dQ: `allows_atomic_dq`) may serve only when False.
  deterministic: bool = False
  # False in a backward whose bias is a constant (no gradient asked: ALiBi, a fixed
  # bias): the kernels then skip d bias, a float32 [B, Nq, T, S] write.
  bias_grad: bool = True

  @property
  def group_size(self) -> int:
    """Query heads that share one key/value head (GQA; 1 for MHA)."""
    return self.num_q_heads // self.num_kv_heads

  @property
  def jnp_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def has_bias(self) -> bool:
    return self.bias_shape is not None

  @property
  def has_mask(self) -> bool:
    return self.mask_shape is not None

  @property
  def has_dropout(self) -> bool:
    return self.dropout_rate > 0.0

  @property
  def has_structured_mask(self) -> bool:
    """True when some rule besides a dense bool mask hides keys from queries."""
    return (self.causal or self.window is not None or self.has_segment_ids
            or self.has_q_lengths or self.has_kv_lengths)

  def features(self) -> tuple[str, ...]:
    """Names of the features this call uses, as implementations declare them."""
    names = {
        "causal": self.causal, "window": self.window is not None,
        "softcap": self.softcap is not None, "bias": self.has_bias, "mask": self.has_mask,
        "q_offset": self.has_q_offset, "segment_ids": self.has_segment_ids,
        "q_lengths": self.has_q_lengths, "kv_lengths": self.has_kv_lengths,
        "dropout": self.has_dropout,
        "gqa": self.num_q_heads != self.num_kv_heads, "paged": self.paged,
    }
    return tuple(name for name, used in names.items() if used)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionArrays:
  """Dynamic mask parameters; a field is None when its feature is off in the spec."""

  q_offset: jax.Array | None = None  # [B] int32: position of query 0 in key coordinates
  q_segment_ids: jax.Array | None = None  # [B, T] int32
  kv_segment_ids: jax.Array | None = None  # [B, S] int32
  q_lengths: jax.Array | None = None  # [B] int32: queries >= length see nothing
  kv_lengths: jax.Array | None = None  # [B] int32: keys >= length are hidden
  mask: jax.Array | None = None  # bool, 4-D, broadcastable to [B, Nq, T, S]
  dropout_seed: jax.Array | None = None  # [] uint32
  block_tables: jax.Array | None = None  # [B, pages_per_seq] int32 page ids (paged K/V)


def _shape(x: Any) -> tuple[int, ...]:
  return tuple(x.shape) if isinstance(x, jax.ShapeDtypeStruct) else tuple(np.shape(x))


def _as_array(x: Any):
  """jnp.asarray, except that a ShapeDtypeStruct stands for k/v described only by shape
  (paged_attention's logical [B, S, Nkv, H] view of its pages)."""
  return x if isinstance(x, jax.ShapeDtypeStruct) else jnp.asarray(x)


def _as_4d(name: str, x: Any, target: tuple[int, int, int, int]) -> jax.Array:
  """Left-pads `x` to 4-D and checks it broadcasts to `target` = (B, Nq, T, S)."""
  x = jnp.asarray(x)
  if x.ndim > 4:
    raise ValueError(f"{name} must have at most 4 dims [B, Nq, T, S], got shape {x.shape}")
  x = x.reshape((1,) * (4 - x.ndim) + x.shape)
  for got, want in zip(x.shape, target):
    if got not in (1, want):
      raise ValueError(f"{name} of shape {x.shape} does not broadcast to [B, Nq, T, S] = {target}")
  return x


def _is_traced(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


def check_bool(name: str, x: Any) -> bool:
  """x as a Python bool; a traced value or another type raises a TypeError naming `name`."""
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if _is_traced(x):
    raise TypeError(f"{name} must be a Python bool, got a traced value: it selects what is "
                    f"computed, so pass it as a static argument (jit's static_argnames)")
  raise TypeError(f"{name} must be a bool, got {x!r}")


XLA_DETERMINISM_FLAG = "--xla_gpu_deterministic_ops"


def resolve_deterministic(deterministic: Any) -> bool:
  """`flash_attention(deterministic=)`: True or False as given; None follows XLA's own
  switch, True when XLA_FLAGS sets --xla_gpu_deterministic_ops (=true or =1), the flag
  that makes XLA's and cuDNN's GPU backward reproducible."""
  if deterministic is not None:
    return check_bool("deterministic", deterministic)
  for flag in os.environ.get("XLA_FLAGS", "").split():
    name, _, value = flag.partition("=")
    if name == XLA_DETERMINISM_FLAG:
      return value.lower() in ("", "true", "1")
  return False


def _is_int(x: Any) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_real(x: Any) -> bool:
  return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def _int_array(name: str, x: Any, shape: tuple[int, ...], lo: int = INT32_MIN,
               hi: int = INT32_MAX) -> jax.Array:
  """x as int32 of `shape`; nothing wraps. Host values (Python ints, lists, numpy arrays,
  and device arrays of a dtype wider than int32) outside [lo, hi] raise a ValueError;
  other device arrays (traced ones included) are clipped to [lo, hi] in their own dtype
  before the cast, without a read-back to the host."""
  if not isinstance(x, jax.Array):
    x = np.asarray(x)  # Python ints and lists too: checked before any int32 conversion
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"{name} must be an integer array, got dtype {x.dtype}")
  if x.shape != shape:
    raise ValueError(f"{name} must have shape {shape}, got {x.shape}")
  info = jnp.iinfo(x.dtype)
  if info.min >= lo and info.max <= hi:
    return jnp.asarray(x).astype(jnp.int32)
  wider = info.min < INT32_MIN or info.max > INT32_MAX
  if isinstance(x, np.ndarray) or (wider and not _is_traced(x)):  # host values: check them
    values = np.asarray(x)
    if values.size and (values.min() < lo or values.max() > hi):
      raise ValueError(f"{name} must lie in [{lo}, {hi}], got values in "
                       f"[{values.min()}, {values.max()}]")
    return jnp.asarray(values.astype(np.int32))
  # Device arrays (traced or int32 already) are not read back to the host: clipped.
  return jnp.clip(x, max(lo, info.min), min(hi, info.max)).astype(jnp.int32)


def normalize_window(window: Any, causal: bool) -> tuple[int | None, int | None] | None:
  """`window` int w -> (w, w), or (w, 0) with causal; a pair passes through; checks >= 0.

  A side at or above WINDOW_UNBOUNDED hides nothing and becomes None (unbounded), so
  "huge" sides such as 2**31 - 1 never enter int32 position arithmetic.
  """
  if window is None:
    return None
  if _is_int(window):
    left, right = int(window), (0 if causal else int(window))
  elif isinstance(window, (bool, np.bool_, str)) or _is_traced(window):
    raise TypeError(f"window must be an int, a (left, right) pair or None, got {window!r}")
  else:
    try:
      left, right = window
    except (TypeError, ValueError):
      raise TypeError(f"window must be an int or a (left, right) pair, got {window!r}") from None
  for side, value in (("left", left), ("right", right)):
    if value is not None and not _is_int(value):
      raise TypeError(f"window {side} must be a non-negative int or None, got {value!r}")
    if value is not None and value < 0:
      raise ValueError(f"window {side} must be a non-negative int or None, got {value!r}")
  unbounded = lambda side: side is None or side >= WINDOW_UNBOUNDED
  left = None if unbounded(left) else int(left)
  right = None if unbounded(right) else int(right)
  if causal:
    right = 0  # causal already hides every key right of the query
  if left is None and (right is None or causal):
    return None  # the window hides nothing beyond what causal hides
  return (left, right)


def normalize(q, k, v, *, causal=False, scale=None, bias=None, mask=None, segment_ids=None,
              q_offset=None, window=None, softcap=None, dropout_rate=0.0, dropout_rng=None,
              q_lengths=None, kv_lengths=None, deterministic=None):
  """Validates a call; returns (spec, q, k, v, bias, arrays). Raises before any tracing."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if len(_shape(x)) != 4:
      raise ValueError(f"{name} must be 4-D [batch, length, heads, head_dim], got shape {_shape(x)}")
  q, k, v = _as_array(q), _as_array(k), _as_array(v)
  batch, q_len, num_q_heads, head_dim = q.shape
  kb, kv_len, num_kv_heads, k_head_dim = k.shape
  if q.dtype not in SUPPORTED_DTYPES:
    raise TypeError(f"q dtype must be one of bfloat16, float16, float32, float64, got {q.dtype}")
  if k.dtype != q.dtype or v.dtype != q.dtype:
    raise TypeError(f"q, k, v must share one dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
  if kb != batch or v.shape[0] != batch:
    raise ValueError(f"q, k, v must share the batch size, got q={q.shape}, k={k.shape}, v={v.shape}")
  if k_head_dim != head_dim:
    raise ValueError(f"q and k must share head_dim, got q={q.shape}, k={k.shape}")
  if v.shape[1] != kv_len or v.shape[2] != num_kv_heads:
    raise ValueError(f"k and v must share length and heads, got k={k.shape}, v={v.shape}")
  if num_kv_heads == 0 or num_q_heads % num_kv_heads:
    raise ValueError(f"q heads ({num_q_heads}) must be a multiple of k/v heads ({num_kv_heads}); "
                     f"q={q.shape}, k={k.shape}")
  if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM or not MIN_HEAD_DIM <= v.shape[3] <= MAX_HEAD_DIM:
    raise ValueError(f"head dims must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got q={q.shape}, v={v.shape}")
  if q_len == 0 or kv_len == 0:
    raise ValueError(f"sequence lengths must be positive, got q={q.shape}, k={k.shape}")
  if max(q_len, kv_len) > MAX_SEQUENCE_LENGTH:
    raise ValueError(f"sequence lengths must be at most {MAX_SEQUENCE_LENGTH} (int32 positions), "
                     f"got q={q.shape}, k={k.shape}")

  causal = check_bool("causal", causal)
  if scale is None:
    scale = 1.0 / float(np.sqrt(head_dim))
  if not _is_real(scale):
    raise TypeError(f"scale must be a Python float, got {type(scale).__name__}")
  if not np.isfinite(scale):
    raise ValueError(f"scale must be finite, got {scale!r}")
  if softcap is not None:
    if not _is_real(softcap):
      raise TypeError(f"softcap must be a positive float or None, got {softcap!r}")
    if not softcap > 0:  # NaN too
      raise ValueError(f"softcap must be a positive float or None, got {softcap!r}")
    # An infinite cap is no cap: c * tanh(s / c) -> s.
    softcap = None if softcap == float("inf") else float(softcap)
  if not _is_real(dropout_rate):
    raise TypeError(f"dropout_rate must be a float in [0, 1), got {dropout_rate!r}")
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"dropout_rate must be a float in [0, 1), got {dropout_rate!r}")
  if dropout_rate > 0.0 and dropout_rng is None:
    raise ValueError(f"dropout_rate={dropout_rate} needs a dropout_rng")

  target = (batch, num_q_heads, q_len, kv_len)
  if bias is not None:
    bias = _as_4d("bias", bias, target)
    if not jnp.issubdtype(bias.dtype, jnp.floating):
      raise TypeError(f"bias must be a float array, got dtype {bias.dtype}; pass bool masks as mask=")
  if mask is not None:
    mask = _as_4d("mask", mask, target)
    if mask.dtype != jnp.bool_:
      raise TypeError(f"mask must be a bool array (True = attend), got dtype {mask.dtype}")

  arrays = {}
  if q_offset is not None:
    if not isinstance(q_offset, jax.Array):
      q_offset = np.asarray(q_offset)
    if q_offset.ndim == 0:  # one offset for every batch row
      q_offset = (jnp if isinstance(q_offset, jax.Array) else np).broadcast_to(q_offset, (batch,))
    arrays["q_offset"] = _int_array("q_offset", q_offset, (batch,), -MAX_Q_OFFSET, MAX_Q_OFFSET)
  if segment_ids is not None:
    if isinstance(segment_ids, (tuple, list)):
      if len(segment_ids) != 2:
        raise ValueError("segment_ids must be an array [B, T] or a pair (q_ids [B, T], kv_ids [B, S])")
      q_ids, kv_ids = segment_ids
    else:
      if q_len != kv_len:
        raise ValueError(f"a single segment_ids array needs T == S (self-attention), got T={q_len}, "
                         f"S={kv_len}; pass a pair (q_ids, kv_ids)")
      q_ids = kv_ids = segment_ids
    q_ids, kv_ids = _compact_traced_ids(q_ids, kv_ids)
    arrays["q_segment_ids"] = _int_array("segment_ids (query)", q_ids, (batch, q_len))
    arrays["kv_segment_ids"] = _int_array("segment_ids (key/value)", kv_ids, (batch, kv_len))
  # A length <= 0 hides everything and one >= the sequence hides nothing: the clip keeps
  # the mask and bounds the kernels' int32 arithmetic.
  if q_lengths is not None:
    q_lengths = _int_array("q_lengths", q_lengths, (batch,))
    arrays["q_lengths"] = jnp.clip(q_lengths, 0, q_len)
  if kv_lengths is not None:
    kv_lengths = _int_array("kv_lengths", kv_lengths, (batch,))
    arrays["kv_lengths"] = jnp.clip(kv_lengths, 0, kv_len)
  if mask is not None:
    arrays["mask"] = mask
  if dropout_rate > 0.0:
    arrays["dropout_seed"] = dropout_seed_from_rng(dropout_rng)

  spec = AttentionSpec(
      batch=batch, q_len=q_len, kv_len=kv_len, num_q_heads=num_q_heads,
      num_kv_heads=num_kv_heads, head_dim=head_dim, head_dim_v=v.shape[3],
      dtype=q.dtype.name, scale=float(scale), causal=causal,
      window=normalize_window(window, causal), softcap=softcap,
      bias_shape=None if bias is None else tuple(bias.shape),
      mask_shape=None if mask is None else tuple(mask.shape),
      has_q_offset=q_offset is not None, has_segment_ids=segment_ids is not None,
      has_q_lengths=q_lengths is not None, has_kv_lengths=kv_lengths is not None,
      dropout_rate=float(dropout_rate), precision=jax.config.jax_default_matmul_precision,
      deterministic=resolve_deterministic(deterministic))
  return spec, q, k, v, bias, AttentionArrays(**arrays)


def _compact_traced_ids(q_ids, kv_ids):
  """Traced segment ids of a dtype wider than int32 -> their ranks among all ids (int32).

  Equal ids stay equal and different ids stay different, so the mask is unchanged and
  nothing wraps; concrete ids are range-checked by `_int_array` instead.
  """
  wide = lambda x: (_is_traced(x) and jnp.issubdtype(x.dtype, jnp.integer)
                    and (jnp.iinfo(x.dtype).max > INT32_MAX or jnp.iinfo(x.dtype).min < INT32_MIN))
  if not (wide(q_ids) or wide(kv_ids)):
    return q_ids, kv_ids
  q_ids, kv_ids = jnp.asarray(q_ids), jnp.asarray(kv_ids)
  common = jnp.promote_types(q_ids.dtype, kv_ids.dtype)
  q_ids, kv_ids = q_ids.astype(common), kv_ids.astype(common)
  ordered = jnp.sort(jnp.concatenate([q_ids.reshape(-1), kv_ids.reshape(-1)]))
  rank = lambda x: jnp.searchsorted(ordered, x).astype(jnp.int32)
  return rank(q_ids), rank(kv_ids)


def dropout_seed_from_rng(rng) -> jax.Array:
  """A uint32 seed from a PRNG key (new-style typed or raw uint32[2])."""
  dtype = getattr(rng, "dtype", None)
  is_key = dtype is not None and (jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
                                  or (dtype == jnp.uint32 and np.ndim(rng) == 1))
  if not is_key:
    raise TypeError(f"dropout_rng must be a PRNG key (jax.random.key(seed) or "
                    f"jax.random.PRNGKey(seed)), got {rng!r}")
  try:
    return jax.random.bits(rng, (), jnp.uint32)
  except (TypeError, ValueError) as e:
    raise TypeError(f"dropout_rng must be a single PRNG key, got shape {np.shape(rng)}: {e}") from None
