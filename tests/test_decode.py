"""Decode plumbing: the split-KV merge and heuristic, paged-cache validation and writes,
and dispatch's preference for split-KV kernels. (Numerics of every implementation on
decode and paged calls: the shared suite, tests/test_attention.py and test_paged.py.)"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flash_jax
from flash_jax import dispatch, split_kv, spec as spec_lib
from flash_jax.kernels.triton import TritonConfig


# ---- split_kv.merge ---------------------------------------------------------------------

def test_merge_of_splits_equals_attention_over_their_union():
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(keys[0], (2, 3, 4, 16))
  k = jax.random.normal(keys[1], (2, 40, 4, 16))
  v = jax.random.normal(keys[2], (2, 40, 4, 16))
  whole, whole_lse = flash_jax.flash_attention(q, k, v, implementation="xla", return_lse=True)
  parts = [flash_jax.flash_attention(q, k[:, a:b], v[:, a:b], implementation="xla",
                                     return_lse=True) for a, b in ((0, 7), (7, 30), (30, 40))]
  outs = jnp.stack([o for o, _ in parts])  # [3, B, T, N, H]
  lses = jnp.stack([jnp.transpose(l, (0, 2, 1)) for _, l in parts])  # [3, B, T, N]
  out, lse = split_kv.merge(outs, lses)
  np.testing.assert_allclose(out, whole, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jnp.transpose(lse, (0, 2, 1)), whole_lse, rtol=1e-5, atol=1e-5)


def test_merge_weighs_empty_splits_zero_and_never_nans():
  outs = jnp.stack([jnp.full((2, 3), 5.0), jnp.zeros((2, 3)), jnp.full((2, 3), 7.0)])
  lses = jnp.array([[1.0, -jnp.inf], [-jnp.inf, -jnp.inf], [1.0, -jnp.inf]])  # [3, 2]
  out, lse = split_kv.merge(outs, lses)
  np.testing.assert_allclose(out[0], 6.0)
  np.testing.assert_array_equal(out[1], 0.0)
  assert lse[0] == pytest.approx(1.0 + np.log(2.0)) and np.isneginf(lse[1])
  grads = jax.grad(lambda o: jnp.sum(split_kv.merge(o, lses)[0]))(outs)
  assert np.all(np.isfinite(grads))


@pytest.mark.parametrize("programs, kv_blocks, want", [
    (8, 2048, 32), (64, 512, 4), (512, 64, 1), (32, 128, 8), (8, 20, 4), (1, 10**6, 128)])
def test_num_splits_aims_at_two_programs_per_multiprocessor(programs, kv_blocks, want):
  got = split_kv.num_splits(programs=programs, kv_blocks=kv_blocks, multiprocessors=132,
                            per_multiprocessor=2, min_blocks_per_split=4)
  assert got == want and got & (got - 1) == 0


def _spec(t, s, nq=8, nkv=2, **kwargs):
  q = jnp.zeros((1, t, nq, 16))
  k = jnp.zeros((1, s, nkv, 16))
  return spec_lib.normalize(q, k, k, **kwargs)[0]


def test_decode_shaped_calls():
  assert split_kv.decode_shaped(_spec(1, 4096))
  assert split_kv.decode_shaped(_spec(16, 4096, causal=True))
  assert not split_kv.decode_shaped(_spec(64, 4096))  # 64 x 4 rows: prefill-shaped
  assert not split_kv.decode_shaped(_spec(16, 16))  # T == S: self-attention
  assert not split_kv.decode_shaped(_spec(1, 4096, bias=jnp.zeros((1, 8, 1, 4096))))


def test_dispatch_prefers_split_kv_kernels_for_decode_shaped_calls(monkeypatch):
  """On a GPU, decode-shaped calls go to an implementation with split-KV kernels even
  when one without is listed first (mosaic_gpu); other calls keep the registry order."""
  class Serves(flash_jax.implementation.Implementation):
    platforms = ("gpu",)

    def __init__(self, name, split):
      self.name, self.split_kv_kernels = name, split

    def check_spec(self, spec):
      pass

    def __call__(self, *args):
      raise AssertionError("not called")

  fakes = {"mosaic_gpu": Serves("mosaic_gpu", False), "triton": Serves("triton", True)}
  monkeypatch.setattr(dispatch, "get_implementation", lambda name: fakes.get(name) or Serves(
      name, False))
  assert dispatch.select(_spec(1, 4096), None, platform="gpu").name == "triton"
  assert dispatch.select(_spec(512, 512), None, platform="gpu").name == "mosaic_gpu"


def test_triton_config_takes_split_kv_fields():
  config = TritonConfig(block_kv_split=32, num_splits=8, prefetch_pages=False)
  assert config.num_splits == 8
  with pytest.raises(ValueError, match="num_splits=1000 must be at most"):
    TritonConfig(num_splits=1000)
  with pytest.raises(ValueError, match="block_kv_split=48 must be a power of two"):
    TritonConfig(block_kv_split=48)
  with pytest.raises(ValueError, match="prefetch_pages must be a bool"):
    TritonConfig(prefetch_pages=1)


# ---- paged caches: validation and writes -------------------------------------------------

def _pool(num_pages=6, page_size=4, nkv=2, h=8, dtype=jnp.float32):
  return jnp.zeros((num_pages, page_size, nkv, h), dtype), jnp.zeros((num_pages, page_size, nkv, h), dtype)


def test_write_kv_pages_puts_each_token_at_its_page_and_slot():
  k_pages, v_pages = _pool()
  tables = jnp.array([[3, 0, 5], [1, 4, 2]], jnp.int32)
  start = jnp.array([2, 5], jnp.int32)
  k_new = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 2, 8))
  k_pages, v_pages = flash_jax.write_kv_pages(k_pages, v_pages, tables, start, k_new, -k_new,
                                              lengths=jnp.array([3, 2]))
  # Row 0: positions 2, 3 (page 3, slots 2, 3), 4 (page 0, slot 0).
  np.testing.assert_array_equal(k_pages[3, 2], k_new[0, 0])
  np.testing.assert_array_equal(k_pages[3, 3], k_new[0, 1])
  np.testing.assert_array_equal(k_pages[0, 0], k_new[0, 2])
  np.testing.assert_array_equal(v_pages[0, 0], -k_new[0, 2])
  # Row 1: positions 5, 6 (page 4, slots 1, 2); its third token is past lengths: dropped.
  np.testing.assert_array_equal(k_pages[4, 1], k_new[1, 0])
  np.testing.assert_array_equal(k_pages[4, 2], k_new[1, 1])
  assert int(jnp.sum(k_pages != 0)) == 5 * 2 * 8  # nothing else was written


def test_write_kv_pages_drops_writes_outside_the_table_and_pool():
  k_pages, v_pages = _pool()
  tables = jnp.array([[0, 99]], jnp.int32)  # the second entry is outside the pool
  k_new = jnp.ones((1, 6, 2, 8))
  k_pages, _ = flash_jax.write_kv_pages(k_pages, v_pages, tables, 2, k_new, k_new)
  # Positions 2, 3 land in page 0; 4..7 map to page 99 (dropped), nothing wraps around.
  assert int(jnp.sum(k_pages[0] != 0)) == 2 * 2 * 8
  assert int(jnp.sum(k_pages[1:] != 0)) == 0


def test_write_kv_pages_updates_donated_pools_in_place():
  k_pages, v_pages = _pool(num_pages=64, page_size=16, h=64)
  tables = jnp.arange(8, dtype=jnp.int32).reshape(2, 4)
  write = jax.jit(flash_jax.write_kv_pages, donate_argnums=(0, 1))
  k_new = jnp.ones((2, 1, 2, 64))
  hlo = write.lower(k_pages, v_pages, tables, 3, k_new, k_new).compile().as_text()
  # In place: the pools' buffers become the outputs, and no pool-sized copy is made
  # (without donation XLA copies both pools: f32[64,16,2,64] copy(...)).
  assert "{0}: (0, {}" in hlo and "{1}: (1, {}" in hlo
  assert not re.search(r"= f32\[64,16,2,64\]\{[\d,]+\} copy\(", hlo)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(k_pages=jnp.zeros((4, 2, 8))), ValueError, "k_pages must be 4-D"),
    (dict(v_pages=jnp.zeros((4, 3, 2, 8))), ValueError, "k_pages and v_pages must share"),
    (dict(block_tables=jnp.zeros((2, 3))), TypeError, "block_tables must be an integer"),
    (dict(block_tables=jnp.zeros((3, 3), jnp.int32)), ValueError, "share the batch size"),
    (dict(kv_lengths=jnp.zeros((2, 1), jnp.int32)), ValueError, "kv_lengths must be 1-D"),
    (dict(q=jnp.zeros((2, 1, 3, 8))), ValueError, "multiple of k/v heads"),
])
def test_paged_attention_validates_its_arguments(kwargs, error, match):
  args = dict(q=jnp.zeros((2, 1, 4, 8)), k_pages=jnp.zeros((4, 4, 2, 8)),
              v_pages=jnp.zeros((4, 4, 2, 8)), block_tables=jnp.zeros((2, 3), jnp.int32),
              kv_lengths=jnp.ones((2,), jnp.int32))
  args.update(kwargs)
  with pytest.raises(error, match=match):
    flash_jax.paged_attention(**args)


@pytest.mark.parametrize("page_size, head_dim, served", [
    (16, 64, True), (64, 128, True), (128, 256, True), (32, 192, True),
    (7, 64, False),  # a block would span pages of 7 rows: no TMA copy per page
    (48, 64, False),  # 64-key blocks neither hold nor fit in whole pages
    (64, 96, False),  # padding the head dim would copy the cache
])
def test_mosaic_gpu_serves_paged_caches_it_reads_in_place(monkeypatch, page_size, head_dim,
                                                          served):
  from flash_jax.kernels.mosaic_gpu import IMPLEMENTATION, compat
  monkeypatch.setattr(compat, "is_hopper", lambda: True)
  pages = jnp.zeros((4, page_size, 2, head_dim), jnp.bfloat16)
  spec = flash_jax.paged.normalize_paged(
      jnp.zeros((1, 1, 4, head_dim), jnp.bfloat16), pages, pages, jnp.zeros((1, 4), jnp.int32),
      jnp.ones((1,), jnp.int32))[0]
  if served:
    IMPLEMENTATION.check_spec(spec)
  else:
    with pytest.raises(NotImplementedError, match="page size|head dims"):
      IMPLEMENTATION.check_spec(spec)


def test_mosaic_gpu_block_that_does_not_tile_the_pages_is_a_value_error(monkeypatch):
  from flash_jax.kernels.mosaic_gpu import compat
  from flash_jax.kernels.mosaic_gpu.config import MosaicGPUBlockSizes
  from flash_jax.kernels.mosaic_gpu.implementation import MosaicGPUImplementation
  monkeypatch.setattr(compat, "is_hopper", lambda: True)
  monkeypatch.setattr(MosaicGPUImplementation, "platforms", ("gpu", jax.default_backend()))
  # The default 64-key blocks tile pages of 192 tokens; 128-key blocks do not.
  pages = jax.ShapeDtypeStruct((4, 192, 2, 128), jnp.bfloat16)
  q = jax.ShapeDtypeStruct((1, 1, 4, 128), jnp.bfloat16)
  call = lambda q, k, v: flash_jax.paged_attention(
      q, k, v, jnp.zeros((1, 4), jnp.int32), jnp.ones((1,), jnp.int32),
      implementation="mosaic_gpu", block_sizes=MosaicGPUBlockSizes(block_kv_split=128))
  with pytest.raises(ValueError, match="block_kv_split=128 does not tile pages of 192"):
    jax.eval_shape(call, q, pages, pages)


@pytest.mark.parametrize("head_dim, t, group, mosaic_gpu_first", [
    (64, 1, 4, True), (256, 16, 4, True),  # one 64-row tile: mosaic_gpu's kernel
    (128, 1, 4, False),  # d65-128: Triton's (the two are level on an H200)
    (64, 16, 8, False), (256, 16, 8, True),  # two row tiles: Triton's at d64 only
])
def test_mosaic_gpu_split_kv_preference(monkeypatch, head_dim, t, group, mosaic_gpu_first):
  from flash_jax.kernels.mosaic_gpu import IMPLEMENTATION, compat
  monkeypatch.setattr(compat, "is_hopper", lambda: True)
  q = jnp.zeros((1, t, 2 * group, head_dim), jnp.bfloat16)
  k = jnp.zeros((1, 4096, 2, head_dim), jnp.bfloat16)
  spec = spec_lib.normalize(q, k, k, causal=True, q_offset=4096 - t)[0]
  assert split_kv.decode_shaped(spec)
  assert IMPLEMENTATION.slower_than_next(spec) is not mosaic_gpu_first

