"""Train a small decoder-only byte-level language model with flash attention (flax.nnx + optax).

The corpus is the Python standard library's own source files (*.py under
sysconfig's "stdlib" path), read at run time, so every machine has it and nothing is
copied into this repository. Bytes are tokens (vocabulary 256).

--attention picks the attention of every layer; the parameters are the same in all three
(FlashAttention's tree is nnx.MultiHeadAttention's), so one --seed gives one model:
  flash     flash_jax.flax.nnx.FlashAttention(causal=True): structured causal mask, GQA
  flash_fn  nnx.MultiHeadAttention(attention_fn=flash_jax.flax.make_attention_fn(causal=True)):
            the one-line change to an existing Flax model
  flax      nnx.MultiHeadAttention with Flax's stock attention (is_causal / causal mask)

It ends with one line to compare runs, e.g.
  SUMMARY attention=flash implementation=triton ... step_ms=123.4 tokens_per_s=265000 ...

  python examples/train_lm.py --steps 3 --seq-len 64 --batch 2 --layers 1 --d-model 32  # CPU smoke
  python examples/train_lm.py --attention flash --seq-len 4096 --batch 8 --layers 8 \\
      --d-model 1024 --heads 8 --kv-heads 8 --steps 30                                  # GPU
  (the same with --attention flax for Flax's stock attention)
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import pathlib
import sys
import sysconfig
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import flash_jax
import flash_jax.flax as fjf

ATTENTIONS = ("flash", "flash_fn", "flax")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  seq_len: int
  d_model: int
  layers: int
  heads: int
  kv_heads: int
  mlp_ratio: int
  attention: str  # one of ATTENTIONS
  dtype: str  # computation dtype; parameters are float32
  implementation: str | None  # flash_jax implementation (None: the fastest that serves)
  remat: bool
  vocab: int = 256

  @property
  def head_dim(self) -> int:
    return self.d_model // self.heads


# ---- data: the standard library's source, as bytes ---------------------------------------

def load_corpus(max_bytes: int) -> np.ndarray:
  """Up to `max_bytes` bytes of the standard library's *.py files, in sorted path order."""
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  chunks, total = [], 0
  for path in sorted(stdlib.rglob("*.py")):
    if {"site-packages", "dist-packages"} & set(path.parts):
      continue  # third-party packages, not the standard library
    try:
      data = path.read_bytes()
    except OSError:
      continue
    chunks.append(data)
    total += len(data)
    if total >= max_bytes:
      break
  if total == 0:
    raise RuntimeError(f"no Python sources found under {stdlib}; this interpreter ships none")
  return np.frombuffer(b"".join(chunks)[:max_bytes], np.uint8)


def sample_batch(corpus, rng, batch: int, seq_len: int):
  """[batch, seq_len + 1] int32 windows at random offsets of `corpus` (on device)."""
  starts = jax.random.randint(rng, (batch,), 0, corpus.shape[0] - seq_len - 1)
  take = lambda start: jax.lax.dynamic_slice_in_dim(corpus, start, seq_len + 1)
  return jax.vmap(take)(starts).astype(jnp.int32)


# ---- model --------------------------------------------------------------------------------

def _flax_mha_supports(argument: str, method=None) -> bool:
  return argument in inspect.signature(method or nnx.MultiHeadAttention.__init__).parameters


