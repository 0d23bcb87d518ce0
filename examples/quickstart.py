"""flash_jax in one page: causal GQA attention, its gradient, and the jax.nn drop-in.

Runs anywhere (CPU by default; on a GPU or TPU the kernels are picked automatically):
    python examples/quickstart.py
"""

import jax
import jax.numpy as jnp

import flash_jax


def main():
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  batch, seq, q_heads, kv_heads, head_dim = 2, 256, 8, 2, 64
  q = jax.random.normal(keys[0], (batch, seq, q_heads, head_dim), jnp.bfloat16)  # [B, T, Nq, H]
  k = jax.random.normal(keys[1], (batch, seq, kv_heads, head_dim), jnp.bfloat16)  # [B, S, Nkv, H]
  v = jax.random.normal(keys[2], (batch, seq, kv_heads, head_dim), jnp.bfloat16)

  # Packed documents: two sequences per row, each attending causally within itself.
  segment_ids = jnp.broadcast_to((jnp.arange(seq) >= seq // 3).astype(jnp.int32), (batch, seq))
  options = dict(causal=True, segment_ids=segment_ids, window=128, softcap=30.0)
  print("devices:", jax.devices())
  print("implementation=None picks:", flash_jax.which_implementation(q, k, v, **options))

  attention = jax.jit(lambda q, k, v: flash_jax.flash_attention(q, k, v, **options))
  out = attention(q, k, v)
  reference = flash_jax.flash_attention(q, k, v, implementation="xla", **options)
  print(f"output {out.shape} {out.dtype}; max |flash - reference| = "
        f"{float(jnp.max(jnp.abs(out.astype(jnp.float32) - reference.astype(jnp.float32)))):.4f}")

  loss = lambda q, k, v: jnp.mean(flash_jax.flash_attention(q, k, v, **options).astype(jnp.float32) ** 2)
  dq, dk, dv = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  print("gradients:", dq.shape, dk.shape, dv.shape, "finite:",
        all(bool(jnp.all(jnp.isfinite(g))) for g in (dq, dk, dv)))

  # The jax.nn drop-in: same signature, same result.
  ours = flash_jax.dot_product_attention(q, k, v, is_causal=True)
  theirs = jax.nn.dot_product_attention(q, k, v, is_causal=True)
  print(f"flash_jax.dot_product_attention vs jax.nn: max diff "
        f"{float(jnp.max(jnp.abs(ours.astype(jnp.float32) - theirs.astype(jnp.float32)))):.4f}")


if __name__ == "__main__":
  main()
