"""API contract: argument validation, dispatch, and the jax.nn drop-in signature."""

from __future__ import annotations

import inspect
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flash_jax
from flash_jax import dispatch
from flash_jax import spec as spec_lib

B, T, S, N, K, H = 2, 8, 12, 4, 2, 16


def _qkv(dtype=jnp.float32, **shapes):
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(keys[0], shapes.get("q", (B, T, N, H)), dtype)
  k = jax.random.normal(keys[1], shapes.get("k", (B, S, K, H)), dtype)
  v = jax.random.normal(keys[2], shapes.get("v", (B, S, K, H)), dtype)
  return q, k, v


BAD_CALLS = [
    ("3-d q", dict(q=(T, N, H)), {}, ValueError, "q must be 4-D"),
    ("batch", dict(k=(B + 1, S, K, H), v=(B + 1, S, K, H)), {}, ValueError, "batch"),
    ("head dims", dict(k=(B, S, K, H + 8), v=(B, S, K, H)), {}, ValueError, "head_dim"),
    ("heads", dict(k=(B, S, 3, H), v=(B, S, 3, H)), {}, ValueError, "multiple of k/v heads"),
    ("k/v length", dict(v=(B, S + 1, K, H)), {}, ValueError, "k and v"),
    ("bias shape", {}, dict(bias=jnp.zeros((B, N, T + 1, S))), ValueError, "bias of shape"),
    ("bias dtype", {}, dict(bias=jnp.zeros((B, N, T, S), jnp.int32)), TypeError, "bias"),
    ("mask shape", {}, dict(mask=jnp.ones((B, 3, T, S), bool)), ValueError, "mask of shape"),
    ("mask dtype", {}, dict(mask=jnp.ones((B, N, T, S))), TypeError, "mask must be a bool"),
    ("dropout rng", {}, dict(dropout_rate=0.1), ValueError, "dropout_rng"),
    ("dropout rate", {}, dict(dropout_rate=1.5), ValueError, "dropout_rate"),
    ("window", {}, dict(window=(-2, 3)), ValueError, "window left"),
    ("softcap", {}, dict(softcap=-1.0), ValueError, "softcap"),
    ("segment ids T!=S", {}, dict(segment_ids=jnp.zeros((B, T), jnp.int32)), ValueError,
     "segment_ids"),
    ("segment ids shape", dict(k=(B, T, K, H), v=(B, T, K, H)),
     dict(segment_ids=jnp.zeros((B, T + 1), jnp.int32)), ValueError, "segment_ids"),
    ("q_offset shape", {}, dict(q_offset=jnp.zeros((B + 1,), jnp.int32)), ValueError, "q_offset"),
    ("lengths dtype", {}, dict(kv_lengths=jnp.ones((B,))), TypeError, "kv_lengths"),
    ("implementation", {}, dict(implementation="magic"), ValueError, "implementation must be"),
    ("block sizes", {}, dict(block_sizes=(64, 64)), TypeError, "block_sizes"),
    ("deterministic", {}, dict(deterministic="yes"), TypeError, "deterministic"),
]


@pytest.mark.parametrize("name,shapes,kwargs,error,match", BAD_CALLS,
                         ids=[c[0] for c in BAD_CALLS])
def test_bad_arguments_raise_naming_the_argument(name, shapes, kwargs, error, match):
  q, k, v = _qkv(**shapes)
  with pytest.raises(error, match=match):
    flash_jax.flash_attention(q, k, v, **kwargs)


@pytest.mark.parametrize("xla_flags,given,want", [
    ("", None, False), ("--xla_gpu_deterministic_ops=true", None, True),
    ("--xla_dump_to=/tmp --xla_gpu_deterministic_ops=1", None, True),
    ("--xla_gpu_deterministic_ops=false", None, False),
    ("--xla_gpu_deterministic_ops=true", False, False), ("", True, True)])
def test_deterministic_follows_xla_flags_unless_given(monkeypatch, xla_flags, given, want):
  """deterministic=None follows XLA's --xla_gpu_deterministic_ops; True/False win."""
  monkeypatch.setenv("XLA_FLAGS", xla_flags)
  q, k, v = _qkv()
  assert spec_lib.normalize(q, k, v, deterministic=given)[0].deterministic is want


def test_mixed_dtypes_and_int_inputs_raise():
  q, k, v = _qkv()
  with pytest.raises(TypeError, match="share one dtype"):
    flash_jax.flash_attention(q, k.astype(jnp.bfloat16), v)
  with pytest.raises(TypeError, match="q dtype"):
    flash_jax.flash_attention(q.astype(jnp.int32), k.astype(jnp.int32), v.astype(jnp.int32))


