"""mosaic_gpu specifics: tile ranges against `masking` (CPU), config, dispatch, and the
kernels on a Hopper GPU (`pytest -m gpu`; the shared suite covers the features)."""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flash_jax
from conftest import assert_accurate
from flash_jax import masking, spec as spec_lib
from flash_jax.kernels.mosaic_gpu import compat, ranges
from flash_jax import tuning
from flash_jax.kernels.mosaic_gpu.config import (PLAN_FIELDS, TUNING, MosaicGPUBlockSizes,
                                                 default_config, split_kv_plan,
                                                 resolve, table_key)

RULES = [
    dict(causal=False, window=None),
    dict(causal=True, window=None),
    dict(causal=True, window=(50, 0)),
    dict(causal=False, window=(40, 70)),
    dict(causal=False, window=(None, 5)),
    dict(causal=False, window=(0, None)),
]


# Per-batch parameters of one batch row: offsets (also negative) and lengths.
BATCH_ROWS = [
    dict(),
    dict(q_offset=37),
    dict(q_offset=-21),
    dict(q_length=150, kv_length=170),
    dict(q_offset=100, q_length=90, kv_length=250),
    dict(kv_length=0),
    dict(q_length=0),
]


def _traced(row):
  """The batch row as the kernels see it: int32 scalars, not Python ints."""
  return {name: jnp.int32(value) for name, value in row.items()}


def _visible(q_len, kv_len, rules):
  q = np.arange(q_len)[:, None]
  k = np.arange(kv_len)[None, :]
  vis = masking.key_visibility(q, k, **rules)
  return np.ones((q_len, kv_len), bool) if vis is None else np.broadcast_to(vis, (q_len, kv_len))


