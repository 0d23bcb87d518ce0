"""What an implementation is: the interface every backend fills in.

An implementation declares where it runs and which calls it serves (`check` raises
`NotImplementedError` naming the missing feature or shape), picks a default config,
and computes (out, lse). Blockwise implementations supply `forward` and `backward`;
`BlockwiseImplementation` wires them into one `jax.custom_vjp` whose residuals are
q, k, v, bias, the mask arrays, out and lse: nothing of size T x S.
"""

from __future__ import annotations

import abc
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp

from flash_jax.config import BlockSizes
from flash_jax.spec import AttentionArrays, AttentionSpec


class Implementation(abc.ABC):
  """One way to compute attention. Subclasses are stateless singletons (hashable)."""

  name: ClassVar[str]
  platforms: ClassVar[tuple[str, ...]]  # jax platform names it runs on natively
  interpretable: ClassVar[bool] = False  # can run on CPU with interpret=True
  config_type: ClassVar[type] = BlockSizes
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

  def __repr__(self):
    return f"<flash_jax implementation {self.name!r}>"


def unsupported(impl_name: str, what: str) -> NotImplementedError:
  return NotImplementedError(f"implementation {impl_name!r} does not support {what}")


class BlockwiseImplementation(Implementation):
  """An implementation with an explicit forward and backward (recompute from lse)."""

  @abc.abstractmethod
  def forward(self, q, k, v, bias, arrays, spec, config, interpret):
    """-> (out [B, T, Nq, Hv], lse [B, Nq, T] float32, -inf on rows that see no key)."""

  @abc.abstractmethod
  def backward(self, q, k, v, bias, arrays, out, lse, dout, delta, spec, config, interpret):
    """-> (dq, dk, dv, dbias or None).

    delta [B, Nq, T] float32 = rowsum(dout * out) - dlse, so that dS = P * (dP - delta)
    also carries the cotangent of the returned lse (d lse / d logits = P).
    """

  def __call__(self, q, k, v, bias, arrays, spec, config, interpret):
    return _blockwise_attention(q, k, v, bias, arrays, self, spec, config, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _blockwise_attention(q, k, v, bias, arrays, impl, spec, config, interpret):
  return impl.forward(q, k, v, bias, arrays, spec, config, interpret)


def _blockwise_attention_fwd(q, k, v, bias, arrays, impl, spec, config, interpret):
  out, lse = impl.forward(q, k, v, bias, arrays, spec, config, interpret)
  return (out, lse), (q, k, v, bias, arrays, out, lse)


def _blockwise_attention_bwd(impl, spec, config, interpret, residuals, cotangents):
  q, k, v, bias, arrays, out, lse = residuals
  dout, dlse = cotangents
  stats = lse.dtype  # float32 (float64 for float64 inputs)
  delta = jnp.einsum("btnh,btnh->bnt", dout.astype(stats), out.astype(stats),
                     precision=spec.precision)
  delta = delta - dlse.astype(stats)
  dq, dk, dv, dbias = impl.backward(q, k, v, bias, arrays, out, lse, dout, delta, spec, config,
                                    interpret)
  return dq, dk, dv, dbias, None  # the mask arrays are not differentiable


_blockwise_attention.defvjp(_blockwise_attention_fwd, _blockwise_attention_bwd)
