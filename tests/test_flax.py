"""flash_jax.flax: Flax-compatible attention functions and modules against Flax's own.

Accuracy rule (as the shared suite): error against a float32 HIGHEST-precision Flax
result <= 2x (outputs) / 3x (gradients) Flax's own same-dtype error, plus a floor.
Masks always leave key 0 visible: fully masked rows differ by design (flash_jax
returns 0, Flax the mean of value).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

flax = pytest.importorskip("flax")
optax = pytest.importorskip("optax")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import flash_jax  # noqa: E402
from flash_jax import accuracy  # noqa: E402
from conftest import dot_precisions  # noqa: E402
import flash_jax.flax as fjf  # noqa: E402

# ---- helpers ---------------------------------------------------------------------------

def normal(seed, shape, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def random_mask(seed, shape):
  """Bool mask, ~70% visible, key 0 always visible (no fully masked rows)."""
  mask = jax.random.bernoulli(jax.random.key(seed), 0.7, shape)
  return mask.at[..., 0].set(True)


def assert_accurate(name, ours, flax_same_dtype, reference, dtype):
  """`flash_jax.accuracy`'s rule, with Flax in the same dtype as the baseline; `name`
  ends in "output" (the forward's factor) or "grads" (the gradients')."""
  factor = accuracy.FORWARD_FACTOR if name.endswith("output") else accuracy.GRADIENT_FACTOR
  for o, f, r in zip(jax.tree.leaves(ours), jax.tree.leaves(flax_same_dtype),
                     jax.tree.leaves(reference)):
    verdict = accuracy.judge(o, f, r, factor=factor, dtype=dtype)
    assert verdict.ok, verdict.describe(name)


def upcast(tree):
  return jax.tree.map(lambda x: x.astype(jnp.float32)
                      if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def compare(name, ours_fn, flax_fn, args, dtype):
  """Outputs and gradients (of a random projection of the output) of two functions."""
  cotangent = normal(99, jax.eval_shape(flax_fn, *upcast(args)).shape)

  def value_and_grads(fn, args):
    def run(*args):
      out, vjp = jax.vjp(fn, *args)
      return out, vjp(cotangent.astype(out.dtype))
    return jax.jit(run)(*args)  # one compilation, not one per eager op

  ours = value_and_grads(ours_fn, args)
  flax_same = value_and_grads(flax_fn, args)
  with jax.default_matmul_precision("highest"):
    reference = value_and_grads(flax_fn, upcast(args))
  assert_accurate(f"{name} output", ours[0], flax_same[0], reference[0], dtype)
  assert_accurate(f"{name} grads", ours[1], flax_same[1], reference[1], dtype)


def params_equal(a, b):
  same_tree = jax.tree.structure(a) == jax.tree.structure(b)
  return same_tree and all(bool(jnp.array_equal(x, y))
                           for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ---- packaging -------------------------------------------------------------------------

def test_import_flash_jax_does_not_import_flax():
  code = "import sys, flash_jax; assert 'flax' not in sys.modules, 'flax imported'"
  subprocess.run([sys.executable, "-c", code], check=True)


# ---- dot_product_attention vs flax's ---------------------------------------------------

# (name, q shape, k/v shape, extra kwargs builder)
FUNCTION_CASES = {
    "plain": ((2, 9, 2, 16), (2, 13, 2, 16), lambda: {}),
    "float_mask": ((2, 9, 2, 16), (2, 13, 2, 16),
                   lambda: {"mask": random_mask(3, (2, 1, 9, 13)).astype(jnp.float32)}),
    "bias_and_mask": ((2, 9, 4, 24), (2, 13, 4, 24),
                      lambda: {"bias": normal(4, (2, 4, 9, 13)),
                               "mask": random_mask(5, (2, 4, 9, 13))}),
    "two_batch_dims": ((2, 3, 9, 2, 16), (2, 3, 13, 2, 16),
                       lambda: {"mask": random_mask(6, (2, 3, 1, 9, 13))}),
    "unbatched": ((9, 2, 16), (13, 2, 16), lambda: {"mask": random_mask(7, (2, 9, 13))}),
    "causal": ((2, 17, 2, 16), (2, 17, 2, 16), lambda: {"is_causal": True}),
    "gqa": ((2, 9, 4, 16), (2, 13, 2, 16), lambda: {"mask": random_mask(8, (2, 1, 9, 13))}),
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", list(FUNCTION_CASES))
def test_dot_product_attention_matches_nnx(case, dtype):
  q_shape, kv_shape, extra = FUNCTION_CASES[case]
  kwargs = extra()
  q, k, v = (normal(i, s, dtype) for i, s in enumerate((q_shape, kv_shape, kv_shape)))
  bias = kwargs.pop("bias", None)
  args = (q, k, v) if bias is None else (q, k, v, bias)

  def call(fn):
    return lambda q, k, v, bias=None: fn(q, k, v, bias=bias, **kwargs)

  compare(case, call(fjf.dot_product_attention), call(nnx.dot_product_attention), args, dtype)


@pytest.mark.parametrize("case", ["plain", "bias_and_mask", "two_batch_dims"])
def test_dot_product_attention_matches_linen(case):
  q_shape, kv_shape, extra = FUNCTION_CASES[case]
  kwargs = extra()
  q, k, v = (normal(i, s) for i, s in enumerate((q_shape, kv_shape, kv_shape)))
  ours = fjf.dot_product_attention(q, k, v, **kwargs)
  theirs = nn.dot_product_attention(q, k, v, **kwargs)
  np.testing.assert_allclose(ours, theirs, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("implementation", ["xla", "chunked"])
def test_make_attention_fn_structured_masks_match_dense_masks(implementation):
  """causal + window through the fast path == Flax with the equivalent dense mask."""
  t = 33
  q, k, v = (normal(i, (2, t, 2, 16)) for i in range(3))
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  dense = jnp.asarray((j <= i) & (j >= i - 5))[None, None]
  fast = fjf.make_attention_fn(causal=True, window=5, implementation=implementation)
  compare("causal+window", lambda q, k, v: fast(q, k, v),
          lambda q, k, v: nnx.dot_product_attention(q, k, v, mask=dense), (q, k, v), "float32")


def test_make_attention_fn_softcap_matches_flash_attention():
  q, k, v = (normal(i, (1, 16, 2, 16)) for i in range(3))
  fn = fjf.make_attention_fn(softcap=5.0, scale=0.3)
  np.testing.assert_array_equal(fn(q, k, v),
                                flash_jax.flash_attention(q, k, v, softcap=5.0, scale=0.3))


def test_segment_ids_extension_matches_dense_mask():
  ids = jnp.array([[0] * 5 + [1] * 7, [0] * 12])
  q, k, v = (normal(i, (2, 12, 2, 16)) for i in range(3))
  dense = (ids[:, :, None] == ids[:, None, :])[:, None]
  compare("segment_ids", lambda q, k, v: fjf.dot_product_attention(q, k, v, segment_ids=ids),
          lambda q, k, v: nnx.dot_product_attention(q, k, v, mask=dense), (q, k, v), "float32")


# ---- dropout ---------------------------------------------------------------------------

def _keep_masks(broadcast_dropout, rate=0.5, batch=2, heads=3, length=32, rng_seed=1):
  """The keep-mask [B, T, N, S] read off the output: q = 0 makes softmax uniform (1/S)
  and value = identity makes out[..., j] = keep_j / ((1 - rate) * S)."""
  q = jnp.zeros((batch, length, heads, 8))
  k = normal(0, (batch, length, heads, 8))
  v = jnp.broadcast_to(jnp.eye(length)[None, :, None, :], (batch, length, heads, length))
  out = fjf.dot_product_attention(q, k, v, dropout_rate=rate, dropout_rng=jax.random.key(rng_seed),
                                  broadcast_dropout=broadcast_dropout)
  return np.asarray(out) * (1 - rate) * length


@pytest.mark.parametrize("broadcast_dropout", [True, False])
def test_dropout_keep_mask(broadcast_dropout):
  keep = _keep_masks(broadcast_dropout)
  np.testing.assert_allclose(keep, np.round(keep), atol=1e-5)  # exactly 0 or 1
  assert 0.4 < keep.mean() < 0.6
  shared = np.all(keep == keep[:1, :, :1])  # the same [T, S] mask for every batch and head
  assert shared == broadcast_dropout
  np.testing.assert_array_equal(keep, _keep_masks(broadcast_dropout))  # reproducible
  assert not np.array_equal(keep, _keep_masks(broadcast_dropout, rng_seed=2))


def test_dropout_off_when_deterministic_or_rate_zero():
  q, k, v = (normal(i, (2, 9, 2, 16)) for i in range(3))
  plain = fjf.dot_product_attention(q, k, v)
  rng = jax.random.key(0)
  np.testing.assert_array_equal(
      fjf.dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=rng, deterministic=True),
      plain)
  np.testing.assert_array_equal(fjf.dot_product_attention(q, k, v, dropout_rng=rng), plain)


def test_broadcast_dropout_with_gqa_bias_and_segment_ids():
  q = normal(0, (2, 12, 4, 16))
  k, v = normal(1, (2, 12, 2, 16)), normal(2, (2, 12, 2, 16))
  bias = normal(3, (1, 4, 12, 12))
  ids = jnp.array([[0] * 6 + [1] * 6, [0] * 12])
  kwargs = dict(bias=bias, segment_ids=ids, dropout_rate=0.3, dropout_rng=jax.random.key(0))
  out = fjf.dot_product_attention(q, k, v, broadcast_dropout=True, **kwargs)
  assert out.shape == (2, 12, 4, 16) and np.isfinite(np.asarray(out)).all()
  # Each (batch, head) equals a flash call of batch 1 and one head with the same rng.
  one = flash_jax.flash_attention(q[1:2, :, 3:4], k[1:2, :, 1:2], v[1:2, :, 1:2],
                                  bias=bias[:, 3:4], segment_ids=ids[1:2], dropout_rate=0.3,
                                  dropout_rng=jax.random.key(0))
  np.testing.assert_allclose(out[1:2, :, 3:4], one, atol=1e-6)


# ---- errors, as Flax raises them -----------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, match", [
    (dict(qk_attn_weights_einsum=jnp.einsum, attn_weights_value_einsum=jnp.einsum),
     NotImplementedError, "qk_attn_weights_einsum"),
    (dict(einsum_dot_general=jax.lax.dot_general), NotImplementedError, "einsum_dot_general"),
    # Flax's own ValueErrors for combinations it rejects:
    (dict(qk_attn_weights_einsum=jnp.einsum), ValueError, "together"),
    (dict(attn_weights_value_einsum=jnp.einsum), ValueError, "together"),
    (dict(precision=jax.lax.Precision.DEFAULT, qk_attn_weights_einsum=jnp.einsum,
          attn_weights_value_einsum=jnp.einsum), ValueError, "mutually exclusive"),
    (dict(einsum_dot_general=jax.lax.dot_general, qk_attn_weights_einsum=jnp.einsum,
          attn_weights_value_einsum=jnp.einsum), ValueError, "mutually exclusive"),
    (dict(precision="sloppy"), ValueError, "precision"),
    (dict(module=object()), TypeError, "module"),
    (dict(dropout_rate=0.1), ValueError, "dropout_rng"),
    (dict(mask=jnp.ones((2, 3, 9, 13), bool)), ValueError, "mask"),
    (dict(mask=jnp.ones((1, 2, 2, 9, 13), bool)), ValueError, "mask"),
])
def test_rejects_what_it_cannot_honour(kwargs, error, match):
  q, k, v = normal(0, (2, 9, 2, 16)), normal(1, (2, 13, 2, 16)), normal(2, (2, 13, 2, 16))
  with pytest.raises(error, match=match):
    fjf.dot_product_attention(q, k, v, **kwargs)


@pytest.mark.parametrize("shapes, match", [
    (((2, 16, 4, 8), (16, 4, 8), (16, 4, 8)), "same rank"),
    (((2, 16, 4, 8), (3, 16, 4, 8), (3, 16, 4, 8)), "batch dims"),
    (((2, 16, 4, 8), (2, 16, 4, 8), (2, 15, 4, 8)), "lengths must match"),
    (((2, 16, 4, 8), (2, 16, 4, 7), (2, 16, 4, 8)), "depths must match"),
    (((2, 16, 5, 8), (2, 16, 2, 8), (2, 16, 2, 8)), "must be a multiple"),
    (((2, 16, 4, 8), (2, 16, 2, 8), (2, 16, 1, 8)), "must be a multiple"),
    (((16, 8), (16, 8), (16, 8)), "rank >= 3"),
])
@pytest.mark.parametrize("dropout", [False, True])
def test_bad_shapes_raise_value_error_with_flax_wording(shapes, match, dropout):
  """Checked before anything else, also on the broadcast-dropout path."""
  q, k, v = (jnp.ones(s) for s in shapes)
  kwargs = dict(dropout_rate=0.1, dropout_rng=jax.random.key(0)) if dropout else {}
  with pytest.raises(ValueError, match=match):
    fjf.dot_product_attention(q, k, v, **kwargs)


def test_accepts_default_precision_and_fp32_softmax():
  q, k, v = (normal(i, (1, 5, 1, 8)) for i in range(3))
  plain = fjf.dot_product_attention(q, k, v)
  for precision in (jax.lax.Precision.DEFAULT, "default"):
    np.testing.assert_array_equal(fjf.dot_product_attention(q, k, v, precision=precision), plain)
  np.testing.assert_array_equal(
      fjf.dot_product_attention(q, k, v, force_fp32_for_softmax=True), plain)


@pytest.mark.parametrize("kwargs, error", [
    (dict(window=-1), ValueError), (dict(window="x"), TypeError),
    (dict(softcap=0.0), ValueError), (dict(implementation="nope"), ValueError),
    (dict(block_sizes=(64, 64)), TypeError), (dict(causal=1), TypeError),
    (dict(deterministic_backward="yes"), TypeError),
])
def test_make_attention_fn_validates(kwargs, error):
  with pytest.raises(error):
    fjf.make_attention_fn(**kwargs)


# ---- as attention_fn of Flax's own modules ---------------------------------------------------

def _nnx_mha(attention_fn=nnx.dot_product_attention, **kwargs):
  return nnx.MultiHeadAttention(4, 32, qkv_features=64, in_kv_features=24, decode=False,
                                attention_fn=attention_fn, rngs=nnx.Rngs(0), **kwargs)


def _nnx_compare(name, ours, theirs, call_ours, call_theirs=None, dtype="float32",
                 reference=None):
  """Outputs and parameter gradients of two nnx modules with equal parameters;
  `reference` (default `theirs`) computes in float32 at HIGHEST precision."""
  call_theirs = call_theirs or call_ours

  def loss_and_grads(module, call):
    @nnx.jit
    def run(module):
      def loss(m):
        out = call(m)
        return jnp.sum(out.astype(jnp.float32) * normal(99, out.shape)), out
      (_, out), grads = nnx.value_and_grad(loss, has_aux=True)(module)
      return out, nnx.state(grads, nnx.Param)
    return run(module)

  mine, same = loss_and_grads(ours, call_ours), loss_and_grads(theirs, call_theirs)
  with jax.default_matmul_precision("highest"):
    ref = loss_and_grads(theirs if reference is None else reference, call_theirs)
  assert_accurate(f"{name} output", mine[0], same[0], ref[0], dtype)
  assert_accurate(f"{name} grads", mine[1], same[1], ref[1], dtype)


def test_nnx_multi_head_attention_with_our_attention_fn():
  x, y = normal(1, (2, 10, 32)), normal(2, (2, 12, 24))
  cross_mask = random_mask(3, (2, 1, 10, 12))
  ours, theirs = _nnx_mha(fjf.dot_product_attention), _nnx_mha()
  _nnx_compare("cross+mask", ours, theirs, lambda m: m(x, y, mask=cross_mask))
  _nnx_compare("causal", ours, theirs, lambda m: m(x, y[:, :10], is_causal=True))
  fast = _nnx_mha(fjf.make_attention_fn(causal=True))
  _nnx_compare("make_attention_fn", fast, theirs, lambda m: m(x, y[:, :10], is_causal=True))


def test_linen_multi_head_attention_with_our_attention_fn():
  x, y = normal(1, (2, 10, 32)), normal(2, (2, 12, 24))
  mask = random_mask(3, (2, 4, 10, 12))
  ours = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=64,
                                         attention_fn=fjf.dot_product_attention)
  theirs = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=64)
  params = theirs.init(jax.random.key(0), x, y)

  def run(module, params):
    def loss(p):
      out = module.apply(p, x, y, mask=mask)
      return jnp.sum(out * normal(99, out.shape)), out
    (_, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return out, grads

  run = jax.jit(run, static_argnums=0)
  mine, same = run(ours, params), run(theirs, params)
  with jax.default_matmul_precision("highest"):
    reference = run(theirs, params)
  assert_accurate("linen output", mine[0], same[0], reference[0], "float32")
  assert_accurate("linen grads", mine[1], same[1], reference[1], "float32")


# ---- precision, sown weights, float64, rank promotion ----------------------------------------

@pytest.mark.parametrize("implementation", ["xla", "chunked"])
def test_precision_reaches_every_product_of_float32_inputs(implementation):
  """HIGH/HIGHEST (as Flax's modules pass them) run the forward and the backward of the
  jnp implementations at that precision; bfloat16 inputs, exact already, get none."""
  fn = fjf.make_attention_fn(implementation=implementation)
  for dtype, precision, expected in (
      ("float32", jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST),
      ("float32", "high", jax.lax.Precision.HIGH),
      ("float32", (jax.lax.Precision.DEFAULT, jax.lax.Precision.HIGHEST),
       jax.lax.Precision.HIGHEST),
      ("float32", jax.lax.Precision.DEFAULT, None),
      ("bfloat16", jax.lax.Precision.HIGHEST, None)):
    q, k, v = (normal(i, (2, 9, 2, 16), dtype) for i in range(3))
    call = lambda q, k, v: fn(q, k, v, mask=random_mask(3, (2, 1, 9, 9)), precision=precision)
    out, vjp = jax.vjp(call, q, k, v)
    forward = dot_precisions(jax.make_jaxpr(call)(q, k, v))
    backward = dot_precisions(jax.make_jaxpr(vjp)(out))
    assert forward and backward
    assert set(forward) == set(backward) == {expected}, (dtype, precision)


def test_multi_head_attention_with_precision_highest():
  """nnx and linen modules built with precision=HIGHEST (it also sets the projections')."""
  x = normal(1, (2, 10, 32))
  ours = nnx.MultiHeadAttention(4, 32, qkv_features=64, decode=False, rngs=nnx.Rngs(0),
                                precision=jax.lax.Precision.HIGHEST,
                                attention_fn=fjf.dot_product_attention)
  theirs = nnx.MultiHeadAttention(4, 32, qkv_features=64, decode=False, rngs=nnx.Rngs(0),
                                  precision=jax.lax.Precision.HIGHEST)
  np.testing.assert_allclose(ours(x, is_causal=True), theirs(x, is_causal=True),
                             atol=2e-5, rtol=2e-5)
  linen_ours = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=64,
                                               precision=jax.lax.Precision.HIGHEST,
                                               attention_fn=fjf.dot_product_attention)
  linen_theirs = linen_ours.clone(attention_fn=nn.dot_product_attention)
  params = linen_theirs.init(jax.random.key(0), x)
  np.testing.assert_allclose(linen_ours.apply(params, x), linen_theirs.apply(params, x),
                             atol=2e-5, rtol=2e-5)


def _nnx_sown(module, *args, **kwargs):
  out, intermediates = nnx.capture(lambda m: m(*args, sow_weights=True, **kwargs),
                                   nnx.Intermediate)(module)
  return out, intermediates


def test_nnx_sow_weights_match_flax_and_leave_the_output_unchanged():
  x, y = normal(1, (2, 10, 32)), normal(2, (2, 12, 24))
  mask = random_mask(3, (2, 1, 10, 12))
  ours = _nnx_mha(fjf.dot_product_attention, num_kv_heads=2)
  theirs = _nnx_mha(num_kv_heads=2)
  out, sown = _nnx_sown(ours, x, y, mask=mask)
  _, flax_sown = _nnx_sown(theirs, x, y, mask=mask)
  [weights], [flax_weights] = sown["attention_weights"], flax_sown["attention_weights"]
  assert weights.shape == flax_weights.shape == (2, 4, 10, 12)
  assert weights.dtype == flax_weights.dtype
  np.testing.assert_allclose(weights, flax_weights, atol=2e-6)
  np.testing.assert_array_equal(out, ours(x, y, mask=mask))  # sowing changes nothing
  _, nothing = nnx.capture(lambda m: m(x, y, mask=mask), nnx.Intermediate)(ours)
  assert not nothing


def test_sown_weights_follow_flash_jax_masking_and_structured_masks():
  """Rows that see no key sow zeros (Flax: uniform weights); causal/window of
  make_attention_fn are in the weights, and weights @ value is the output."""
  q, k, v = (normal(i, (1, 12, 2, 8)) for i in range(3))
  mask = jnp.ones((1, 1, 12, 12), bool).at[:, :, 3].set(False)

  class Sink(nnx.Module):
    pass

  fn = fjf.make_attention_fn(causal=True, window=(4, 0))
  out, sown = nnx.capture(lambda m: fn(q, k, v, mask=mask, module=m), nnx.Intermediate)(Sink())
  [weights] = sown["attention_weights"]  # [1, 2, 12, 12]
  np.testing.assert_array_equal(weights[0, :, 3], 0.0)  # row 3 sees only itself: masked
  i, j = np.arange(12)[:, None], np.arange(12)[None, :]
  assert not np.any(np.asarray(weights)[..., (j > i) | (j < i - 4)])
  np.testing.assert_allclose(jnp.einsum("bnts,bsnh->btnh", weights, v), out, atol=1e-6)


def test_sown_weights_share_the_denominator_with_sinks():
  """With sinks, the sown weights are the softmax the output used: weights @ value is the
  output, and each row's weights sum to 1 - its sink's share (less than 1)."""
  q, k, v = (normal(i, (1, 12, 2, 8)) for i in range(3))
  sinks = jnp.array([0.5, 2.0])

  class Sink(nnx.Module):
    pass

  fn = fjf.make_attention_fn(causal=True)
  out, sown = nnx.capture(lambda m: fn(q, k, v, sinks=sinks, module=m),
                          nnx.Intermediate)(Sink())
  [weights] = sown["attention_weights"]  # [1, 2, 12, 12]
  np.testing.assert_allclose(jnp.einsum("bnts,bsnh->btnh", weights, v), out, atol=1e-6)
  row_sums = np.asarray(weights.sum(-1))
  assert np.all(row_sums < 1.0) and np.all(row_sums > 0.0)
  assert np.all(row_sums[:, 1] < row_sums[:, 0])  # the larger sink takes more


@pytest.mark.parametrize("force_fp32, weights_dtype", [(True, "float32"), (False, "bfloat16")])
def test_linen_sow_weights_dtype_and_collection(force_fp32, weights_dtype):
  x = normal(1, (2, 6, 16))
  module = nn.MultiHeadDotProductAttention(
      num_heads=2, qkv_features=8, dtype=jnp.bfloat16, force_fp32_for_softmax=force_fp32,
      attention_fn=fjf.dot_product_attention)
  params = module.init(jax.random.key(0), x)
  out, variables = module.apply(params, x, mutable=["intermediates"], sow_weights=True)
  [weights] = variables["intermediates"]["attention_weights"]
  assert weights.shape == (2, 2, 6, 6) and weights.dtype == jnp.dtype(weights_dtype)
  theirs = module.clone(attention_fn=nn.dot_product_attention)
  _, flax_variables = theirs.apply(params, x, mutable=["intermediates"], sow_weights=True)
  np.testing.assert_allclose(np.asarray(weights, np.float32), np.asarray(
      flax_variables["intermediates"]["attention_weights"][0], np.float32), atol=1e-2)
  np.testing.assert_array_equal(out, module.apply(params, x))


def test_float64_as_attention_fn():
  with jax.enable_x64():
    x = jax.random.normal(jax.random.key(0), (2, 5, 8), jnp.float64)
    mask = random_mask(1, (2, 1, 5, 5))
    ours = nnx.MultiHeadAttention(2, 8, qkv_features=8, decode=False, rngs=nnx.Rngs(0),
                                  param_dtype=jnp.float64, attention_fn=fjf.dot_product_attention)
    theirs = nnx.MultiHeadAttention(2, 8, qkv_features=8, decode=False, rngs=nnx.Rngs(0),
                                    param_dtype=jnp.float64)
    out = ours(x, mask=mask)
    assert out.dtype == jnp.float64
    q, k, v = (jax.random.normal(jax.random.key(i), (3, 7, 2, 4), jnp.float64) for i in range(3))
    flax_out = nnx.dot_product_attention(q, k, v)
    ours_out = fjf.dot_product_attention(q, k, v)
    expected = theirs(x, mask=mask)
  # Flax's fast path is jax.nn, whose softmax runs in float32 even for float64 inputs.
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ours_out, flax_out, rtol=1e-6, atol=1e-6)


