"""mosaic_gpu specifics: tile ranges against `masking` (CPU), config, dispatch, and the
kernels on a Hopper GPU (`pytest -m gpu`; the shared suite covers the features)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flash_jax
from flash_jax import masking, spec as spec_lib
from flash_jax.kernels.mosaic_gpu import compat, ranges
from flash_jax.kernels.mosaic_gpu.config import MosaicGPUBlockSizes, default_config, resolve

RULES = [
    dict(causal=False, window=None),
    dict(causal=True, window=None),
    dict(causal=True, window=(50, 0)),
    dict(causal=False, window=(40, 70)),
    dict(causal=False, window=(None, 5)),
    dict(causal=False, window=(0, None)),
]


def _visible(q_len, kv_len, rules):
  q = np.arange(q_len)[:, None]
  k = np.arange(kv_len)[None, :]
  vis = masking.key_visibility(q, k, **rules)
  return np.ones((q_len, kv_len), bool) if vis is None else np.broadcast_to(vis, (q_len, kv_len))


@pytest.mark.parametrize("rules", RULES, ids=str)
@pytest.mark.parametrize("q_len,kv_len", [(200, 333), (300, 200), (256, 256)])
def test_kv_block_ranges_match_masking(rules, q_len, kv_len):
  """Every visible block is visited; every block called unmasked is fully visible."""
  block_q, block_kv = 64, 128
  vis = _visible(q_len, kv_len, rules)
  for q_lo in range(0, q_len, block_q):
    q_hi = min(q_lo + block_q, q_len)
    lo, hi = (int(x) for x in ranges.visited_kv_blocks(q_lo, q_hi, block_kv=block_kv,
                                                        kv_len=kv_len, **rules))
    f_lo, f_hi = (int(x) for x in ranges.unmasked_kv_blocks(
        q_lo, q_lo + block_q, lo, hi, block_kv=block_kv, kv_len=kv_len, **rules))
    assert lo <= f_lo <= f_hi <= hi
    for j in range(-(-kv_len // block_kv)):
      cols = slice(j * block_kv, (j + 1) * block_kv)
      if vis[q_lo:q_hi, cols].any():
        assert lo <= j < hi, (q_lo, j)
      if f_lo <= j < f_hi:  # rows past q_len are padding: only real rows matter
        assert (j + 1) * block_kv <= kv_len and vis[q_lo:q_hi, cols].all(), (q_lo, j)


@pytest.mark.parametrize("rules", RULES, ids=str)
@pytest.mark.parametrize("q_len,kv_len", [(200, 333), (300, 200), (256, 256)])
def test_q_block_ranges_match_masking(rules, q_len, kv_len):
  block_q, block_kv = 64, 64
  vis = _visible(q_len, kv_len, rules)
  s_pad = -(-kv_len // block_kv) * block_kv
  for k_lo in range(0, s_pad, block_kv):
    k_hi = k_lo + block_kv
    lo, hi = (int(x) for x in ranges.visited_q_blocks(k_lo, k_hi, block_q=block_q, q_len=q_len,
                                                       kv_len=kv_len, **rules))
    f_lo, f_hi = (int(x) for x in ranges.unmasked_q_blocks(
        k_lo, k_hi, lo, hi, block_q=block_q, kv_len=kv_len, **rules))
    assert lo <= f_lo <= f_hi <= hi
    for i in range(-(-q_len // block_q)):
      rows = slice(i * block_q, (i + 1) * block_q)
      if vis[rows, k_lo:k_hi].any():
        assert lo <= i < hi, (k_lo, i)
      if f_lo <= i < f_hi:
        assert k_hi <= kv_len and vis[rows, k_lo:k_hi].all(), (k_lo, i)


def _spec(head_dim=128, **kwargs):
  q = jnp.zeros((1, 128, 2, head_dim), jnp.bfloat16)
  return spec_lib.normalize(q, q, q, **kwargs)[0]


def test_config_defaults_and_validation():
  for d in (64, 128, 256):
    config = default_config(_spec(d))
    assert config.block_q == 64 and config.num_stages >= 2
  filled = resolve(MosaicGPUBlockSizes(block_kv=64), _spec(128))
  assert filled.block_kv == 64 and filled.num_stages == default_config(_spec(128)).num_stages
  with pytest.raises(ValueError, match="multiple of 64"):
    MosaicGPUBlockSizes(block_kv=48)
  with pytest.raises(ValueError, match="num_stages"):
    MosaicGPUBlockSizes(num_stages=1)
  with pytest.raises(ValueError, match="block_q"):
    resolve(MosaicGPUBlockSizes(block_q=128), _spec(128))


def test_not_picked_off_hopper():
  """Off sm90 the implementation raises, so implementation=None picks another."""
  impl = flash_jax.dispatch.get_implementation("mosaic_gpu")
  if compat.is_hopper():
    pytest.skip("on a Hopper GPU")
  with pytest.raises(NotImplementedError, match="sm90"):
    impl.check_spec(_spec())
  q = jnp.ones((1, 16, 1, 64), jnp.float32)
  assert flash_jax.which_implementation(q, q, q) != "mosaic_gpu"


# ---- on the GPU ---------------------------------------------------------------------------

needs_hopper = pytest.mark.skipif(not compat.is_hopper(), reason="needs an sm90 GPU")


@pytest.mark.gpu
@needs_hopper
def test_default_on_hopper_and_unsupported_features():
  q = jnp.ones((1, 256, 2, 128), jnp.bfloat16)
  assert flash_jax.which_implementation(q, q, q, causal=True) == "mosaic_gpu"
  for kwargs in (dict(q_offset=3), dict(kv_lengths=jnp.array([5]))):
    assert flash_jax.which_implementation(q, q, q, **kwargs) != "mosaic_gpu"
  with pytest.raises(NotImplementedError, match="head_dim"):
    q96 = jnp.ones((1, 256, 2, 96), jnp.bfloat16)
    flash_jax.flash_attention(q96, q96, q96, implementation="mosaic_gpu")


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("head_dim,causal,t,s,groups", [
    (64, True, 384, 384, 2), (128, False, 200, 333, 1), (256, True, 256, 256, 1),
    (128, True, 300, 200, 4)])
def test_matches_reference_on_gpu(head_dim, causal, t, s, groups):
  keys = jax.random.split(jax.random.PRNGKey(head_dim + t), 4)
  q = jax.random.normal(keys[0], (1, t, 2 * groups, head_dim), jnp.bfloat16)
  k = jax.random.normal(keys[1], (1, s, 2, head_dim), jnp.bfloat16)
  v = jax.random.normal(keys[2], (1, s, 2, head_dim), jnp.bfloat16)
  dout = jax.random.normal(keys[3], q.shape, jnp.bfloat16)

  def grads(impl, q, k, v):
    f = lambda q, k, v: flash_jax.flash_attention(q, k, v, causal=causal, implementation=impl)
    out, vjp = jax.vjp(f, q, k, v)
    return (out,) + vjp(dout.astype(out.dtype))

  got = grads("mosaic_gpu", q, k, v)
  same = grads("xla", q, k, v)
  with jax.default_matmul_precision("highest"):
    ref = grads("xla", *(x.astype(jnp.float32) for x in (q, k, v)))
  for name, g, sp, r, factor in zip(("out", "dq", "dk", "dv"), got, same, ref, (2, 3, 3, 3)):
    g, sp, r = (np.asarray(x, np.float32) for x in (g, sp, r))
    assert not np.isnan(g).any(), name
    err, base = np.abs(g - r).max(), np.abs(sp - r).max()
    assert err <= factor * base + 4e-3 * max(1.0, np.abs(r).max()), (name, err, base)
