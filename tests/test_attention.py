"""The shared suite: every implementation in targets.TARGETS runs every test here."""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flash_jax
from cases import CASES, Case, make_inputs, visible_rows
from conftest import (assert_accurate, attend, highest_precision, skip_if_unsupported,
                      upcast)

CASE_PARAMS = [pytest.param(c, id=c.id) for c in CASES]


def _reference(q, k, v, kwargs, *, exact):
  """The xla reference: float32 at HIGHEST precision on upcast inputs, or same precision."""
  if exact:
    q, k, v, kwargs = upcast((q, k, v, kwargs))
    with highest_precision():
      return flash_jax.flash_attention(q, k, v, implementation="xla", return_lse=True, **kwargs)
  return flash_jax.flash_attention(q, k, v, implementation="xla", return_lse=True, **kwargs)


def _forward_inputs(case: Case):
  return make_inputs(case, seed=zlib.crc32(case.id.encode()))


@functools.cache
def _forward_references(case: Case):
  """(exact out, exact lse, same-precision out, same-precision lse, exact lse without the
  sinks) of `case`: computed once, shared by every target."""
  q, k, v, kwargs = _forward_inputs(case)
  exact = _reference(q, k, v, kwargs, exact=True)
  same = _reference(q, k, v, kwargs, exact=False)
  sinkless = {name: value for name, value in kwargs.items() if name != "sinks"}
  sinkless_lse = _reference(q, k, v, sinkless, exact=True)[1] if "sinks" in kwargs else exact[1]
  return (*exact, *same, sinkless_lse)


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_forward_and_lse(target, case: Case):
  skip_if_unsupported(target, case)
  q, k, v, kwargs = _forward_inputs(case)
  out, lse = attend(target, q, k, v, return_lse=True, **kwargs)
  assert out.shape == q.shape[:3] + v.shape[3:] and out.dtype == q.dtype
  assert lse.shape == (case.batch, case.num_q_heads, case.q_len) and lse.dtype == jnp.float32
  ref_out, ref_lse, same_out, same_lse, sinkless_lse = _forward_references(case)
  assert_accurate("out", out, same_out, ref_out, dtype=case.dtype)
  assert_accurate("lse", lse, same_lse, ref_lse, dtype=case.dtype)
  # Rows that see no key: exactly zero output and -inf lse (with sinks: lse = the sink,
  # which makes every lse finite, so the rows are found without sinks).
  hidden = ~visible_rows(sinkless_lse)
  assert np.all(np.asarray(out, np.float32)[hidden] == 0)
  sinks = kwargs.get("sinks")
  if sinks is not None:
    sink_rows = np.broadcast_to(np.asarray(sinks, np.float32), hidden.shape)
    np.testing.assert_array_equal(np.asarray(lse).transpose(0, 2, 1)[hidden], sink_rows[hidden])


# Keyword inputs with gradients, beside q, k and v.
DIFFERENTIABLE_KWARGS = ("bias", "sinks")


def _loss_and_grads(fn, q, k, v, extras, seed):
  """Gradients of <out, dout> + <lse, dlse> for random cotangents (lse on finite rows)
  w.r.t. q, k, v and the keyword inputs `extras` ({"bias": ..., "sinks": ...}):
  -> (dq, dk, dv, {name: gradient})."""
  def loss(q, k, v, extras):
    out, lse = fn(q, k, v, **extras)
    keys = jax.random.split(jax.random.PRNGKey(seed))
    dout = jax.random.normal(keys[0], out.shape, jnp.float32)
    dlse = jax.random.normal(keys[1], lse.shape, jnp.float32)
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return jnp.sum(out.astype(jnp.float32) * dout) + 0.5 * jnp.sum(lse * dlse)
  return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, extras)


def _gradient_inputs(case: Case):
  """q, k, v, the differentiable keyword inputs and the other keyword arguments."""
  q, k, v, kwargs = make_inputs(case, seed=zlib.crc32(case.id.encode()) + 1)
  extras = {name: kwargs.pop(name) for name in DIFFERENTIABLE_KWARGS if name in kwargs}
  return q, k, v, extras, kwargs


GRADIENT_SEED = 7


