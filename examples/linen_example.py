"""flash_jax in flax.linen: a byte-level causal LM whose layers are one nn.scan'd, nn.remat'd block.

The block uses `flash_jax.flax.linen.FlashAttention` (causal, GQA); `Block` shows
Flax's own attention in its place. Trains on the Python standard library's
source, read at run time (see train_lm.py).

  python examples/linen_example.py --steps 50
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import flash_jax.flax as fjf

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from train_lm import load_corpus, sample_batch  # noqa: E402  (the shared data pipeline)


class Block(nn.Module):
  heads: int
  kv_heads: int

  @nn.compact
  def __call__(self, x, _):  # x [B, T, D]; (carry, per-layer input) for nn.scan
    d = x.shape[-1]
    attention = fjf.linen.FlashAttention(num_heads=self.heads, num_kv_heads=self.kv_heads,
                                         causal=True, dtype=jnp.bfloat16)
    h = nn.RMSNorm(dtype=jnp.bfloat16)(x)
    x = x + attention(h)
    # Flax's stock attention instead (same parameters; causality from a dense mask):
    #   x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, dtype=jnp.bfloat16)(
    #       h, mask=nn.make_causal_mask(jnp.ones(x.shape[:2])))
    h = nn.Dense(4 * d, dtype=jnp.bfloat16)(nn.RMSNorm(dtype=jnp.bfloat16)(x))
    return x + nn.Dense(d, dtype=jnp.bfloat16)(nn.gelu(h)), None


class LanguageModel(nn.Module):
  layers: int
  d_model: int
  heads: int
  kv_heads: int
  seq_len: int

  @nn.compact
  def __call__(self, tokens):  # [B, T] -> logits [B, T, 256] float32
    embed = nn.Embed(256, self.d_model, dtype=jnp.bfloat16)
    x = embed(tokens) + nn.Embed(self.seq_len, self.d_model,
                                 dtype=jnp.bfloat16)(jnp.arange(tokens.shape[1]))[None]
    # One set of block parameters per layer, stacked on axis 0; remat saves memory.
    layers = nn.scan(nn.remat(Block), variable_axes={"params": 0}, split_rngs={"params": True},
                     length=self.layers)
    x, _ = layers(self.heads, self.kv_heads)(x, None)
    return embed.attend(nn.RMSNorm(dtype=jnp.bfloat16)(x)).astype(jnp.float32)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--seq-len", type=int, default=256)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--d-model", type=int, default=128)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--kv-heads", type=int, default=2)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--data-mb", type=float, default=4.0)
  args = p.parse_args(argv)

  corpus = jnp.asarray(load_corpus(int(args.data_mb * 2**20)))
  model = LanguageModel(args.layers, args.d_model, args.heads, args.kv_heads, args.seq_len)
  params = model.init(jax.random.key(0), jnp.zeros((1, args.seq_len), jnp.int32))
  tx = optax.adamw(args.lr)
  opt_state = tx.init(params)

  def loss_fn(params, tokens):  # tokens [B, T + 1]
    logits = model.apply(params, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  @jax.jit
  def train_step(params, opt_state, rng):
    tokens = sample_batch(corpus, rng, args.batch, args.seq_len)
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses, start = [], time.perf_counter()
  for step in range(args.steps):
    params, opt_state, loss = train_step(params, opt_state, jax.random.key(step))
    losses.append(float(loss))
    if step % 10 == 0 or step == args.steps - 1:
      print(f"step {step:4d}  loss {losses[-1]:.4f}", flush=True)
  seconds = time.perf_counter() - start
  result = dict(first_loss=round(losses[0], 4), final_loss=round(losses[-1], 4),
                seconds=round(seconds, 2))
  print("SUMMARY linen " + " ".join(f"{k}={v}" for k, v in result.items()), flush=True)
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
