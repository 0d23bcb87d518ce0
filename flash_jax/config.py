"""Block-size configuration shared by every blockwise implementation.

One frozen, hashable dataclass validated in one place. Fields left None are filled by
the implementation's heuristic (`Implementation.default_config`); a backend that needs
more knobs (warps, pipeline stages) subclasses it.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes. Forward: block_q x block_kv. Backward: the dK/dV pass walks query blocks
  of block_q_dkv against a key block of block_kv_dkv; the dQ pass the reverse."""

  block_q: int | None = None
  block_kv: int | None = None
  block_q_dkv: int | None = None
  block_kv_dkv: int | None = None
  block_q_dq: int | None = None
  block_kv_dq: int | None = None
  # Fields of a subclass that are not counts (validated by the subclass itself).
  switches: ClassVar[tuple[str, ...]] = ()

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if value is None or field.name in self.switches:
        continue
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{type(self).__name__}.{field.name} must be a positive int, got {value!r}")

  def block_fields(self) -> dict[str, int | None]:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(BlockSizes)}

  def require_multiple(self, multiple: int, *, names=None) -> None:
    """Raises ValueError naming the first set block size that is not a multiple of `multiple`."""
    for name, value in self.block_fields().items():
      if (names is None or name in names) and value is not None and value % multiple:
        raise ValueError(f"{type(self).__name__}.{name}={value} must be a multiple of {multiple}")

  def fill(self, **defaults) -> "BlockSizes":
    """A copy in which each None field takes the given default."""
    updates = {name: value for name, value in defaults.items() if getattr(self, name) is None}
    return dataclasses.replace(self, **updates)


def next_power_of_two(n: int) -> int:
  return 1 << max(0, (int(n) - 1).bit_length())