class CausalSelfAttention(nnx.Module):
  """Causal self-attention through the attention the config names."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    self.kind = config.attention
    dtype = jnp.dtype(config.dtype)
    kv = {} if config.kv_heads == config.heads else {"num_kv_heads": config.kv_heads}
    if kv and not _flax_mha_supports("num_kv_heads") and config.attention != "flash":
      raise ValueError("this Flax's nnx.MultiHeadAttention has no num_kv_heads: use --kv-heads "
                       f"{config.heads} or --attention flash")
    if config.attention == "flash":
      self.attention = fjf.nnx.FlashAttention(
          config.heads, config.d_model, causal=True, dtype=dtype,
          implementation=config.implementation, rngs=rngs, **kv)
    else:
      extra = {}
      if config.attention == "flash_fn":
        extra["attention_fn"] = fjf.make_attention_fn(causal=True,
                                                      implementation=config.implementation)
      self.attention = nnx.MultiHeadAttention(config.heads, config.d_model, dtype=dtype,
                                              decode=False, rngs=rngs, **kv, **extra)
    self.use_is_causal = _flax_mha_supports("is_causal", nnx.MultiHeadAttention.__call__)

  def __call__(self, x):  # [B, T, D]
    if self.kind != "flax":
      return self.attention(x)  # causal is built into the attention
    if self.use_is_causal:
      return self.attention(x, is_causal=True)
    return self.attention(x, mask=nnx.make_causal_mask(jnp.ones(x.shape[:2])))


class Block(nnx.Module):
  """Pre-norm transformer block: x + attention(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    dtype, d = jnp.dtype(config.dtype), config.d_model
    self.attention_norm = nnx.RMSNorm(d, dtype=dtype, rngs=rngs)
    self.attention = CausalSelfAttention(config, rngs)
    self.mlp_norm = nnx.RMSNorm(d, dtype=dtype, rngs=rngs)
    self.mlp_in = nnx.Linear(d, config.mlp_ratio * d, dtype=dtype, rngs=rngs)
    self.mlp_out = nnx.Linear(config.mlp_ratio * d, d, dtype=dtype, rngs=rngs)

  def __call__(self, x):  # [B, T, D]
    x = x + self.attention(self.attention_norm(x))
    return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x))))


class LanguageModel(nnx.Module):
  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    dtype = jnp.dtype(config.dtype)
    self.config = config
    self.token_embed = nnx.Embed(config.vocab, config.d_model, dtype=dtype, rngs=rngs)
    self.position_embed = nnx.Embed(config.seq_len, config.d_model, dtype=dtype, rngs=rngs)
    self.blocks = nnx.List([Block(config, rngs) for _ in range(config.layers)]) if hasattr(
        nnx, "List") else [Block(config, rngs) for _ in range(config.layers)]
    self.final_norm = nnx.RMSNorm(config.d_model, dtype=dtype, rngs=rngs)

  def __call__(self, tokens):  # [B, T] int32 -> logits [B, T, vocab] float32
    x = self.token_embed(tokens) + self.position_embed(jnp.arange(tokens.shape[1]))[None]
    for block in self.blocks:
      x = nnx.remat(lambda b, x: b(x))(block, x) if self.config.remat else block(x)
    return self.token_embed.attend(self.final_norm(x)).astype(jnp.float32)  # tied embedding


# ---- training -----------------------------------------------------------------------------

