"""What an implementation is: the interface every backend fills in.

An implementation declares where it runs and which calls it serves (`check` raises
`NotImplementedError` naming the missing feature or shape), picks a default config,
and computes (out, lse). Blockwise implementations supply `forward` and `backward`;
`BlockwiseImplementation` wires them into one `jax.custom_vjp` whose residuals are
q, k, v, bias, the mask arrays, out, lse and optional per-row statistics: nothing of
size T x S.

Per-row statistics: lse = m + log(l) rounds log(l) away when the row max m is huge
(a bias of -1e9 on a whole row), so recomputing P = exp(s - lse) in the backward would
be wrong by a factor l. An implementation that returns its (m, log l) from
`forward_with_stats` gets them back in `backward(..., stats=...)` and recomputes
P = exp((s - m) - log l), exactly as its forward did.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from typing import Any, ClassVar

import jax
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero
import jax.numpy as jnp

from flash_jax.config import BlockSizes
from flash_jax.spec import AttentionArrays, AttentionSpec


class Implementation(abc.ABC):
  """One way to compute attention. Subclasses are stateless singletons (hashable)."""

  name: ClassVar[str]
  platforms: ClassVar[tuple[str, ...]]  # jax platform names it runs on natively
  interpretable: ClassVar[bool] = False  # can run on CPU with interpret=True
  config_type: ClassVar[type] = BlockSizes
  # Has split-KV kernels for decode-shaped calls (`split_kv.decode_shaped`): dispatch
  # prefers it for them over implementations listed earlier.
  split_kv_kernels: ClassVar[bool] = False
  # True: __call__ takes `sinks=` and folds them into its softmax itself; otherwise
  # flash_attention merges them into (out, lse) afterwards (flash_jax.sinks).
  folds_sinks: ClassVar[bool] = False
  dtypes: ClassVar[tuple[str, ...]] = ("bfloat16", "float16", "float32")  # input dtypes served

  def check(self, spec: AttentionSpec, *, platform: str, interpret: bool) -> None:
    """Raises NotImplementedError when this implementation cannot serve the call."""
    if interpret and not self.interpretable:
      raise NotImplementedError(f"implementation {self.name!r} has no interpret mode")
    if not interpret and platform not in self.platforms:
      hint = "; pass interpret=True to run its kernels on CPU" if self.interpretable else ""
      raise NotImplementedError(
          f"implementation {self.name!r} runs on {'/'.join(self.platforms)}, not {platform!r}{hint}")
    if spec.dtype not in self.dtypes:
      raise unsupported(self.name, f"dtype {spec.dtype} (it serves {', '.join(self.dtypes)})")
    self.check_spec(spec)

  def check_spec(self, spec: AttentionSpec) -> None:
    """Feature and shape support; the default serves every call."""

  def slower_than_next(self, spec: AttentionSpec) -> bool:
    """True for calls this implementation serves but measurably slower than those listed
    after it (e.g. through padding): dispatch with implementation=None tries it last."""
    del spec
    return False

  def check_config(self, config) -> None:
    if not isinstance(config, self.config_type):
      raise TypeError(f"block_sizes for {self.name!r} must be a {self.config_type.__name__}, "
                      f"got {type(config).__name__}")

  def default_config(self, spec: AttentionSpec):
    return self.config_type()

  @abc.abstractmethod
  def __call__(self, q, k, v, bias, arrays: AttentionArrays, spec: AttentionSpec, config,
               interpret: bool):
    """-> (out [B, T, Nq, Hv] in q.dtype, lse [B, Nq, T] float32). Differentiable."""

  def forward_only(self, q, k, v, bias, arrays, spec, config, interpret):
    """(out, lse) for a call that is never differentiated (paged K/V)."""
    return self(q, k, v, bias, arrays, spec, config, interpret)

  def __repr__(self):
    return f"<flash_jax implementation {self.name!r}>"


def unsupported(impl_name: str, what: str) -> NotImplementedError:
  return NotImplementedError(f"implementation {impl_name!r} does not support {what}")


class BlockwiseImplementation(Implementation):
  """An implementation with an explicit forward and backward (recompute from lse)."""

  # False where the backward cannot itself be differentiated (Pallas kernels have no
  # JVP): a second-order derivative then raises a NotImplementedError naming it.
  differentiable_backward: ClassVar[bool] = True

  @abc.abstractmethod
  def forward(self, q, k, v, bias, arrays, spec, config, interpret):
    """-> (out [B, T, Nq, Hv], lse [B, Nq, T] float32, -inf on rows that see no key)."""

  def forward_with_stats(self, q, k, v, bias, arrays, spec, config, interpret):
    """-> (out, lse, stats): stats are the per-row statistics `backward` takes back
    (see the module docstring), or None when it recomputes from lse alone."""
    out, lse = self.forward(q, k, v, bias, arrays, spec, config, interpret)
    return out, lse, None

  @abc.abstractmethod
  def backward(self, q, k, v, bias, arrays, out, lse, dout, delta, spec, config, interpret):
    """-> (dq, dk, dv, dbias or None).

    delta [B, Nq, T] float32 = rowsum(dout * out) - dlse, so that dS = P * (dP - delta)
    also carries the cotangent of the returned lse (d lse / d logits = P). Called with
    a keyword `stats=` when `forward_with_stats` returned some.
    """

  def __call__(self, q, k, v, bias, arrays, spec, config, interpret):
    return _blockwise_attention(q, k, v, bias, arrays, self, spec, config, interpret)

  def forward_only(self, q, k, v, bias, arrays, spec, config, interpret):
    return self.forward(q, k, v, bias, arrays, spec, config, interpret)


def second_order_error(name: str) -> NotImplementedError:
  from flash_jax import dispatch  # the registry imports this module

  def differentiable(other: str) -> bool:
    try:
      return getattr(dispatch.get_implementation(other), "differentiable_backward", True)
    except ImportError:  # a backend this JAX cannot import
      return False

  serving = [n for n in dispatch.implementation_names() if differentiable(n)]
  return NotImplementedError(
      f"implementation {name!r} has no second-order derivative (its backward kernels "
      f"cannot be differentiated: grad of grad, Hessian-vector products); use one of "
      f"{serving} for higher-order derivatives")


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _blockwise_attention(q, k, v, bias, arrays, impl, spec, config, interpret):
  return impl.forward(q, k, v, bias, arrays, spec, config, interpret)


def _blockwise_attention_fwd(q, k, v, bias, arrays, impl, spec, config, interpret):
  # symbolic_zeros: the primals come wrapped, saying which ones a gradient flows to.
  bias_grad = bias is not None and bias.perturbed
  q, k, v, bias, arrays = jax.tree.map(lambda p: p.value, (q, k, v, bias, arrays),
                                       is_leaf=lambda x: isinstance(x, CustomVJPPrimal))

  def forward(q, k, v, bias, arrays):
    return impl.forward_with_stats(q, k, v, bias, arrays, spec, config, interpret)

  if not impl.differentiable_backward:  # a JVP of this pass is a second-order derivative
    forward = _first_order_only(forward, impl.name)
  out, lse, stats = forward(q, k, v, bias, arrays)
  return (out, lse), (q, k, v, _Bias(bias, bias_grad), arrays, out, lse, stats)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["value"],
                   meta_fields=["grad"])
@dataclasses.dataclass(frozen=True)
class _Bias:
  """The bias as a residual, and (static) whether its gradient is wanted: a constant
  bias (ALiBi, a fixed bias) skips d bias, a float32 [B, Nq, T, S] write."""
  value: Any
  grad: bool


def _blockwise_attention_bwd(impl, spec, config, interpret, residuals, cotangents):
  q, k, v, bias, arrays, out, lse, stats = residuals
  if bias.value is not None and not bias.grad:
    spec = dataclasses.replace(spec, bias_grad=False)
  bias = bias.value
  dout, dlse = (jnp.zeros(c.shape, c.dtype) if isinstance(c, SymbolicZero) else c
                for c in cotangents)
  stats_dtype = lse.dtype  # float32 (float64 for float64 inputs)
  delta = jnp.einsum("btnh,btnh->bnt", dout.astype(stats_dtype), out.astype(stats_dtype),
                     precision=spec.precision)
  delta = delta - dlse.astype(stats_dtype)

  def backward(q, k, v, bias, arrays, out, lse, stats, dout, delta):
    kwargs = {} if stats is None else {"stats": stats}
    return tuple(impl.backward(q, k, v, bias, arrays, out, lse, dout, delta, spec, config,
                               interpret, **kwargs))

  if not impl.differentiable_backward:
    backward = _first_order_only(backward, impl.name)
  dq, dk, dv, dbias = backward(q, k, v, bias, arrays, out, lse, stats, dout, delta)
  return dq, dk, dv, dbias, None  # the mask arrays are not differentiable


def _first_order_only(fn, name: str):
  """`fn`, whose differentiation raises `second_order_error(name)` instead of failing
  deep inside Pallas (a bare AssertionError, or an empty NotImplementedError)."""
  @jax.custom_jvp
  def wrapped(*args):
    return fn(*args)

  @wrapped.defjvp
  def _jvp(primals, tangents):
    del primals, tangents
    raise second_order_error(name)

  return wrapped


_blockwise_attention.defvjp(_blockwise_attention_fwd, _blockwise_attention_bwd,
                            symbolic_zeros=True)
