"""A pytest plugin that substitutes flash_jax for jax.nn / Flax attention in outside suites.

Loaded by run_outside_suites.py (`pytest -p flash_jax_substitution`); the environment
variable FLASH_JAX_SUBSTITUTE picks what is replaced:

  jax         every `jax.nn.dot_product_attention` call runs
              `flash_jax.dot_product_attention` (implementation "xla" -> flash_jax's xla,
              None -> flash_jax's default, "cudnn" -> jax.nn's cuDNN path, as ours does);
  jax-answer  only calls naming an implementation run flash_jax's; implementation=None
              stays jax.nn's own XLA path, so a test's reference is JAX itself;
  flax        `flax.nnx.dot_product_attention`, `flax.linen.dot_product_attention` and
              the default `attention_fn` of Flax's attention modules become
              `flash_jax.flax.dot_product_attention` (jax.nn stays JAX's).
"""

from __future__ import annotations

import functools
import os

import jax

import flash_jax

_ORIGINAL_JAX_NN = jax.nn.dot_product_attention


def _jax_answer(*args, implementation=None, **kwargs):
  if implementation is None:
    return _ORIGINAL_JAX_NN(*args, **kwargs)
  return flash_jax.dot_product_attention(*args, implementation=implementation, **kwargs)


def _replace_default(cls, old, new) -> int:
  """Replaces `old` by `new` among the defaults of `cls.__init__` (positional or keyword,
  through linen's __init__ wrapper) and a dataclass's field defaults; -> how many."""
  replaced = 0
  init = cls.__init__
  while init is not None:
    if init.__defaults__ and any(d is old for d in init.__defaults__):
      init.__defaults__ = tuple(new if d is old else d for d in init.__defaults__)
      replaced += 1
    if init.__kwdefaults__ and any(d is old for d in init.__kwdefaults__.values()):
      init.__kwdefaults__ = {k: new if d is old else d for k, d in init.__kwdefaults__.items()}
      replaced += 1
    init = getattr(init, "__wrapped__", None)
  for field in getattr(cls, "__dataclass_fields__", {}).values():
    if field.default is old:
      field.default = new
      setattr(cls, field.name, new)
  return replaced


def _substitute_flax() -> None:
  from flax import linen, nnx
  from flax.linen import attention as linen_attention
  from flax.nnx.nn import attention as nnx_attention

  import flash_jax.flax as fjf

  ours = fjf.dot_product_attention
  for module, cls_names in ((nnx_attention, ("MultiHeadAttention",)),
                            (linen_attention, ("MultiHeadDotProductAttention",
                                               "MultiHeadAttention", "SelfAttention"))):
    theirs = module.dot_product_attention
    for name in cls_names:
      if hasattr(module, name) and not _replace_default(getattr(module, name), theirs, ours):
        raise RuntimeError(f"could not substitute the default attention_fn of {name}")
    module.dot_product_attention = ours
  nnx.dot_product_attention = ours
  linen.dot_product_attention = ours


def pytest_configure(config):
  mode = os.environ.get("FLASH_JAX_SUBSTITUTE", "")
  if mode == "jax":
    jax.nn.dot_product_attention = flash_jax.dot_product_attention
  elif mode == "jax-answer":
    jax.nn.dot_product_attention = functools.wraps(_ORIGINAL_JAX_NN)(_jax_answer)
  elif mode == "flax":
    _substitute_flax()
  else:
    raise ValueError(f"FLASH_JAX_SUBSTITUTE must be jax, jax-answer or flax, got {mode!r}")
