"""Shared fixtures: the implementation targets and the accuracy rule."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flash_jax
from targets import TARGETS, Target

JNP_IMPLEMENTATIONS = ("xla", "chunked")  # these serve every call: NotImplementedError fails

# Floors of the accuracy rule (relative to max |reference|), per dtype.
ERROR_FLOOR = {"float32": 2e-5, "float16": 1e-3, "bfloat16": 4e-3}


def _target_param(target: Target):
  marks = [pytest.mark.gpu] if target.platform == "gpu" else []
  return pytest.param(target, id=target.id, marks=marks)


@pytest.fixture(params=[_target_param(t) for t in TARGETS])
def target(request) -> Target:
  t = request.param
  if t.platform == "gpu" and jax.default_backend() != "gpu":
    pytest.skip("needs a GPU")
  return t


def skip_if_unsupported(target: Target, case=None):
  """Skips cases a target opts out of (size, dtype). The jnp implementations take all."""
  if case is None:
    return
  if target.max_tokens is not None and case.tokens > target.max_tokens:
    pytest.skip(f"T*S={case.tokens} > max_tokens={target.max_tokens} for {target.id}")
  if case.dtype not in target.dtypes:
    pytest.skip(f"{case.dtype} not in {target.id}'s dtypes")


def attend(target: Target, q, k, v, **kwargs):
  """flash_attention through `target`; a kernel's NotImplementedError skips the case."""
  try:
    return flash_jax.flash_attention(q, k, v, implementation=target.name,
                                     interpret=target.interpret,
                                     block_sizes=target.block_sizes, **kwargs)
  except NotImplementedError as e:
    if target.name in JNP_IMPLEMENTATIONS:
      raise
    pytest.skip(f"{target.id}: {e}")


@contextlib.contextmanager
def highest_precision():
  with jax.default_matmul_precision("highest"):
    yield


def upcast(tree):
  return jax.tree.map(
      lambda x: x.astype(jnp.float32)
      if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def max_error(x, ref) -> float:
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  finite = np.isfinite(ref)
  assert np.array_equal(np.isfinite(x), finite), "non-finite entries differ from the reference"
  return float(np.max(np.abs(np.where(finite, x, 0.0) - np.where(finite, ref, 0.0)), initial=0.0))


def assert_accurate(name, x, same_precision, reference, *, factor, dtype):
  """The rule: error(x) <= factor * error(same-precision reference) + floor."""
  x = np.asarray(x, np.float32)
  assert not np.isnan(x).any(), f"{name}: NaN"
  err = max_error(x, reference)
  base = max_error(same_precision, reference)
  scale = max(1.0, float(np.max(np.abs(np.where(np.isfinite(reference), reference, 0)))))
  bound = factor * base + ERROR_FLOOR[dtype] * scale
  assert err <= bound, f"{name}: error {err:.3g} > {factor} x reference error {base:.3g} + floor"
