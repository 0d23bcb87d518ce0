"""Flax-compatible attention functions: `dot_product_attention` and `make_attention_fn`.

Both take Flax's layout and keywords (flax.nnx / flax.linen `dot_product_attention`):
query [batch..., T, Nq, H], key [batch..., S, Nkv, H], value [batch..., S, Nkv, Hv]; bias
and mask broadcastable to [batch..., Nq, T, S] (mask: nonzero/True = attend). Any number
of leading batch dims (none included) is flattened into flash_jax's single batch dim.
They plug into `flax.nnx.MultiHeadAttention(attention_fn=...)` and
`flax.linen.MultiHeadDotProductAttention(attention_fn=...)`.

Where they differ from Flax (documented, never silent):
  * a query row that sees no key returns 0 (Flax: the mean of value);
  * dropout: flash_jax draws its keep-mask from a counter-based hash of
    (rng, batch, head, query, key), not from `jax.random.bernoulli`, so with dropout on
    the result has Flax's distribution but not its bits; only with dropout off
    (deterministic=True or dropout_rate=0) are results equal to Flax's. With
    broadcast_dropout=True (Flax's default) one keep-mask [T, S] is shared by every
    batch element and head, as in Flax: we run one flash call per (batch, head) under
    `jax.vmap` with the same rng, so all see the hash's (0, 0) slice. That is exact but
    launches batch x heads small problems; broadcast_dropout=False is the fast path;
  * `precision`: HIGH/HIGHEST (or their names, or a dot algorithm preset) apply to
    float32 and float64 inputs: the jnp implementations ("xla", "chunked") run every
    product, forward and backward, at that precision; the Triton and Mosaic TPU kernels
    always multiply float32 operands at full float32 precision (HIGHEST). bfloat16 and
    float16 inputs need none: their products are exact in the float32 accumulators;
  * `module` (Flax's `sow_weights=True`) is a debugging aid: the attention weights
    [batch..., Nq, T, S] (before dropout; 0 on rows that see no key) are computed a
    second time on the slow, materializing path and sown as 'attention_weights', as
    Flax does; the output still comes from the flash call, unchanged;
  * custom einsums (`einsum_dot_general`, `qk_attn_weights_einsum`,
    `attn_weights_value_einsum`) cannot run inside a flash kernel: they raise
    NotImplementedError (and ValueError where Flax itself rejects the combination).
    `force_fp32_for_softmax` is always honoured (softmax statistics are float32 in every
    implementation; it also makes sown weights float32, as in Flax).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from flash_jax import api, dispatch, reference, sinks as sinks_lib
from flash_jax import spec as spec_lib
from flash_jax.config import BlockSizes
from flash_jax.spec import normalize_window


@dataclasses.dataclass(frozen=True)
class AttentionFn:
  """A Flax-compatible attention function bound to flash_jax's structured masking.

  Frozen and hashable, so it can be a static attribute of nnx and linen modules. Build
  it with `make_attention_fn`; `dot_product_attention` is the instance with no options.
  """

  causal: bool = False
  window: int | tuple[int | None, int | None] | None = None
  softcap: float | None = None
  scale: float | None = None
  implementation: str | None = None
  block_sizes: BlockSizes | None = None
  interpret: bool = False
  deterministic_backward: bool | None = None  # flash_attention's `deterministic`

  def __post_init__(self):
    if not isinstance(self.causal, bool):
      raise TypeError(f"causal must be a bool, got {self.causal!r}")
    normalize_window(self.window, self.causal)  # raises on a malformed window
    if self.softcap is not None and (not isinstance(self.softcap, (int, float))
                                     or self.softcap <= 0):
      raise ValueError(f"softcap must be a positive float or None, got {self.softcap!r}")
    if self.scale is not None and not isinstance(self.scale, (int, float)):
      raise TypeError(f"scale must be a Python float or None, got {type(self.scale).__name__}")
    names = dispatch.implementation_names()
    if self.implementation is not None and self.implementation not in names:
      raise ValueError(f"implementation must be None or one of {names}, "
                       f"got {self.implementation!r}")
    if self.block_sizes is not None and not isinstance(self.block_sizes, BlockSizes):
      raise TypeError(f"block_sizes must be a BlockSizes, got {type(self.block_sizes).__name__}")
    if self.deterministic_backward is not None:
      spec_lib.check_bool("deterministic_backward", self.deterministic_backward)

  def __call__(self, query, key, value, bias=None, mask=None, broadcast_dropout=True,
               dropout_rng=None, dropout_rate=0.0, deterministic=False, dtype=None,
               precision=None, module=None, *, promote_dtype=None, is_causal=False,
               force_fp32_for_softmax=False, einsum_dot_general=None,
               qk_attn_weights_einsum=None, attn_weights_value_einsum=None,
               segment_ids=None, sinks=None):
    """softmax(query key^T / sqrt(H) + bias, masked) value, in Flax's layout.

    Args (Flax's, see flax.nnx.dot_product_attention):
      query [batch..., T, Nq, H], key [batch..., S, Nkv, H], value [batch..., S, Nkv, Hv];
        Nq a multiple of Nkv (GQA).
      bias: float, broadcastable to [batch..., Nq, T, S].
      mask: broadcastable to [batch..., Nq, T, S]; nonzero/True = attend. A dense mask
        is read for every tile; use `make_attention_fn(causal=..., window=...)` or
        `is_causal` for structured masks that skip whole tiles.
      broadcast_dropout, dropout_rng, dropout_rate, deterministic: dropout on the
        attention weights when `not deterministic and dropout_rate > 0` (see the
        module docstring for how the keep-mask differs from Flax's).
      dtype: computation dtype; default: q, k, v promoted to a common dtype.
      precision: matmul precision of float32/float64 inputs (module docstring).
      module: a Flax module (nnx or linen) to sow the attention weights into, as
        'attention_weights' (Flax's sow_weights=True): a debugging aid that materializes
        them on the slow path beside the flash call.
      promote_dtype: nnx's dtype promotion hook, called as promote_dtype((q, k, v), dtype=dtype).
      is_causal: nnx's flag; combined (or) with this function's own `causal`.
      force_fp32_for_softmax: linen's flag; always honoured.
      einsum_dot_general, qk_attn_weights_einsum, attn_weights_value_einsum: linen's
        einsum overrides; must be None.
    flash_jax extension (keyword only; Flax's modules never pass it):
      segment_ids: int [batch..., T] (self-attention) or a pair ([batch..., T],
        [batch..., S]): a query sees only keys of its own segment.
      sinks: float [Nq]: attention sinks, as `flash_jax.flash_attention`.

    Returns:
      [batch..., T, Nq, Hv] in the computation dtype.
    """
    _reject_custom_einsums(precision=precision, einsum_dot_general=einsum_dot_general,
                           qk_attn_weights_einsum=qk_attn_weights_einsum,
                           attn_weights_value_einsum=attn_weights_value_einsum)
    query, key, value = _promote(query, key, value, dtype, promote_dtype)
    batch_shape = _check_shapes(query, key, value)
    flat_batch = math.prod(batch_shape)
    flatten = lambda x: x.reshape((flat_batch,) + x.shape[len(batch_shape):])
    q, k, v = flatten(query), flatten(key), flatten(value)  # [B, T|S, N, H]
    bias = _flatten_broadcastable("bias", bias, batch_shape)
    if mask is not None:
      mask = _flatten_broadcastable("mask", jnp.asarray(mask).astype(jnp.bool_), batch_shape)
    segment_ids = _flatten_segment_ids(segment_ids, batch_shape)

    use_dropout = not deterministic and dropout_rate > 0.0
    if use_dropout and dropout_rng is None:
      raise ValueError(f"dropout_rate={dropout_rate} with deterministic=False needs a dropout_rng")
    structure = dict(causal=self.causal or bool(is_causal), window=self.window,
                     softcap=self.softcap, scale=self.scale)
    kwargs = dict(structure, implementation=self.implementation, block_sizes=self.block_sizes,
                  interpret=self.interpret, deterministic=self.deterministic_backward)
    if use_dropout:
      kwargs.update(dropout_rate=float(dropout_rate), dropout_rng=dropout_rng)
    # The jnp implementations read the call's jax.default_matmul_precision (spec.precision).
    with _matmul_precision(precision, q.dtype):
      if module is not None:
        weights_dtype = jnp.float32 if force_fp32_for_softmax else q.dtype
        weights = _attention_weights(q, k, v, bias, mask, segment_ids, sinks, structure)
        _sow(module, weights.astype(weights_dtype).reshape(batch_shape + weights.shape[1:]))
      if use_dropout and broadcast_dropout:
        out = _attention_shared_dropout(q, k, v, bias, mask, segment_ids, sinks, kwargs)
      else:
        out = api.flash_attention(q, k, v, bias=bias, mask=mask, segment_ids=segment_ids,
                                  sinks=sinks, **kwargs)
    return out.reshape(batch_shape + out.shape[1:])


def make_attention_fn(*, causal: bool = False, window=None, softcap: float | None = None,
                      scale: float | None = None, implementation: str | None = None,
                      block_sizes: BlockSizes | None = None, interpret: bool = False,
                      deterministic_backward: bool | None = None) -> AttentionFn:
  """A Flax-compatible attention function with structured masking (the fast path).

  Unlike a dense `mask`, `causal` and `window` let kernels skip whole tiles that no
  query sees. Arguments as in `flash_jax.flash_attention`:
    causal: query i sees key j only when j <= i (top-left aligned, as Flax's causal mask).
    window: (left, right) keys i-left ... i+right; an int w means (w, w), (w, 0) with causal.
    softcap: logits = softcap * tanh(logits / softcap).
    scale: logit scale; default 1 / sqrt(H), as Flax.
    implementation, block_sizes, interpret: which flash_jax implementation runs, and how.
    deterministic_backward: `flash_jax.flash_attention`'s `deterministic` (reproducible
      gradients; None follows XLA_FLAGS). Named apart from Flax's `deterministic`, which
      switches dropout off.

  Example:
    attn = nnx.MultiHeadAttention(num_heads=8, in_features=512, decode=False, rngs=rngs,
                                  attention_fn=make_attention_fn(causal=True))
  """
  if isinstance(window, list):
    window = tuple(window)  # hashable: the function is a static module attribute
  return AttentionFn(causal=causal, window=window, softcap=softcap, scale=scale,
                     implementation=implementation, block_sizes=block_sizes, interpret=interpret,
                     deterministic_backward=deterministic_backward)


dot_product_attention = AttentionFn()
"""Drop-in for `flax.nnx.dot_product_attention` / `flax.linen.dot_product_attention`."""


def _reject_custom_einsums(*, precision, einsum_dot_general, qk_attn_weights_einsum,
                           attn_weights_value_einsum) -> None:
  """Flax's own checks of the einsum overrides (ValueError), then NotImplementedError:
  a flash kernel cannot call a user's einsum."""
  custom = qk_attn_weights_einsum is not None or attn_weights_value_einsum is not None
  if (qk_attn_weights_einsum is None) != (attn_weights_value_einsum is None):
    raise ValueError("qk_attn_weights_einsum and attn_weights_value_einsum must be specified "
                     "together")
  if custom and (precision is not None or einsum_dot_general is not None):
    raise ValueError("precision/einsum_dot_general and qk_attn_weights_einsum/"
                     "attn_weights_value_einsum are mutually exclusive; specify only one of them")
  for name, value in (("einsum_dot_general", einsum_dot_general),
                      ("qk_attn_weights_einsum", qk_attn_weights_einsum)):
    if value is not None:
      raise NotImplementedError(
          f"flash_jax attention cannot honour a custom {name}: its products run inside the "
          "flash kernels; pass None, or use Flax's own dot_product_attention")


def _precision_level(precision) -> str | None:
  """Flax's `precision` -> the jax.default_matmul_precision it asks for (None: default).
  A per-operand pair asks for the higher of its two."""
  if isinstance(precision, jax.lax.DotAlgorithmPreset):
    return precision.name
  parts = tuple(precision) if isinstance(precision, (tuple, list)) else (precision,)
  try:  # Precision.DEFAULT, HIGH, HIGHEST have values 0, 1, 2; names map onto them
    rank = max(0 if p is None else jax.lax.Precision(p).value for p in parts)
  except (ValueError, TypeError):
    raise ValueError(f"precision must be None, a jax.lax.Precision, its name, a pair of "
                     f"them or a jax.lax.DotAlgorithmPreset, got {precision!r}") from None
  return (None, "high", "highest")[rank]


def _matmul_precision(precision, dtype):
  """A context setting jax.default_matmul_precision for float32/float64 inputs (a no-op
  for bfloat16/float16 inputs, whose products are exact in float32 accumulators)."""
  level = _precision_level(precision)
  if level is None or jnp.dtype(dtype).itemsize < 4:
    return contextlib.nullcontext()
  return jax.default_matmul_precision(level)


def _attention_weights(q, k, v, bias, mask, segment_ids, sinks, structure):
  """Softmax weights [B, Nq, T, S] before dropout (sinks in the denominator), on the
  materializing path."""
  spec, q, k, _, bias, arrays = spec_lib.normalize(q, k, v, bias=bias, mask=mask,
                                                   segment_ids=segment_ids, **structure)
  sinks = sinks_lib.check_sinks(sinks, spec.num_q_heads)
  return reference.attention_weights(q, k, bias, arrays, spec, sinks)


def _sow(module, weights) -> None:
  """Sows into Flax's collection: linen's 'intermediates', nnx's Intermediate."""
  from flax import linen, nnx  # flash_jax.flax imports flax; flash_jax alone does not
  if isinstance(module, linen.Module):
    module.sow("intermediates", "attention_weights", weights)
  elif isinstance(module, nnx.Module):
    module.sow(nnx.Intermediate, "attention_weights", weights)
  else:
    raise TypeError(f"module must be a flax.nnx or flax.linen Module to sow the attention "
                    f"weights into, got {type(module).__name__}")


def _promote(query, key, value, dtype, promote_dtype):
  """Flax's dtype rule: cast q, k, v to `dtype`, or to their promoted common dtype."""
  if promote_dtype is not None:
    return promote_dtype((query, key, value), dtype=dtype)
  query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
  if dtype is None:
    dtype = jnp.result_type(query, key, value)
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"dtype must be a floating dtype, got {dtype} (query={query.dtype}, "
                    f"key={key.dtype}, value={value.dtype})")
  return query.astype(dtype), key.astype(dtype), value.astype(dtype)


def _check_shapes(query, key, value) -> tuple[int, ...]:
  """Flax's shape checks, as ValueError with Flax's wording; -> the batch shape."""
  shapes = f"{query.shape}, {key.shape}, {value.shape}"
  if not query.ndim == key.ndim == value.ndim:
    raise ValueError(f"query, key, value must have same rank, got shapes {shapes}")
  if query.ndim < 3:
    raise ValueError(f"query, key, value must have rank >= 3 ([batch..., length, heads, "
                     f"head_dim]), got shapes {shapes}")
  batch_shape = query.shape[:-3]
  if key.shape[:-3] != batch_shape or value.shape[:-3] != batch_shape:
    raise ValueError(f"query, key, value batch dims must match, got shapes {shapes}")
  if key.shape[-3] != value.shape[-3]:
    raise ValueError(f"key, value lengths must match, got shapes {shapes}")
  if query.shape[-1] != key.shape[-1]:
    raise ValueError(f"query, key depths must match, got shapes {shapes}")
  if key.shape[-2] != value.shape[-2] or query.shape[-2] % key.shape[-2]:
    raise ValueError(f"query heads must be a multiple of key/value heads (which must match), "
                     f"got shapes {shapes}")
  return batch_shape


def _flatten_broadcastable(name: str, x, batch_shape: tuple[int, ...]):
  """[batch?..., N?, T?, S?] (numpy broadcasting) -> 4-D [B or 1, N?, T?, S?].

  Batch dims that are all 1 stay one broadcast dim; otherwise they are broadcast to the
  full batch shape and flattened (a partially broadcast batch is materialized).
  """
  if x is None:
    return None
  x = jnp.asarray(x)
  rank = len(batch_shape) + 3
  if x.ndim > rank:
    raise ValueError(f"{name} of shape {x.shape} has more dims than [batch..., heads, q_length, "
                     f"kv_length] (batch dims {batch_shape})")
  x = x.reshape((1,) * (rank - x.ndim) + x.shape)
  lead, rest = x.shape[:len(batch_shape)], x.shape[len(batch_shape):]
  if all(d == 1 for d in lead):
    return x.reshape((1,) + rest)
  if lead != batch_shape:
    try:
      x = jnp.broadcast_to(x, batch_shape + rest)
    except ValueError:
      raise ValueError(f"{name} of shape {x.shape} does not broadcast to batch dims "
                       f"{batch_shape}") from None
  return x.reshape((math.prod(batch_shape),) + rest)


def _flatten_segment_ids(segment_ids, batch_shape):
  if segment_ids is None:
    return None
  flat = lambda ids: jnp.reshape(ids, (math.prod(batch_shape),) + np.shape(ids)[len(batch_shape):])
  if isinstance(segment_ids, (tuple, list)):
    if len(segment_ids) != 2:
      raise ValueError("segment_ids must be an array [batch..., T] or a pair "
                       "([batch..., T], [batch..., S])")
    return tuple(flat(ids) for ids in segment_ids)
  return flat(segment_ids)


def _attention_shared_dropout(q, k, v, bias, mask, segment_ids, sinks, kwargs):
  """Flax's broadcast_dropout: one keep-mask [T, S] for every batch element and head.

  flash_jax's keep-mask hashes (rng, batch, head, query, key). Running one problem of
  batch 1 and one head per (batch, head) under vmap, all with the same rng, makes every
  one of them read the same (0, 0) slice of the hash. q [B, T, Nq, H], k/v [B, S, Nkv, .].
  """
  batch, q_len, num_q_heads, _ = q.shape
  num_kv_heads = k.shape[2]
  if num_q_heads % num_kv_heads:
    raise ValueError(f"query heads ({num_q_heads}) must be a multiple of key/value heads "
                     f"({num_kv_heads})")
  group = num_q_heads // num_kv_heads
  q5 = q.reshape(batch, q_len, num_kv_heads, group, q.shape[-1])  # [B, T, Nkv, G, H]

  def squeezed(x):
    """4-D [B?, Nq?, T?, S?] -> [B?, Nkv?, G?, T?, S?] with the broadcast (size 1) B, Nkv
    and G dims dropped, and which of those three it kept (each is vmapped at axis 0)."""
    if x is None:
      return None, (False, False, False)
    x5 = x[:, :, None] if x.shape[1] == 1 else x.reshape(
        x.shape[0], num_kv_heads, group, x.shape[2], x.shape[3])
    kept = tuple(d > 1 for d in x5.shape[:3])
    return x5.reshape(tuple(d for d, keep in zip(x5.shape[:3], kept) if keep) + x5.shape[3:]), kept

  bias5, bias_kept = squeezed(bias)
  mask5, mask_kept = squeezed(mask)
  seg_q, seg_kv = (segment_ids if isinstance(segment_ids, tuple)
                   else (segment_ids, segment_ids))
  if sinks is not None:
    sinks = sinks_lib.check_sinks(sinks, num_q_heads).reshape(num_kv_heads, group)

  def one_head(q1, k1, v1, bias1, mask1, seg_q1, seg_kv1, sink1):
    # q1 [T, H], k1 [S, H], v1 [S, Hv], bias1/mask1 [T?, S?], seg_q1 [T], seg_kv1 [S], sink1 [].
    expand = lambda x: None if x is None else x[None, :, None, :]
    pair = None if seg_q1 is None else (seg_q1[None], seg_kv1[None])
    out = api.flash_attention(
        expand(q1), expand(k1), expand(v1), bias=None if bias1 is None else bias1[None, None],
        mask=None if mask1 is None else mask1[None, None], segment_ids=pair,
        sinks=None if sink1 is None else sink1[None], **kwargs)
    return out[0, :, 0]  # [T, Hv]

  def level(i):  # in_axes of bias and mask at vmap level i (0: batch, 1: kv head, 2: group)
    return (0 if bias_kept[i] else None), (0 if mask_kept[i] else None)

  # Innermost: the G query heads that share one k/v head; then the k/v heads; then batch.
  sink_axis = None if sinks is None else 0  # sinks [Nkv, G]: vmapped over kv heads, group
  over_group = jax.vmap(one_head, in_axes=(1, None, None, *level(2), None, None, sink_axis),
                        out_axes=1)
  over_kv = jax.vmap(over_group, in_axes=(1, 1, 1, *level(1), None, None, sink_axis),
                     out_axes=1)
  seg_axis = lambda ids: None if ids is None else 0
  over_batch = jax.vmap(over_kv, in_axes=(0, 0, 0, *level(0), seg_axis(seg_q), seg_axis(seg_kv),
                                          None), out_axes=0)
  out = over_batch(q5, k, v, bias5, mask5, seg_q, seg_kv, sinks)  # [B, T, Nkv, G, Hv]
  return out.reshape(batch, q_len, num_q_heads, out.shape[-1])