def make_train_functions(model, tx, batch: int, seq_len: int):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(params, tokens):  # tokens [B, T + 1]
    logits = nnx.merge(graphdef, params, rest)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  @jax.jit
  def train_step(params, opt_state, corpus, rng):
    tokens = sample_batch(corpus, rng, batch, seq_len)
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def eval_loss(params, corpus, rng):
    return loss_fn(params, sample_batch(corpus, rng, batch, seq_len))

  return params, train_step, eval_loss, loss_fn


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--attention", choices=ATTENTIONS, default="flash")
  p.add_argument("--implementation", default=None,
                 help=f"flash_jax implementation, one of {flash_jax.implementation_names()} "
                      "(default: the fastest that serves the call)")
  p.add_argument("--seq-len", type=int, default=512)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=100)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--d-model", type=int, default=256)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--kv-heads", type=int, default=None, help="default: --heads (GQA when fewer)")
  p.add_argument("--mlp-ratio", type=int, default=4)
  p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
  p.add_argument("--remat", action="store_true", help="rematerialize each block (nnx.remat)")
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--warmup-steps", type=int, default=2,
                 help="steps left out of the timing (compilation happens in the first)")
  p.add_argument("--log-every", type=int, default=10)
  p.add_argument("--eval-batches", type=int, default=4)
  p.add_argument("--data-mb", type=float, default=16.0, help="megabytes of stdlib source to read")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--save", default=None,
                 help="directory to write the trained parameters to (read by generate.py)")
  args = p.parse_args(argv)
  args.kv_heads = args.kv_heads or args.heads
  if args.d_model % args.heads or args.heads % args.kv_heads:
    p.error(f"--d-model ({args.d_model}) must be a multiple of --heads ({args.heads}), "
            f"and --heads of --kv-heads ({args.kv_heads})")
  if args.steps <= args.warmup_steps:
    p.error(f"--steps ({args.steps}) must exceed --warmup-steps ({args.warmup_steps})")
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  config = ModelConfig(seq_len=args.seq_len, d_model=args.d_model, layers=args.layers,
                       heads=args.heads, kv_heads=args.kv_heads, mlp_ratio=args.mlp_ratio,
                       attention=args.attention, dtype=args.dtype,
                       implementation=args.implementation, remat=args.remat)
  corpus_np = load_corpus(int(args.data_mb * 2**20))
  split = int(0.95 * len(corpus_np))  # the last 5% is held out for the final eval loss
  if split < 2 * (args.seq_len + 1) or len(corpus_np) - split < args.seq_len + 2:
    raise SystemExit(f"--data-mb {args.data_mb} is too small for --seq-len {args.seq_len}")
  train_corpus, eval_corpus = jnp.asarray(corpus_np[:split]), jnp.asarray(corpus_np[split:])

  model = LanguageModel(config, nnx.Rngs(args.seed))
  schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(1, args.steps // 10), args.steps)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.1))
  params, train_step, eval_loss, _ = make_train_functions(model, tx, args.batch, args.seq_len)
  opt_state = tx.init(params)
  num_params = sum(x.size for x in jax.tree.leaves(params))

  implementation = "flax"
  if args.attention != "flax":
    probe = jnp.zeros((args.batch, args.seq_len, args.heads, config.head_dim), args.dtype)
    probe_kv = probe[:, :, :args.kv_heads]
    implementation = flash_jax.which_implementation(
        probe, probe_kv, probe_kv, causal=True, implementation=args.implementation)
  print(f"device={jax.devices()[0].device_kind} attention={args.attention} "
        f"implementation={implementation} params={num_params / 1e6:.2f}M "
        f"corpus={len(corpus_np) / 2**20:.1f}MiB of {sysconfig.get_paths()['stdlib']}", flush=True)

  rng = jax.random.key(args.seed)
  losses, timed_start = [], None
  for step in range(args.steps):
    if step == args.warmup_steps:
      jax.block_until_ready(params)
      timed_start = time.perf_counter()
    params, opt_state, loss = train_step(params, opt_state, train_corpus,
                                         jax.random.fold_in(rng, step))
    losses.append(loss)
    if step % args.log_every == 0 or step == args.steps - 1:
      print(f"step {step:5d}  loss {float(loss):.4f}", flush=True)
  jax.block_until_ready(params)
  step_time = (time.perf_counter() - timed_start) / (args.steps - args.warmup_steps)
  tokens_per_s = args.batch * args.seq_len / step_time

  eval_rng = jax.random.key(args.seed + 1)
  held_out = float(np.mean([eval_loss(params, eval_corpus, jax.random.fold_in(eval_rng, i))
                            for i in range(args.eval_batches)]))
  losses = [float(x) for x in losses]
  result = dict(attention=args.attention, implementation=implementation, seq_len=args.seq_len,
                batch=args.batch, layers=args.layers, d_model=args.d_model, heads=args.heads,
                kv_heads=args.kv_heads, dtype=args.dtype, params_m=round(num_params / 1e6, 2),
                step_ms=round(step_time * 1e3, 2), tokens_per_s=round(tokens_per_s),
                first_loss=round(losses[0], 4), final_loss=round(losses[-1], 4),
                eval_loss=round(held_out, 4))
  if args.save:
    save_checkpoint(args.save, config, params)
  print("SUMMARY " + " ".join(f"{k}={v}" for k, v in result.items()), flush=True)
  return result


def save_checkpoint(directory: str, config: ModelConfig, params) -> None:
  """params.msgpack (the nnx.Param state as a pure dict) and config.json (the shape)."""
  from flax import serialization
  path = pathlib.Path(directory)
  path.mkdir(parents=True, exist_ok=True)
  (path / "params.msgpack").write_bytes(
      serialization.msgpack_serialize(jax.device_get(nnx.to_pure_dict(params))))
  shape = {k: getattr(config, k) for k in ("seq_len", "d_model", "layers", "heads", "kv_heads",
                                           "mlp_ratio")}
  (path / "config.json").write_text(json.dumps(shape))


if __name__ == "__main__":
  main(sys.argv[1:])