def test_attention_fn_under_rank_promotion_raise():
  """Flax's mask/bias forms (fewer dims, broadcast batch and heads), several batch dims,
  GQA, shared and per-head dropout, sown weights."""
  q = normal(0, (2, 3, 9, 4, 16))
  k, v = normal(1, (2, 3, 13, 2, 16)), normal(2, (2, 3, 13, 2, 16))
  bias, mask = normal(3, (4, 9, 13)), random_mask(4, (3, 1, 9, 13))

  class Sink(nnx.Module):
    pass

  def run():
    outs = [fjf.dot_product_attention(q, k, v, bias=bias, mask=mask, is_causal=True)]
    for broadcast in (True, False):
      outs.append(fjf.dot_product_attention(
          q, k, v, mask=mask, dropout_rate=0.2, dropout_rng=jax.random.key(5),
          broadcast_dropout=broadcast))
    out, sown = nnx.capture(lambda m: fjf.dot_product_attention(q, k, v, mask=mask, module=m),
                            nnx.Intermediate)(Sink())
    return outs + [out, sown["attention_weights"][0]]

  with jax.numpy_rank_promotion("raise"):
    strict = run()
  for a, b in zip(strict, run()):
    np.testing.assert_array_equal(a, b)


# ---- FlashAttention modules ------------------------------------------------------------

