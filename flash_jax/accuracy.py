"""The accuracy rule every implementation is held to, by the tests and the GPU checks.

A result passes when its error against a float32 reference (HIGHEST matmul precision on
upcast inputs) is at most `factor` times the error of the same-precision jnp reference
against it, plus a small floor scaled by the reference's magnitude: factor 2 for
forward results (out, lse), 3 for gradients. NaN never passes, and non-finite entries
(a row that sees no key has lse -inf) must sit exactly where the reference has them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

FORWARD_FACTOR = 2
GRADIENT_FACTOR = 3
FORWARD_RESULTS = ("out", "lse")  # every other result named by a check is a gradient
FLOOR = {"float32": 2e-5, "float16": 1e-3, "bfloat16": 4e-3}


def max_error(x, reference) -> float:
  """Largest |x - reference| over the reference's finite entries; inf when the non-finite
  entries of x and the reference differ."""
  x, reference = np.asarray(x, np.float32), np.asarray(reference, np.float32)
  finite = np.isfinite(reference)
  if not np.array_equal(np.isfinite(x), finite):
    return float("inf")
  return float(np.max(np.abs(np.where(finite, x, 0.0) - np.where(finite, reference, 0.0)),
                      initial=0.0))


def factor_for(name: str) -> int:
  """The rule's factor for a result named `name` ("out", "lse", "dq", "dbias", ...)."""
  return FORWARD_FACTOR if name in FORWARD_RESULTS else GRADIENT_FACTOR


@dataclasses.dataclass(frozen=True)
class Verdict:
  ok: bool
  error: float  # max_error(result, reference)
  bound: float  # factor * max_error(same precision, reference) + floor
  nan: bool

  def describe(self, name: str) -> str:
    if self.nan:
      return f"{name}: NaN"
    if self.error == float("inf"):
      return f"{name}: non-finite entries differ from the reference"
    if self.bound == float("inf"):
      return f"{name}: the same-precision baseline's non-finite entries differ"
    return f"{name} {self.error:.2e}/{self.bound:.2e}{'' if self.ok else ' FAIL'}"


def judge(result, same_precision, reference, *, factor: float, dtype) -> Verdict:
  """The rule for one result; `dtype`: the inputs' dtype (its name or a numpy dtype)."""
  result = np.asarray(result, np.float32)
  reference = np.asarray(reference, np.float32)
  scale = max(1.0, float(np.max(np.abs(np.where(np.isfinite(reference), reference, 0.0)),
                                initial=0.0)))
  dtype = dtype if isinstance(dtype, str) else np.dtype(dtype).name
  bound = factor * max_error(same_precision, reference) + FLOOR[dtype] * scale
  error = max_error(result, reference)
  nan = bool(np.isnan(result).any())
  # An infinite bound means the baseline itself misplaced non-finite entries: no pass.
  return Verdict(ok=not nan and error <= bound < float("inf"), error=error, bound=bound,
                 nan=nan)
