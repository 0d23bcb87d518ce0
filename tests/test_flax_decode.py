"""Decoding with flash_jax's Flax modules: the autoregressive cache of nnx and linen
FlashAttention, and Flax's own MultiHeadAttention decode with our attention_fn.

The bar is teacher forcing: prefill + decode steps over a sequence give the outputs of
one full causal forward over it, by `flash_jax.accuracy`'s rule (the full forward at
default precision is the same-precision baseline, at HIGHEST the reference).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("flax")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from flash_jax import accuracy  # noqa: E402
import flash_jax.flax as fjf  # noqa: E402
from flash_jax.flax import decode as decode_lib  # noqa: E402

FEATURES, HEADS, BATCH = 32, 4, 2
# (new tokens per call): a prefill, single steps, a multi-token step, single steps.
CHUNKS = (6, 1, 1, 3, 1, 1)
LENGTH = sum(CHUNKS)  # 13
MAX_LENGTH = 17  # room past the last token: the unfilled tail is poisoned


def normal(seed, shape, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def assert_accurate(name, ours, same_precision, reference, dtype):
  verdict = accuracy.judge(ours, same_precision, reference, factor=accuracy.FORWARD_FACTOR,
                           dtype=dtype)
  assert verdict.ok, verdict.describe(name)


def pieces(x, chunks=CHUNKS):
  """x [B, T, ...] -> the consecutive slices of `chunks` tokens along axis 1."""
  starts = np.cumsum((0,) + chunks[:-1])
  return [x[:, s:s + n] for s, n in zip(starts, chunks)]


# (kv heads, module kwargs): MHA and GQA; every case is causal (decoding is).
CASES = {
    "mha_causal": (None, dict(causal=True)),
    "gqa_window": (2, dict(causal=True, window=4)),
    "gqa_softcap": (2, dict(causal=True, softcap=3.0)),
    "mha_window_softcap": (None, dict(causal=True, window=(3, 0), softcap=2.0)),
}


def poison(value, index):
  """A cache value with its positions >= index filled with a large finite junk value:
  read, it would dominate the softmax and the output (NaN: see the triton test)."""
  position = jnp.arange(value.shape[-3])[:, None, None]
  return jnp.where(position >= index, jnp.asarray(1e4, value.dtype), value)


# ---- nnx ---------------------------------------------------------------------------------

def _nnx_module(kv_heads, dtype=None, **kwargs):
  return fjf.nnx.FlashAttention(HEADS, FEATURES, num_kv_heads=kv_heads, dtype=dtype,
                                rngs=nnx.Rngs(0), **kwargs)


def _nnx_decode(module, x, chunks=CHUNKS, cache_dtype=jnp.float32):
  """Teacher-forced decoding of x [B, T, F], chunk by chunk, under nnx.jit."""
  module.init_cache((BATCH, MAX_LENGTH, FEATURES), cache_dtype)
  module.cached_key[...] = poison(module.cached_key[...], 0)
  module.cached_value[...] = poison(module.cached_value[...], 0)
  step = nnx.jit(lambda m, x: m(x, decode=True))
  outs = [step(module, piece) for piece in pieces(x, chunks)]
  assert int(module.cache_index[...]) == x.shape[1]
  return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize("case", list(CASES))
def test_nnx_decode_equals_full_forward(case):
  kv_heads, kwargs = CASES[case]
  module = _nnx_module(kv_heads, **kwargs)
  x = normal(1, (BATCH, LENGTH, FEATURES))
  decoded = _nnx_decode(module, x)
  full = nnx.jit(lambda m, x: m(x))
  same_precision = full(module, x)
  with jax.default_matmul_precision("highest"):
    reference = full(module, x)
  assert_accurate(f"nnx {case} output", decoded, same_precision, reference, "float32")


def test_nnx_decode_bfloat16():
  kwargs = dict(causal=True, window=5, num_kv_heads=2)
  ours = fjf.nnx.FlashAttention(HEADS, FEATURES, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), **kwargs)
  x = normal(1, (BATCH, LENGTH, FEATURES), jnp.bfloat16)
  decoded = _nnx_decode(ours, x, cache_dtype=jnp.bfloat16)
  assert decoded.dtype == jnp.bfloat16 and ours.cached_key.dtype == jnp.bfloat16
  same_precision = ours(x)
  f32 = fjf.nnx.FlashAttention(HEADS, FEATURES, rngs=nnx.Rngs(0), **kwargs)
  with jax.default_matmul_precision("highest"):
    reference = f32(x.astype(jnp.float32))
  assert_accurate("nnx bfloat16 output", decoded, same_precision, reference, "bfloat16")


def test_nnx_decode_never_reads_past_the_index_nan_poison():
  """The triton kernel (interpret mode) with NaN past the index: none reaches the output."""
  kwargs = dict(causal=True, num_kv_heads=2, implementation="triton", interpret=True)
  module = fjf.nnx.FlashAttention(HEADS, FEATURES, rngs=nnx.Rngs(0), **kwargs)
  x = normal(1, (BATCH, 7, FEATURES))
  module.init_cache((BATCH, MAX_LENGTH, FEATURES))
  nan = jnp.full_like(module.cached_key[...], jnp.nan)
  module.cached_key[...], module.cached_value[...] = nan, nan
  decoded = jnp.concatenate([module(p, decode=True) for p in pieces(x, (4, 1, 2))], axis=1)
  assert np.isfinite(np.asarray(decoded)).all()
  np.testing.assert_allclose(decoded, module(x), atol=2e-5, rtol=2e-5)


def test_nnx_decode_uses_the_decode_path(monkeypatch):
  """Attention gets kv_lengths = index + T and q_offset = index, never a mask."""
  calls = []
  real = decode_lib.api.flash_attention

  def spy(q, k, v, **kwargs):
    calls.append((k.shape, kwargs))
    return real(q, k, v, **kwargs)

  monkeypatch.setattr(decode_lib.api, "flash_attention", spy)
  module = _nnx_module(2, causal=True, window=3, softcap=2.0)
  module.init_cache((BATCH, MAX_LENGTH, FEATURES))
  x = normal(1, (BATCH, 5, FEATURES))
  module(x[:, :4], decode=True)
  module(x[:, 4:], decode=True)
  assert len(calls) == 2
  for (k_shape, kwargs), index, new in zip(calls, (0, 4), (4, 1)):
    assert k_shape == (BATCH, MAX_LENGTH, 2, FEATURES // HEADS)
    assert kwargs["mask"] is None and kwargs["causal"] and kwargs["window"] == 3
    assert kwargs["softcap"] == 2.0
    np.testing.assert_array_equal(kwargs["kv_lengths"], [index + new] * BATCH)
    np.testing.assert_array_equal(kwargs["q_offset"], [index] * BATCH)


def test_nnx_decode_ragged_rows():
  """A per-row index: rows prefill different prompt lengths in one call (lengths), then
  decode together; each row equals its own full forward."""
  module = _nnx_module(2, causal=True)
  x = normal(1, (BATCH, 9, FEATURES))
  prompt = np.array([5, 2])
  module.init_cache((BATCH, MAX_LENGTH, FEATURES), ragged=True)
  assert module.cache_index.shape == (BATCH,)
  step = nnx.jit(lambda m, x, n: m(x, decode=True, lengths=n))
  first = step(module, x[:, :5], jnp.asarray(prompt))
  np.testing.assert_array_equal(module.cache_index[...], prompt)
  np.testing.assert_array_equal(first[1, 2:], 0)  # padding rows of the short prompt
  outs = [first]
  for t in range(4):  # row b feeds its token prompt[b] + t
    tokens = jnp.stack([x[b, prompt[b] + t] for b in range(BATCH)])[:, None]
    outs.append(step(module, tokens, jnp.ones(BATCH, jnp.int32)))
  with jax.default_matmul_precision("highest"):
    for b in range(BATCH):
      full = module(x[b:b + 1, :prompt[b] + 4])[0]
      got = jnp.concatenate([outs[0][b, :prompt[b]]] + [o[b] for o in outs[1:]])
      np.testing.assert_allclose(got, full, atol=2e-5, rtol=2e-5)


def test_nnx_decode_constructor_flag_view_and_batch_dims():
  """decode=True in the constructor, nnx.view's switch, and two batch dims."""
  x = normal(1, (2, 3, 7, FEATURES))
  plain = _nnx_module(None, causal=True)
  full = plain(x)
  always = fjf.nnx.FlashAttention(HEADS, FEATURES, causal=True, decode=True, rngs=nnx.Rngs(0))
  always.init_cache((2, 3, 9, FEATURES))
  assert always.cache_index.shape == ()
  np.testing.assert_allclose(jnp.concatenate([always(x[:, :, :4]), always(x[:, :, 4:])], 2),
                             full, atol=2e-5, rtol=2e-5)
  viewed = nnx.view(plain, decode=True, batch_size=(2, 3), max_length=9)
  assert viewed.decode and not plain.decode and viewed.cached_key.shape == (2, 3, 9, HEADS, 8)
  np.testing.assert_allclose(jnp.concatenate([viewed(x[:, :, :6]), viewed(x[:, :, 6:])], 2),
                             full, atol=2e-5, rtol=2e-5)
  np.testing.assert_array_equal(plain(x), full)  # the original stays decode-free


