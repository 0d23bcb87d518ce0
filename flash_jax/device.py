"""The default device as the kernels' configs see it: one place for device detection.

Everything returns None off a GPU (or when no device can be created), so heuristics can
plan for a stated default in interpret mode on CPU.
"""

from __future__ import annotations

import jax


def default_device():
  try:
    return jax.devices()[0]
  except RuntimeError:
    return None


def compute_capability() -> tuple[int, int] | None:
  """(major, minor) of the default GPU ((9, 0) on Hopper), None off GPU."""
  device = default_device()
  capability = getattr(device, "compute_capability", None)
  if device is None or device.platform != "gpu" or capability is None:
    return None
  major, _, minor = str(capability).partition(".")
  return int(major), int(minor or 0)


def multiprocessor_count() -> int | None:
  """Streaming multiprocessors of the default GPU (132 on an H100/H200 SXM), None off GPU."""
  device = default_device()
  if device is None or device.platform != "gpu":
    return None
  count = getattr(device, "core_count", None)
  return int(count) if count else None


def kind() -> str | None:
  """The default device's kind ('NVIDIA H200', 'TPU v5 lite', 'cpu'), None without one."""
  device = default_device()
  return None if device is None else device.device_kind
