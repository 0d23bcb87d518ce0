"""Attention sinks (flash_jax/sinks.py): argument checks, the lse route's edge cases, and
the sink as one more key. The shared suite (cases with "sinks") checks every
implementation against the reference's sink column."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flash_jax
from flash_jax.sinks import apply_sinks

B, T, S, N, K, H = 2, 9, 13, 4, 2, 16


def _qkv(dtype=jnp.float32):
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(keys[0], (B, T, N, H), dtype)
  k = jax.random.normal(keys[1], (B, S, K, H), dtype)
  v = jax.random.normal(keys[2], (B, S, K, H), dtype)
  sinks = np.log(S) + jax.random.normal(keys[3], (N,))
  return q, k, v, sinks


@pytest.mark.parametrize("sinks,error,match", [
    (jnp.zeros((N + 1,)), ValueError, r"sinks must have shape \[Nq\] = \(4,\)"),
    (jnp.zeros((1, N)), ValueError, "sinks must have shape"),
    (0.5, ValueError, "sinks must have shape"),
    (jnp.zeros((N,), jnp.int32), TypeError, "sinks must be a float array"),
])
def test_bad_sinks_raise_naming_the_argument(sinks, error, match):
  q, k, v, _ = _qkv()
  with pytest.raises(error, match=match):
    flash_jax.flash_attention(q, k, v, sinks=sinks)
  with pytest.raises(error, match=match):
    flash_jax.flash_attention(q, k, v, sinks=sinks, implementation="xla")


def test_which_implementation_accepts_sinks():
  q, k, v, sinks = _qkv()
  assert (flash_jax.which_implementation(q, k, v, causal=True, sinks=sinks)
          == flash_jax.which_implementation(q, k, v, causal=True))


@pytest.mark.parametrize("implementation", ["xla", "chunked"])
def test_sink_is_one_more_key_with_value_zero(implementation):
  """The sink equals an extra key column whose logit is sinks[h] (through a bias on a zero
  key) and whose value is 0: out, lse and d(sinks) = that column's summed d(bias)."""
  q, k, v, sinks = _qkv()
  k_ext = jnp.concatenate([k, jnp.zeros((B, 1, K, H))], axis=1)  # [B, S + 1, K, H]
  v_ext = jnp.concatenate([v, jnp.zeros((B, 1, K, H))], axis=1)
  column = jnp.zeros((1, N, 1, S + 1)).at[..., S].set(1.0)  # [1, N, 1, S + 1]

  def with_sinks(sinks):
    return flash_jax.flash_attention(q, k, v, sinks=sinks, return_lse=True,
                                     implementation=implementation)

  def with_column(sinks):
    bias = column * sinks[None, :, None, None]  # logit 0 + sinks[h] on the extra key
    return flash_jax.flash_attention(q, k_ext, v_ext, bias=bias, return_lse=True,
                                     implementation="xla")

  with jax.default_matmul_precision("highest"):
    out, lse = with_sinks(sinks)
    want_out, want_lse = with_column(sinks)
    loss = lambda f: lambda s: jnp.sum(jnp.cos(f(s)[0])) + jnp.sum(f(s)[1] ** 2)
    dsinks, want_dsinks = jax.grad(loss(with_sinks))(sinks), jax.grad(loss(with_column))(sinks)
  np.testing.assert_allclose(out, want_out, atol=1e-5)
  np.testing.assert_allclose(lse, want_lse, atol=1e-5)
  np.testing.assert_allclose(dsinks, want_dsinks, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("implementation", ["xla", "chunked"])
def test_sink_of_minus_inf_is_no_sink(implementation):
  q, k, v, _ = _qkv()
  kwargs = dict(causal=True, q_offset=jnp.array([-3, 0]), return_lse=True,
                implementation=implementation)  # batch 0's first rows see no key
  out, lse = flash_jax.flash_attention(q, k, v, sinks=jnp.full((N,), -jnp.inf), **kwargs)
  want_out, want_lse = flash_jax.flash_attention(q, k, v, **kwargs)
  np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(want_lse))
  np.testing.assert_allclose(out, want_out, atol=1e-6)
  np.testing.assert_allclose(lse, want_lse, atol=1e-6)


def test_apply_sinks_on_rows_that_see_no_key():
  """lse -inf: out 0, lse = sink, d lse'/d sink = 1, d out'/d sink = 0, zero d(out), d(lse);
  lse and sink both -inf: out 0, lse -inf. Never NaN, in values or gradients."""
  out = jnp.ones((1, 3, 2, 4), jnp.bfloat16).at[:, 0].set(0)  # [B, T, Nq, Hv]
  lse = jnp.array([[[-jnp.inf, 1.0, 2.0], [-jnp.inf, -jnp.inf, 0.5]]])  # [B, Nq, T]
  sinks = jnp.array([0.75, -jnp.inf])
  new_out, new_lse = apply_sinks(out, lse, sinks)
  assert new_out.dtype == jnp.bfloat16 and new_lse.dtype == jnp.float32
  np.testing.assert_array_equal(new_lse[0, 0, 0], 0.75)
  assert np.isneginf(new_lse[0, 1, :2]).all() and np.all(new_out[0, :2, 1] == 0)
  np.testing.assert_allclose(new_lse[0, 1, 2], 0.5)  # a -inf sink changes nothing
  np.testing.assert_allclose(new_lse[0, 0, 1:], np.logaddexp(0.75, [1.0, 2.0]), rtol=1e-6)

  def loss(out, lse, sinks):
    new_out, new_lse = apply_sinks(out, lse, sinks)
    return jnp.sum(new_out.astype(jnp.float32) * 3.0) + jnp.sum(
        jnp.where(jnp.isfinite(new_lse), new_lse, 0.0))
  dout, dlse, dsinks = jax.grad(loss, argnums=(0, 1, 2))(out, lse, sinks)
  for g in (dout, dlse, dsinks):
    assert np.isfinite(np.asarray(g, np.float32)).all()
  assert np.all(dout[0, 0, 0] == 0) and dlse[0, 0, 0] == 0  # the hidden row's inputs
  weights = jax.nn.sigmoid(jnp.array([1.0, 2.0]) - 0.75)  # the keys' share of the rows
  row_sums = 4 * 3.0  # sum of out * 3 over Hv = 4 on the visible rows (out = 1)
  want = 1.0 + float(jnp.sum(1 - weights)) - row_sums * float(jnp.sum(weights * (1 - weights)))
  np.testing.assert_allclose(dsinks[0], want, rtol=2e-3)
  assert dsinks[1] == 0


def test_sinks_under_vmap_and_jit():
  q, k, v, sinks = _qkv()
  fn = lambda q, sinks: flash_jax.flash_attention(q, k, v, causal=True, sinks=sinks)
  stacked = jnp.stack([sinks, sinks - 3.0])
  got = jax.jit(jax.vmap(fn, in_axes=(None, 0)))(q, stacked)
  for i in range(2):
    np.testing.assert_allclose(got[i], fn(q, stacked[i]), atol=1e-6)
  dsinks = jax.jit(jax.grad(lambda s: jnp.sum(fn(q, s) ** 2)))(sinks)
  assert dsinks.shape == (N,) and dsinks.dtype == sinks.dtype and np.all(dsinks != 0)