def test_nnx_decode_dense_mask_is_honoured():
  """A mask over [T, max_length] (the slow route) combines with the decode path."""
  module = _nnx_module(None, causal=True)
  x = normal(1, (BATCH, 6, FEATURES))
  keep = jnp.arange(MAX_LENGTH) != 1  # hide key 1 from every query
  module.init_cache((BATCH, MAX_LENGTH, FEATURES))
  decoded = jnp.concatenate([module(x[:, :4], decode=True, mask=keep[None, None, None]),
                             module(x[:, 4:], decode=True, mask=keep[None, None, None])], 1)
  dense = jnp.tril(jnp.ones((6, 6), bool)) & (jnp.arange(6) != 1)[None]
  expected = fjf.nnx.FlashAttention(HEADS, FEATURES, rngs=nnx.Rngs(0))(x, mask=dense[None, None])
  np.testing.assert_allclose(decoded, expected, atol=2e-5, rtol=2e-5)


def test_nnx_decode_past_max_length():
  module = _nnx_module(2, causal=True)
  x = normal(1, (BATCH, MAX_LENGTH + 1, FEATURES))
  module.init_cache((BATCH, MAX_LENGTH, FEATURES))
  with pytest.raises(ValueError, match="max_length"):  # the shapes say so
    nnx.jit(lambda m, x: m(x, decode=True))(module, x)
  module(x[:, :MAX_LENGTH - 2], decode=True)
  with pytest.raises(ValueError, match="max_length=17"):  # eager: a concrete index
    module(x[:, :3], decode=True)
  assert int(module.cache_index[...]) == MAX_LENGTH - 2  # nothing was written

  # Under jit: the documented clamp.
  graphdef, state = nnx.split(module)
  keys_before = module.cached_key[...]

  def step(state, x):
    m = nnx.merge(graphdef, state)
    return m(x, decode=True), nnx.state(m)

  out, after = jax.jit(step)(state, x[:, :3])
  clamped = nnx.merge(graphdef, after)
  assert int(clamped.cache_index[...]) == MAX_LENGTH + 1  # records the overflow
  np.testing.assert_array_equal(clamped.cached_key[...][:, :MAX_LENGTH - 2],
                                keys_before[:, :MAX_LENGTH - 2])  # nothing earlier overwritten
  assert np.isfinite(np.asarray(out)).all()
  # The tokens that fit are written and attended as without the overflow.
  fits, exactly_full = jax.jit(step)(state, x[:, :2])
  assert int(nnx.merge(graphdef, exactly_full).cache_index[...]) == MAX_LENGTH
  np.testing.assert_array_equal(clamped.cached_key[...],
                                nnx.merge(graphdef, exactly_full).cached_key[...])
  np.testing.assert_allclose(out[:, :2], fits, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("call, error, match", [
    (lambda m, x: m(x, decode=True), ValueError, "init_cache"),
    (lambda m, x: m(x, lengths=jnp.ones(BATCH, jnp.int32)), ValueError, "decode"),
])
def test_nnx_decode_errors_without_cache(call, error, match):
  with pytest.raises(error, match=match):
    call(_nnx_module(None, causal=True), normal(1, (BATCH, 3, FEATURES)))


def test_nnx_decode_errors_with_cache():
  module = _nnx_module(None, causal=True, dropout_rate=0.1)
  module.init_cache((BATCH, MAX_LENGTH, FEATURES))
  x = normal(1, (BATCH, 3, FEATURES))
  with pytest.raises(ValueError, match="ragged=True"):
    module(x, decode=True, deterministic=True, lengths=jnp.ones(BATCH, jnp.int32))
  with pytest.raises(ValueError, match="segment_ids"):
    module(x, decode=True, deterministic=True, segment_ids=jnp.zeros((BATCH, 3), jnp.int32))
  with pytest.raises(NotImplementedError, match="deterministic=True"):
    module(x, decode=True, deterministic=False)
  with pytest.raises(ValueError, match="as many tokens as the query"):
    module(x, x[:, :2], decode=True, deterministic=True)  # keys of another length
  with pytest.raises(ValueError, match="batch dims"):
    module(x[:1], decode=True, deterministic=True)
  assert int(module.cache_index[...]) == 0


def test_nnx_training_with_remat_unchanged_beside_decode():
  """A decode-capable module (decode=False) trains under nnx.remat as before."""
  module = _nnx_module(2, causal=True)
  x = normal(1, (BATCH, 8, FEATURES))
  loss = lambda m: jnp.sum(jnp.sin(nnx.remat(lambda m, x: m(x))(m, x)))
  plain = lambda m: jnp.sum(jnp.sin(m(x)))
  grads = lambda f: nnx.state(nnx.jit(nnx.grad(f))(module), nnx.Param)
  for g, r in zip(jax.tree.leaves(grads(loss)), jax.tree.leaves(grads(plain))):
    np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5)
  assert module.cached_key is None  # no cache unless asked for