@functools.cache
def _gradient_references(case: Case):
  """(same-precision, exact) gradients of `case` by the xla reference: computed once,
  shared by every target."""
  q, k, v, extras, kwargs = _gradient_inputs(case)
  same = _loss_and_grads(lambda *a, **kw: flash_jax.flash_attention(
      *a, implementation="xla", return_lse=True, **kwargs, **kw), q, k, v, extras,
      GRADIENT_SEED)
  q32, k32, v32, extras32, kw32 = upcast((q, k, v, extras, kwargs))
  with highest_precision():
    exact = _loss_and_grads(lambda *a, **kw: flash_jax.flash_attention(
        *a, implementation="xla", return_lse=True, **kw32, **kw), q32, k32, v32, extras32,
        GRADIENT_SEED)
  return same, exact


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_gradients(target, case: Case):
  skip_if_unsupported(target, case)
  q, k, v, extras, kwargs = _gradient_inputs(case)
  grads = _loss_and_grads(lambda *a, **kw: attend(target, *a, return_lse=True, **kwargs, **kw),
                          q, k, v, extras, GRADIENT_SEED)
  same, exact = _gradient_references(case)
  results = list(zip(("dq", "dk", "dv"), grads[:3], same[:3], exact[:3], (q, k, v)))
  results += [(f"d{name}", grads[3][name], same[3][name], exact[3][name], x)
              for name, x in extras.items()]
  for name, g, s, r, x in results:
    assert g.shape == x.shape and g.dtype == x.dtype, name
    assert_accurate(name, g, s, r, dtype=case.dtype)


FEATURED = Case(2, 97, 130, 4, 2, 64, "bfloat16",
                ("causal", "q_offset_array", "segment_ids", "softcap", "dropout"))
SMALL = Case(2, 33, 47, 4, 2, 32, "float32", ("causal", "bias", "window"))


def test_deterministic(target):
  case = FEATURED if target.max_tokens is None else SMALL
  skip_if_unsupported(target, case)
  q, k, v, kwargs = make_inputs(case, seed=3)

  def outputs():  # deterministic=True: bitwise reproducible gradients
    fn = lambda q, k, v: attend(target, q, k, v, deterministic=True, **kwargs)
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(jnp.ones_like(out)))

  first, second = outputs(), outputs()
  for a, b in zip(first, second):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_implementation_really_ran(target):
  q, k, v, kwargs = make_inputs(SMALL, seed=4)
  jaxpr = str(jax.make_jaxpr(jax.grad(
      lambda q: jnp.sum(attend(target, q, k, v, **kwargs))))(q))
  assert f"flash_jax_{target.name}" in jaxpr
  if target.name not in ("xla", "chunked"):
    # Pallas kernels appear as pallas_call; Mosaic GPU's plgpu.kernel as mpmd_map.
    assert "pallas_call" in jaxpr or "mpmd_map" in jaxpr


def test_constant_bias_skips_dbias(target):
  """A bias no gradient flows to (ALiBi, a fixed bias) gives the same q/k/v gradients,
  and the blockwise kernels skip d bias: no float32 [B, Nq, T, S] in the backward."""
  case = Case(2, 33, 47, 4, 2, 32, "bfloat16" if "float32" not in target.dtypes
              else "float32", ("causal", "bias"))
  skip_if_unsupported(target, case)
  q, k, v, kwargs = make_inputs(case, seed=6)
  bias = kwargs.pop("bias")[:1]  # [1, Nq, T, S]: d bias is summed from [B, Nq, T, S]
  loss = lambda q, k, v, bias: jnp.sum(attend(target, q, k, v, bias=bias, **kwargs)
                                       .astype(jnp.float32))
  constant = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, bias)
  learned = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, bias)
  for a, b in zip(constant, learned):
    if target.ordered_backward:
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    else:  # the constant bias's backward adds dQ up in no fixed order
      np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                 rtol=1e-5, atol=1e-6)
  assert learned[3].shape == bias.shape
  if target.name not in ("xla", "chunked"):  # autodiff keeps its own [T, S] tensors
    full = f"f32[{case.batch},{case.num_q_heads},{case.q_len},{case.kv_len}]"
    assert full not in str(jax.make_jaxpr(jax.grad(loss))(q, k, v, bias))
    assert full in str(jax.make_jaxpr(jax.grad(loss, argnums=3))(q, k, v, bias))


