"""Peers for `python -m flash_jax.bench --peers torch`: other libraries' attention, timed
beside flash_jax and jax.nn with the same protocol, in the same process.

A peer is optional, never a dependency: when its library is missing or cannot run here
(no CUDA device), its loader raises `PeerUnavailable` and the bench reports it and goes on.

A peer has `contenders` (the names it adds to the table) and `timed_functions(problem,
arg_sets)` -> {name: fn(q, k, v, dout)}: the same signature and inputs as the bench's
jitted functions (JAX arrays [B, T, N, H]), so `bench.time_contenders` times them in turn
with the others; each fn runs the problem's mode and returns only when the device is done.
A peer that cannot serve a problem raises NotImplementedError (the table says n/a).

The PyTorch peer shares the GPU with JAX, which takes 75% of its memory at start by
default (XLA_PYTHON_CLIENT_MEM_FRACTION); the paper protocol's tensors need far less than
the rest.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Callable, Protocol

import numpy as np


class PeerUnavailable(Exception):
  """A peer cannot run here (library not installed, no CUDA device): reported, not an error."""


class Peer(Protocol):
  contenders: tuple[str, ...]
  description: str

  def timed_functions(self, problem, arg_sets) -> dict[str, Callable]:
    ...


class TorchSDPA:
  """PyTorch's `scaled_dot_product_attention` on CUDA, one contender per SDPA backend,
  each pinned with `torch.nn.attention.sdpa_kernel` (no fallback to another backend: one
  that cannot serve a problem raises, and the row says n/a with PyTorch's reason).

  `torch` and `attention` are the modules `torch` and `torch.nn.attention`, passed in so
  that the tests can stand in for them without PyTorch."""

  BACKENDS = {"torch.sdpa[cudnn]": "CUDNN_ATTENTION", "torch.sdpa[flash]": "FLASH_ATTENTION"}

  def __init__(self, torch, attention):
    if not torch.cuda.is_available():
      raise PeerUnavailable(f"torch {torch.__version__} sees no CUDA device")
    self.torch, self.attention = torch, attention
    self.backends = {name: getattr(attention.SDPBackend, member)
                     for name, member in self.BACKENDS.items()
                     if hasattr(attention.SDPBackend, member)}
    if not self.backends:
      raise PeerUnavailable(f"torch {torch.__version__} has neither SDPA backend "
                            f"({', '.join(self.BACKENDS.values())})")
    self.contenders = tuple(self.backends)
    self.description = f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}"

  def timed_functions(self, problem, arg_sets) -> dict[str, Callable]:
    backward = problem.mode == "fwd_bwd"
    # Each set (q, k, v, dout) copied to torch once per problem, outside the timing, and
    # found again by the identity of its q: the timed call receives the JAX arrays
    # themselves (`bench.time_contenders` calls fn(*arg_sets[i % len(arg_sets)])).
    tensors = {id(args[0]): tuple(self.to_torch(x, requires_grad=backward and i < 3)
                                  for i, x in enumerate(args))
               for args in arg_sets}
    return {name: self._timed(name, backend, problem.causal, backward, tensors)
            for name, backend in self.backends.items()}

  def to_torch(self, x, *, requires_grad: bool = False):
    """A JAX array [B, T, N, H] as a contiguous CUDA tensor [B, N, T, H], SDPA's layout.
    Through the host: once per problem, so its speed does not matter, and it needs no
    DLPack agreement between the two libraries' versions."""
    host = np.array(np.swapaxes(np.asarray(x), 1, 2), order="C")  # [B, N, T, H], a copy
    if host.dtype.name == "bfloat16":  # JAX's bfloat16 is ml_dtypes', unknown to torch
      tensor = self.torch.from_numpy(host.view(np.int16)).view(self.torch.bfloat16)
    else:
      tensor = self.torch.from_numpy(host)
    return tensor.to("cuda").requires_grad_(requires_grad)

  def _timed(self, name, backend, causal: bool, backward: bool, tensors):
    torch = self.torch
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def attend(q, k, v, dout):
      # The forward and, for "fwd_bwd", the gradients of q, k, v: what jax.vjp computes.
      # autograd.grad rather than backward(): nothing accumulates into .grad across calls.
      tq, tk, tv, tdout = tensors[id(q)]
      with self.attention.sdpa_kernel(backend):
        out = sdpa(tq, tk, tv, is_causal=causal)
        if backward:
          torch.autograd.grad(out, (tq, tk, tv), grad_outputs=tdout)

    def call(q, k, v, dout):
      try:
        attend(q, k, v, dout)
      except RuntimeError as e:
        if "No available kernel" not in str(e):
          raise  # out of memory, a CUDA error: the row reports it
        raise NotImplementedError(f"{name}: {_declined_reasons(attend, q, k, v, dout) or e}") from e
      torch.cuda.synchronize()  # the time of the work, not of its launch

    return call


def _declined_reasons(attend, *args) -> str:
  """Why SDPA found no kernel: it says so in warnings before raising, which a second call
  records (warnings show once per place by default, so the first call's may be gone)."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
      attend(*args)
    except RuntimeError:
      pass
  # PyTorch warns "<kernel> not used because:", then one warning per reason.
  return "; ".join(str(w.message).splitlines()[0] for w in caught).replace(":; ", ": ")


def load_torch(platform: str) -> TorchSDPA:
  """The PyTorch SDPA peer, or PeerUnavailable saying why not."""
  try:
    torch = importlib.import_module("torch")
  except ImportError as e:
    raise PeerUnavailable("PyTorch is not installed") from e
  try:
    attention = importlib.import_module("torch.nn.attention")
  except ImportError as e:
    raise PeerUnavailable(f"torch {torch.__version__} has no torch.nn.attention "
                          "(PyTorch >= 2.3)") from e
  if platform != "gpu":
    raise PeerUnavailable(f"JAX runs on {platform}; the PyTorch peers are timed on the same "
                          "NVIDIA GPU as JAX")
  return TorchSDPA(torch, attention)


# name (`--peers NAME`) -> loader(JAX platform) -> a Peer, or PeerUnavailable.
PEERS: dict[str, Callable[[str], Peer]] = {"torch": load_torch}


def load(names, platform: str) -> tuple[list[Peer], dict[str, str]]:
  """(the peers that can run, {name: description or "unavailable: why"}) for `--peers`."""
  peers, report = [], {}
  for name in names:
    try:
      peer = PEERS[name](platform)
    except PeerUnavailable as e:
      report[name] = f"unavailable: {e}"
      continue
    peers.append(peer)
    report[name] = peer.description
  return peers, report
