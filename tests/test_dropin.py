"""Drop-in fidelity: what code written for jax.nn.dot_product_attention relies on.

The residual carries no gradient, every feature runs under
jax_numpy_rank_promotion="raise" (as JAX's own test suite sets it), float64 inputs are
served by the jnp implementations, and the call's matmul precision reaches every product
of the jnp implementations, forward and backward. (Flax's attention_fn: test_flax.py.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import enable_x64
from jax.test_util import check_grads

import flash_jax
from flash_jax import dispatch, spec as spec_lib
from cases import Case, make_inputs
from conftest import attend, dot_precisions, skip_if_unsupported

# ---- return_residual ----------------------------------------------------------------------

def test_residual_carries_no_gradient_as_in_jax_nn():
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 12, 4, 16)) for i in range(3))
  weights = jax.random.normal(jax.random.key(3), (2, 12, 4))

  def loss(fn):
    def f(q, k, v):
      out, residual = fn(q, k, v, is_causal=True, return_residual=True)
      return jnp.sum(out ** 2) + jnp.sum(residual * weights)
    return jax.grad(f, argnums=(0, 1, 2))(q, k, v)

  ours, theirs = loss(flash_jax.dot_product_attention), loss(jax.nn.dot_product_attention)
  for g, t in zip(ours, theirs):
    np.testing.assert_allclose(g, t, rtol=1e-4, atol=1e-5)
  residual_only = jax.grad(lambda q: jnp.sum(flash_jax.dot_product_attention(
      q, k, v, return_residual=True)[1]))(q)
  assert not np.any(np.asarray(residual_only))


# ---- jax_numpy_rank_promotion="raise" -----------------------------------------------------

# Every feature of make_inputs, on shapes small enough for the interpret-mode targets.
RANK_CASES = (
    Case(2, 33, 47, 4, 2, 32, "float32", ("causal", "q_offset_array", "lengths")),
    Case(2, 40, 40, 4, 1, 16, "bfloat16", ("window", "segment_ids", "softcap", "dropout")),
    Case(2, 33, 47, 2, 2, 32, "float32", ("bias", "mask", "dropout")),
    Case(2, 24, 40, 4, 2, 16, "float32", ("bias_broadcast", "empty_rows")),
    Case(1, 1, 47, 4, 2, 32, "bfloat16", ("causal", "decode")),
    Case(1, 16, 64, 2, 2, 16, "float32", ("causal", "q_offset_int", "window", "scale_large")),
)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in RANK_CASES])
def test_every_feature_under_rank_promotion_raise(target, case):
  """Forward, lse and gradients with rank promotion raising (first, so that nothing
  traced under "allow" is reused) equal the same call under "allow"."""
  skip_if_unsupported(target, case)
  q, k, v, kwargs = make_inputs(case, seed=11)
  bias = kwargs.pop("bias", None)

  def run():
    def f(q, k, v, bias):
      out, lse = attend(target, q, k, v, return_lse=True, bias=bias, **kwargs)
      return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(jnp.where(
          jnp.isfinite(lse), lse, 0.0)), (out, lse)
    argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
    return jax.grad(f, argnums=argnums, has_aux=True)(q, k, v, bias)

  with jax.numpy_rank_promotion("raise"):
    strict = run()
  with jax.numpy_rank_promotion("allow"):
    loose = run()
  for a, b in zip(jax.tree.leaves(strict), jax.tree.leaves(loose)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_jax_nn_drop_in_under_rank_promotion_raise():
  """jax.nn's argument forms: unbatched, lower-rank bias/mask, lengths, windows, residual."""
  t, s = 9, 13
  q, k, v = (jax.random.normal(jax.random.key(i), shape) for i, shape in
             enumerate(((t, 4, 16), (s, 2, 16), (s, 2, 16))))
  mask = jnp.arange(s) <= s // 2  # 1-D, as JAX's float64 test passes it
  bias = jax.random.normal(jax.random.key(5), (4, t, s))
  lengths = jnp.array([5], jnp.int32)
  with jax.numpy_rank_promotion("raise"):
    for kwargs in (dict(mask=mask), dict(bias=bias, is_causal=True),
                   dict(query_seq_lengths=lengths, key_value_seq_lengths=lengths + 3),
                   dict(local_window_size=(3, 2), mask=mask[None, None, None])):
      out, residual = flash_jax.dot_product_attention(q, k, v, return_residual=True, **kwargs)
      expected = jax.nn.dot_product_attention(q, k, v, **kwargs)
      np.testing.assert_allclose(out, expected, rtol=2e-5, atol=2e-5)
      assert residual.shape == (t, 4)


# ---- float64 --------------------------------------------------------------------------------

def _numpy_attention(q, k, v, bias, visible):
  """float64 numpy attention, [B, T, N, H] layout with GQA; rows that see nothing: 0."""
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1]) + bias
  logits = np.where(visible, logits, -np.inf)
  row_max = np.max(logits, axis=-1, keepdims=True)
  p = np.where(visible, np.exp(logits - np.where(np.isfinite(row_max), row_max, 0.0)), 0.0)
  total = p.sum(-1, keepdims=True)
  p = p / np.where(total > 0, total, 1.0)
  return np.einsum("bnts,bsnh->btnh", p, v)


