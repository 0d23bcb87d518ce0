"""The masking rules: tile ranges agree with the element rule; dropout is fair and pure."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cases import unseen_keys
from flash_jax import masking, spec as spec_lib, tiles
from flash_jax.spec import normalize_window

windows = st.one_of(st.none(), st.tuples(st.one_of(st.none(), st.integers(0, 20)),
                                         st.one_of(st.none(), st.integers(0, 20))))


def _element_mask(t, s, causal, window, offset, q_length, kv_length):
  q = np.arange(t)[:, None]
  k = np.arange(s)[None, :]
  visible = masking.key_visibility(jnp.asarray(q), jnp.asarray(k), causal=causal, window=window,
                                   q_offset=offset, q_length=q_length, kv_length=kv_length)
  return np.ones((t, s), bool) if visible is None else np.broadcast_to(np.asarray(visible), (t, s))


@settings(max_examples=60, deadline=None)
@given(t=st.integers(1, 40), s=st.integers(1, 40), causal=st.booleans(), window=windows,
       offset=st.integers(-10, 30), q_lo=st.integers(0, 39), q_size=st.integers(1, 16),
       k_lo=st.integers(0, 39), k_size=st.integers(1, 16), kv_length=st.integers(0, 40),
       q_length=st.integers(0, 40))
def test_block_ranges_bound_the_element_rule(t, s, causal, window, offset, q_lo, q_size, k_lo,
                                             k_size, kv_length, q_length):
  mask = _element_mask(t, s, causal, window, offset, q_length, kv_length)
  q_lo, k_lo = min(q_lo, t - 1), min(k_lo, s - 1)
  q_hi, k_hi = min(q_lo + q_size, t), min(k_lo + k_size, s)
  rules = dict(causal=causal, window=window, q_offset=offset)

  lo, hi = masking.visible_kv_range(q_lo, q_hi, kv_len=s, kv_length=kv_length, **rules)
  rows = mask[q_lo:q_hi]
  outside = np.ones(s, bool)
  outside[int(lo):int(hi)] = False
  assert not rows[:, outside].any(), "a visible key lies outside visible_kv_range"

  lo, hi = masking.visible_q_range(k_lo, k_hi, q_len=t, q_length=q_length, **rules)
  cols = mask[:, k_lo:k_hi]
  outside = np.ones(t, bool)
  outside[int(lo):int(hi)] = False
  assert not cols[outside].any(), "a visible query lies outside visible_q_range"

  full = masking.tile_fully_visible(q_lo, q_hi, k_lo, k_hi, kv_len=s, q_length=q_length,
                                    kv_length=kv_length, **rules)
  if bool(full):
    assert mask[q_lo:q_hi, k_lo:k_hi].all(), "tile_fully_visible on a tile with hidden entries"


def test_window_normalization():
  assert normalize_window(None, False) is None
  assert normalize_window(4, False) == (4, 4)
  assert normalize_window(4, True) == (4, 0)
  assert normalize_window((3, None), False) == (3, None)
  assert normalize_window((None, 7), True) is None  # causal hides all that it would
  with pytest.raises(ValueError, match="window left"):
    normalize_window((-1, 2), False)
  with pytest.raises(TypeError, match="window"):
    normalize_window("wide", False)


def test_dropout_keep_rate_and_purity():
  seed = jnp.uint32(1234)
  i = jnp.arange(256)[:, None]
  j = jnp.arange(256)[None, :]
  keep = masking.dropout_keep(seed, 1, 3, i, j, 0.3)
  assert abs(float(jnp.mean(keep)) - 0.7) < 0.01
  np.testing.assert_array_equal(keep, masking.dropout_keep(seed, 1, 3, i, j, 0.3))
  # Every coordinate changes the bits.
  for other in (masking.dropout_keep(seed + 1, 1, 3, i, j, 0.3),
                masking.dropout_keep(seed, 2, 3, i, j, 0.3),
                masking.dropout_keep(seed, 1, 4, i, j, 0.3),
                masking.dropout_keep(seed, 1, 3, i + 1, j, 0.3)):
    assert 0.3 < float(jnp.mean(other != keep)) < 0.5
  # Tiles agree with the whole: the mask is a function of global indices only.
  tile = masking.dropout_keep(seed, 1, 3, i[64:128], j[:, 32:96], 0.3)
  np.testing.assert_array_equal(tile, keep[64:128, 32:96])


def test_masked_exp_never_nan():
  logits = jnp.full((2, 4), masking.MASK_VALUE)
  visible = jnp.zeros((2, 4), bool)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  p = masking.masked_exp(logits, row_max, visible)
  assert np.all(np.asarray(p) == 0)
  g = jax.grad(lambda x: jnp.sum(masking.masked_exp(x, row_max, visible)))(logits)
  assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("rules", [
    dict(kv_lengths=np.array([25, 9])),
    dict(causal=True, q_offset=np.array([3, 11]), q_lengths=np.array([24, 7])),
    dict(causal=True, q_offset=5, kv_lengths=np.array([40, 12])),
], ids=["kv_lengths", "cache_tail", "causal_lengths"])
def test_zero_keys_no_row_sees_zeroes_exactly_the_unseen_keys(rules):
  """tiles.zero_keys_no_row_sees (before the TMA kernels) against tests/cases.unseen_keys:
  the keys no query row sees by position become 0, every other key is kept."""
  b, t, s = 2, 24, 40
  keys = jax.random.split(jax.random.PRNGKey(7), 2)
  q = jax.random.normal(keys[0], (b, t, 2, 16))
  k = jax.random.normal(keys[1], (b, s, 1, 16))
  spec, _, k, _, _, arrays = spec_lib.normalize(q, k, k, **rules)
  zeroed, = tiles.zero_keys_no_row_sees(spec, arrays, k)
  hidden = unseen_keys(rules, b, t, s)
  assert hidden.any() and (~hidden).any()
  np.testing.assert_array_equal(np.asarray(zeroed)[hidden], 0)
  np.testing.assert_array_equal(np.asarray(zeroed)[~hidden], np.asarray(k)[~hidden])
