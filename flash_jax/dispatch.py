"""Which implementation serves a call: a registry, in order of preference.

Dispatch is data: each entry names an implementation, the platforms it runs on, and
where it lives. Modules load lazily, so importing flash_jax never imports a GPU- or
TPU-only module. `implementation=None` takes the first entry for the current platform
whose `check` passes; a named implementation that cannot serve a call raises
`NotImplementedError` from its `check`, never falling back silently. Decode-shaped
calls (`split_kv.decode_shaped`) try implementations with split-KV kernels first; an
implementation that knows itself slower for a call (`slower_than_next`) is tried last.
Adding a backend means adding one line here.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging

import jax

from flash_jax import split_kv
from flash_jax.implementation import Implementation
from flash_jax.spec import AttentionSpec

logger = logging.getLogger("flash_jax")


@dataclasses.dataclass(frozen=True)
class RegistryEntry:
  name: str
  platforms: tuple[str, ...]
  target: str  # "module:attribute" of the Implementation instance


REGISTRY: tuple[RegistryEntry, ...] = (
    RegistryEntry("mosaic_gpu", ("gpu",), "flash_jax.kernels.mosaic_gpu:IMPLEMENTATION"),
    RegistryEntry("mosaic_tpu", ("tpu",), "flash_jax.kernels.mosaic_tpu:IMPLEMENTATION"),
    RegistryEntry("triton", ("gpu",), "flash_jax.kernels.triton:IMPLEMENTATION"),
    RegistryEntry("chunked", ("cpu", "gpu", "tpu"), "flash_jax.chunked:IMPLEMENTATION"),
    RegistryEntry("xla", ("cpu", "gpu", "tpu"), "flash_jax.reference:IMPLEMENTATION"),
)


def implementation_names() -> tuple[str, ...]:
  return tuple(entry.name for entry in REGISTRY)


@functools.cache
def get_implementation(name: str) -> Implementation:
  for entry in REGISTRY:
    if entry.name == name:
      module, attribute = entry.target.split(":")
      try:
        return getattr(importlib.import_module(module), attribute)
      except ImportError as e:  # e.g. a Pallas lowering that this JAX no longer ships
        return _Unavailable(entry, f"{type(e).__name__}: {e}")
  raise ValueError(f"implementation must be None or one of {implementation_names()}, got {name!r}")


class _Unavailable(Implementation):
  """A registered backend whose module cannot be imported with the installed JAX: it
  declines every call (NotImplementedError naming the reason), so dispatch moves on."""

  def __init__(self, entry: RegistryEntry, reason: str):
    self.name, self.platforms, self._reason = entry.name, entry.platforms, reason

  def check(self, spec, *, platform, interpret):
    raise NotImplementedError(f"implementation {self.name!r} is unavailable with JAX "
                              f"{jax.__version__}: {self._reason}")

  def __call__(self, *args):
    raise NotImplementedError(self._reason)


def current_platform() -> str:
  return jax.default_backend()


def select(spec: AttentionSpec, implementation: str | None, *, interpret: bool = False,
           platform: str | None = None) -> Implementation:
  """The implementation that serves `spec`: the named one (checked) or the best one."""
  platform = platform or current_platform()
  if implementation is not None:
    impl = get_implementation(implementation)
    impl.check(spec, platform=platform, interpret=interpret)
    return impl
  reasons = []
  candidates = [get_implementation(entry.name) for entry in REGISTRY
                if platform in entry.platforms]
  # Split-KV kernels first for decode-shaped calls, implementations that know themselves
  # slower for this call last, registry order otherwise (a stable sort).
  decode = split_kv.decode_shaped(spec)
  candidates.sort(key=lambda impl: (decode and not impl.split_kv_kernels,
                                    impl.slower_than_next(spec)))
  for impl in candidates:
    try:
      impl.check(spec, platform=platform, interpret=False)
    except NotImplementedError as e:
      reasons.append(str(e))
      continue
    logger.debug("flash_jax: implementation=None picked %r on %s for %s", impl.name, platform, spec)
    return impl
  raise NotImplementedError(f"no implementation serves this call on {platform}: {reasons}")