# ---- linen -------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
def test_linen_decode_equals_full_forward(case):
  kv_heads, kwargs = CASES[case]
  module = fjf.linen.FlashAttention(num_heads=HEADS, num_kv_heads=kv_heads, **kwargs)
  x = normal(1, (BATCH, LENGTH, FEATURES))
  params = module.init(jax.random.key(0), x)["params"]
  decoder = module.clone(decode=True)
  variables = decoder.init(jax.random.key(0), jnp.zeros((BATCH, MAX_LENGTH, FEATURES)))
  kv_heads = kv_heads or HEADS
  assert jax.tree.map(jnp.shape, variables["cache"]) == {
      "cached_key": (BATCH, MAX_LENGTH, kv_heads, 8),
      "cached_value": (BATCH, MAX_LENGTH, kv_heads, 8), "cache_index": ()}
  cache = jax.tree.map(lambda c: poison(c, 0) if c.ndim else c, variables["cache"])

  @jax.jit
  def step(cache, x):
    out, mutated = decoder.apply({"params": params, "cache": cache}, x, mutable=["cache"])
    return out, mutated["cache"]

  outs = []
  for piece in pieces(x):
    out, cache = step(cache, piece)
    outs.append(out)
  assert int(cache["cache_index"]) == LENGTH
  full = jax.jit(lambda x: module.apply({"params": params}, x))
  same_precision = full(x)
  with jax.default_matmul_precision("highest"):
    reference = full(x)
  assert_accurate(f"linen {case} output", jnp.concatenate(outs, 1), same_precision,
                  reference, "float32")