def test_query_vectors_equal_their_broadcast(target):
  """A bias or mask of one value per query ([.., T, 1]: query padding) gives the output
  and gradients of its broadcast to [.., T, S] (the Hopper kernels keep it a vector, so
  that memory stays linear in T)."""
  dtype = "float32" if "float32" in target.dtypes else "bfloat16"
  case = Case(2, 130, 200, 4, 2, 64, dtype, ("causal", "mask_queries", "bias_queries"))
  skip_if_unsupported(target, case)
  q, k, v, kwargs = make_inputs(case, seed=8)
  b, t, n, s = case.batch, case.q_len, case.num_q_heads, case.kv_len
  broadcast = dict(kwargs, bias=jnp.broadcast_to(kwargs["bias"], (1, n, t, s)),
                   mask=jnp.broadcast_to(kwargs["mask"], (b, 1, t, s)))
  cotangent = jax.random.normal(jax.random.PRNGKey(9), q.shape, q.dtype)

  def results(options):
    out, vjp = jax.vjp(lambda q, k, v: attend(target, q, k, v, **options), q, k, v)
    return (out, *vjp(cotangent))

  tolerance = 1e-5 if dtype == "float32" else 2e-2
  for name, x, y in zip(("out", "dq", "dk", "dv"), results(kwargs), results(broadcast)):
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32),
                               rtol=tolerance, atol=tolerance, err_msg=name)
  assert not np.any(np.asarray(results(kwargs)[0])[:, 0]), "a query row the mask hides"


def test_jax_transformations(target):
  """jit, vmap over an extra batch axis, grad, checkpoint and scan over layers."""
  case = SMALL
  skip_if_unsupported(target, case)
  q, k, v, kwargs = make_inputs(case, seed=5)
  fn = lambda q, k, v: attend(target, q, k, v, **kwargs)
  expected = fn(q, k, v)
  np.testing.assert_allclose(jax.jit(fn)(q, k, v), expected, rtol=1e-5, atol=1e-5)

  stacked = jax.tree.map(lambda x: jnp.stack([x, x[::-1]]), (q, k, v))
  batched = jax.vmap(fn)(*stacked)
  np.testing.assert_allclose(batched[0], expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(batched[1], fn(q[::-1], k[::-1], v[::-1]), rtol=1e-5, atol=1e-5)

  loss = lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))
  grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  if target.checkpointable:
    remat_grads = jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2)))(q, k, v)
    for g, r in zip(grads, remat_grads):
      np.testing.assert_allclose(r, g, rtol=1e-4, atol=1e-5)

  def layers(x):
    def layer(h, _):
      h = h + fn(h, k, v).reshape(h.shape[:3] + (-1,))[..., :h.shape[-1]]
      return h, None
    return jnp.sum(jax.lax.scan(layer, x, None, length=2)[0])
  scanned = jax.jit(jax.grad(layers))(q)
  assert scanned.shape == q.shape and np.all(np.isfinite(scanned))


def test_rows_that_see_nothing(target):
  """Zero output, -inf lse and zero, finite gradients on fully masked rows."""
  case = Case(2, 16, 24, 2, 1, 32, "float32", ("empty_rows",))
  skip_if_unsupported(target, case)
  q, k, v, kwargs = make_inputs(case, seed=6)
  fn = lambda q, k, v: attend(target, q, k, v, return_lse=True, **kwargs)
  out, lse = fn(q, k, v)
  hidden = ~visible_rows(lse)
  assert hidden.any() and (~hidden).any()
  assert np.all(np.asarray(out)[hidden] == 0)
  assert np.all(np.isneginf(np.asarray(lse).transpose(0, 2, 1)[hidden]))
  dq, dk, dv = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v)[0] ** 2), argnums=(0, 1, 2))(q, k, v)
  for g in (dq, dk, dv):
    assert np.all(np.isfinite(np.asarray(g)))
  assert np.all(np.asarray(dq)[hidden] == 0)


