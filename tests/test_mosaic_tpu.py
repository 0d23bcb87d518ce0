"""Tests specific to the "mosaic_tpu" kernels: config validation, the per-block tables that
drive tile skipping, race detection and grid-order independence in TPU interpret mode,
skipped blocks never read, and lowering to Mosaic for real TPU generations. The paged
decode kernel's own parts (fetch tables, index maps, float16 bits, page streams and row
blocks, lowering and, with libtpu installed, compiling) close the file.

The shared suites (test_attention.py, test_paged.py) run the same kernels over the
curated cases; the cases here force multi-block grids on both axes with 128-wide blocks.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

import flash_jax
from flash_jax import BlockSizes, dispatch, paged as paged_lib, spec as spec_lib, tiles
from flash_jax.kernels.mosaic_tpu import IMPLEMENTATION, MosaicTpuBlockSizes
from flash_jax.kernels.mosaic_tpu import backward, block_info, config, forward, page_info, paged
from flash_jax.kernels.mosaic_tpu.layout import Geometry
from flash_jax.kernels.mosaic_tpu.page_info import PagedGeometry

from conftest import assert_accurate, highest_precision, upcast

SMALL_BLOCKS = MosaicTpuBlockSizes(block_q=128, block_kv=128)


def _qkv(b, t, s, nq, nkv, h, dtype="float32", hv=None, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(keys[0], (b, t, nq, h), dtype)
  k = jax.random.normal(keys[1], (b, s, nkv, h), dtype)
  v = jax.random.normal(keys[2], (b, s, nkv, hv or h), dtype)
  return q, k, v


# ---- config ------------------------------------------------------------------------------

def test_block_sizes_must_be_lane_multiples():
  with pytest.raises(ValueError, match="block_q=64 must be a multiple of 128"):
    MosaicTpuBlockSizes(block_q=64)
  with pytest.raises(ValueError, match="block_kv_dq must be a positive int"):
    MosaicTpuBlockSizes(block_kv_dq=0)
  with pytest.raises(ValueError, match="vmem_limit_bytes"):
    MosaicTpuBlockSizes(vmem_limit_bytes=-1)
  with pytest.raises(dataclasses.FrozenInstanceError):
    MosaicTpuBlockSizes().block_q = 128


def test_api_validates_block_sizes_before_tracing():
  q, k, v = _qkv(1, 8, 8, 1, 1, 16)
  call = lambda bs: flash_jax.flash_attention(q, k, v, implementation="mosaic_tpu",
                                              interpret=True, block_sizes=bs)
  with pytest.raises(ValueError, match="block_kv=200 must be a multiple of 128"):
    call(BlockSizes(block_kv=200))
  with pytest.raises(TypeError, match="must be a BlockSizes"):
    call({"block_q": 128})


def test_defaults_per_generation_fit_the_sequence():
  spec, *_ = spec_lib.normalize(*_qkv(1, 100, 3000, 2, 2, 64))
  v5p = config.default_block_sizes(spec, "TPU v5p")
  assert (v5p.block_q, v5p.block_kv) == (128, 1024)  # T=100 pads to one 128 block
  assert config.default_block_sizes(spec, "TPU v4").block_kv == 512
  assert config.default_block_sizes(spec, "cpu") == config.default_block_sizes(spec, "?")
  # A plain BlockSizes resolves; backward blocks follow the forward ones the user set.
  resolved = config.resolve(BlockSizes(block_q=256), spec)
  assert isinstance(resolved, MosaicTpuBlockSizes)
  assert resolved.block_q == resolved.block_q_dkv == resolved.block_q_dq == 256
  assert None not in resolved.block_fields().values()


def test_default_implementation_on_tpu_only():
  spec, *_ = spec_lib.normalize(*_qkv(1, 8, 8, 1, 1, 16), causal=True)
  assert dispatch.select(spec, None, platform="tpu") is IMPLEMENTATION
  assert dispatch.select(spec, None, platform="cpu").name != "mosaic_tpu"
  with pytest.raises(NotImplementedError, match="interpret=True"):
    dispatch.select(spec, "mosaic_tpu", platform="cpu")


# ---- per-block tables --------------------------------------------------------------------

def test_causal_table_as_drawn_in_block_info():
  spec, q, k, v, bias, arrays = spec_lib.normalize(*_qkv(1, 512, 512, 1, 1, 16), causal=True)
  states = block_info.block_states(spec, arrays, Geometry(spec, 128, 128))
  expected = np.array([[1, 0, 0, 0], [2, 1, 0, 0], [2, 2, 1, 0], [2, 2, 2, 1]])
  np.testing.assert_array_equal(states[0, 0], expected)
  fetch = block_info.fetch_indices(states)
  np.testing.assert_array_equal(fetch[0, 0], [[0, 0, 0, 0], [0, 1, 1, 1], [0, 1, 2, 2],
                                              [0, 1, 2, 3]])


def _element_truth(spec, arrays, geo):
  """(any, all) visible per tile, brute force from the reference visibility rule."""
  mask5 = None if arrays.mask is None else tiles.to_grouped_frame(arrays.mask, spec)
  vis = tiles.tile_visibility(spec, arrays, mask5, 0, spec.kv_len)
  shape = (spec.batch, spec.num_kv_heads, spec.group_size, spec.q_len, spec.kv_len)
  vis = np.broadcast_to(np.asarray(True if vis is None else vis), shape)
  vis = vis.reshape(spec.batch, spec.num_q_heads, spec.q_len, spec.kv_len)
  pad = ((0, 0), (0, 0), (0, geo.q_len_padded - spec.q_len), (0, geo.kv_len_padded - spec.kv_len))
  blocks = lambda x: x.reshape(spec.batch, spec.num_q_heads, geo.num_q_blocks, geo.block_q,
                               geo.num_kv_blocks, geo.block_kv)
  any_vis = blocks(np.pad(vis, pad, constant_values=False)).any(axis=(3, 5))
  rows_ok = np.pad(vis, ((0, 0), (0, 0), (0, geo.q_len_padded - spec.q_len), (0, 0)),
                   constant_values=True)  # padded rows are sliced off: they never matter
  rows_ok = np.pad(rows_ok, ((0, 0), (0, 0), (0, 0), (0, geo.kv_len_padded - spec.kv_len)),
                   constant_values=False)
  return any_vis, blocks(rows_ok).all(axis=(3, 5))


TABLE_CASES = {
    "causal_offset_window": (dict(causal=True, q_offset=np.array([0, 200]), window=(150, 0)),
                             True),
    "lengths": (dict(q_lengths=np.array([300, 129]), kv_lengths=np.array([1, 385])), True),
    "window_both_sides": (dict(window=(40, 200)), True),
    "sorted_segments": (dict(segment_ids=(np.repeat([[0, 1, 2]], 2, 0).repeat(120, 1)[:, :300],
                                          np.repeat([[0, 1, 2]], 2, 0).repeat(140, 1)[:, :400])),
                        False),
    "dense_per_head_mask": ("mask", False),
}


@pytest.mark.parametrize("name", TABLE_CASES)
def test_block_states_bound_element_visibility(name):
  kwargs, exact = TABLE_CASES[name]
  q, k, v = _qkv(2, 300, 400, 4, 2, 16)
  if kwargs == "mask":  # a per-head mask with whole empty and whole full blocks
    rows, cols = np.arange(300)[:, None] // 128, np.arange(400)[None, :] // 128
    heads = np.arange(4)[:, None, None]
    mask = ((rows + cols + heads) % 3 == 0) | ((rows == cols) & (np.arange(400) % 7 == 0))
    kwargs = dict(mask=np.broadcast_to(mask, (2, 4, 300, 400)))
  spec, q, k, v, bias, arrays = spec_lib.normalize(q, k, v, **kwargs)
  geo = Geometry(spec, 128, 128)
  states = np.asarray(block_info.block_states(spec, arrays, geo))
  states = np.broadcast_to(states, (2, 4) + states.shape[2:])
  any_vis, all_vis = _element_truth(spec, arrays, geo)
  skip, full = states == block_info.SKIP, states == block_info.FULL
  assert not (skip & any_vis).any(), "a tile with a visible pair is skipped"
  assert not (full & ~all_vis).any(), "a tile with a hidden pair skips the mask"
  assert skip.any() and (states == block_info.PARTIAL).any()
  if exact:  # positional rules are classified exactly
    np.testing.assert_array_equal(skip, ~any_vis)
    np.testing.assert_array_equal(full, all_vis)


def test_fetch_indices_load_each_live_block_once():
  rng = np.random.default_rng(0)
  states = jnp.asarray(rng.choice([0, 0, 1, 2], size=(3, 2, 5, 9)), jnp.int32)
  fetch = np.asarray(block_info.fetch_indices(states))
  states = np.asarray(states)
  live = states != block_info.SKIP
  index = np.broadcast_to(np.arange(9), states.shape)
  np.testing.assert_array_equal(fetch[live], index[live])  # live tiles load themselves
  loads = 1 + (np.diff(fetch, axis=-1) != 0).sum(axis=-1)  # copies the pipeline issues
  np.testing.assert_array_equal(loads, np.maximum(live.sum(axis=-1), 1))


def test_kv_major_is_the_transpose_per_group():
  spec, *_ = spec_lib.normalize(*_qkv(1, 8, 8, 6, 2, 16))  # G = 3
  states = jnp.arange(1 * 6 * 2 * 5, dtype=jnp.int32).reshape(1, 6, 2, 5)  # [B, Nq, nq, nk]
  t = np.asarray(block_info.kv_major(states, spec))  # [B, Nkv, nk, G * nq]
  for kvh in range(2):
    for g in range(3):
      for i in range(2):
        np.testing.assert_array_equal(t[0, kvh, :, g * 2 + i], states[0, kvh * 3 + g, i, :])
  shared = block_info.kv_major(states[:, :1], spec)  # no head dimension: tiled over G
  assert shared.shape == (1, 1, 5, 6)


# ---- kernels in TPU interpret mode -------------------------------------------------------

def _grads(fn, q, k, v, bias, seed=1):
  def loss(q, k, v, bias):
    out, lse = fn(q, k, v, bias)
    keys = jax.random.split(jax.random.PRNGKey(seed))
    dout = jax.random.normal(keys[0], out.shape, jnp.float32)
    dlse = jax.random.normal(keys[1], lse.shape, jnp.float32)
    return (jnp.sum(out.astype(jnp.float32) * dout)
            + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * dlse))
  argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
  return jax.value_and_grad(loss, argnums=argnums)(q, k, v, bias)[1]


KERNEL_CASES = {
    # GQA, 3 x 3 blocks, every positional rule, segment ids, softcap and dropout at once,
    # a key mask broadcast over queries and a bias broadcast over keys.
    "gqa_features_f32": (dict(b=2, t=300, s=260, nq=4, nkv=2, h=64), dict(
        causal=True, q_offset=np.array([0, 40]), kv_lengths=np.array([260, 200]),
        segment_ids=(np.array([[0] * 100 + [1] * 200] * 2), np.array([[0] * 90 + [1] * 170] * 2)),
        softcap=3.0, dropout_rate=0.2, dropout_rng=jax.random.PRNGKey(3),
        mask=np.arange(260)[None, None, None, :] % 5 != 3,
        bias=np.linspace(-1, 1, 4 * 300, dtype=np.float32).reshape(1, 4, 300, 1))),
    # MQA, per-head dense mask with empty rows, full bias with dbias, head dims 16 / 256.
    "mqa_mask_bias_bf16": (dict(b=1, t=200, s=300, nq=2, nkv=1, h=16, hv=256,
                                dtype="bfloat16"), "mask_bias"),
    # float16 (float32 inside), head dim 256, a two-sided window and query lengths.
    "window_lengths_f16": (dict(b=1, t=256, s=256, nq=2, nkv=2, h=256, dtype="float16"),
                           dict(window=(100, 30), q_lengths=np.array([200]))),
}


@pytest.mark.parametrize("name", KERNEL_CASES)
def test_matches_reference_on_multi_block_grids(name):
  shape, kwargs = KERNEL_CASES[name]
  dtype = shape.get("dtype", "float32")
  q, k, v = _qkv(shape["b"], shape["t"], shape["s"], shape["nq"], shape["nkv"], shape["h"],
                 dtype, shape.get("hv"))
  bias = None
  if isinstance(kwargs, dict) and "bias" in kwargs:
    kwargs = dict(kwargs)
    bias = jnp.asarray(kwargs.pop("bias"))
  if kwargs == "mask_bias":
    keys = jax.random.split(jax.random.PRNGKey(5))
    mask = jax.random.bernoulli(keys[0], 0.6, (1, 2, 200, 300)).at[:, 1, :20].set(False)
    kwargs = dict(mask=mask)
    bias = jax.random.normal(keys[1], (1, 2, 200, 300), jnp.float32)

  def run(impl, interpret=False, block_sizes=None):
    return lambda q, k, v, bias: flash_jax.flash_attention(
        q, k, v, bias=bias, implementation=impl, interpret=interpret,
        block_sizes=block_sizes, return_lse=True, **kwargs)

  kernel = run("mosaic_tpu", True, SMALL_BLOCKS)
  out, lse = kernel(q, k, v, bias)
  same_out, same_lse = run("xla")(q, k, v, bias)
  q32, k32, v32, b32 = upcast((q, k, v, bias))
  with highest_precision():
    ref_out, ref_lse = run("xla")(q32, k32, v32, b32)
    ref_grads = _grads(run("xla"), q32, k32, v32, b32)
  assert_accurate("out", out, same_out, ref_out, dtype=dtype)
  assert_accurate("lse", lse, same_lse, ref_lse, dtype=dtype)
  grads = _grads(kernel, q, k, v, bias)
  same_grads = _grads(run("xla"), q, k, v, bias)
  for name_, g, s, r in zip(("dq", "dk", "dv", "dbias"), grads, same_grads, ref_grads):
    assert_accurate(name_, g, s, r, dtype=dtype)


def test_skipped_blocks_are_never_read():
  """Keys past kv_lengths (whole blocks) hold NaN: any read of a skipped block would show."""
  q, k, v = _qkv(2, 256, 512, 2, 1, 32)
  kv_lengths = jnp.array([256, 128])
  hidden = (jnp.arange(512)[None, :] >= kv_lengths[:, None])[:, :, None, None]
  k_bad, v_bad = jnp.where(hidden, jnp.nan, k), jnp.where(hidden, jnp.nan, v)
  fn = lambda impl, interpret: lambda q, k, v, bias: flash_jax.flash_attention(
      q, k, v, causal=True, q_offset=256, kv_lengths=kv_lengths, implementation=impl,
      interpret=interpret, block_sizes=SMALL_BLOCKS, return_lse=True)
  out, _ = fn("mosaic_tpu", True)(q, k_bad, v_bad, None)
  ref_out, _ = fn("xla", False)(q, k, v, None)
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
  grads = _grads(fn("mosaic_tpu", True), q, k_bad, v_bad, None)
  ref_grads = _grads(fn("xla", False), q, k, v, None)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)  # NaN anywhere fails here


def _race_detector():
  try:
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call
  except ImportError:
    pytest.skip("this JAX has no TPU interpret race detector")
  return interpret_pallas_call


def test_kernels_are_race_free_and_grid_order_independent():
  """Two simulated cores split the parallel grid axes, visited in a shuffled order."""
  detector = _race_detector()
  params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2, random_seed=11)
  q, k, v = _qkv(1, 256, 384, 4, 2, 32)
  bias = jax.random.normal(jax.random.PRNGKey(2), (1, 1, 256, 384))
  spec, q, k, v, bias, arrays = spec_lib.normalize(q, k, v, bias=bias, causal=True,
                                                   q_offset=128)
  geo = Geometry(spec, 128, 128)
  dout = jax.random.normal(jax.random.PRNGKey(4), (1, 256, 4, 32))

  def kernels(interpret):
    out, lse, stats = forward.forward(q, k, v, bias, arrays, geo, interpret=interpret)
    races = [detector.races.races_found]
    delta = jnp.einsum("btnh,btnh->bnt", dout, out)
    dk, dv = backward.backward_dkv(q, k, v, bias, arrays, stats, dout, delta, geo,
                                   interpret=interpret)
    races.append(detector.races.races_found)
    dq, ds = backward.backward_dq(q, k, v, bias, arrays, stats, dout, delta, geo,
                                  interpret=interpret)
    races.append(detector.races.races_found)
    return (out, lse, dk, dv, dq, ds), races

  shuffled, races = kernels(params)
  assert races == [False, False, False]
  for got, want in zip(shuffled, kernels(True)[0]):
    np.testing.assert_array_equal(got, want)


def test_race_detector_is_live():
  """Control: two parallel grid points writing one block are reported."""
  detector = _race_detector()

  def kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...] + 1.0

  try:
    pl.pallas_call(
        kernel, grid=(2,), in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((8, 128), lambda i: (0, 0)),
        out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2),
    )(jnp.ones((16, 128))).block_until_ready()
  except Exception as e:  # pylint: disable=broad-except
    assert "RACE DETECTED" in str(e)  # JAX 0.12 raises at the first race ...
    return
  assert detector.races.races_found  # ... where 0.10 and 0.11 record it


def test_vmap_matches_per_element_calls():
  q, k, v = _qkv(1, 40, 40, 2, 1, 16)
  fn = lambda q, k, v: flash_jax.flash_attention(
      q, k, v, causal=True, dropout_rate=0.3, dropout_rng=jax.random.PRNGKey(0),
      implementation="mosaic_tpu", interpret=True)
  stacked = jax.tree.map(lambda x: jnp.stack([x, 2 * x]), (q, k, v))
  batched = jax.vmap(fn)(*stacked)
  np.testing.assert_array_equal(batched[1], fn(2 * q, 2 * k, 2 * v))


def _all_features():
  q, k, v = _qkv(2, 200, 300, 4, 2, 72, "bfloat16")
  keys = jax.random.split(jax.random.PRNGKey(1), 3)
  return q, k, v, dict(
      causal=True, q_offset=jnp.array([0, 100]), window=(120, 0), softcap=4.0,
      segment_ids=(jnp.zeros((2, 200), jnp.int32), jnp.zeros((2, 300), jnp.int32)),
      q_lengths=jnp.array([200, 150]), kv_lengths=jnp.array([300, 250]),
      bias=jax.random.normal(keys[0], (1, 4, 1, 300)),
      mask=jax.random.bernoulli(keys[1], 0.9, (2, 1, 200, 300)),
      dropout_rate=0.1, dropout_rng=keys[2])


def _grad_of_kernels(q, k, v, kwargs, interpret):
  spec, q, k, v, bias, arrays = spec_lib.normalize(q, k, v, **kwargs)
  cfg = IMPLEMENTATION.default_config(spec)

  def loss(q, k, v, bias):
    out, lse = IMPLEMENTATION(q, k, v, bias, arrays, spec, cfg, interpret)
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

  return jax.grad(loss, argnums=(0, 1, 2, 3)), (q, k, v, bias)


def test_each_call_is_named_and_has_a_cost_estimate():
  q, k, v, kwargs = _all_features()
  fn, args = _grad_of_kernels(q, k, v, kwargs, interpret=True)
  jaxpr = jax.make_jaxpr(fn)(*args)
  calls = {}

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        calls[eqn.params["name"]] = eqn.params["cost_estimate"]
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        visit(sub)

  visit(jaxpr.jaxpr)
  assert set(calls) == {"flash_jax_mosaic_tpu_fwd", "flash_jax_mosaic_tpu_bwd_dkv",
                        "flash_jax_mosaic_tpu_bwd_dq"}
  for cost in calls.values():
    assert cost is not None and cost.flops > 0 and cost.bytes_accessed > 0


@pytest.mark.parametrize("kind", ["TPU v4", "TPU v5 lite", "TPU v6 lite"])
def test_lowers_to_mosaic_for_tpu(kind):
  """Forward and backward with every feature lower to Mosaic TPU custom calls (no TPU
  needed: jax.export lowers for the platform; the Mosaic compiler itself is not run)."""
  q, k, v, kwargs = _all_features()
  fn, args = _grad_of_kernels(q, k, v, kwargs, interpret=False)
  device = jax.sharding.AbstractDevice(device_kind=kind, num_cores=1, platform="tpu")
  # Auto axes, as every JAX release before 0.12 defaults to (0.12 defaults to Explicit).
  mesh = jax.sharding.AbstractMesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,),
                                   abstract_device=device)
  with jax.sharding.use_abstract_mesh(mesh):
    exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)
  assert exported.mlir_module().count("tpu_custom_call") == 3


def test_compiled_calls_lower_under_vmap_and_checkpoint():
  """vmap (Pallas' batching rule, batched scalar prefetch) and jax.checkpoint: the compiled
  path has neither of interpret mode's limits (see docs/mosaic_tpu.md)."""
  q, k, v = _qkv(3, 100, 120, 4, 2, 64, "bfloat16")
  offsets = jnp.array([0, 10, 20])

  def loss(q, k, v, offset):  # the API would refuse: this machine's platform is not tpu
    spec, q, k, v, bias, arrays = spec_lib.normalize(q[None], k[None], v[None], causal=True,
                                                     q_offset=offset[None])
    out, _ = IMPLEMENTATION(q, k, v, bias, arrays, spec, IMPLEMENTATION.default_config(spec),
                            False)
    return jnp.sum(jnp.sin(out.astype(jnp.float32)))

  fn = jax.vmap(jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2)))
  device = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
  # Auto axes, as every JAX release before 0.12 defaults to (0.12 defaults to Explicit).
  mesh = jax.sharding.AbstractMesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,),
                                   abstract_device=device)
  with jax.sharding.use_abstract_mesh(mesh):
    exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(q, k, v, offsets)
  assert exported.mlir_module().count("tpu_custom_call") >= 3