def test_linen_decode_scanned_layers():
  """A scanned stack of layers decodes with a stacked cache."""
  class Layer(nn.Module):
    decode: bool = False

    @nn.compact
    def __call__(self, x, _):
      return x + fjf.linen.FlashAttention(num_heads=HEADS, num_kv_heads=2, causal=True,
                                          decode=self.decode, name="attention")(x), None

  def stack(decode):
    return nn.scan(Layer, variable_axes={"params": 0, "cache": 0},
                   split_rngs={"params": True}, length=3)(decode=decode)

  x = normal(1, (BATCH, 9, FEATURES))
  params = stack(False).init(jax.random.key(0), x, None)["params"]
  full = stack(False).apply({"params": params}, x, None)[0]
  cache = stack(True).init(jax.random.key(0), jnp.zeros((BATCH, 10, FEATURES)), None)["cache"]
  assert cache["attention"]["cached_key"].shape == (3, BATCH, 10, 2, 8)
  outs = []
  for piece in pieces(x, (5, 1, 3)):
    (out, _), mutated = stack(True).apply({"params": params, "cache": cache}, piece, None,
                                          mutable=["cache"])
    outs.append(out)
    cache = mutated["cache"]
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=2e-5, rtol=2e-5)
  np.testing.assert_array_equal(cache["attention"]["cache_index"], [9, 9, 9])


