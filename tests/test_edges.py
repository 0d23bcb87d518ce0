"""Special-value and edge probes: nothing a user passes gives a silent wrong result or a NaN.

Every CPU target (xla, chunked, triton and mosaic_tpu in interpret mode), and the GPU
kernels under `pytest -m gpu` (in bfloat16 where they take no float32), get junk in
hidden keys, rows whose every key carries a -inf or a huge negative bias, huge windows
and offsets, and is held to the xla reference, which must itself be NaN-free. Wrong
argument types and second-order derivatives raise errors that name what is wrong.
Shapes are small: the whole file runs in well under two minutes on CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flash_jax
from flash_jax import BlockSizes
from cases import poison_unseen_keys, unseen_keys
from conftest import assert_accurate, highest_precision, upcast
from flash_jax.kernels.triton import TritonConfig
from targets import GRADIENT_TESTS, Target

CPU_TARGETS = (
    Target("xla"),
    Target("chunked", block_sizes=BlockSizes(block_kv=16), label="bkv16"),
    Target("triton", interpret=True, block_sizes=BlockSizes(block_q=16, block_kv=16)),
    Target("mosaic_tpu", interpret=True),
    Target("triton", interpret=True, label="atomic_dq", tests=GRADIENT_TESTS,
           block_sizes=TritonConfig(block_q=16, block_kv=16, atomic_dq=True),
           ordered_backward=False),
)
GPU_TARGETS = (
    Target("triton", platform="gpu"),
    Target("triton", platform="gpu", label="atomic_dq", tests=GRADIENT_TESTS,
           block_sizes=TritonConfig(atomic_dq=True), ordered_backward=False),
    Target("mosaic_gpu", platform="gpu", dtypes=("bfloat16",)),
)
TARGET_PARAMS = ([pytest.param(t, id=t.id) for t in CPU_TARGETS]
                 + [pytest.param(t, id=t.id, marks=pytest.mark.gpu) for t in GPU_TARGETS])
B, T, S, NQ, NKV, H = 2, 24, 40, 2, 1, 16
F32_LOWEST = float(np.finfo(np.float32).min)


def _dtype(target: Target | None) -> str:
  """float32 where the target takes it, else bfloat16; skips GPU targets off a GPU."""
  if target is not None and target.platform == "gpu" and jax.default_backend() != "gpu":
    pytest.skip("needs a GPU")
  return "float32" if target is None or "float32" in target.dtypes else "bfloat16"


def _inputs(seed=0, t=T, s=S, target: Target | None = None):
  dtype = _dtype(target)
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(keys[0], (B, t, NQ, H), dtype)
  k = jax.random.normal(keys[1], (B, s, NKV, H), dtype)
  v = jax.random.normal(keys[2], (B, s, NKV, H), dtype)
  return q, k, v, keys[3]


def _call(target: Target, q, k, v, bias=None, **kwargs):
  extra = {} if bias is None else {"bias": bias}
  return flash_jax.flash_attention(q, k, v, implementation=target.name,
                                   interpret=target.interpret, block_sizes=target.block_sizes,
                                   return_lse=True, **extra, **kwargs)


def _results(target: Target, q, k, v, bias=None, **kwargs):
  """(out, lse, dq, dk, dv[, dbias]) of a loss that uses out and the finite lse."""
  def loss(q, k, v, bias):
    out, lse = _call(target, q, k, v, bias, **kwargs)
    finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return jnp.sum(jnp.sin(out)) + 0.5 * jnp.sum(finite_lse), (out, lse)
  argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
  (_, (out, lse)), grads = jax.value_and_grad(loss, argnums=argnums, has_aux=True)(
      q, k, v, bias)
  return (out, lse) + tuple(grads)


def _exact(q, k, v, bias=None, **kwargs):
  with highest_precision():
    return _results(Target("xla"), *upcast((q, k, v, bias)), **kwargs)


_REFERENCES = {}


def _references(name, q, k, v, bias=None, **kwargs):
  """(same precision, exact) xla results, computed once per probe and dtype."""
  name = f"{name}-{q.dtype}"
  if name not in _REFERENCES:
    _REFERENCES[name] = (_results(Target("xla"), q, k, v, bias, **kwargs),
                         _exact(q, k, v, bias, **kwargs))
  return _REFERENCES[name]


NAMES = ("out", "lse", "dq", "dk", "dv", "dbias")


def _assert_matches(results, same, exact, dtype="float32"):
  for name, r, s_, e in zip(NAMES, results, same, exact):
    assert not np.isnan(np.asarray(r, np.float32)).any(), f"{name}: NaN"
    assert_accurate(name, r, s_, e, dtype=dtype)


# ---- junk in hidden keys -----------------------------------------------------------------

JUNK_RULES = {
    "kv_lengths": dict(kv_lengths=np.array([25, 9])),
    # A decode cache: keys past the last query position (i + q_offset, rows < q_lengths).
    "cache_tail": dict(causal=True, q_offset=np.array([3, 11]), q_lengths=np.array([24, 7])),
}


@pytest.mark.parametrize("rule", list(JUNK_RULES))
@pytest.mark.parametrize("target", TARGET_PARAMS)
def test_junk_in_unseen_keys_has_no_effect(target, rule):
  """NaN/inf in keys no row sees change nothing, forward or backward; their dk, dv are 0."""
  q, k, v, _ = _inputs(1, target=target)
  kwargs = JUNK_RULES[rule]
  junk_k, junk_v = poison_unseen_keys(k, v, kwargs, T)
  hidden = unseen_keys(kwargs, B, T, S)
  assert hidden.any() and np.isnan(np.asarray(junk_k, np.float32)).any()
  got = _results(target, q, junk_k, junk_v, **kwargs)
  # The answer with finite values there: hidden keys must not matter whatever they hold.
  _assert_matches(got, *_references(f"junk-{rule}", q, k, v, **kwargs), dtype=_dtype(target))
  dk, dv = got[3], got[4]
  assert np.all(np.asarray(dk)[hidden] == 0) and np.all(np.asarray(dv)[hidden] == 0)


# ---- bias rows: -inf hides, a finite bias is a logit -------------------------------------

ROW_BIASES = (-jnp.inf, -1e9, -1e20, F32_LOWEST, -1e4)


def _row_bias(key):
  """[B, NQ, T, S] bias: normal rows, and rows whose every key has one special value."""
  bias = jax.random.normal(key, (B, NQ, T, S))
  for i, value in enumerate(ROW_BIASES):
    bias = bias.at[:, :, 2 * i].set(value)
  # Two huge negatives in one row: the larger one takes all the weight (as in jax.nn).
  bias = bias.at[:, :, 2 * len(ROW_BIASES)].set(-2e30)
  return bias.at[:, :, 2 * len(ROW_BIASES), 5].set(-1e30)


@pytest.mark.parametrize("softcap", [None, 3.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("target", TARGET_PARAMS)
def test_rows_of_huge_negative_or_infinite_bias(target, softcap):
  q, k, v, key = _inputs(2, target=target)
  bias = _row_bias(key)
  kwargs = dict(causal=True, q_offset=S - T, softcap=softcap)
  got = _results(target, q, k, v, bias, **kwargs)
  _assert_matches(got, *_references(f"bias-{softcap}", q, k, v, bias, **kwargs))
  out, lse = np.asarray(got[0]), np.asarray(got[1])
  # -inf on every key: the row sees nothing (zeros, lse -inf); finite biases are logits.
  assert np.all(out[:, 0] == 0) and np.all(np.isneginf(lse[:, :, 0]))
  assert np.all(np.isfinite(lse[:, :, 1:]))
  if softcap is None:
    # A row of equal huge biases attends uniformly to the keys it sees; the lowest float32
    # counts as -1e38; -1e30 beats -2e30.
    visible = S - T + 2 + 1  # row 2: keys 0 .. S - T + 2 (causal)
    np.testing.assert_allclose(out[:, 2], jnp.mean(v[:, :visible], axis=1).repeat(NQ, 1),
                               atol=1e-5)
    np.testing.assert_allclose(lse[:, :, 4], -1e20, rtol=1e-6)
    np.testing.assert_allclose(lse[:, :, 6], -1e38, rtol=1e-6)
    np.testing.assert_allclose(out[:, 2 * len(ROW_BIASES)], v[:, 5].repeat(NQ, 1), atol=1e-5)


def test_reference_is_nan_free_on_the_where_mask_idiom():
  """bias = where(mask, 0, -inf) with fully masked rows: zeros there, like mask=."""
  q, k, v, key = _inputs(3)
  mask = jax.random.bernoulli(key, 0.6, (B, 1, T, S)).at[:, :, :3].set(False)
  with_bias = _results(Target("xla"), q, k, v, jnp.where(mask, 0.0, -jnp.inf))
  with_mask = _results(Target("xla"), q, k, v, mask=mask)
  for name, a, b in zip(NAMES, with_bias, with_mask):
    assert not np.isnan(np.asarray(a)).any(), name
    np.testing.assert_allclose(a, b, atol=1e-6, err_msg=name)


# ---- huge windows and offsets ------------------------------------------------------------

@pytest.mark.parametrize("target", TARGET_PARAMS)
def test_huge_window_sides_are_unbounded(target):
  q, k, v, _ = _inputs(4, target=target)
  huge = _call(target, q, k, v, window=(3, 2**31 - 1), q_offset=5)
  unbounded = _call(target, q, k, v, window=(3, None), q_offset=5)
  for a, b in zip(huge, unbounded):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A traced offset beyond the limit is clipped, which keeps the mask: every key visible.
  far = jax.jit(lambda off: _call(target, q, k, v, causal=True, q_offset=off))(
      jnp.full((B,), 2**31 - 5, jnp.int32))
  # The same kernel without a mask (GPU float32 products are TF32 by default: another
  # implementation would differ by more than the mask's effect).
  plain = _call(target, q, k, v)
  atol = 1e-5 if q.dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(far[0], np.float32), np.asarray(plain[0], np.float32),
                             atol=atol)


@pytest.mark.parametrize("kwargs,match", [
    (dict(q_offset=2**31), "q_offset"),
    (dict(q_offset=2**31 - 5), "q_offset"),
    (dict(q_offset=np.array([0, -2**40])), "q_offset"),
    (dict(kv_lengths=np.array([2**32 + 3, 4], np.int64)), "kv_lengths"),
    (dict(q_lengths=[2**31, 1]), "q_lengths"),
    (dict(segment_ids=np.array([[0, 2**33] * 20] * B)), "segment_ids"),
], ids=["offset-2^31", "offset-near-2^31", "offset-array", "kv_lengths-int64",
        "q_lengths-list", "segment-ids-int64"])
def test_values_beyond_int32_are_rejected(kwargs, match):
  q, k, v, _ = _inputs(5, t=S)
  with pytest.raises(ValueError, match=match):
    flash_jax.flash_attention(q, k, v, **kwargs)


def test_traced_wide_segment_ids_keep_equality():
  """uint32 ids beyond int32 under jit: ranked, not wrapped (2**31 + 1 stays apart from 1)."""
  q, k, v, _ = _inputs(6, t=S)
  ids = np.where(np.arange(S) < 17, 1, 2**31 + 1).astype(np.uint32)[None].repeat(B, 0)
  fn = jax.jit(lambda ids: flash_jax.flash_attention(q, k, v, segment_ids=ids))
  expected = flash_jax.flash_attention(q, k, v, segment_ids=jnp.asarray(ids != 1, jnp.int32))
  np.testing.assert_allclose(fn(jnp.asarray(ids)), expected, atol=1e-6)


# ---- argument types ----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,error,match", [
    (dict(causal="no"), TypeError, "causal"),
    (dict(causal=1), TypeError, "causal"),
    (dict(window=True), TypeError, "window"),
    (dict(window=(2.5, 1)), TypeError, "window left"),
    (dict(return_lse="yes"), TypeError, "return_lse"),
    (dict(softcap="2"), TypeError, "softcap"),
    (dict(softcap=float("nan")), ValueError, "softcap"),
    (dict(scale=float("inf")), ValueError, "scale"),
    (dict(scale=True), TypeError, "scale"),
    (dict(dropout_rate=0.1, dropout_rng=123), TypeError, "dropout_rng"),
    (dict(dropout_rate=True, dropout_rng=jax.random.PRNGKey(0)), TypeError, "dropout_rate"),
], ids=lambda x: None)
def test_wrong_types_name_the_argument(kwargs, error, match):
  q, k, v, _ = _inputs(7)
  with pytest.raises(error, match=match):
    flash_jax.flash_attention(q, k, v, **kwargs)


@pytest.mark.parametrize("name", ["causal", "return_lse"])
def test_traced_static_arguments_name_the_argument(name):
  q, k, v, _ = _inputs(8)
  fn = jax.jit(lambda flag: flash_jax.flash_attention(q, k, v, **{name: flag}))
  with pytest.raises(TypeError, match=f"{name} must be a Python bool.*static"):
    fn(True)


def test_softcap_inf_is_no_cap():
  q, k, v, _ = _inputs(9)
  capped = flash_jax.flash_attention(q, k, v, softcap=float("inf"), implementation="chunked")
  plain = flash_jax.flash_attention(q, k, v, implementation="chunked")
  np.testing.assert_array_equal(np.asarray(capped), np.asarray(plain))


# ---- second-order derivatives ------------------------------------------------------------

def _hvp(target: Target, q, k, v, direction):
  """A Hessian-vector product: forward-mode over reverse-mode (grad of grad's cousin)."""
  loss = lambda q: jnp.sum(jnp.sin(_call(target, q, k, v, causal=True)[0]))
  return jax.jvp(jax.grad(loss), (q,), (direction,))[1]


@pytest.mark.parametrize("target", TARGET_PARAMS)
def test_second_order_derivatives(target):
  """xla and chunked differentiate twice (and agree); the kernels say they cannot."""
  q, k, v, key = _inputs(10, target=target)
  direction = jax.random.normal(key, q.shape, q.dtype)
  if target.name in ("xla", "chunked"):
    got = _hvp(target, q, k, v, direction)
    expected = _hvp(Target("xla"), q, k, v, direction)
    assert np.all(np.isfinite(np.asarray(got)))
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-5)
    return
  with pytest.raises(NotImplementedError, match=f"{target.name}.*second-order.*xla"):
    _hvp(target, q, k, v, direction)
