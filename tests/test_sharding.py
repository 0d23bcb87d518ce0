"""flash_attention under jit on sharded inputs. Multi-device checks run in a subprocess
with 8 simulated CPU devices (tests/multidevice/check_sharding.py)."""

from __future__ import annotations

import jax

from flash_jax import dispatch, sharding
from multidevice.runner import assert_checks_pass


def test_partitioned_attention_on_8_cpu_devices():
  assert_checks_pass("check_sharding.py")


def test_single_device_process_is_not_wrapped():
  impl = dispatch.get_implementation("chunked")
  if jax.device_count() == 1:
    assert sharding.partitioned(impl) is impl
  assert sharding.partitioned(dispatch.get_implementation("xla")) is dispatch.get_implementation("xla")