# ---- the paged decode kernel ---------------------------------------------------------------

def _tpu_mesh(kind="TPU v5 lite"):
  device = jax.sharding.AbstractDevice(device_kind=kind, num_cores=1, platform="tpu")
  # Auto axes, as every JAX release before 0.12 defaults to (0.12 defaults to Explicit).
  return jax.sharding.AbstractMesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,),
                                   abstract_device=device)


def _paged_call(b=4, t=3, nq=4, nkv=2, h=32, hv=None, page_size=8, pages_per_seq=8,
                dtype="float32", seed=0, **kwargs):
  """Random q and page pool, shuffled tables with junk past each sequence's pages (-7 and
  the pool size), ragged lengths 0, 1, ...; pages nobody uses hold NaN / inf."""
  rng = np.random.RandomState(seed)
  pool = b * pages_per_seq + 3
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  q = jnp.asarray(normal(b, t, nq, h), dtype)
  k_pages, v_pages = normal(pool, page_size, nkv, h), normal(pool, page_size, nkv, hv or h)
  lengths = rng.randint(t, page_size * pages_per_seq + 1, b)
  lengths[:3] = [0, 1, page_size * pages_per_seq - 1][:b]
  tables = rng.permutation(pool)[:b * pages_per_seq].reshape(b, pages_per_seq)
  used = -(-lengths // page_size)
  unused = np.arange(pages_per_seq)[None, :] >= used[:, None]
  tables = np.where(unused, np.where(np.arange(b)[:, None] % 2, -7, pool), tables)
  untouched = np.setdiff1d(np.arange(pool), tables[~unused])
  k_pages[untouched], v_pages[untouched] = np.nan, np.inf
  for seq in range(b):  # slots past the length in the last used page: junk too
    tail = lengths[seq] % page_size
    if used[seq] and tail:
      last = tables[seq, used[seq] - 1]
      k_pages[last, tail:], v_pages[last, tail:] = -np.inf, np.nan
  k_pages, v_pages = jnp.asarray(k_pages, dtype), jnp.asarray(v_pages, dtype)
  return q, k_pages, v_pages, jnp.asarray(tables, jnp.int32), jnp.asarray(lengths, jnp.int32), kwargs


def _paged_tables(pages_per_step, block_rows, **call):
  q, k_pages, v_pages, tables, lengths, kwargs = _paged_call(**call)
  spec, q, k_pages, v_pages, arrays = paged_lib.normalize_paged(
      q, k_pages, v_pages, tables, lengths, **kwargs)
  geo = PagedGeometry(spec, spec.page_size, pages_per_step, block_rows)

  @jax.jit
  def tables_of(arrays):
    ranges = page_info.slot_ranges(spec, arrays, geo)
    return ranges, page_info.fetch_table(arrays.block_tables, ranges, geo, spec.num_pages)

  ranges, fetch = tables_of(arrays)
  return spec, arrays, geo, np.asarray(ranges), np.asarray(fetch)


TABLE_CALLS = {
    # 3 page streams over 8 slots (a padded last step), 2 row blocks of 16 packed rows.
    "causal_streams_rows": (3, 16, dict(b=4, t=6, nq=6, nkv=2)),
    # A window: pages before it are not live either; q_offset before the cache's end.
    "window_offset": (2, 16, dict(b=3, t=2, nq=2, nkv=1, window=(9, 0),
                                  q_offset=np.array([0, 3, 30]))),
    "not_causal": (4, 16, dict(b=2, t=1, nq=2, nkv=2, causal=False)),
}


@pytest.mark.parametrize("name", TABLE_CALLS)
def test_page_ranges_bound_element_visibility(name):
  """Live slots are exactly the pages some row of a row block sees; full slots exactly
  those every real row of the block sees entirely (brute force from the reference rule)."""
  pages_per_step, block_rows, call = TABLE_CALLS[name]
  spec, arrays, geo, ranges, _ = _paged_tables(pages_per_step, block_rows, **call)
  vis = jax.jit(lambda a: tiles.tile_visibility(spec, a, None, 0, spec.kv_len))(arrays)
  vis = np.broadcast_to(np.asarray(vis), (spec.batch, 1, 1, spec.q_len, spec.kv_len))[:, 0, 0]
  slot = np.arange(geo.num_slots)
  for b in range(spec.batch):
    for rb, (t_lo, t_hi) in enumerate(zip(*map(np.asarray, geo.row_tokens()))):
      pages = vis[b, t_lo:t_hi].reshape(t_hi - t_lo, geo.num_slots, geo.page_size)
      live = (slot >= ranges[b, rb, 0]) & (slot < ranges[b, rb, 1])
      full = (slot >= ranges[b, rb, 2]) & (slot < ranges[b, rb, 3])
      np.testing.assert_array_equal(live, pages.any(axis=(0, 2)), err_msg=f"live b={b} rb={rb}")
      np.testing.assert_array_equal(full, pages.all(axis=(0, 2)), err_msg=f"full b={b} rb={rb}")


@pytest.mark.parametrize("name", TABLE_CALLS)
def test_index_maps_never_name_an_unused_page(name):
  """What the K/V index maps name at each grid step: live slots their table entry; other
  slots the block the stream named before (no DMA), never an entry past a sequence's
  last page (those hold -7 or the pool size here); one DMA per live page per stream."""
  pages_per_step, block_rows, call = TABLE_CALLS[name]
  spec, arrays, geo, ranges, fetch = _paged_tables(pages_per_step, block_rows, **call)
  tables = np.asarray(arrays.block_tables)
  n, rb, steps = pages_per_step, geo.num_row_blocks, geo.num_steps
  index_maps = [paged._page_spec(geo, spec.head_dim, i, paged=True).index_map for i in range(n)]
  flat = fetch.reshape(-1)
  for i, index_map in enumerate(index_maps):
    named, live_slots = [], 0
    for b in range(spec.batch):
      for r in range(rb):
        for j in range(steps):
          page, *rest = index_map(b, r, j, flat, None, None)
          assert rest == [0, 0, 0]
          named.append(page)
          slot = j * n + i
          if ranges[b, r, 0] <= slot < ranges[b, r, 1]:
            live_slots += 1
            assert page == tables[b, slot], "a live slot names its table entry"
          elif len(named) > 1 and any(ranges[:, :, 1].reshape(-1)[:b * rb + r + 1] > 0):
            assert page == named[-2], "a dead slot repeats the stream's previous page"
    used = {int(p) for b in range(spec.batch) for p in tables[b, :-(-int(arrays.kv_lengths[b])
                                                                   // geo.page_size) or 0]}
    assert set(named) <= used or not used, "a page outside every sequence's pages is named"
    dmas = 1 + int(np.sum(np.diff(named) != 0))
    assert dmas <= max(live_slots, 1)


def test_contiguous_chunks_repeat_within_their_row():
  """A contiguous cache's block index names the batch row too: a dead chunk repeats a
  live chunk of its own row (the first one before a window), so each row's live chunks
  are its only DMAs."""
  q, k, v = _qkv(3, 2, 100, 2, 1, 16)
  spec, q, k, v, bias, arrays = spec_lib.normalize(
      q, k, v, causal=True, window=(20, 0), kv_lengths=np.array([100, 0, 57]),
      q_offset=np.array([98, 0, 55]))
  geo = PagedGeometry(spec, 8, 1, 16)
  ranges = page_info.slot_ranges(spec, arrays, geo)
  slots = jnp.broadcast_to(jnp.arange(geo.num_slots, dtype=jnp.int32), (3, geo.num_slots))
  fetch = np.asarray(page_info.fetch_table(slots, ranges, geo, geo.num_slots,
                                           shared_pool=False))[:, 0, :, 0]  # [B, steps]
  ranges = np.asarray(ranges)[:, 0]
  for b in range(3):
    lo, hi = ranges[b, 0], ranges[b, 1]
    expected = np.clip(np.arange(geo.num_slots), lo, hi - 1) if hi > lo else 0
    np.testing.assert_array_equal(fetch[b], expected)
  assert (ranges[0, 0], ranges[0, 1]) == (9, 13)  # keys 78..99 of the window
  assert ranges[1, 1] == 0  # an empty row: no live chunk


def test_float16_from_bits_is_exact():
  """Every float16 bit pattern (zeros, subnormals, normals, inf, NaN) decodes exactly."""
  bits = np.arange(-(1 << 15), 1 << 15, dtype=np.int16)
  want = bits.view(np.float16).astype(np.float32)
  got = np.asarray(jax.jit(paged._float16_from_bits)(jnp.asarray(bits)))
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
  finite = ~np.isnan(want)
  np.testing.assert_array_equal(got[finite].view(np.int32), want[finite].view(np.int32))


PAGED_KERNEL_CASES = {
    # float16 (int16 bits in, float32 inside), 3 page streams over 8 slots, 2 row blocks
    # of 16 rows (T * G = 24), a window that leaves leading pages unread.
    "f16_streams_rows_window": (MosaicTpuBlockSizes(pages_per_step=3, block_rows_decode=16),
                                dict(b=4, t=6, nq=8, nkv=2, h=40, dtype="float16",
                                     window=(13, 0))),
    # MQA, Hv != H, softcap and an explicit per-row q_offset; one page per step.
    "bf16_mqa_softcap_offsets": (MosaicTpuBlockSizes(pages_per_step=1),
                                 dict(b=3, t=2, nq=4, nkv=1, h=16, hv=136, page_size=16,
                                      pages_per_seq=3, dtype="bfloat16", softcap=3.0,
                                      q_offset=np.array([0, 1, 20]))),
}


@pytest.mark.parametrize("name", PAGED_KERNEL_CASES)
def test_paged_kernel_matches_reference(name):
  block_sizes, call = PAGED_KERNEL_CASES[name]
  dtype = call.get("dtype", "float32")
  q, k_pages, v_pages, tables, lengths, kwargs = _paged_call(**call)
  run = lambda impl, *args, **extra: flash_jax.paged_attention(
      *args, tables, lengths, implementation=impl, return_lse=True, **kwargs, **extra)
  out, lse = run("mosaic_tpu", q, k_pages, v_pages, interpret=True, block_sizes=block_sizes)
  same_out, same_lse = run("xla", q, k_pages, v_pages)
  with highest_precision():
    ref_out, ref_lse = run("xla", *upcast((q, k_pages, v_pages)))
  assert_accurate("out", out, same_out, ref_out, dtype=dtype)
  assert_accurate("lse", lse, same_lse, ref_lse, dtype=dtype)
  assert np.all(np.asarray(out[0], np.float32) == 0), "an empty sequence gives zeros"


def test_paged_kernel_is_race_free_and_grid_order_independent():
  """Two simulated cores split the batch and row-block axes, in a shuffled order."""
  detector = _race_detector()
  params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2, random_seed=5)
  q, k_pages, v_pages, tables, lengths, kwargs = _paged_call(b=3, t=2, nq=2, nkv=1,
                                                              pages_per_seq=4)
  spec, q, k_pages, v_pages, arrays = paged_lib.normalize_paged(
      q, k_pages, v_pages, tables, lengths, **kwargs)
  geo = PagedGeometry(spec, spec.page_size, 2, 16)
  out, lse = paged.decode_attention(q, k_pages, v_pages, arrays, geo, interpret=params)
  assert not detector.races.races_found
  ref_out, ref_lse = flash_jax.paged_attention(q, k_pages, v_pages, tables, lengths,
                                               implementation="xla", return_lse=True, **kwargs)
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_decode_config_and_tiling():
  with pytest.raises(ValueError, match="pages_per_step=17 must be at most 16"):
    MosaicTpuBlockSizes(pages_per_step=17)
  with pytest.raises(ValueError, match="block_rows_decode=24 must be a multiple of 16"):
    MosaicTpuBlockSizes(block_rows_decode=24)
  q, k_pages, v_pages, tables, lengths, kwargs = _paged_call(
      b=2, t=1, nq=32, nkv=8, h=128, page_size=16, pages_per_seq=64, dtype="bfloat16")
  spec, *_ = paged_lib.normalize_paged(q, k_pages, v_pages, tables, lengths)
  resolved = config.resolve(MosaicTpuBlockSizes(), spec)
  # 16-token pages of 8 heads x (128 + 128) bf16 = 64 KiB: 16 of them make a 1 MiB step.
  assert config.decode_tiling(resolved, spec, "TPU v5 lite") == (16, 16, 16)
  assert config.decode_tiling(resolved, spec, "cpu") == (16, 2, 16)  # interpret: 2 streams
  forced = config.resolve(MosaicTpuBlockSizes(pages_per_step=4, block_rows_decode=64), spec)
  assert config.decode_tiling(forced, spec, "TPU v5 lite") == (16, 4, 16)  # T*G = 4 rows
  # Contiguous caches: chunks of block_kv keys (at most S), one a step.
  for s_len, chunk in ((1000, 512), (300, 300)):
    contiguous, *_ = spec_lib.normalize(*_qkv(1, 1, s_len, 8, 2, 64), causal=True)
    resolved = config.resolve(MosaicTpuBlockSizes(block_kv=512), contiguous)
    assert config.decode_tiling(resolved, contiguous, "TPU v5 lite")[:2] == (chunk, 1)


def test_paged_and_decode_calls_run_the_decode_kernel():
  q, k_pages, v_pages, tables, lengths, kwargs = _paged_call(b=2, t=1)
  spec, *_ = paged_lib.normalize_paged(q, k_pages, v_pages, tables, lengths)
  assert dispatch.select(spec, None, platform="tpu") is IMPLEMENTATION

  def names(jaxpr):  # of every pallas_call, nested ones too
    found = set()
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        found.add(eqn.params["name"])
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        found |= names(sub)
    return found

  paged_jaxpr = jax.make_jaxpr(lambda q: IMPLEMENTATION.forward_only(
      q, k_pages, v_pages, None, paged_lib.normalize_paged(q, k_pages, v_pages, tables,
                                                           lengths)[4],
      spec, IMPLEMENTATION.default_config(spec), True))(q)
  assert names(paged_jaxpr.jaxpr) == {"flash_jax_mosaic_tpu_paged"}
  q, k, v = _qkv(2, 1, 200, 4, 2, 32)
  spec, q, k, v, bias, arrays = spec_lib.normalize(q, k, v, causal=True, q_offset=199)
  decode_jaxpr = jax.make_jaxpr(lambda q: IMPLEMENTATION.forward(
      q, k, v, bias, arrays, spec, IMPLEMENTATION.default_config(spec), True))(q)
  assert names(decode_jaxpr.jaxpr) == {"flash_jax_mosaic_tpu_decode"}


def test_paged_tables_beyond_smem_decline():
  """A pool addressed by 64 x 4096 table slots needs 1 MiB of SMEM (Mosaic rejects it):
  the named implementation says so; implementation=None moves on to another one."""
  q, pages = jnp.zeros((64, 1, 8, 128), jnp.bfloat16), jnp.zeros((2, 16, 2, 128), jnp.bfloat16)
  spec, *_ = paged_lib.normalize_paged(q, pages, pages, np.zeros((64, 4096), np.int32),
                                       np.ones((64,), np.int32))
  with pytest.raises(NotImplementedError, match="page tables need .* KiB of SMEM"):
    dispatch.select(spec, "mosaic_tpu", platform="tpu")
  assert dispatch.select(spec, None, platform="tpu").name != "mosaic_tpu"
  cache = jax.ShapeDtypeStruct((64, 1 << 20, 2, 128), jnp.bfloat16)  # a huge contiguous
  contiguous, *_ = spec_lib.normalize(q, cache, cache)  # call takes the blockwise kernel
  assert dispatch.select(contiguous, None, platform="tpu") is IMPLEMENTATION


def _decode_calls(kind_of_call):
  """(function, args) of a paged call with every paged feature, or a contiguous decode."""
  if kind_of_call == "paged":
    q, k_pages, v_pages, tables, lengths, _ = _paged_call(
        b=2, t=2, nq=8, nkv=2, h=72, hv=40, page_size=16, dtype="bfloat16")

    def fn(q, k_pages, v_pages, tables, lengths):  # the API would refuse: not on a TPU
      spec, q, k_pages, v_pages, arrays = paged_lib.normalize_paged(
          q, k_pages, v_pages, tables, lengths, window=(20, 0), softcap=5.0)
      return IMPLEMENTATION.forward_only(q, k_pages, v_pages, None, arrays, spec,
                                         MosaicTpuBlockSizes(pages_per_step=3), False)
    return fn, (q, k_pages, v_pages, tables, lengths)
  q, k, v = _qkv(2, 1, 300, 8, 2, 64, "bfloat16")

  def fn(q, k, v, lengths):
    spec, q, k, v, bias, arrays = spec_lib.normalize(q, k, v, causal=True, kv_lengths=lengths,
                                                     q_offset=lengths - 1)
    return IMPLEMENTATION(q, k, v, bias, arrays, spec, IMPLEMENTATION.default_config(spec), False)
  return fn, (q, k, v, jnp.array([300, 17]))


@pytest.mark.parametrize("kind", ["TPU v4", "TPU v5 lite", "TPU v6 lite"])
@pytest.mark.parametrize("call", ["paged", "contiguous"])
def test_decode_kernel_lowers_to_mosaic_for_tpu(kind, call):
  fn, args = _decode_calls(call)
  with jax.sharding.use_abstract_mesh(_tpu_mesh(kind)):
    exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)
  assert exported.mlir_module().count("tpu_custom_call") == 1


@pytest.mark.parametrize("topology", ["v4:2x2x1", "v5e:2x2", "v6e:2x2"])
def test_kernels_compile_with_libtpu(topology):
  """With libtpu installed (`pip install "jax[tpu]==<this JAX>"`), the Mosaic compiler
  itself compiles the kernels for TPU topologies on this CPU host (deviceless AOT): the
  layout and legality checks that lowering alone does not run. Forward and backward
  with every feature, a paged call and a contiguous decode."""
  pytest.importorskip("libtpu")
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  devices = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
  mesh = jax.sharding.Mesh(np.array(devices[:1]), ("x",),
                           axis_types=(jax.sharding.AxisType.Auto,))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  q, k, v, kwargs = _all_features()
  calls = [_grad_of_kernels(q, k, v, kwargs, interpret=False),
           _decode_calls("paged"), _decode_calls("contiguous")]
  for fn, args in calls:
    args = [None if x is None else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated)
            for x in args]
    with jax.set_mesh(mesh):
      jax.jit(fn).lower(*args).compile()  # raises on a kernel Mosaic rejects