def test_rows_that_see_nothing_with_sinks(target):
  """A row that sees no key puts all its mass on the sink: output 0, lse = the sink,
  d lse / d sink = 1, d out / d sink = 0, zero q/k/v gradients, never NaN."""
  case = Case(2, 16, 24, 2, 1, 32, "float32", ("empty_rows", "sinks"))
  skip_if_unsupported(target, case)
  q, k, v, kwargs = make_inputs(case, seed=6)
  sinks = kwargs.pop("sinks")
  hidden = ~visible_rows(attend(target, q, k, v, return_lse=True, **kwargs)[1])  # [B, T, Nq]
  assert hidden.any() and (~hidden).any()
  fn = lambda q, k, v, sinks: attend(target, q, k, v, return_lse=True, sinks=sinks, **kwargs)
  out, lse = fn(q, k, v, sinks)
  assert np.all(np.asarray(out)[hidden] == 0)
  lse_rows = np.asarray(lse).transpose(0, 2, 1)  # [B, T, Nq]
  np.testing.assert_array_equal(lse_rows[hidden], np.broadcast_to(sinks, hidden.shape)[hidden])

  rows = jnp.asarray(hidden)
  weights = jax.random.normal(jax.random.PRNGKey(1), out.shape)
  def hidden_rows_loss(q, k, v, sinks):  # lse and out of the hidden rows only
    out, lse = fn(q, k, v, sinks)
    return (jnp.sum(jnp.where(rows, jnp.swapaxes(lse, 1, 2), 0.0))
            + jnp.sum(jnp.where(rows[..., None], out * weights, 0.0)))
  dq, dk, dv, dsinks = jax.grad(hidden_rows_loss, argnums=(0, 1, 2, 3))(q, k, v, sinks)
  for name, g in (("dq", dq), ("dk", dk), ("dv", dv)):
    assert np.all(np.asarray(g) == 0), name
  np.testing.assert_array_equal(dsinks, hidden.sum(axis=(0, 1)))  # d lse / d sink = 1 per row

  loss = lambda *args: jnp.sum(jnp.sin(fn(*args)[0])) + jnp.sum(fn(*args)[1])
  grads = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, sinks)
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))
  assert np.all(np.asarray(grads[0])[hidden] == 0)


# Where the features overlap, flash_jax.dot_product_attention equals jax.nn's.
JAX_NN_CASES = (
    ("causal", dict(is_causal=True)),
    ("bias", dict(bias=True)),
    ("mask", dict(mask=True)),
    ("lengths", dict(query_seq_lengths=True, key_value_seq_lengths=True)),
    ("window", dict(local_window_size=(9, 4))),
    ("causal_window", dict(is_causal=True, local_window_size=6)),
)


@pytest.mark.parametrize("name,options", JAX_NN_CASES, ids=[c[0] for c in JAX_NN_CASES])
def test_matches_jax_nn(target, name, options):
  case = Case(2, 40, 40 if "causal" in name or "window" in name else 56, 4, 2, 32, "float32")
  skip_if_unsupported(target, case)
  q, k, v, _ = make_inputs(case, seed=8)
  keys = jax.random.split(jax.random.PRNGKey(9), 4)
  b, t, s = case.batch, case.q_len, case.kv_len
  kwargs = dict(options)
  if kwargs.pop("bias", None):
    kwargs["bias"] = jax.random.normal(keys[0], (b, 1, t, s))
  if kwargs.pop("mask", None):
    kwargs["mask"] = jax.random.bernoulli(keys[1], 0.8, (b, 4, t, s)).at[..., 0].set(True)
  if kwargs.pop("query_seq_lengths", None):
    kwargs["query_seq_lengths"] = jnp.array([t, t // 2], jnp.int32)
  if kwargs.pop("key_value_seq_lengths", None):
    kwargs["key_value_seq_lengths"] = jnp.array([s // 3, s], jnp.int32)
  # jax.nn at HIGHEST is the exact answer; at default precision (TF32 on GPU) it is the
  # same-precision baseline of the accuracy rule.
  with highest_precision():
    expected = jax.nn.dot_product_attention(q, k, v, implementation="xla", **kwargs)
  same_precision = jax.nn.dot_product_attention(q, k, v, implementation="xla", **kwargs)
  try:
    got = flash_jax.dot_product_attention(q, k, v, implementation=target.name, **kwargs) \
        if not target.interpret else attend(target, q, k, v, **_to_flash_kwargs(kwargs))
  except NotImplementedError as e:
    if target.name in ("xla", "chunked"):
      raise
    pytest.skip(str(e))
  assert_accurate("out", got, same_precision, expected, dtype=case.dtype)


def _to_flash_kwargs(kwargs):
  """jax.nn argument names -> flash_attention's (for interpret-mode targets)."""
  names = dict(is_causal="causal", local_window_size="window",
               query_seq_lengths="q_lengths", key_value_seq_lengths="kv_lengths")
  return {names.get(k, k): v for k, v in kwargs.items()}
