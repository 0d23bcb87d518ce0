"""The Mosaic GPU kernels as lowered for CUDA, location-free: a refactor check without a GPU.

  python benchmarks/mosaic_gpu_lowering.py /tmp/before   # on the old tree
  python benchmarks/mosaic_gpu_lowering.py /tmp/after    # on the new tree
  diff -r /tmp/before /tmp/after                         # empty: the kernels are unchanged

Exports forward and gradients of `flash_attention(implementation="mosaic_gpu")` for a set
of configurations (head dims 64/128/256; causal, window + softcap; offsets, lengths and
segment ids; a bias; a negative scale) and the forward of decode-shaped and paged calls
(the split-KV kernel) with `jax.export` for the cuda platform on any host, decodes each kernel's
serialized Mosaic GPU module and prints it without debug locations (source line numbers
change with any edit), one file per configuration. Identical files mean identical kernels;
the wrapper program (padding, reshapes) is compared with locations stripped too.
"""

from __future__ import annotations

import os
import re
import sys

import jax
import jax.numpy as jnp
from jax._src.interpreters import mlir as jax_mlir
from jax._src.lib.mlir import ir

import flash_jax
from flash_jax.kernels.mosaic_gpu import compat
from flash_jax.kernels.mosaic_gpu.implementation import MosaicGPUImplementation

B, T, S = 2, 200, 333


def _ids(n, seed):
  return jnp.cumsum(jax.random.bernoulli(jax.random.PRNGKey(seed), 0.05, (B, n)), axis=1)


CONFIGS = {  # name -> (head_dim, flash_attention keyword arguments)
    "plain128": (128, {}),
    "causal64": (64, dict(causal=True)),
    "window128": (128, dict(window=(50, 20), softcap=20.0)),
    "causal256": (256, dict(causal=True)),
    "features128": (128, dict(causal=True, q_offset=jnp.array([3, 130]),
                              q_lengths=jnp.array([150, 200]), kv_lengths=jnp.array([333, 100]),
                              segment_ids=(_ids(T, 1), _ids(S, 2)))),
    "features64": (64, dict(window=(40, 0), segment_ids=(_ids(T, 3), _ids(S, 4)),
                            kv_lengths=jnp.array([300, 20]))),
    "bias128": (128, dict(causal=True, bias=jax.random.normal(jax.random.PRNGKey(5),
                                                              (1, 4, T, S)))),
    "scale64": (64, dict(scale=-0.1, kv_lengths=jnp.array([333, 100]))),
}
# Decode-shaped calls (T new tokens; the split-KV kernel, forward only): name ->
# (head dim, T, flash_attention keyword arguments; page_size: paged_attention instead).
DECODE_LENGTHS = jnp.array([333, 17])
DECODE_CONFIGS = {
    "decode128": (128, 1, dict(causal=True, kv_lengths=DECODE_LENGTHS,
                               q_offset=DECODE_LENGTHS - 1)),
    "decode64_window": (64, 7, dict(causal=True, window=(100, 0), softcap=30.0,
                                    kv_lengths=DECODE_LENGTHS, q_offset=DECODE_LENGTHS - 7)),
    "paged256": (256, 2, dict(page_size=64)),
    "paged128_small_pages": (128, 1, dict(page_size=16)),
}


def _unescape(text: str) -> bytes:
  """An MLIR string attribute's escaped bytes (\\XX hex, \\\\, \\") -> bytes."""
  out, i = bytearray(), 0
  while i < len(text):
    if text[i] != "\\":
      out += text[i].encode("latin-1")
      i += 1
    elif text[i + 1] in "\\\"":
      out.append(ord(text[i + 1]))
      i += 2
    else:
      out.append(int(text[i + 1:i + 3], 16))
      i += 3
  return bytes(out)


def location_free(exported_text: str) -> str:
  """The wrapper program and every kernel module, without debug locations."""
  modules = re.findall(r'module = "((?:[^"\\]|\\.)*)"', exported_text)
  wrapper = re.sub(r' loc\([^)]*\)|^#loc.*$|module = "(?:[^"\\]|\\.)*"|kernel_hash = "(?:[^"\\]|\\.)*"',
                   "", exported_text, flags=re.M)
  context = jax_mlir.make_ir_context()
  context.allow_unregistered_dialects = True
  try:  # newer JAX serializes types of the Mosaic GPU dialect (barriers) into the modules
    from jax._src.lib import mosaic_gpu_dialect  # pylint: disable=import-outside-toplevel
    mosaic_gpu_dialect.register_dialect(context)
  except (ImportError, AttributeError):
    pass
  with context:
    kernels = [ir.Module.parse(_unescape(m)).operation.get_asm(enable_debug_info=False)
               for m in modules]
  return "\n\n".join([wrapper] + kernels)


def main(out_dir: str) -> None:
  compat.is_hopper = lambda: True  # lowering only: no GPU is asked for
  MosaicGPUImplementation.platforms = ("gpu", jax.default_backend())
  os.makedirs(out_dir, exist_ok=True)
  for name, (head_dim, kwargs) in CONFIGS.items():
    q = jax.ShapeDtypeStruct((B, T, 4, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((B, S, 2, head_dim), jnp.bfloat16)
    attend = lambda q, k, v: flash_jax.flash_attention(q, k, v, implementation="mosaic_gpu",
                                                       **kwargs)
    grads = jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32)),
                     argnums=(0, 1, 2))
    for tag, fn in (("fwd", attend), ("grad", grads)):
      text = jax.export.export(jax.jit(fn), platforms=["cuda"])(q, kv, kv).mlir_module()
      with open(os.path.join(out_dir, f"{name}_{tag}.mlir.txt"), "w") as f:
        f.write(location_free(text))
  for name, (head_dim, q_len, kwargs) in DECODE_CONFIGS.items():
    q = jax.ShapeDtypeStruct((B, q_len, 8, head_dim), jnp.bfloat16)
    kwargs = dict(kwargs)
    page_size = kwargs.pop("page_size", None)
    if page_size is None:
      kv = jax.ShapeDtypeStruct((B, S + 3, 2, head_dim), jnp.bfloat16)  # S + 3: a multiple of 8
      attend = lambda q, k, v, kwargs=kwargs: flash_jax.flash_attention(
          q, k, v, implementation="mosaic_gpu", **kwargs)
    else:
      pages = -(-S // page_size)
      kv = jax.ShapeDtypeStruct((B * pages, page_size, 2, head_dim), jnp.bfloat16)
      tables = jnp.arange(B * pages, dtype=jnp.int32).reshape(B, pages)
      attend = lambda q, k, v, tables=tables: flash_jax.paged_attention(
          q, k, v, tables, DECODE_LENGTHS, implementation="mosaic_gpu", **kwargs)
    text = jax.export.export(jax.jit(attend), platforms=["cuda"])(q, kv, kv).mlir_module()
    with open(os.path.join(out_dir, f"{name}_fwd.mlir.txt"), "w") as f:
      f.write(location_free(text))
  print(f"wrote {2 * len(CONFIGS) + len(DECODE_CONFIGS)} files to {out_dir}")


if __name__ == "__main__":
  main(sys.argv[1])
