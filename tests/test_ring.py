"""Ring attention. Multi-device checks run in a subprocess with 8 simulated CPU devices
(tests/multidevice/check_ring.py); the layout helpers are checked here on one device."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import flash_jax
from flash_jax import ring_layout
from multidevice.runner import assert_checks_pass


def test_ring_attention_on_8_cpu_devices():
  assert_checks_pass("check_ring.py")


@pytest.mark.parametrize("layout", ring_layout.LAYOUTS)
@pytest.mark.parametrize("devices", [1, 2, 4])
def test_layout_round_trip_and_pieces(layout, devices):
  total = 48
  x = jnp.arange(2 * total * 3).reshape(2, total, 3)
  permuted = flash_jax.to_ring_layout(x, devices, layout)
  np.testing.assert_array_equal(flash_jax.from_ring_layout(permuted, devices, layout), x)
  positions = ring_layout.ring_positions(total, devices, layout)
  np.testing.assert_array_equal(permuted[0, :, 0] // 3, positions)
  assert sorted(positions) == list(range(total))
  local = total // devices
  for shard in range(devices):  # each device's pieces name the positions it holds
    held = np.concatenate([p.global_start + p.stride * np.arange(p.length)
                           for p in ring_layout.pieces(layout, shard, devices, local)])
    np.testing.assert_array_equal(held, positions[shard * local:(shard + 1) * local])


def test_layout_errors():
  with pytest.raises(ValueError, match="layout"):
    flash_jax.to_ring_layout(jnp.ones((1, 8)), 2, "spiral")
  with pytest.raises(ValueError, match="multiple"):
    flash_jax.to_ring_layout(jnp.ones((1, 9)), 2, "contiguous")
  with pytest.raises(ValueError, match="even"):
    flash_jax.to_ring_layout(jnp.ones((1, 6)), 2, "zigzag")


def test_ring_attention_outside_shard_map_explains():
  q = jnp.ones((1, 8, 2, 16))
  with pytest.raises(ValueError, match="shard_map"):
    flash_jax.ring_attention(q, q, q, axis_name="sp")