def test_linen_decode_past_max_length():
  module = fjf.linen.FlashAttention(num_heads=HEADS, causal=True, decode=True)
  x = normal(1, (BATCH, 12, FEATURES))
  variables = module.init(jax.random.key(0), x[:, :10])
  _, mutated = module.apply(variables, x[:, :9], mutable=["cache"])
  variables = dict(variables, cache=mutated["cache"])
  with pytest.raises(ValueError, match="max_length=10"):
    module.apply(variables, x[:, 9:], mutable=["cache"])
  with pytest.raises(ValueError, match="cannot fit"):
    jax.jit(lambda v, x: module.apply(v, x, mutable=["cache"]))(variables, x)


# ---- Flax's own MultiHeadAttention decode, with our attention_fn (the slower route) ----------

@pytest.mark.parametrize("kv_heads", [None, 2])
def test_stock_multi_head_attention_decode_with_our_attention_fn(kv_heads):
  """nnx.MultiHeadAttention(decode=True, attention_fn=fjf.dot_product_attention) passes a
  dense mask over max_length every step: slower, and still exact."""
  def mha(attention_fn):
    return nnx.MultiHeadAttention(HEADS, FEATURES, num_kv_heads=kv_heads, decode=True,
                                  attention_fn=attention_fn, rngs=nnx.Rngs(0))

  ours, theirs = mha(fjf.dot_product_attention), mha(nnx.dot_product_attention)
  x = normal(1, (BATCH, 6, FEATURES))
  step = nnx.jit(lambda m, x: m(x))
  outs = {}
  for name, module in (("ours", ours), ("theirs", theirs)):
    module.init_cache((BATCH, MAX_LENGTH, FEATURES))
    outs[name] = jnp.concatenate([step(module, x[:, t:t + 1]) for t in range(6)], axis=1)
  with jax.default_matmul_precision("highest"):
    reference = theirs(x, decode=False, mask=jnp.tril(jnp.ones((6, 6), bool))[None, None])
  assert_accurate("stock MHA decode output", outs["ours"], outs["theirs"], reference, "float32")
  # Our module, decoding through its own cache, agrees with both.
  flash = fjf.nnx.FlashAttention(HEADS, FEATURES, num_kv_heads=kv_heads, causal=True,
                                 rngs=nnx.Rngs(0))
  flash.init_cache((BATCH, MAX_LENGTH, FEATURES))
  np.testing.assert_allclose(jnp.concatenate([flash(x[:, :2], decode=True),
                                              flash(x[:, 2:], decode=True)], 1),
                             outs["theirs"], atol=2e-5, rtol=2e-5)


def test_stock_linen_multi_head_attention_decode_with_our_attention_fn():
  x = normal(1, (BATCH, 5, FEATURES))

  def decode(attention_fn):
    module = nn.MultiHeadDotProductAttention(num_heads=HEADS, decode=True,
                                             attention_fn=attention_fn)
    variables = module.init(jax.random.key(0), jnp.zeros((BATCH, MAX_LENGTH, FEATURES)))
    outs = []
    for t in range(5):
      out, mutated = module.apply(variables, x[:, t:t + 1], mutable=["cache"])
      variables = dict(variables, cache=mutated["cache"])
      outs.append(out)
    return jnp.concatenate(outs, 1)

  np.testing.assert_allclose(decode(fjf.dot_product_attention), decode(nn.dot_product_attention),
                             atol=2e-5, rtol=2e-5)