def _nnx_pair(num_kv_heads=None, dtype=None, in_kv_features=24, **ours_kwargs):
  common = dict(qkv_features=64, in_kv_features=in_kv_features, num_kv_heads=num_kv_heads,
                dtype=dtype)
  ours = fjf.nnx.FlashAttention(4, 32, rngs=nnx.Rngs(0), **common, **ours_kwargs)
  theirs = nnx.MultiHeadAttention(4, 32, decode=False, rngs=nnx.Rngs(0),
                                  normalize_qk=ours_kwargs.get("normalize_qk", False), **common)
  return ours, theirs


def test_nnx_flash_attention_params_match_multi_head_attention():
  for kwargs in ({}, {"num_kv_heads": 2}, {"normalize_qk": True}):
    ours, theirs = _nnx_pair(**kwargs)
    assert params_equal(nnx.state(ours, nnx.Param), nnx.state(theirs, nnx.Param)), kwargs


def test_nnx_flash_attention_loads_multi_head_attention_checkpoint():
  ours = fjf.nnx.FlashAttention(4, 32, qkv_features=64, in_kv_features=24, rngs=nnx.Rngs(1))
  theirs = nnx.MultiHeadAttention(4, 32, qkv_features=64, in_kv_features=24, decode=False,
                                  rngs=nnx.Rngs(2))
  nnx.update(ours, nnx.state(theirs, nnx.Param))
  x, y = normal(1, (2, 10, 32)), normal(2, (2, 12, 24))
  np.testing.assert_allclose(ours(x, y), theirs(x, y), atol=2e-5, rtol=2e-5)