@pytest.mark.parametrize("row", BATCH_ROWS, ids=str)
@pytest.mark.parametrize("rules", RULES, ids=str)
@pytest.mark.parametrize("q_len,kv_len", [(200, 333), (300, 200), (256, 256)])
def test_kv_block_ranges_match_masking(rules, row, q_len, kv_len):
  """Every visible block is visited; every block called unmasked is fully visible."""
  block_q, block_kv = 64, 128
  rules = dict(rules, **row)
  vis = _visible(q_len, kv_len, rules)
  for q_lo in range(0, q_len, block_q):
    q_hi = min(q_lo + block_q, q_len)
    lo, hi = (int(x) for x in ranges.visited_kv_blocks(q_lo, q_hi, block_kv=block_kv,
                                                        kv_len=kv_len, **rules))
    f_lo, f_hi = (int(x) for x in ranges.unmasked_kv_blocks(
        q_lo, q_lo + block_q, lo, hi, block_kv=block_kv, kv_len=kv_len, **rules))
    assert lo <= f_lo <= f_hi <= hi
    traced = dict(rules, **_traced(row))
    t_lo, t_hi = ranges.visited_kv_blocks(q_lo, q_hi, block_kv=block_kv, kv_len=kv_len, **traced)
    assert (int(t_lo), int(t_hi)) == (lo, hi)
    assert tuple(int(x) for x in ranges.unmasked_kv_blocks(
        q_lo, q_lo + block_q, t_lo, t_hi, block_kv=block_kv, kv_len=kv_len, **traced)) == (
            f_lo, f_hi)
    for j in range(-(-kv_len // block_kv)):
      cols = slice(j * block_kv, (j + 1) * block_kv)
      if vis[q_lo:q_hi, cols].any():
        assert lo <= j < hi, (q_lo, j)
      if f_lo <= j < f_hi:  # rows past q_len are padding: only real rows matter
        assert (j + 1) * block_kv <= kv_len and vis[q_lo:q_hi, cols].all(), (q_lo, j)


@pytest.mark.parametrize("row", BATCH_ROWS, ids=str)
@pytest.mark.parametrize("rules", RULES, ids=str)
@pytest.mark.parametrize("q_len,kv_len", [(200, 333), (300, 200), (256, 256)])
def test_q_block_ranges_match_masking(rules, row, q_len, kv_len):
  block_q, block_kv = 64, 64
  rules = dict(rules, **row)
  vis = _visible(q_len, kv_len, rules)
  s_pad = -(-kv_len // block_kv) * block_kv
  for k_lo in range(0, s_pad, block_kv):
    k_hi = k_lo + block_kv
    lo, hi = (int(x) for x in ranges.visited_q_blocks(k_lo, k_hi, block_q=block_q, q_len=q_len,
                                                       kv_len=kv_len, **rules))
    f_lo, f_hi = (int(x) for x in ranges.unmasked_q_blocks(
        k_lo, k_hi, lo, hi, block_q=block_q, kv_len=kv_len, **rules))
    assert lo <= f_lo <= f_hi <= hi
    traced = dict(rules, **_traced(row))
    t_lo, t_hi = ranges.visited_q_blocks(k_lo, k_hi, block_q=block_q, q_len=q_len,
                                         kv_len=kv_len, **traced)
    assert (int(t_lo), int(t_hi)) == (lo, hi)
    assert tuple(int(x) for x in ranges.unmasked_q_blocks(
        k_lo, k_hi, t_lo, t_hi, block_q=block_q, kv_len=kv_len, **traced)) == (f_lo, f_hi)
    for i in range(-(-q_len // block_q)):
      rows = slice(i * block_q, (i + 1) * block_q)
      if vis[rows, k_lo:k_hi].any():
        assert lo <= i < hi, (k_lo, i)
      if f_lo <= i < f_hi:
        assert k_hi <= kv_len and vis[rows, k_lo:k_hi].all(), (k_lo, i)


def _spec(head_dim=128, **kwargs):
  q = jnp.zeros((1, 128, 2, head_dim), jnp.bfloat16)
  return spec_lib.normalize(q, q, q, **kwargs)[0]


def test_unordered_backward_serves_only_where_the_call_allows_it():
  """atomic_dq fuses dQ into the dK/dV kernel only for a call that is not deterministic,
  wants no d bias, and has head dims up to 128; otherwise the two ordered kernels run."""
  from flash_jax.kernels.mosaic_gpu.backward import fuses_dq
  on, off = MosaicGPUBlockSizes(atomic_dq=True), MosaicGPUBlockSizes(atomic_dq=False)
  free = _spec(128, deterministic=False)
  assert fuses_dq(free, on) and fuses_dq(_spec(64, deterministic=False), on)
  assert not fuses_dq(free, off) and not fuses_dq(free, MosaicGPUBlockSizes())
  assert not fuses_dq(_spec(128, deterministic=True), on)
  assert not fuses_dq(_spec(256, deterministic=False), on)
  biased = dataclasses.replace(free, bias_shape=(1, 2, 128, 128))
  assert not fuses_dq(biased, on)  # d bias wants the dQ kernel's d logits
  assert fuses_dq(dataclasses.replace(biased, bias_grad=False), on)  # a constant bias


def test_config_defaults_and_validation():
  for d in (64, 128, 256):
    config = default_config(_spec(d))
    assert config.block_q == 64 and config.num_stages >= 2
    assert all(getattr(config, f.name) is not None for f in dataclasses.fields(config)), config
  filled = resolve(MosaicGPUBlockSizes(block_kv=64, num_stages_dq=4), _spec(128))
  default = default_config(_spec(128))
  assert (filled.block_kv, filled.num_stages_dq) == (64, 4)
  assert (filled.num_stages, filled.num_stages_dkv) == (default.num_stages, default.num_stages_dkv)
  with pytest.raises(ValueError, match="multiple of 64"):
    MosaicGPUBlockSizes(block_kv=48)
  for stages in ("num_stages", "num_stages_dkv", "num_stages_dq"):
    with pytest.raises(ValueError, match=f"{stages} must be an int >= 2"):
      MosaicGPUBlockSizes(**{stages: 1})
    with pytest.raises(ValueError, match=f"{stages} must be a positive int"):
      MosaicGPUBlockSizes(**{stages: True})
  with pytest.raises(ValueError, match="block_q"):
    resolve(MosaicGPUBlockSizes(block_q=128), _spec(128))
  for switch in ("overlap_softmax", "dkv_ping_pong"):
    with pytest.raises(ValueError, match=f"{switch} must be a bool or None"):
      MosaicGPUBlockSizes(**{switch: 1})
  assert resolve(MosaicGPUBlockSizes(overlap_softmax=True), _spec(64)).overlap_softmax
  assert all(isinstance(getattr(default_config(_spec(d, causal=causal)), switch), bool)
             for d in (64, 128, 256) for causal in (False, True)
             for switch in MosaicGPUBlockSizes.switches)
  # The defaults are the tuning table's (tests/test_tuning.py checks the tables).
  for d, causal in itertools.product((64, 128, 256), (False, True)):
    spec = _spec(d, causal=causal)
    fields = tuning.lookup(TUNING, table_key(spec)).fields
    kernel_fields = {k: v for k, v in fields.items() if k not in PLAN_FIELDS}
    planned = split_kv_plan(spec, block_kv=fields["block_kv_split"],
                            **{name: fields[name] for name in PLAN_FIELDS})
    assert default_config(spec) == MosaicGPUBlockSizes(**kernel_fields, num_splits=planned)
  with pytest.raises(ValueError, match="block_kv_split=96 must be a multiple of 64"):
    MosaicGPUBlockSizes(block_kv_split=96)
  with pytest.raises(ValueError, match="num_splits=129 must be at most"):
    MosaicGPUBlockSizes(num_splits=129)


def test_features_served_and_declined(monkeypatch):
  impl = flash_jax.dispatch.get_implementation("mosaic_gpu")
  monkeypatch.setattr(compat, "is_hopper", lambda: True)
  for d in (64, 80, 96, 112, 128, 192, 256):
    impl.check_spec(_spec(d, q_offset=3, kv_lengths=jnp.array([5])))
  impl.check_spec(_spec(128, dropout_rate=0.1, dropout_rng=jax.random.PRNGKey(0)))
  impl.check_spec(_spec(128, mask=jnp.ones((1, 1, 128, 128), bool),
                        bias=jnp.ones((1, 2, 1, 128), jnp.bfloat16)))


def test_padded_small_head_dims_go_to_triton_first(monkeypatch):
  """mosaic_gpu serves every head dim, but below PREFERRED_MIN_HEAD_DIM its padding loses
  to Triton (measured), and so does a bias up to head dim 64: implementation=None then
  picks Triton; named, mosaic_gpu serves."""
  from flash_jax.kernels.mosaic_gpu import implementation as mosaic
  monkeypatch.setattr(compat, "is_hopper", lambda: True)
  for head_dim, head_dim_v, want in ((32, 32, "triton"), (16, 64, "mosaic_gpu"),
                                     (96, 96, "mosaic_gpu"), (192, 128, "mosaic_gpu")):
    q = jnp.zeros((1, 256, 2, head_dim), jnp.bfloat16)
    v = jnp.zeros((1, 256, 2, head_dim_v), jnp.bfloat16)
    spec = spec_lib.normalize(q, q, v, causal=True)[0]
    assert flash_jax.dispatch.select(spec, None, platform="gpu").name == want, head_dim
    assert flash_jax.dispatch.select(spec, "mosaic_gpu", platform="gpu") is mosaic.IMPLEMENTATION
  # With a bias, Triton up to head dim 64 (measured); a dense mask stays on mosaic_gpu.
  for head_dim, extra, want in ((64, dict(bias=jnp.zeros((1, 1, 256, 256))), "triton"),
                                (128, dict(bias=jnp.zeros((1, 1, 256, 256))), "mosaic_gpu"),
                                (64, dict(mask=jnp.ones((1, 1, 256, 256), bool)), "mosaic_gpu")):
    q = jnp.zeros((1, 256, 2, head_dim), jnp.bfloat16)
    spec = spec_lib.normalize(q, q, q, **extra)[0]
    assert flash_jax.dispatch.select(spec, None, platform="gpu").name == want, (head_dim, extra)


def test_not_picked_off_hopper():
  """Off sm90 the implementation raises, so implementation=None picks another."""
  impl = flash_jax.dispatch.get_implementation("mosaic_gpu")
  if compat.is_hopper():
    pytest.skip("on a Hopper GPU")
  with pytest.raises(NotImplementedError, match="sm90"):
    impl.check_spec(_spec())
  q = jnp.ones((1, 16, 1, 64), jnp.float32)
  assert flash_jax.which_implementation(q, q, q) != "mosaic_gpu"


# ---- lowering without a GPU: jax.export for the cuda platform ------------------------------

FEATURE_CALLS = [
    (64, dict(causal=True, window=(40, 0), q_offset=133)),
    (128, dict(causal=True, q_offset="array", q_lengths=True, kv_lengths=True,
               segment_ids=True)),
    (64, dict(q_lengths=True, kv_lengths=True, segment_ids=True)),
    (128, dict(causal=True, window=(40, 0), q_offset=133)),
    (256, dict(q_lengths=True, kv_lengths=True, segment_ids=True)),
    (128, dict(causal=True, kv_lengths=True, dropout=True)),
    (64, dict(window=(40, 0), dropout=True)),
    (128, dict(causal=True, kv_lengths=True, bias="heads")),
    (64, dict(mask="batch", bias="keys", softcap=20.0)),
    (256, dict(mask="keys", q_offset=133, causal=True)),
    (192, dict(bias="full", mask="full", segment_ids=True, dropout=True)),
    (128, dict(causal=True, bias="queries", mask="queries")),
    (64, dict(bias="queries", mask="keys", kv_lengths=True)),
]


def _feature_kwargs(options, b, t, s):
  """Concrete flash_attention arguments for FEATURE_CALLS / the GPU feature tests."""
  kwargs = dict(options)
  if kwargs.get("q_offset") == "array":
    kwargs["q_offset"] = jnp.array([s - t, 11][:b], jnp.int32)
  if kwargs.pop("q_lengths", False):
    kwargs["q_lengths"] = jnp.array([t - 37, 70][:b], jnp.int32)
  if kwargs.pop("kv_lengths", False):
    kwargs["kv_lengths"] = jnp.array([s - 50, 130][:b], jnp.int32)
  if kwargs.pop("dropout", False):
    kwargs.update(dropout_rate=0.25, dropout_rng=jax.random.PRNGKey(3))
  # Bias and mask shapes: [1, N, T, S], [B, 1, 1, S] (key padding), [B, 1, T, S],
  # [B, N, T, S], [B, 1, T, 1] (query padding).
  shapes = {"heads": (1, 4, t, s), "keys": (b, 1, 1, s), "batch": (b, 1, t, s),
            "full": (b, 4, t, s), "queries": (b, 1, t, 1)}
  if "bias" in kwargs:
    shape = shapes[kwargs["bias"]]
    kwargs["bias"] = jax.random.normal(jax.random.PRNGKey(4), shape, jnp.float32)
  if "mask" in kwargs:
    shape = shapes[kwargs["mask"]]
    kwargs["mask"] = jax.random.bernoulli(jax.random.PRNGKey(5), 0.8, shape)
  if kwargs.pop("segment_ids", False):
    q_ids = (jnp.arange(t)[None, :] >= jnp.array([[60], [t // 2]])[:b]).astype(jnp.int32)
    kv_ids = (jnp.arange(s)[None, :] >= jnp.array([[90], [s // 2]])[:b]).astype(jnp.int32)
    kwargs["segment_ids"] = (q_ids, kv_ids)
  return kwargs


SCHEDULES = {  # the kernels' schedules: the forward's, dK/dV's, and the unordered backward
    "sequential": MosaicGPUBlockSizes(overlap_softmax=False, dkv_ping_pong=False),
    "overlapped+ping_pong": MosaicGPUBlockSizes(overlap_softmax=True, dkv_ping_pong=True),
    "atomic_dq": MosaicGPUBlockSizes(overlap_softmax=True, dkv_ping_pong=True, atomic_dq=True),
}


@pytest.mark.parametrize("schedules", list(SCHEDULES))
@pytest.mark.parametrize("head_dim,options", FEATURE_CALLS, ids=str)
def test_feature_kernels_lower_for_cuda(monkeypatch, head_dim, options, schedules):
  """Forward and backward kernels (each schedule: the forward's `overlap_softmax`, the
  dK/dV `dkv_ping_pong`, the unordered backward's `atomic_dq`) with offsets, lengths and
  segment ids lower to Mosaic GPU on any host (no GPU needed: jax.export for the cuda
  platform)."""
  from flash_jax.kernels.mosaic_gpu.implementation import MosaicGPUImplementation
  monkeypatch.setattr(compat, "is_hopper", lambda: True)
  monkeypatch.setattr(MosaicGPUImplementation, "platforms", ("gpu", jax.default_backend()))
  b, t, s = 2, 200, 333
  kwargs = _feature_kwargs(options, b, t, s)
  q = jax.ShapeDtypeStruct((b, t, 4, head_dim), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((b, s, 2, head_dim), jnp.bfloat16)
  block_sizes = SCHEDULES[schedules]
  attn = lambda q, k, v: flash_jax.flash_attention(q, k, v, implementation="mosaic_gpu",
                                                   block_sizes=block_sizes, **kwargs)
  grads = jax.grad(lambda q, k, v: jnp.sum(attn(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))
  for fn in (attn, grads):
    text = jax.export.export(jax.jit(fn), platforms=["cuda"])(q, k, k).mlir_module()
    assert "mosaic_gpu" in text
  # The unordered backward runs no dQ kernel, except where the head dim leaves no
  # registers for dQ's rows (`backward.fuses_dq`; the bias here is a constant).
  fused = schedules == "atomic_dq" and head_dim <= 128
  assert ("flash_jax_mosaic_gpu_bwd_dkdv_dq" in text) == fused
  assert ("flash_jax_mosaic_gpu_bwd_dq" in text) == (not fused)


def test_unordered_backward_lowers_under_vmap(monkeypatch):
  """The unordered backward's launch writes its dQ sum in place, which Pallas batches only
  at size 1: under vmap it runs once per element (`vmapping.map_when_vmapped`)."""
  from flash_jax.kernels.mosaic_gpu.implementation import MosaicGPUImplementation
  monkeypatch.setattr(compat, "is_hopper", lambda: True)
  monkeypatch.setattr(MosaicGPUImplementation, "platforms", ("gpu", jax.default_backend()))
  q = jax.ShapeDtypeStruct((3, 1, 200, 4, 64), jnp.bfloat16)  # vmapped over the first axis
  k = jax.ShapeDtypeStruct((3, 1, 333, 2, 64), jnp.bfloat16)
  loss = lambda q, k, v: jnp.sum(flash_jax.flash_attention(
      q, k, v, implementation="mosaic_gpu", causal=True, deterministic=False,
      block_sizes=MosaicGPUBlockSizes(atomic_dq=True)).astype(jnp.float32))
  grads = jax.vmap(jax.grad(loss, argnums=(0, 1, 2)))
  text = jax.export.export(jax.jit(grads), platforms=["cuda"])(q, k, k).mlir_module()
  assert "flash_jax_mosaic_gpu_bwd_dkdv_dq" in text and "stablehlo.while" in text


@pytest.mark.parametrize("head_dim,head_dim_v", [(192, 128), (96, 96), (80, 80), (64, 40),
                                                (128, 256), (256, 64)], ids=str)
def test_padded_head_dims_lower_for_cuda(monkeypatch, head_dim, head_dim_v):
  """Head dims other than the kernels' (and Hv != H) run zero-padded to a kernel head dim:
  forward and backward lower, with kv_lengths (junk keys zeroed first)."""
  from flash_jax.kernels.mosaic_gpu.implementation import MosaicGPUImplementation, kernel_spec
  monkeypatch.setattr(compat, "is_hopper", lambda: True)
  monkeypatch.setattr(MosaicGPUImplementation, "platforms", ("gpu", jax.default_backend()))
  q = jax.ShapeDtypeStruct((2, 200, 4, head_dim), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((2, 333, 2, head_dim), jnp.bfloat16)
  v = jax.ShapeDtypeStruct((2, 333, 2, head_dim_v), jnp.bfloat16)
  spec = spec_lib.normalize(q, k, v)[0]
  padded = kernel_spec(spec)
  assert (padded.head_dim, padded.head_dim_v) == {
      (192, 128): (192, 128), (96, 96): (128, 128), (80, 80): (128, 128), (64, 40): (64, 64),
      (128, 256): (128, 256), (256, 64): (256, 64)}[head_dim, head_dim_v]
  assert padded.scale == spec.scale == pytest.approx(head_dim ** -0.5)
  attn = lambda q, k, v: flash_jax.flash_attention(q, k, v, implementation="mosaic_gpu",
                                                   causal=True, kv_lengths=jnp.array([300, 9]))
  grads = jax.grad(lambda q, k, v: jnp.sum(attn(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))
  assert jax.eval_shape(attn, q, k, v).shape == (2, 200, 4, head_dim_v)
  for fn in (attn, grads):
    assert "mosaic_gpu" in jax.export.export(jax.jit(fn), platforms=["cuda"])(q, k, v).mlir_module()


def test_bias_and_mask_with_hv_not_h_lower_for_cuda(monkeypatch):
  """MLA's (192, 128) with a bias and a mask: the forward's own output tile and its
  (max, sum) staging come in the order of its scratch list; forward and backward lower."""
  from flash_jax.kernels.mosaic_gpu.implementation import MosaicGPUImplementation
  monkeypatch.setattr(compat, "is_hopper", lambda: True)
  monkeypatch.setattr(MosaicGPUImplementation, "platforms", ("gpu", jax.default_backend()))
  q = jax.ShapeDtypeStruct((2, 200, 4, 192), jnp.bfloat16)
  v = jax.ShapeDtypeStruct((2, 200, 2, 128), jnp.bfloat16)
  bias = jnp.zeros((1, 4, 200, 200), jnp.float32)
  mask = jnp.ones((2, 1, 200, 200), bool)
  attn = lambda q, k, v, bias: flash_jax.flash_attention(
      q, k, v, bias=bias, mask=mask, causal=True, implementation="mosaic_gpu")
  grads = jax.grad(lambda *a: jnp.sum(attn(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3))
  k = jax.ShapeDtypeStruct((2, 200, 2, 192), jnp.bfloat16)
  for fn in (attn, grads):
    assert "mosaic_gpu" in jax.export.export(jax.jit(fn), platforms=["cuda"])(
        q, k, v, bias).mlir_module()


def test_three_slot_d128_forward_fits_shared_memory(monkeypatch):
  """Q plus three 128-row K/V slots at d128 leave 248 bytes of the 227 KiB: this lowers
  only without the 2 KiB Pallas reserves for cross-warp reductions by default
  (compat.compiler_params)."""
  from flash_jax.kernels.mosaic_gpu.implementation import MosaicGPUImplementation
  monkeypatch.setattr(compat, "is_hopper", lambda: True)
  monkeypatch.setattr(MosaicGPUImplementation, "platforms", ("gpu", jax.default_backend()))
  q = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
  block_sizes = MosaicGPUBlockSizes(block_kv=128, num_stages=3)
  attn = lambda q, k, v: flash_jax.flash_attention(q, k, v, implementation="mosaic_gpu",
                                                   block_sizes=block_sizes)
  assert "mosaic_gpu" in jax.export.export(jax.jit(attn), platforms=["cuda"])(q, q, q).mlir_module()


# ---- on the GPU ---------------------------------------------------------------------------

needs_hopper = pytest.mark.skipif(not compat.is_hopper(), reason="needs an sm90 GPU")


@pytest.mark.gpu
@needs_hopper
def test_default_on_hopper_with_every_feature():
  q = jnp.ones((1, 256, 2, 128), jnp.bfloat16)
  assert flash_jax.which_implementation(q, q, q, causal=True) == "mosaic_gpu"
  for kwargs in (dict(q_offset=3), dict(kv_lengths=jnp.array([5]))):
    assert flash_jax.which_implementation(q, q, q, **kwargs) == "mosaic_gpu"
  for kwargs in (dict(bias=jnp.zeros((1, 1, 256, 256))),
                 dict(mask=jnp.ones((1, 1, 256, 256), bool))):
    assert flash_jax.which_implementation(q, q, q, **kwargs) == "mosaic_gpu"
  for head_dim, head_dim_v in ((96, 96), (80, 80), (192, 128)):
    q = jnp.ones((1, 256, 2, head_dim), jnp.bfloat16)
    v = jnp.ones((1, 256, 2, head_dim_v), jnp.bfloat16)
    assert flash_jax.which_implementation(q, q, v, causal=True) == "mosaic_gpu"


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("head_dim,head_dim_v,causal,t,s,groups", [
    (64, 64, True, 384, 384, 2), (128, 128, False, 200, 333, 1), (256, 256, True, 256, 256, 1),
    (128, 128, True, 300, 200, 4),
    # Zero-padded to the kernels' head dims (MLA's 192/128, and 80, 96, 112).
    (192, 128, True, 300, 333, 2), (192, 192, False, 200, 256, 1), (96, 96, True, 256, 256, 2),
    (80, 80, False, 200, 333, 1), (112, 112, True, 384, 384, 1), (128, 64, False, 130, 200, 1)])
def test_matches_reference_on_gpu(head_dim, head_dim_v, causal, t, s, groups):
  keys = jax.random.split(jax.random.PRNGKey(head_dim + t), 4)
  q = jax.random.normal(keys[0], (1, t, 2 * groups, head_dim), jnp.bfloat16)
  k = jax.random.normal(keys[1], (1, s, 2, head_dim), jnp.bfloat16)
  v = jax.random.normal(keys[2], (1, s, 2, head_dim_v), jnp.bfloat16)
  dout = jax.random.normal(keys[3], q.shape[:3] + (head_dim_v,), jnp.bfloat16)

  def grads(impl, q, k, v):
    f = lambda q, k, v: flash_jax.flash_attention(q, k, v, causal=causal, implementation=impl)
    out, vjp = jax.vjp(f, q, k, v)
    return (out,) + vjp(dout.astype(out.dtype))

  got = grads("mosaic_gpu", q, k, v)
  same = grads("xla", q, k, v)
  with jax.default_matmul_precision("highest"):
    ref = grads("xla", *(x.astype(jnp.float32) for x in (q, k, v)))
  for name, g, sp, r in zip(("out", "dq", "dk", "dv"), got, same, ref):
    assert_accurate(name, g, sp, r, dtype="bfloat16")


def _poisoned(x, lengths, round_to: int, poison: float):
  """x [B, L, N, H] with rows [length, round_up(length)) set to `poison` (finite: those
  rows share blocks with visible ones and meet P = 0 in a product) and rows past that
  set to NaN (whole blocks past the length: any read of one would show)."""
  rows = jnp.arange(x.shape[1])[None, :]
  edge = -(-lengths // round_to) * round_to
  x = jnp.where((rows >= lengths[:, None])[:, :, None, None], jnp.asarray(poison, x.dtype), x)
  return jnp.where((rows >= edge[:, None])[:, :, None, None], jnp.asarray(jnp.nan, x.dtype), x)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("head_dim,options", [
    (128, dict(causal=True, q_offset="array", q_lengths=True, kv_lengths=True)),
    (64, dict(kv_lengths=True, q_lengths=True, segment_ids=True)),
    (128, dict(kv_lengths=True, q_lengths=True, segment_ids=True)),
    (128, dict(window=(70, 30), q_offset="array", q_lengths=True, kv_lengths=True,
               segment_ids=True)),
    (256, dict(causal=True, q_offset="array", kv_lengths=True, segment_ids=True)),
    # The forward schedule each head dim does not use by default (`overlap_softmax`),
    # with query tiles that visit no key block (past q_lengths).
    (128, dict(causal=True, q_offset="array", q_lengths=True, kv_lengths=True,
               overlap_softmax=False)),
    (256, dict(causal=True, q_offset="array", q_lengths=True, kv_lengths=True,
               segment_ids=True, overlap_softmax=False)),
    (64, dict(causal=True, q_offset="array", q_lengths=True, kv_lengths=True,
              overlap_softmax=True)),
    # The dK/dV consumers without their ping-pong (the default at d64 and d128), with key
    # tiles past kv_lengths.
    (64, dict(causal=True, q_offset="array", q_lengths=True, kv_lengths=True,
              segment_ids=True, dkv_ping_pong=False)),
    (128, dict(window=(70, 30), q_lengths=True, kv_lengths=True, dkv_ping_pong=False)),
], ids=str)
def test_lengths_offsets_segments_with_poison(head_dim, options):
  """Rows past q_lengths hold junk (finite in the boundary block, NaN beyond it), keys
  past kv_lengths inf in the boundary block and NaN beyond it; outputs, lse and gradients match the float32 reference on clean
  inputs by the accuracy rule, and hidden rows get zero output and gradients."""
  b, t, s = 2, 300, 460
  kwargs = _feature_kwargs(options, b, t, s)
  schedules = {name: kwargs.pop(name, None) for name in MosaicGPUBlockSizes.switches}
  block_sizes = {"mosaic_gpu": MosaicGPUBlockSizes(**schedules)}
  keys = jax.random.split(jax.random.PRNGKey(head_dim + len(options)), 5)
  q = jax.random.normal(keys[0], (b, t, 4, head_dim), jnp.bfloat16)
  k = jax.random.normal(keys[1], (b, s, 2, head_dim), jnp.bfloat16)
  v = jax.random.normal(keys[2], (b, s, 2, head_dim), jnp.bfloat16)
  dout = jax.random.normal(keys[3], q.shape, jnp.float32)
  dlse = jax.random.normal(keys[4], (b, 4, t), jnp.float32)
  if "q_lengths" in kwargs:  # the forward reads 128-row tiles of queries
    q_bad = _poisoned(q, kwargs["q_lengths"], 128, 30.0)
  else:
    q_bad = q
  # Key blocks are up to 256 wide (the d64 forward).
  k_bad = _poisoned(k, kwargs["kv_lengths"], 256, jnp.inf) if "kv_lengths" in kwargs else k
  v_bad = _poisoned(v, kwargs["kv_lengths"], 256, -jnp.inf) if "kv_lengths" in kwargs else v

  def run(impl, q, k, v):
    def f(q, k, v):
      out, lse = flash_jax.flash_attention(q, k, v, implementation=impl, return_lse=True,
                                           block_sizes=block_sizes.get(impl), **kwargs)
      return out, lse
    (out, lse), vjp = jax.vjp(f, q, k, v)
    finite = jnp.isfinite(lse)
    grads = vjp((dout.astype(out.dtype), jnp.where(finite, dlse, 0.0)))
    return (out, lse) + tuple(grads)

  got = run("mosaic_gpu", q_bad, k_bad, v_bad)
  same = run("xla", q, k, v)
  with jax.default_matmul_precision("highest"):
    ref = run("xla", *(x.astype(jnp.float32) for x in (q, k, v)))
  for name, g, sp, r in zip(("out", "lse", "dq", "dk", "dv"), got, same, ref):
    if name in ("dk", "dv") and "kv_lengths" in kwargs:  # junk keys: zero gradients
      hidden = (jnp.arange(s)[None, :] >= kwargs["kv_lengths"][:, None])
      assert np.all(np.asarray(g, np.float32)[np.asarray(hidden)] == 0), name
    assert_accurate(name, g, sp, r, dtype="bfloat16")
  if "q_lengths" in kwargs:
    hidden = np.asarray(jnp.arange(t)[None, :] >= kwargs["q_lengths"][:, None])
    assert np.all(np.asarray(got[0], np.float32)[hidden] == 0)
    assert np.all(np.isneginf(np.asarray(got[1]).transpose(0, 2, 1)[hidden]))
    assert np.all(np.asarray(got[2], np.float32)[hidden] == 0)


# ---- split-KV decode (split_kv.py) ---------------------------------------------------------

DECODE_CALLS = [  # (T, Nq, Nkv, head dim, page size, num_splits (None: planned), options)
    (1, 32, 8, 128, 64, None, {}),
    (2, 16, 1, 128, 16, 3, {}),  # MQA; pages of 16 (8 TMA copies per 128-key block)
    (7, 8, 8, 64, 128, None, {"window": (100, 0)}),
    (16, 32, 8, 128, 64, 5, {"softcap": 30.0}),  # uneven shares: some splits are empty
    (1, 8, 2, 256, 128, None, {"scale": 0.3}),
    (3, 8, 2, 192, 32, None, {}),  # MLA's (192, 128)
    (16, 8, 1, 128, 64, 2, {}),  # 16 tokens x 8 heads: two 64-row tiles per K/V head
]


@pytest.mark.parametrize("t,nq,nkv,head_dim,page_size,splits,options", DECODE_CALLS, ids=str)
def test_split_kv_kernel_lowers_for_cuda(monkeypatch, t, nq, nkv, head_dim, page_size, splits,
                                         options):
  """Decode-shaped contiguous and paged calls lower to the split-KV kernel on any host,
  the paged one with no gather of the pool (pages are read in place)."""
  from flash_jax.kernels.mosaic_gpu.implementation import MosaicGPUImplementation
  monkeypatch.setattr(compat, "is_hopper", lambda: True)
  monkeypatch.setattr(MosaicGPUImplementation, "platforms", ("gpu", jax.default_backend()))
  head_dim_v = 128 if head_dim == 192 else head_dim
  block_sizes = MosaicGPUBlockSizes(num_splits=splits)
  q = jax.ShapeDtypeStruct((2, t, nq, head_dim), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((2, 1000, nkv, head_dim), jnp.bfloat16)
  v = jax.ShapeDtypeStruct((2, 1000, nkv, head_dim_v), jnp.bfloat16)
  lengths = jnp.array([997, 17], jnp.int32)
  contiguous = lambda q, k, v: flash_jax.flash_attention(
      q, k, v, causal=True, kv_lengths=lengths, q_offset=lengths - t, block_sizes=block_sizes,
      implementation="mosaic_gpu", **options)
  tables = jnp.zeros((2, -(-1000 // page_size)), jnp.int32)
  paged = lambda q, k, v: flash_jax.paged_attention(
      q, k, v, tables, lengths, block_sizes=block_sizes, implementation="mosaic_gpu", **options)
  k_pages = jax.ShapeDtypeStruct((40, page_size, nkv, head_dim), jnp.bfloat16)
  v_pages = jax.ShapeDtypeStruct((40, page_size, nkv, head_dim_v), jnp.bfloat16)
  for fn, args in ((contiguous, (q, k, v)), (paged, (q, k_pages, v_pages))):
    text = jax.export.export(jax.jit(fn), platforms=["cuda"])(*args).mlir_module()
    assert "flash_jax_mosaic_gpu_split_kv" in text and "stablehlo.gather" not in text


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("t,nq,nkv,head_dim,page_size,splits,options", DECODE_CALLS, ids=str)
def test_split_kv_decode_with_junk_on_gpu(t, nq, nkv, head_dim, page_size, splits, options):
  """Contiguous and paged decode through the split-KV kernel match the float32 reference
  by the accuracy rule, with lengths 0, 1 and odd ones, NaN/inf past the lengths of the
  contiguous cache, in unused pages and in unused table entries (out of the pool)."""
  from cases import PagedCase, make_paged_inputs, poison_unseen_keys
  head_dim_v = 128 if head_dim == 192 else head_dim
  case = PagedCase(4, t, nq, nkv, head_dim, page_size, -(-600 // page_size), "bfloat16",
                   head_dim_v=None if head_dim_v == head_dim else head_dim_v)
  q, k_pages, v_pages, tables, lengths, _, (k, v) = make_paged_inputs(case, seed=t + head_dim)
  kwargs = dict(causal=True, **options)
  k, v = poison_unseen_keys(k, v, dict(kwargs, kv_lengths=lengths, q_offset=lengths - t), t)
  block_sizes = MosaicGPUBlockSizes(num_splits=splits)
  calls = {
      "contiguous": lambda impl, q, k, v: flash_jax.flash_attention(
          q, k, v, kv_lengths=lengths, q_offset=lengths - t, return_lse=True,
          implementation=impl, block_sizes=block_sizes if impl == "mosaic_gpu" else None,
          **kwargs),
      "paged": lambda impl, q, k, v: flash_jax.paged_attention(
          q, k, v, tables, lengths, return_lse=True, implementation=impl,
          block_sizes=block_sizes if impl == "mosaic_gpu" else None, **kwargs),
  }
  for layout, call in calls.items():
    args = (q, k, v) if layout == "contiguous" else (q, k_pages, v_pages)
    assert "flash_jax_mosaic_gpu_split_kv" in jax.jit(
        lambda *a: call("mosaic_gpu", *a)).lower(*args).as_text()
    got = call("mosaic_gpu", *args)
    same = call("xla", *args)
    with jax.default_matmul_precision("highest"):
      ref = call("xla", *(x.astype(jnp.float32) for x in args))
    for name, g, sp, r in zip(("out", "lse"), got, same, ref):
      assert np.all(np.isfinite(np.asarray(g, np.float32))[np.isfinite(np.asarray(r))]), name
      assert_accurate(name, g, sp, r, dtype="bfloat16")
