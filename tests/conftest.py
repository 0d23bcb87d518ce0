"""Shared fixtures: the implementation targets and the accuracy rule."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import pytest

import flash_jax
from flash_jax import accuracy
from targets import TARGETS, Target

JNP_IMPLEMENTATIONS = ("xla", "chunked")  # these serve every call: NotImplementedError fails

MAPPED_REGIONS_BUDGET = 30000  # half of Linux's default vm.max_map_count (65530)


def _mapped_regions() -> int:
  try:
    with open("/proc/self/maps") as maps:
      return sum(1 for _ in maps)
  except OSError:  # not Linux: nothing to count
    return 0


@pytest.fixture(autouse=True)
def _release_compiled_code():
  """Drops the compiled executables once the process maps many memory regions. XLA's
  CPU JIT maps memory for every executable and JAX keeps them cached; the whole suite in
  one process compiles more than Linux's vm.max_map_count allows, and past it XLA aborts."""
  yield
  if _mapped_regions() > MAPPED_REGIONS_BUDGET:
    flash_jax.api.clear_caches()


def _target_param(target: Target):
  marks = [pytest.mark.gpu] if target.platform == "gpu" else []
  return pytest.param(target, id=target.id, marks=marks)


@pytest.fixture(params=[_target_param(t) for t in TARGETS])
def target(request) -> Target:
  t = request.param
  if t.platform == "gpu" and jax.default_backend() != "gpu":
    pytest.skip("needs a GPU")
  return t


def pytest_collection_modifyitems(config, items):
  """A target that joins some shared tests only (`Target.tests`) is deselected from the
  others: not collected for them, rather than reported as skipped."""
  kept, dropped = [], []
  for item in items:
    params = getattr(item, "callspec", None)
    target = params.params.get("target") if params else None
    joins = not isinstance(target, Target) or target.tests is None
    (kept if joins or item.originalname in target.tests else dropped).append(item)
  if dropped:
    config.hook.pytest_deselected(items=dropped)
    items[:] = kept


def skip_if_unsupported(target: Target, case=None):
  """Skips cases a target opts out of (size, dtype). The jnp implementations take all."""
  if case is None:
    return
  if target.max_tokens is not None and case.tokens > target.max_tokens:
    pytest.skip(f"T*S={case.tokens} > max_tokens={target.max_tokens} for {target.id}")
  if case.dtype not in target.dtypes:
    pytest.skip(f"{case.dtype} not in {target.id}'s dtypes")


def _through(target: Target, api_function, *args, **kwargs):
  """api_function (flash_attention, paged_attention) run by `target`; a kernel's
  NotImplementedError skips the case."""
  try:
    return api_function(*args, implementation=target.name, interpret=target.interpret,
                        block_sizes=target.block_sizes, **kwargs)
  except NotImplementedError as e:
    if target.name in JNP_IMPLEMENTATIONS:
      raise
    pytest.skip(f"{target.id}: {e}")


def attend(target: Target, q, k, v, **kwargs):
  """flash_attention through `target`."""
  return _through(target, flash_jax.flash_attention, q, k, v, **kwargs)


def attend_paged(target: Target, *args, **kwargs):
  """flash_jax.paged_attention through `target`."""
  return _through(target, flash_jax.paged_attention, *args, **kwargs)


@contextlib.contextmanager
def highest_precision():
  with jax.default_matmul_precision("highest"):
    yield


def upcast(tree):
  return jax.tree.map(
      lambda x: x.astype(jnp.float32)
      if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def assert_accurate(name, x, same_precision, reference, *, dtype):
  """`flash_jax.accuracy`'s rule: error(x) <= factor * error(same precision) + floor, the
  factor of a forward result or a gradient by `name` ("out", "lse", "dq", ...)."""
  verdict = accuracy.judge(x, same_precision, reference, factor=accuracy.factor_for(name),
                           dtype=dtype)
  assert verdict.ok, verdict.describe(name)


def dot_precisions(closed_jaxpr) -> list:
  """The precision of every dot_general in a jaxpr, nested jaxprs included (None: unset)."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        precision = eqn.params["precision"]
        found.append(precision[0] if isinstance(precision, tuple) else precision)
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          if hasattr(sub, "eqns"):
            walk(sub)
          elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
            walk(sub.jaxpr)

  walk(closed_jaxpr.jaxpr)
  return found
