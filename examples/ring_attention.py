"""Ring attention: one long sequence split over all local devices.

Each device holds T / n positions of q, k and v; K/V blocks travel around the ring while
every device attends its queries to the block at hand (flash_jax.ring_attention). The
causal, load-balanced "zigzag" layout gives every device the same work per step.

On CPU, simulate devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/ring_attention.py
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/ring_attention.py --memory

On GPUs it uses every local GPU.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import flash_jax


def ring_step(mesh: Mesh, layout: str):
  """Loss and gradients of causal ring attention over the mesh axis "seq" (global arrays)."""
  def loss(q, k, v):
    out = flash_jax.sharded_ring_attention(q, k, v, mesh=mesh, seq_axis="seq", causal=True,
                                           layout=layout)
    return jnp.mean(out.astype(jnp.float32) ** 2), out
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def run(seq_len: int, heads: int, head_dim: int, layout: str, dtype) -> None:
  devices = jax.local_devices()
  n = len(devices)
  mesh = Mesh(np.array(devices), ("seq",))
  print(f"{n} {devices[0].platform} device(s); T={seq_len} split into {n} shards of "
        f"{seq_len // n}, layout={layout!r}")

  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  shape = (1, seq_len, heads, head_dim)  # [B, T, N, H]
  q, k, v = (jax.random.normal(key, shape, dtype) for key in keys)

  # Permute the sequence into the layout, then split it evenly over the devices.
  on_ring = NamedSharding(mesh, P(None, "seq"))
  to_ring = lambda x: jax.device_put(flash_jax.to_ring_layout(x, n, layout), on_ring)
  (loss, ring_out), grads = ring_step(mesh, layout)(to_ring(q), to_ring(k), to_ring(v))
  print(f"loss {float(loss):.6f}; out and dq stay split: {ring_out.sharding.spec}, "
        f"{grads[0].sharding.spec}")
  out = flash_jax.from_ring_layout(ring_out, n, layout)
  dq = flash_jax.from_ring_layout(grads[0], n, layout)

  # The same attention on one device, to compare.
  def single(q, k, v):
    out = flash_jax.flash_attention(q, k, v, causal=True)
    return jnp.mean(out.astype(jnp.float32) ** 2), out
  (_, want), want_grads = jax.jit(jax.value_and_grad(single, argnums=(0, 1, 2),
                                                     has_aux=True))(q, k, v)
  error = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
                             / jnp.max(jnp.abs(b.astype(jnp.float32))))
  print(f"max |ring - single device| / max |single device|: out {error(out, want):.1e}, "
        f"dq {error(dq, want_grads[0]):.1e}")


def bytes_per_device(devices: int, seq_len: int, heads: int, head_dim: int, layout: str,
                     dtype) -> int:
  """Compiled per-device memory (arguments + outputs + temporaries) of forward+backward."""
  mesh = Mesh(np.array(jax.local_devices()[:devices]), ("seq",))
  shape = jax.ShapeDtypeStruct((1, seq_len, heads, head_dim), dtype,
                               sharding=NamedSharding(mesh, P(None, "seq")))
  stats = ring_step(mesh, layout).lower(shape, shape, shape).compile().memory_analysis()
  return (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
          - stats.alias_size_in_bytes)


def memory_table(seq_len: int, heads: int, head_dim: int, layout: str, dtype) -> None:
  counts = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= len(jax.local_devices())]
  print(f"ring attention forward+backward, T={seq_len}, N={heads}, H={head_dim}, "
        f"{jnp.dtype(dtype).name}, layout={layout!r}: memory per device")
  print("| devices | MiB per device |")
  print("|---|---|")
  for n in counts:
    size = bytes_per_device(n, seq_len, heads, head_dim, layout, dtype)
    print(f"| {n} | {size / 2**20:.2f} |")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seq-len", type=int, default=4096)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--head-dim", type=int, default=64)
  parser.add_argument("--layout", default="zigzag", choices=flash_jax.ring_layout.LAYOUTS)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--memory", action="store_true",
                      help="print per-device memory for 1, 2, 4, ... devices instead")
  args = parser.parse_args()
  run_fn = memory_table if args.memory else run
  run_fn(args.seq_len, args.heads, args.head_dim, args.layout, jnp.dtype(args.dtype))


if __name__ == "__main__":
  main()
