"""The shared suite for paged K/V caches: every target of targets.TARGETS runs these."""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flash_jax
from cases import PAGED_CASES, PagedCase, make_paged_inputs, visible_rows
from conftest import assert_accurate, attend_paged, highest_precision, skip_if_unsupported, upcast

PAGED_PARAMS = [pytest.param(c, id=c.id) for c in PAGED_CASES]


@pytest.mark.parametrize("case", PAGED_PARAMS)
def test_paged_forward(target, case: PagedCase):
  skip_if_unsupported(target, case)
  q, k_pages, v_pages, tables, lengths, kwargs, (k, v) = make_paged_inputs(
      case, seed=zlib.crc32(case.id.encode()))
  out, lse = attend_paged(target, q, k_pages, v_pages, tables, lengths, return_lse=True,
                          **kwargs)
  assert out.shape == q.shape[:3] + v_pages.shape[3:] and out.dtype == q.dtype
  assert lse.shape == (case.batch, case.num_q_heads, case.q_len) and lse.dtype == jnp.float32
  q32, kp32, vp32 = upcast((q, k_pages, v_pages))
  with highest_precision():
    ref_out, ref_lse = flash_jax.paged_attention(q32, kp32, vp32, tables, lengths,
                                                 implementation="xla", return_lse=True, **kwargs)
  same_out, same_lse = flash_jax.paged_attention(q, k_pages, v_pages, tables, lengths,
                                                 implementation="xla", return_lse=True, **kwargs)
  assert_accurate("out", out, same_out, ref_out, dtype=case.dtype)
  assert_accurate("lse", lse, same_lse, ref_lse, dtype=case.dtype)
  hidden = ~visible_rows(ref_lse)
  # (With sinks every row's lse is finite: the rows that see no key are not told apart.)
  assert hidden.any() or case.batch < 3 or "sinks" in case.features, \
      "a sequence of length 0 sees nothing"
  assert np.all(np.asarray(out, np.float32)[hidden] == 0)


@pytest.mark.parametrize("case", PAGED_PARAMS[:2])
def test_paged_equals_contiguous_decode(target, case: PagedCase):
  """paged_attention is flash_attention over the same tokens, bottom-right aligned."""
  skip_if_unsupported(target, case)
  q, k_pages, v_pages, tables, lengths, kwargs, (k, v) = make_paged_inputs(case, seed=1)
  paged = attend_paged(target, q, k_pages, v_pages, tables, lengths, **kwargs)
  contiguous = flash_jax.flash_attention(q, k, v, kv_lengths=lengths,
                                         q_offset=lengths - case.q_len, implementation="xla",
                                         **kwargs)
  np.testing.assert_allclose(np.asarray(paged, np.float32), np.asarray(contiguous, np.float32),
                             rtol=2e-2, atol=2e-2)


def test_paged_is_forward_only(target):
  case = PAGED_CASES[0]
  skip_if_unsupported(target, case)
  q, k_pages, v_pages, tables, lengths, kwargs, _ = make_paged_inputs(case, seed=2)
  loss = lambda q: jnp.sum(attend_paged(target, q, k_pages, v_pages, tables, lengths, **kwargs))
  with pytest.raises(TypeError, match="paged_attention is forward-only"):
    jax.grad(loss)(q)
