"""The JAX releases flash_jax supports, and the error a kernel raises outside them.

Pallas changes between JAX releases. A kernel that fails to build under the installed
JAX must say so, naming the JAX version and the backend, instead of surfacing as a
KeyError or AttributeError from deep inside Pallas.
"""

from __future__ import annotations

import functools

import jax

OLDEST_JAX = "0.10.2"
NEWEST_TESTED_JAX = "0.12.0.1"
# Exceptions that a Pallas API drift raises while a kernel is traced and lowered; our own
# errors about arguments (ValueError) and unsupported calls (NotImplementedError) pass.
_DRIFT_ERRORS = (KeyError, AttributeError, TypeError, ImportError, IndexError)


class UnsupportedJaxError(RuntimeError):
  """A backend's kernels cannot be built with the installed JAX."""


def unsupported_jax(backend: str, reason: str) -> UnsupportedJaxError:
  return UnsupportedJaxError(
      f"the {backend!r} kernels failed to build with JAX {jax.__version__} (flash_jax is "
      f"tested with JAX {OLDEST_JAX} to {NEWEST_TESTED_JAX}; outside that range a changed "
      f"Pallas API is the likely cause): {reason}. implementation='chunked' (or another "
      f"backend) serves the call meanwhile.")


def names_jax_version(method):
  """Decorates an implementation's kernel-building method (forward, backward): an error
  typical of a Pallas API change becomes an UnsupportedJaxError naming JAX's version."""
  @functools.wraps(method)
  def wrapper(self, *args, **kwargs):
    try:
      return method(self, *args, **kwargs)
    except _DRIFT_ERRORS as e:
      raise unsupported_jax(self.name, f"{type(e).__name__}: {e}") from e
  return wrapper
