"""Tests of the "triton" implementation's own parts: config, tile ranges, tile skipping.

Feature coverage (every mask, GQA, dtypes, gradients) comes from the shared suite
(tests/test_attention.py, targets "triton-interpret" on CPU and "triton-gpu").
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flash_jax
from flash_jax import BlockSizes, reference, tuning
from flash_jax import spec as spec_lib
from flash_jax.kernels.triton import IMPLEMENTATION, TritonConfig
from flash_jax.kernels.triton import config as config_lib
from flash_jax.kernels.triton.implementation import FUSED_DQ_MAX_HEAD_DIM
from flash_jax.kernels.triton.tile_masking import TileMasking
from cases import CASES, PAGED_CASES, make_inputs, make_paged_inputs

SMALL_BLOCKS = TritonConfig(block_q=16, block_kv=16, block_q_dkv=16, block_kv_dkv=16,
                            block_q_dq=16, block_kv_dq=16)


def _spec(t=64, s=64, h=32, dtype=jnp.bfloat16, **kwargs):
  q = jnp.zeros((1, t, 2, h), dtype)
  k = jnp.zeros((1, s, 2, h), dtype)
  return spec_lib.normalize(q, k, k, **kwargs)[0]


# ---- config ----------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, message", [
    ("block_q", 48, "block_q=48 must be a power of two"),
    ("block_kv_dq", 8, "block_kv_dq=8 must be a power of two >= 16"),
    ("num_warps", 3, "num_warps=3 must be one of"),
    ("num_stages_dkv", 9, "num_stages_dkv=9 must be at most"),
    ("num_stages", 0, "must be a positive int"),
])
def test_config_rejects_bad_values(field, value, message):
  with pytest.raises(ValueError, match=message):
    TritonConfig(**{field: value})


def test_config_is_frozen_and_hashable():
  config = TritonConfig(block_q=64)
  assert hash(config) == hash(TritonConfig(block_q=64))
  with pytest.raises(dataclasses.FrozenInstanceError):
    config.block_q = 128


@pytest.mark.parametrize("head_dim", [16, 64, 72, 128, 256])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_heuristic_fills_every_field(head_dim, dtype):
  spec = _spec(t=4096, s=4096, h=head_dim, dtype=dtype)
  config = config_lib.resolve(IMPLEMENTATION.default_config(spec), spec)
  assert all(getattr(config, f.name) is not None for f in dataclasses.fields(config))


def test_resolve_keeps_user_fields_and_fits_blocks_to_short_sequences():
  spec = _spec(t=20, s=4096)
  config = config_lib.resolve(TritonConfig(block_kv=32, num_warps=2), spec)
  assert (config.block_kv, config.num_warps) == (32, 2)
  assert config.block_q == min(32, _table_fields(spec)["block_q"])  # 20 rows: no tile over 32
  plain = config_lib.resolve(BlockSizes(block_q=16), spec)  # a plain BlockSizes works too
  assert isinstance(plain, TritonConfig) and plain.block_q == 16


def _table_fields(spec):
  return tuning.lookup(config_lib.TUNING, config_lib.table_key(spec)).fields


SHRINKABLE = [name for pair in config_lib._STREAMED_BLOCK.values() for name in pair]


def test_defaults_fit_shared_memory():
  """Plain d128 keeps the tuning table's tiles; a bias, mask and segment ids shrink stages
  or streamed blocks until every kernel fits."""
  budget = config_lib.shared_memory_budget()
  plain = _spec(t=4096, s=4096, h=128)
  config = config_lib.heuristic_config(plain)
  table = _table_fields(plain)
  assert {name: getattr(config, name) for name in SHRINKABLE} == {
      name: table[name] for name in SHRINKABLE}
  t = 130
  featured = _spec(t=t, s=t, h=72, bias=jnp.zeros((1, 2, t, t), jnp.bfloat16),
                   mask=jnp.ones((1, 1, t, t), bool),
                   segment_ids=jnp.zeros((1, t), jnp.int32))
  config = config_lib.heuristic_config(featured)
  for kernel in ("fwd", "dkv", "dq"):
    assert config_lib.shared_memory_estimate(config, featured, kernel) <= budget
  table = _table_fields(featured)
  assert any(getattr(config, name) < table[name] for name in SHRINKABLE)


def test_flash_attention_validates_block_sizes():
  q = jax.random.normal(jax.random.PRNGKey(0), (1, 32, 2, 16))
  call = lambda sizes: flash_jax.flash_attention(q, q, q, implementation="triton",
                                                 interpret=True, block_sizes=sizes)
  with pytest.raises(ValueError, match="block_q=24 must be a power of two"):
    call(BlockSizes(block_q=24))
  with pytest.raises(TypeError, match="TritonConfig or BlockSizes"):
    call({"block_q": 16})


def test_needs_a_gpu_or_interpret_mode():
  q = jnp.ones((1, 8, 1, 16))
  if jax.default_backend() != "gpu":
    with pytest.raises(NotImplementedError, match="interpret=True"):
      flash_jax.flash_attention(q, q, q, implementation="triton")


# ---- tile ranges -------------------------------------------------------------------------

def _ranges(spec, kind, start, *, q_offset=None, q_length=None, kv_length=None,
            block_q=16, block_kv=16):
  masks = TileMasking(spec, refs=None, batch=0, q_offset=q_offset, q_length=q_length,
                      kv_length=kv_length,
                      kv_bound=spec.kv_len if spec.kv_len % block_kv else None)
  tiles = (masks.kv_tiles(start, block_q, block_kv) if kind == "kv"
           else masks.q_tiles(start, block_kv, block_q))
  return tuple(int(x) for x in (tiles.lo, tiles.full_lo, tiles.full_hi, tiles.hi))


def test_causal_tiles_stop_at_the_diagonal():
  spec = _spec(causal=True)
  # Query rows 32..47: key tiles 0, 1 are wholly visible, tile 2 holds the diagonal.
  assert _ranges(spec, "kv", 32) == (0, 0, 2, 3)
  # Key columns 32..47 (dK/dV): query tile 2 holds the diagonal, tile 3 is below it.
  assert _ranges(spec, "q", 32) == (2, 3, 4, 4)


def test_window_tiles_are_masked_on_both_edges():
  spec = _spec(window=(20, 20))
  # Rows 32..47 see keys 12..67: only tile 2 (keys 32..47) is seen whole by every row;
  # tiles 0, 1 (left edge) and 3 (right edge) are masked.
  assert _ranges(spec, "kv", 32) == (0, 2, 3, 4)
  spec = _spec(window=(4, 4))
  # Rows 32..47 see keys 28..51: no tile is whole, tiles 1..3 are all masked.
  lo, full_lo, full_hi, hi = _ranges(spec, "kv", 32)
  assert (lo, hi) == (1, 4) and full_lo == full_hi


def test_lengths_and_tails_bound_the_tiles():
  spec = _spec(t=64, s=70)  # key tail: tile 4 holds keys 64..69 and is masked
  assert _ranges(spec, "kv", 0) == (0, 0, 4, 5)
  spec = _spec(t=64, s=64, kv_lengths=jnp.array([40]))
  assert _ranges(spec, "kv", 0, kv_length=40) == (0, 0, 2, 3)
  spec = _spec(t=64, s=64, q_lengths=jnp.array([10]))
  assert _ranges(spec, "kv", 16, q_length=10)[0] == _ranges(spec, "kv", 16, q_length=10)[3]


def test_dense_features_mask_every_tile():
  spec = _spec(segment_ids=jnp.zeros((1, 64), jnp.int32))
  lo, full_lo, full_hi, hi = _ranges(spec, "kv", 0)
  assert (lo, hi) == (0, 4) and full_lo == full_hi


# ---- tile skipping, observed: skipped key tiles are poisoned with NaN ---------------------

@pytest.mark.parametrize("kwargs, poisoned", [
    # Causal, T=32 < S=64, q_offset 0: no query reaches keys 32..63.
    (dict(causal=True), slice(32, 64)),
    # Window (8, 0) for queries at positions 32..63: keys 0..23 are out of every window.
    (dict(window=(8, 0), q_offset=32), slice(0, 16)),
    # Key length 24 (one masked tile 16..31): keys 32..63 never load.
    (dict(kv_lengths=jnp.array([24])), slice(32, 64)),
])
def test_skipped_tiles_are_never_loaded(kwargs, poisoned):
  keys = jax.random.split(jax.random.PRNGKey(1), 4)
  q = jax.random.normal(keys[0], (1, 32, 2, 16), jnp.float32)
  k = jax.random.normal(keys[1], (1, 64, 1, 16), jnp.float32)
  v = jax.random.normal(keys[2], (1, 64, 1, 16), jnp.float32)
  spec, q, k, v, bias, arrays = spec_lib.normalize(q, k, v, **kwargs)
  k_bad, v_bad = k.at[:, poisoned].set(jnp.nan), v.at[:, poisoned].set(jnp.nan)

  def loss(impl, k, v):
    out, lse = impl(q, k, v, None, arrays, spec)
    return jnp.sum(out * jnp.cos(out)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0))
  ours = lambda *a: IMPLEMENTATION(*a, SMALL_BLOCKS, True)
  value, (dk, dv) = jax.value_and_grad(lambda k, v: loss(ours, k, v), argnums=(0, 1))(k_bad, v_bad)
  ref_value, (ref_dk, ref_dv) = jax.value_and_grad(
      lambda k, v: loss(reference.reference_attention, k, v), argnums=(0, 1))(k, v)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  np.testing.assert_allclose(dk[:, poisoned], 0.0)  # skipped key blocks write zero grads
  keep = np.ones(64, bool)
  keep[poisoned] = False
  np.testing.assert_allclose(dk[:, keep], ref_dk[:, keep], atol=1e-5)
  np.testing.assert_allclose(dv[:, keep], ref_dv[:, keep], atol=1e-5)


# ---- lowering for CUDA on CPU ----------------------------------------------------------
# Interpret mode runs the kernels' jaxprs, not their Triton lowering: a kernel can pass
# every CPU test and still emit Triton IR that the GPU compiler rejects (a select between
# two Python ints became an i1 select once). So every case is also lowered for an
# abstract H200 and each Triton module is checked by MLIR's verifier.

def _verified_lowering(monkeypatch):
  """Makes Pallas verify every Triton module it lowers; returns the count seen."""
  from jax._src.pallas.triton import lowering, pallas_call_registration
  original = lowering.lower_jaxpr_to_triton_module
  seen = []

  def lower_and_verify(*args, **kwargs):
    result = original(*args, **kwargs)
    result.module.operation.verify()  # raises MLIRError naming the bad op
    seen.append(1)
    return result

  monkeypatch.setattr(lowering, "lower_jaxpr_to_triton_module", lower_and_verify)
  monkeypatch.setattr(pallas_call_registration.lowering, "lower_jaxpr_to_triton_module",
                      lower_and_verify)
  monkeypatch.setattr(flash_jax.dispatch, "current_platform", lambda: "gpu")
  monkeypatch.setattr(config_lib, "gpu_major_version", lambda: 9)
  return seen


def _export_for_h200(fn, *args):
  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="gpu")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,),
                                   abstract_device=device)
  checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  with jax.sharding.use_abstract_mesh(mesh):
    return jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*args)


# Each case with the two backward kernels, and with the unordered backward (its bias a
# constant: a bias gradient needs the dQ kernel).
LOWERING_PARAMS = ([pytest.param(c, False, id=c.id) for c in CASES]
                   + [pytest.param(c, True, id=c.id + "-atomic_dq") for c in CASES])


@pytest.mark.parametrize("case, atomic_dq", LOWERING_PARAMS)
def test_kernels_lower_to_valid_triton_for_cuda(monkeypatch, case, atomic_dq):
  """Forward (the split-KV kernel for decode-shaped cases) and the backward: the dK/dV
  and dQ kernels, or with atomic_dq one dK/dV kernel that adds dQ up."""
  seen = _verified_lowering(monkeypatch)
  q, k, v, kwargs = make_inputs(case, seed=0)
  bias = kwargs.pop("bias", None)
  block_sizes = TritonConfig(atomic_dq=atomic_dq)
  learned_bias = bias is not None and not atomic_dq

  def loss(q, k, v, bias):
    out = flash_jax.flash_attention(q, k, v, implementation="triton", bias=bias,
                                    block_sizes=block_sizes, deterministic=False, **kwargs)
    return jnp.sum(out.astype(jnp.float32))

  _export_for_h200(jax.grad(loss, argnums=(0, 1, 2, 3) if learned_bias else (0, 1, 2)),
                   q, k, v, bias)
  fused = atomic_dq and max(q.shape[-1], v.shape[-1]) <= FUSED_DQ_MAX_HEAD_DIM
  assert len(seen) == (2 if fused else 3)  # forward, dK/dV, and a dQ kernel unless fused


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in PAGED_CASES])
def test_paged_kernel_lowers_to_valid_triton_for_cuda(monkeypatch, case):
  seen = _verified_lowering(monkeypatch)
  q, k_pages, v_pages, tables, lengths, kwargs, _ = make_paged_inputs(case, seed=0)
  _export_for_h200(lambda *a: flash_jax.paged_attention(*a, implementation="triton", **kwargs),
                   q, k_pages, v_pages, tables, lengths)
  assert len(seen) == 1


# ---- the unordered backward (atomic dQ) ------------------------------------------------

@pytest.mark.parametrize("atomic_dq, kwargs, fused", [
    (True, dict(deterministic=False), True),
    (True, dict(deterministic=True), False),  # reproducible: the dQ kernel
    (True, dict(deterministic=False, bias=True), False),  # d bias needs the dQ kernel's dS
    (True, dict(deterministic=False, head_dim=256), False),  # the fused kernel's smem
    (False, dict(deterministic=False), False),
    (None, dict(deterministic=False), "table"),  # what the tuning table says
    (None, dict(deterministic=True), False),
])
def test_atomic_dq_serves_only_where_allowed(atomic_dq, kwargs, fused):
  head_dim = kwargs.pop("head_dim", 32)
  q = jax.random.normal(jax.random.PRNGKey(0), (1, 40, 2, head_dim), jnp.float32)
  with_bias = kwargs.pop("bias", False)
  bias = jax.random.normal(jax.random.PRNGKey(1), (1, 2, 40, 40)) if with_bias else None
  if fused == "table":
    fused = config_lib.heuristic_config(_spec(40, 40, 32, jnp.float32)).atomic_dq

  def loss(q, bias):
    return jnp.sum(flash_jax.flash_attention(
        q, q, q, bias=bias, implementation="triton", interpret=True,
        block_sizes=TritonConfig(atomic_dq=atomic_dq), **kwargs))
  jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1) if with_bias else 0))(q, bias))
  assert ("flash_jax_triton_bwd_dkv_dq" in jaxpr) is fused
  assert ("flash_jax_triton_bwd_dq" in jaxpr) is not fused


def test_atomic_dq_sums_every_key_block_and_group_head():
  """Many key blocks and a GQA group add into the same dQ rows; a ragged query tail
  (padded rows) adds nothing; NaN and inf in the keys past kv_lengths, inside blocks
  that visible keys share, reach neither dQ's sum nor dK, dV."""
  keys = jax.random.split(jax.random.PRNGKey(2), 4)
  q = jax.random.normal(keys[0], (2, 45, 6, 32), jnp.float32)
  k = jax.random.normal(keys[1], (2, 83, 2, 32), jnp.float32)
  v = jax.random.normal(keys[2], (2, 83, 2, 24), jnp.float32)
  dout = jax.random.normal(keys[3], (2, 45, 6, 24), jnp.float32)
  kv_lengths = jnp.array([70, 41], jnp.int32)
  hidden = (jnp.arange(83)[None, :] >= kv_lengths[:, None])[:, :, None, None]  # [B, S, 1, 1]
  junk_k, junk_v = jnp.where(hidden, jnp.nan, k), jnp.where(hidden, jnp.inf, v)
  config = dataclasses.replace(SMALL_BLOCKS, atomic_dq=True)

  def grads(k, v, **kwargs):
    loss = lambda q, k, v: jnp.sum(flash_jax.flash_attention(
        q, k, v, kv_lengths=kv_lengths, **kwargs) * dout)
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  fused = grads(junk_k, junk_v, implementation="triton", interpret=True, block_sizes=config,
                deterministic=False)
  with jax.default_matmul_precision("highest"):
    exact = grads(k, v, implementation="xla")
  for name, got, want in zip(("dq", "dk", "dv"), fused, exact):
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5, err_msg=name)