def _causal(t):
  return jnp.tril(jnp.ones((t, t), bool))[None, None]


def _window(t, left):
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  return jnp.asarray((j <= i) & (j >= i - left))[None, None]


NNX_MODULE_CASES = {
    # name: (ours kwargs, call kwargs for ours, call kwargs for MHA, self-attention?)
    "cross_mask": ({}, lambda: {"mask": random_mask(3, (2, 4, 10, 12))},
                   lambda: {"mask": random_mask(3, (2, 4, 10, 12))}, False),
    "self_causal": ({"causal": True}, dict, lambda: {"mask": _causal(10)}, True),
    "self_window": ({"causal": True, "window": 3}, dict, lambda: {"mask": _window(10, 3)}, True),
    "gqa_causal": ({"causal": True, "num_kv_heads": 2}, dict, lambda: {"mask": _causal(10)}, True),
    "segment_ids": ({}, lambda: {"segment_ids": jnp.array([[0] * 4 + [1] * 6, [0] * 10])},
                    lambda: {"mask": jnp.array([[0] * 4 + [1] * 6, [0] * 10])[:, None, :, None]
                             == jnp.array([[0] * 4 + [1] * 6, [0] * 10])[:, None, None, :]}, True),
    "normalize_qk": ({"normalize_qk": True}, dict, dict, False),
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", list(NNX_MODULE_CASES))
def test_nnx_flash_attention_matches_multi_head_attention(case, dtype):
  kwargs, ours_call, theirs_call, self_attention = NNX_MODULE_CASES[case]
  kwargs = dict(kwargs, in_kv_features=None if self_attention else 24)
  ours, theirs = _nnx_pair(dtype=None if dtype == "float32" else jnp.dtype(dtype), **kwargs)
  _, reference = _nnx_pair(**kwargs)  # float32 compute, the same parameters
  x = normal(1, (2, 10, 32))
  inputs = (x,) if self_attention else (x, normal(2, (2, 12, 24)))
  ours_kwargs, theirs_kwargs = ours_call(), theirs_call()
  _nnx_compare(case, ours, theirs, lambda m: m(*inputs, **ours_kwargs),
               lambda m: m(*inputs, **theirs_kwargs), dtype, reference=reference)


def test_nnx_flash_attention_dropout():
  module = fjf.nnx.FlashAttention(4, 32, dropout_rate=0.3, rngs=nnx.Rngs(0))
  x = normal(1, (2, 10, 32))
  with pytest.raises(ValueError, match="deterministic"):
    module(x)
  a, b = module(x, deterministic=False), module(x, deterministic=False)
  assert not np.allclose(a, b)  # the kept stream advances
  plain = fjf.nnx.FlashAttention(4, 32, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(module(x, deterministic=True), plain(x))
  c = module(x, deterministic=False, rngs=nnx.Rngs(dropout=5))
  np.testing.assert_array_equal(c, module(x, deterministic=False, rngs=nnx.Rngs(dropout=5)))


def _linen_pair(**kwargs):
  ours = fjf.linen.FlashAttention(num_heads=4, qkv_features=64, **kwargs)
  theirs = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=64,
                                           normalize_qk=kwargs.get("normalize_qk", False),
                                           dtype=kwargs.get("dtype"))
  return ours, theirs


@pytest.mark.parametrize("case", ["cross_mask", "self_causal", "normalize_qk", "bfloat16"])
def test_linen_flash_attention_matches_multi_head_attention(case):
  x, y = normal(1, (2, 10, 32)), normal(2, (2, 12, 24))
  kwargs, ours_call, theirs_call, dtype = {}, {}, {}, "float32"
  if case == "cross_mask":
    ours_call = theirs_call = {"mask": random_mask(3, (2, 4, 10, 12))}
  elif case == "self_causal":
    kwargs, theirs_call, y = {"causal": True}, {"mask": _causal(10)}, x
  elif case == "normalize_qk":
    kwargs = {"normalize_qk": True}
  else:
    kwargs, dtype = {"dtype": jnp.bfloat16}, "bfloat16"
  ours, theirs = _linen_pair(**kwargs)
  params = theirs.init(jax.random.key(0), x, y)
  assert params_equal(ours.init(jax.random.key(0), x, y), params)

  def run(module, call_kwargs, params):
    def loss(p):
      out = module.apply(p, x, y, **call_kwargs)
      return jnp.sum(out.astype(jnp.float32) * normal(99, out.shape)), out
    (_, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return out, grads

  run = jax.jit(run, static_argnums=0)
  mine, same = run(ours, ours_call, params), run(theirs, theirs_call, params)
  with jax.default_matmul_precision("highest"):
    reference = run(theirs.clone(dtype=None), theirs_call, params)
  assert_accurate(f"{case} output", mine[0], same[0], reference[0], dtype)
  assert_accurate(f"{case} grads", mine[1], same[1], reference[1], dtype)


def test_linen_flash_attention_gqa_and_dropout():
  x = normal(1, (2, 10, 32))
  module = fjf.linen.FlashAttention(num_heads=4, num_kv_heads=2, causal=True, dropout_rate=0.3)
  params = module.init(jax.random.key(0), x, deterministic=True)
  assert params["params"]["key"]["kernel"].shape == (32, 2, 8)
  plain = module.apply(params, x, deterministic=True)
  dropped = module.apply(params, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
  assert not np.allclose(plain, dropped) and np.isfinite(np.asarray(dropped)).all()
  with pytest.raises(ValueError):
    module.apply(params, x)  # deterministic is needed with dropout


# ---- attention sinks ----------------------------------------------------------------------

def test_attention_fn_passes_sinks():
  """sinks reach flash_attention, also per head on the shared-dropout path."""
  q = normal(0, (2, 12, 4, 16))
  k, v = normal(1, (2, 12, 2, 16)), normal(2, (2, 12, 2, 16))
  sinks = normal(3, (4,)) + 2.0
  np.testing.assert_allclose(fjf.dot_product_attention(q, k, v, sinks=sinks),
                             flash_jax.flash_attention(q, k, v, sinks=sinks), atol=1e-6)
  kwargs = dict(dropout_rate=0.3, dropout_rng=jax.random.key(0))
  out = fjf.dot_product_attention(q, k, v, broadcast_dropout=True, sinks=sinks, **kwargs)
  one = flash_jax.flash_attention(q[1:2, :, 3:4], k[1:2, :, 1:2], v[1:2, :, 1:2],
                                  sinks=sinks[3:4], **kwargs)
  np.testing.assert_allclose(out[1:2, :, 3:4], one, atol=1e-6)


def test_nnx_flash_attention_sinks():
  make = lambda **kw: fjf.nnx.FlashAttention(4, 32, qkv_features=64, num_kv_heads=2,
                                              causal=True, rngs=nnx.Rngs(0), **kw)
  ours, plain = make(use_sinks=True), make()
  assert plain.sinks is None
  params = nnx.to_pure_dict(nnx.state(ours, nnx.Param))
  sinks = params.pop("sinks")
  assert sinks.shape == (4,) and sinks.dtype == jnp.float32 and np.all(sinks == 0)
  assert params_equal(params, nnx.to_pure_dict(nnx.state(plain, nnx.Param)))  # same draws

  x = normal(1, (2, 10, 32))
  ours.sinks[...] = jnp.full((4,), -jnp.inf)  # a sink of -inf is no sink
  np.testing.assert_allclose(ours(x), plain(x), atol=1e-6)
  ours.sinks[...] = normal(2, (4,)) + 2.0
  q, k, v = ours.query(x), ours.key(x), ours.value(x)
  expected = ours.out(flash_jax.flash_attention(q, k, v, causal=True, sinks=ours.sinks[...]))
  np.testing.assert_allclose(ours(x), expected, atol=1e-6)
  assert not np.allclose(ours(x), plain(x), atol=1e-3)

  weights = normal(99, (2, 10, 32))
  grads = nnx.to_pure_dict(nnx.grad(lambda m: jnp.sum(m(x) * weights))(ours))
  assert grads["sinks"].shape == (4,) and np.isfinite(grads["sinks"]).all()
  assert np.all(grads["sinks"] != 0)


def test_linen_flash_attention_sinks():
  x = normal(1, (2, 10, 32))
  ours = fjf.linen.FlashAttention(num_heads=4, num_kv_heads=2, causal=True, use_sinks=True)
  plain = fjf.linen.FlashAttention(num_heads=4, num_kv_heads=2, causal=True)
  params = ours.init(jax.random.key(0), x)["params"]
  sinks = params["sinks"]
  assert sinks.shape == (4,) and sinks.dtype == jnp.float32 and np.all(sinks == 0)
  rest = {name: p for name, p in params.items() if name != "sinks"}
  assert params_equal({"params": rest}, plain.init(jax.random.key(0), x))
  no_sink = {"params": {**rest, "sinks": jnp.full((4,), -jnp.inf)}}
  np.testing.assert_allclose(ours.apply(no_sink, x), plain.apply({"params": rest}, x), atol=1e-6)
  assert not np.allclose(ours.apply({"params": params}, x), plain.apply({"params": rest}, x),
                         atol=1e-3)

  weights = normal(99, (2, 10, 32))
  grads = jax.grad(lambda p: jnp.sum(ours.apply({"params": p}, x) * weights))(params)
  assert np.isfinite(grads["sinks"]).all() and np.all(grads["sinks"] != 0)


# ---- training, remat and scan --------------------------------------------------------------

class _Block(nnx.Module):
  def __init__(self, features, rngs):
    self.norm = nnx.LayerNorm(features, rngs=rngs)
    self.attention = fjf.nnx.FlashAttention(4, features, num_kv_heads=2, causal=True, rngs=rngs)

  def __call__(self, x):
    return x + self.attention(self.norm(x))


class _TinyLM(nnx.Module):
  def __init__(self, vocab, features, rngs):
    self.embed = nnx.Embed(vocab, features, rngs=rngs)
    self.block = _Block(features, rngs)
    self.head = nnx.Linear(features, vocab, rngs=rngs)

  def __call__(self, tokens):
    return self.head(self.block(self.embed(tokens)))


def test_jit_optax_train_step_lowers_loss():
  vocab = 16
  graphdef, params, rest = nnx.split(_TinyLM(vocab, 32, nnx.Rngs(0)), nnx.Param, ...)
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)
  tokens = jax.random.randint(jax.random.key(1), (4, 17), 0, vocab)

  def loss_fn(params, rest):
    logits = nnx.merge(graphdef, params, rest)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  @jax.jit
  def step(params, opt_state, rest):
    loss, grads = jax.value_and_grad(loss_fn)(params, rest)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  assert "flash_jax_" in str(jax.make_jaxpr(loss_fn)(params, rest))
  losses = []
  for _ in range(25):
    params, opt_state, loss = step(params, opt_state, rest)
    losses.append(float(loss))
  assert np.isfinite(losses).all() and losses[-1] < 0.7 * losses[0], losses


def test_nnx_scan_and_remat_over_layers():
  layers, features = 3, 32

  @nnx.split_rngs(splits=layers)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make_blocks(rngs):
    return _Block(features, rngs)

  blocks = make_blocks(nnx.Rngs(0))
  x = normal(1, (2, 10, features))

  def scanned(blocks, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, block):
      return nnx.remat(lambda b, x: b(x))(block, x)
    return body(x, blocks)

  def unrolled(blocks, x):
    graphdef, state = nnx.split(blocks)
    for i in range(layers):
      x = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))(x)
    return x

  np.testing.assert_allclose(scanned(blocks, x), unrolled(blocks, x), atol=1e-5, rtol=1e-5)
  loss = lambda b: jnp.sum(jnp.sin(scanned(b, x)))
  grads = nnx.grad(loss)(blocks)
  ref_grads = nnx.grad(lambda b: jnp.sum(jnp.sin(unrolled(b, x))))(blocks)
  for g, r in zip(jax.tree.leaves(nnx.state(grads, nnx.Param)),
                  jax.tree.leaves(nnx.state(ref_grads, nnx.Param))):
    np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-4)
  jitted = nnx.jit(lambda b, x: scanned(b, x))
  np.testing.assert_allclose(jitted(blocks, x), unrolled(blocks, x), atol=1e-5, rtol=1e-5)


class _LinenBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    attention = fjf.linen.FlashAttention(num_heads=4, num_kv_heads=2, causal=True)
    return x + attention(nn.LayerNorm()(x)), None


def test_linen_scan_and_remat_over_layers():
  layers = 3
  stack = nn.scan(nn.remat(_LinenBlock), variable_axes={"params": 0},
                  split_rngs={"params": True}, length=layers)
  x = normal(1, (2, 10, 32))
  params = stack().init(jax.random.key(0), x, None)

  def scanned(p):
    return stack().apply(p, x, None)[0]

  def unrolled(p):
    h = x
    for i in range(layers):
      layer_params = jax.tree.map(lambda a: a[i], p)
      h = _LinenBlock().apply(layer_params, h, None)[0]
    return h

  np.testing.assert_allclose(scanned(params), unrolled(params), atol=1e-5, rtol=1e-5)
  g = jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(scanned(p)))))(params)
  r = jax.grad(lambda p: jnp.sum(jnp.sin(unrolled(p))))(params)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(r)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