@pytest.mark.parametrize("implementation", ["xla", "chunked", None])
def test_float64_matches_a_float64_reference(implementation):
  b, t, s = 2, 11, 37
  with enable_x64():
    q, k, v = (jax.random.normal(jax.random.key(i), shape, jnp.float64) for i, shape in
               enumerate(((b, t, 4, 16), (b, s, 2, 16), (b, s, 2, 16))))
    bias = jax.random.normal(jax.random.key(3), (b, 1, t, s), jnp.float64)
    mask = jax.random.bernoulli(jax.random.key(4), 0.8, (b, 4, t, s))
    kv_lengths = jnp.array([s, 20], jnp.int32)
    out, lse = flash_jax.flash_attention(
        q, k, v, bias=bias, mask=mask, causal=True, q_offset=s - t, kv_lengths=kv_lengths,
        implementation=implementation, block_sizes=flash_jax.BlockSizes(block_kv=16)
        if implementation == "chunked" else None, return_lse=True)
    assert out.dtype == jnp.float64 and lse.dtype == jnp.float64
    pos_q, pos_k = np.arange(t)[:, None] + s - t, np.arange(s)[None, :]
    visible = (np.asarray(mask) & (pos_k <= pos_q)
               & (pos_k < np.asarray(kv_lengths)[:, None, None, None]))
    expected = _numpy_attention(*(np.asarray(x) for x in (q, k, v, bias)), visible)
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("implementation", ["xla", "chunked"])
def test_float64_gradients_match_finite_differences(implementation):
  """check_grads in float64: the chunked custom_vjp (and dropout's multiplier) included."""
  with enable_x64():
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 6, 2, 8), jnp.float64) for i in range(3))
    bias = jax.random.normal(jax.random.key(3), (1, 2, 6, 6), jnp.float64)
    fn = lambda q, k, v, bias: flash_jax.flash_attention(
        q, k, v, bias=bias, causal=True, softcap=3.0, dropout_rate=0.2,
        dropout_rng=jax.random.key(5), implementation=implementation,
        return_lse=True)
    check_grads(fn, (q, k, v, bias), order=1, modes=["rev"], eps=1e-6, atol=1e-7, rtol=1e-7)


def test_float64_dot_product_attention_matches_jax_nn():
  with enable_x64():
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 9, 4, 16), jnp.float64) for i in range(3))
    mask = jax.random.bernoulli(jax.random.key(4), 0.8, (2, 1, 9, 9)).at[..., 0].set(True)
    ours = flash_jax.dot_product_attention(q, k, v, mask=mask, is_causal=True)
    theirs = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True)
    assert ours.dtype == theirs.dtype == jnp.float64
  # jax.nn computes its softmax in float32 even for float64 inputs.
  np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)


def test_float64_goes_to_a_jnp_implementation_and_kernels_refuse_it():
  with enable_x64():
    q = jnp.ones((1, 8, 2, 16), jnp.float64)
    spec, *_ = spec_lib.normalize(q, q, q)
    for platform in ("cpu", "gpu", "tpu"):
      assert dispatch.select(spec, None, platform=platform).name == "chunked"
    for name, platform in (("triton", "gpu"), ("mosaic_gpu", "gpu"), ("mosaic_tpu", "tpu")):
      with pytest.raises(NotImplementedError, match="float64"):
        dispatch.get_implementation(name).check(spec, platform=platform, interpret=False)
    for name in ("triton", "mosaic_tpu"):  # named, in interpret mode on CPU
      with pytest.raises(NotImplementedError, match="float64"):
        flash_jax.flash_attention(q, q, q, implementation=name, interpret=True)


# ---- matmul precision -----------------------------------------------------------------------

@pytest.mark.parametrize("implementation", ["xla", "chunked"])
def test_call_precision_reaches_forward_and_backward(implementation):
  """jax.default_matmul_precision at call time is recorded in the spec: the backward,
  traced after the context has closed, runs at it too."""
  q, k, v = (jax.random.normal(jax.random.key(i), (1, 12, 2, 16)) for i in range(3))
  fn = lambda q, k, v: flash_jax.flash_attention(q, k, v, causal=True,
                                                 implementation=implementation)
  with jax.default_matmul_precision("highest"):
    out, vjp = jax.vjp(fn, q, k, v)
    forward = dot_precisions(jax.make_jaxpr(fn)(q, k, v))
  backward = dot_precisions(jax.make_jaxpr(vjp)(out))
  assert forward and backward
  assert set(forward) == set(backward) == {jax.lax.Precision.HIGHEST}
  plain = dot_precisions(jax.make_jaxpr(jax.vjp(fn, q, k, v)[1])(out))
  assert plain and set(plain) == {None}
