"""flash_jax.accuracy: the rule itself."""

import jax.numpy as jnp
import numpy as np

from flash_jax import accuracy


def test_judge_passes_within_the_bound_and_fails_beyond_it():
  reference = np.array([1.0, -2.0, 0.5], np.float32)
  baseline = reference + np.array([0.0, 1e-2, 0.0], np.float32)  # error 1e-2
  bound = 2 * 1e-2 + accuracy.FLOOR["bfloat16"] * 2.0  # scale: max |reference| = 2
  inside = reference + np.array([0.0, 0.0, bound * 0.99], np.float32)
  outside = reference + np.array([0.0, 0.0, bound * 1.01], np.float32)
  verdict = accuracy.judge(inside, baseline, reference, factor=2, dtype="bfloat16")
  assert verdict.ok and np.isclose(verdict.bound, bound)
  assert not accuracy.judge(outside, baseline, reference, factor=2, dtype=jnp.bfloat16).ok
  assert "FAIL" in accuracy.judge(outside, baseline, reference, factor=2,
                                  dtype="bfloat16").describe("out")


def test_judge_rejects_nan_and_misplaced_infinities():
  reference = np.array([-np.inf, 1.0], np.float32)  # a row that sees no key: lse -inf
  good = np.array([-np.inf, 1.0], np.float32)
  assert accuracy.judge(good, good, reference, factor=2, dtype="float32").ok
  nan = np.array([-np.inf, np.nan], np.float32)
  assert accuracy.judge(nan, good, reference, factor=2, dtype="float32").describe("lse") == \
      "lse: NaN"
  finite = np.array([0.0, 1.0], np.float32)
  verdict = accuracy.judge(finite, good, reference, factor=2, dtype="float32")
  assert not verdict.ok and "non-finite" in verdict.describe("lse")
  # A baseline that misplaces them gives no bound to pass under.
  assert not accuracy.judge(good, finite, reference, factor=2, dtype="float32").ok


def test_factor_for_names_forward_results_and_gradients():
  assert [accuracy.factor_for(n) for n in ("out", "lse")] == [2, 2]
  assert [accuracy.factor_for(n) for n in ("dq", "dk", "dv", "dbias")] == [3, 3, 3, 3]