def test_block_sizes_validation():
  with pytest.raises(ValueError, match="block_kv"):
    flash_jax.BlockSizes(block_kv=0)
  with pytest.raises(ValueError, match="multiple of 16"):
    flash_jax.BlockSizes(block_q=24).require_multiple(16)
  assert flash_jax.BlockSizes(block_q=64).fill(block_q=32, block_kv=16) == flash_jax.BlockSizes(
      block_q=64, block_kv=16)


def test_selection_is_visible_and_logged(caplog):
  q, k, v = _qkv()
  name = flash_jax.which_implementation(q, k, v, causal=True)
  assert name in flash_jax.implementation_names()
  if jax.default_backend() == "cpu":
    assert name == "chunked"
  with caplog.at_level(logging.DEBUG, logger="flash_jax"):
    flash_jax.flash_attention(q, k, v, causal=True)
  assert f"picked '{name}'" in caplog.text


def test_named_kernel_off_its_platform_raises_not_implemented():
  q, k, v = _qkv()
  for entry in dispatch.REGISTRY:
    if jax.default_backend() not in entry.platforms:
      with pytest.raises(NotImplementedError, match=entry.name):
        flash_jax.flash_attention(q, k, v, implementation=entry.name)


def test_jnp_implementations_have_no_interpret_mode():
  q, k, v = _qkv()
  with pytest.raises(NotImplementedError, match="interpret"):
    flash_jax.flash_attention(q, k, v, implementation="chunked", interpret=True)


def test_dot_product_attention_has_jax_nn_signature():
  ours = inspect.signature(flash_jax.dot_product_attention)
  theirs = inspect.signature(jax.nn.dot_product_attention)
  assert list(ours.parameters) == list(theirs.parameters)
  for name, param in theirs.parameters.items():
    assert ours.parameters[name].default == param.default, name
    assert ours.parameters[name].kind == param.kind, name


def test_dot_product_attention_unbatched_and_residual():
  q, k, v = _qkv()
  out, residual = flash_jax.dot_product_attention(q[0], k[0], v[0], is_causal=True,
                                                  return_residual=True)
  ref_out, ref_residual = jax.nn.dot_product_attention(q[0], k[0], v[0], is_causal=True,
                                                       return_residual=True)
  np.testing.assert_allclose(out, ref_out, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(residual, ref_residual, rtol=2e-5, atol=2e-5)


def test_importing_flash_jax_imports_no_kernel_module():
  import subprocess
  import sys
  code = ("import sys, flash_jax; bad = [m for m in sys.modules if m.startswith("
          "('flash_jax.kernels.', 'jax.experimental.pallas', 'jax._src.pallas', 'triton', "
          "'flax'))]; assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_a_kernel_that_breaks_under_this_jax_names_the_version(monkeypatch):
  """A Pallas API drift (here: a KeyError inside the kernel) surfaces as an error that
  names the backend and the JAX version, not as the bare KeyError."""
  from flash_jax import versions
  from flash_jax.kernels.triton import implementation as triton_impl

  def drifted(*args, **kwargs):
    raise KeyError("idx")

  monkeypatch.setattr(triton_impl, "forward", drifted)
  monkeypatch.setattr(triton_impl, "split_kv_forward", drifted)
  q, k, v = _qkv()
  with pytest.raises(versions.UnsupportedJaxError, match=rf"'triton'.*JAX {jax.__version__}"):
    flash_jax.flash_attention(q, k, v, implementation="triton", interpret=True)


def test_mosaic_gpu_declines_a_jax_without_its_pallas_api(monkeypatch):
  from flash_jax.kernels.mosaic_gpu import IMPLEMENTATION, compat
  monkeypatch.setattr(compat, "is_hopper", lambda: True)
  monkeypatch.setattr(compat, "missing_api", lambda: ("plgpu.wgmma",))
  q, k, v = _qkv(jnp.bfloat16, q=(B, T, N, 64), k=(B, S, K, 64), v=(B, S, K, 64))
  spec = flash_jax.spec.normalize(q, k, v)[0]
  with pytest.raises(NotImplementedError, match=rf"JAX {jax.__version__}.*plgpu.wgmma"):
    IMPLEMENTATION.check_spec(spec)


def test_a_backend_this_jax_cannot_import_is_declined(monkeypatch):
  """A registered backend whose module fails to import (a Pallas lowering a future JAX
  drops) declines calls with the reason, and implementation=None moves past it."""
  entry = dispatch.RegistryEntry("triton", ("cpu",), "flash_jax.kernels.no_such_backend:X")
  monkeypatch.setattr(dispatch, "REGISTRY", (entry,) + tuple(
      e for e in dispatch.REGISTRY if e.name != "triton"))
  dispatch.get_implementation.cache_clear()
  try:
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError, match=rf"unavailable with JAX {jax.__version__}"):
      flash_jax.flash_attention(q, k, v, implementation="triton")
    assert flash_jax.which_implementation(q, k, v) == "chunked"
  finally:
    dispatch.get_implementation.cache_clear()
