"""Ring attention on 8 CPU devices (see runner.py): forward and gradients against
single-device attention, every layout, causal and not, segment ids, GQA, windows, sinks."""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import flash_jax
from conftest import assert_accurate, highest_precision, upcast
from flash_jax import ring_layout
from flash_jax.ring import ring_attention, sharded_ring_attention

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (runner.py)")


def ring_mesh(shape=(8,), names=("sp",)):
  return Mesh(np.array(jax.devices()[:int(np.prod(shape))]).reshape(shape), names)


@dataclasses.dataclass(frozen=True)
class Case:
  layout: str
  dtype: str
  features: tuple[str, ...] = ()
  heads: tuple[int, int] = (2, 2)
  length: int = 128  # global T
  batch: int = 1
  head_dim: int = 32
  mesh: tuple = ((8,), ("sp",))
  batch_axis: str | None = None
  head_axis: str | None = None

  @property
  def id(self):
    mesh = "x".join(map(str, self.mesh[0]))
    return (f"{self.layout}-{self.dtype}-{'+'.join(self.features) or 'full'}-"
            f"h{self.heads[0]}x{self.heads[1]}-mesh{mesh}")


CASES = (
    Case("contiguous", "float32", heads=(4, 2)),
    Case("contiguous", "bfloat16", ("causal", "segment_ids")),
    Case("contiguous", "float32", ("window",)),
    Case("zigzag", "float32", ("causal", "segment_ids"), heads=(4, 2)),
    Case("zigzag", "bfloat16", ("causal", "window", "softcap")),
    Case("striped", "float16", ("causal",), heads=(4, 1)),
    Case("striped", "float32", ("causal", "empty_rows")),
    Case("zigzag", "float32", ("causal",), heads=(4, 2), batch=2, mesh=((2, 4), ("dp", "sp")),
         batch_axis="dp"),
    Case("contiguous", "bfloat16", ("causal",), heads=(4, 2), mesh=((2, 4), ("tp", "sp")),
         head_axis="tp"),
    Case("striped", "float32", ("causal", "empty_rows", "sinks")),
    # sinks [Nq] split with the heads.
    Case("zigzag", "bfloat16", ("causal", "sinks"), heads=(4, 2), mesh=((2, 4), ("tp", "sp")),
         head_axis="tp"),
)


def make_inputs(case: Case, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  dtype = jnp.dtype(case.dtype)
  b, t, (nq, nkv), h = case.batch, case.length, case.heads, case.head_dim
  q = jax.random.normal(keys[0], (b, t, nq, h), dtype)
  k = jax.random.normal(keys[1], (b, t, nkv, h), dtype)
  v = jax.random.normal(keys[2], (b, t, nkv, h), dtype)
  kwargs = {}
  f = set(case.features)
  if "causal" in f:
    kwargs["causal"] = True
  if "window" in f:
    kwargs["window"] = (21, None if "causal" in f else 9)
  if "softcap" in f:
    kwargs["softcap"] = 4.0
  if "segment_ids" in f:  # three packed documents, boundaries off the shard edges
    bounds = jnp.array([t // 3 + 5, 2 * t // 3 - 3])
    kwargs["segment_ids"] = jnp.broadcast_to(
        jnp.sum(jnp.arange(t)[:, None] >= bounds, axis=-1), (b, t)).astype(jnp.int32)
  if "empty_rows" in f:  # query segment 0 has no key: those rows see nothing
    q_ids = jnp.where(jnp.arange(t) % 5 == 0, 0, 1)
    kwargs["segment_ids"] = (jnp.broadcast_to(q_ids, (b, t)), jnp.ones((b, t), jnp.int32))
  if "sinks" in f:  # float32 [Nq], near the rows' lse
    kwargs["sinks"] = np.log(t) + 2.0 * jax.random.normal(keys[3], (nq,))
  return q, k, v, kwargs


def ring_fn(case: Case, kwargs):
  """Natural-order global arrays -> ring attention in `case.layout` -> natural order."""
  n = ring_mesh(*case.mesh).shape["sp"]
  to = lambda x: ring_layout.to_ring_layout(x, n, case.layout)
  back = lambda x, axis=1: ring_layout.from_ring_layout(x, n, case.layout, axis=axis)
  kwargs = dict(kwargs)
  if "segment_ids" in kwargs:
    ids = kwargs["segment_ids"]
    kwargs["segment_ids"] = tuple(map(to, ids)) if isinstance(ids, tuple) else to(ids)

  def attend(q, k, v, **extras):
    out, lse = sharded_ring_attention(
        to(q), to(k), to(v), mesh=ring_mesh(*case.mesh), seq_axis="sp",
        batch_axis=case.batch_axis, head_axis=case.head_axis, layout=case.layout,
        return_lse=True, **kwargs, **extras)
    return back(out), back(lse, axis=2)
  return attend


def single_device_fn(kwargs, implementation):
  return lambda q, k, v, **extras: flash_jax.flash_attention(
      q, k, v, implementation=implementation, return_lse=True, **kwargs, **extras)


def loss_of(fn, seed=5):
  """<out, dout> + <lse, dlse>, a function of (q, k, v, extras: {"sinks": ...} or {})."""
  def loss(q, k, v, extras):
    out, lse = fn(q, k, v, **extras)
    keys = jax.random.split(jax.random.PRNGKey(seed))
    dout = jax.random.normal(keys[0], out.shape, jnp.float32)
    dlse = jax.random.normal(keys[1], lse.shape, jnp.float32)
    return (jnp.sum(out.astype(jnp.float32) * dout)
            + 0.5 * jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * dlse))
  return loss


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_ring_matches_single_device(case: Case):
  q, k, v, kwargs = make_inputs(case)
  extras = {"sinks": kwargs.pop("sinks")} if "sinks" in kwargs else {}
  ring = ring_fn(case, kwargs)
  out, lse = jax.jit(ring)(q, k, v, **extras)
  same_out, same_lse = single_device_fn(kwargs, "xla")(q, k, v, **extras)
  q32, k32, v32, kw32 = upcast((q, k, v, kwargs))
  with highest_precision():
    ref_out, ref_lse = single_device_fn(kw32, "xla")(q32, k32, v32, **extras)
    plain_lse = single_device_fn(kw32, "xla")(q32, k32, v32)[1]  # -inf: sees no key
  assert out.shape == q.shape and out.dtype == q.dtype and lse.dtype == jnp.float32
  assert_accurate("out", out, same_out, ref_out, dtype=case.dtype)
  assert_accurate("lse", lse, same_lse, ref_lse, dtype=case.dtype)
  hidden = ~np.isfinite(np.asarray(plain_lse)).transpose(0, 2, 1)  # [B, T, Nq]
  assert np.all(np.asarray(out, np.float32)[hidden] == 0)
  if extras:  # rows that see no key: all their mass on the sink
    sinks = np.broadcast_to(np.asarray(extras["sinks"], np.float32), hidden.shape)
    np.testing.assert_array_equal(np.asarray(lse).transpose(0, 2, 1)[hidden], sinks[hidden])

  grads = jax.jit(jax.grad(loss_of(ring), argnums=(0, 1, 2, 3)))(q, k, v, extras)
  same = jax.grad(loss_of(single_device_fn(kwargs, "xla")), argnums=(0, 1, 2, 3))(q, k, v, extras)
  with highest_precision():
    exact = jax.grad(loss_of(single_device_fn(kw32, "xla")), argnums=(0, 1, 2, 3))(
        q32, k32, v32, extras)
  results = list(zip(("dq", "dk", "dv"), grads[:3], same[:3], exact[:3], (q, k, v)))
  results += [(f"d{name}", grads[3][name], same[3][name], exact[3][name], x)
              for name, x in extras.items()]
  for name, g, s, r, x in results:
    assert g.shape == x.shape and g.dtype == x.dtype, name
    assert_accurate(name, g, s, r, dtype=case.dtype)
  if hidden.any():
    assert np.all(np.asarray(grads[0], np.float32)[hidden] == 0), "dq of rows that see nothing"


def test_ring_inside_user_shard_map_with_vma_checks():
  """ring_attention under a user's own shard_map (check_vma on) and jit, contiguous."""
  mesh = ring_mesh()
  q, k, v, kwargs = make_inputs(Case("contiguous", "float32", ("causal",)), seed=3)
  rows = P(None, "sp")
  # The single-device implementation itself must type-check under check_vma.
  jax.shard_map(lambda q: flash_jax.flash_attention(q, q, q), mesh=mesh, in_specs=rows,
                out_specs=rows)(q)
  attend = jax.shard_map(functools.partial(ring_attention, axis_name="sp", causal=True),
                         mesh=mesh, in_specs=(rows, rows, rows), out_specs=rows)
  loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))
  single = lambda q, k, v: flash_jax.flash_attention(q, k, v, causal=True)
  np.testing.assert_allclose(jax.jit(attend)(q, k, v), single(q, k, v), atol=2e-5)
  got = jax.jit(jax.grad(loss(attend), argnums=(0, 1, 2)))(q, k, v)
  want = jax.grad(loss(single), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=2e-5)


def test_ring_sinks_inside_user_shard_map_with_vma_checks():
  """Sinks replicated over the ring (check_vma on): d(sinks) sums every device's rows."""
  mesh = ring_mesh()
  q, k, v, kwargs = make_inputs(Case("zigzag", "float32", ("causal", "sinks")), seed=4)
  sinks = kwargs["sinks"]
  rows = P(None, "sp")
  attend = jax.shard_map(
      lambda q, k, v, sinks: ring_attention(q, k, v, axis_name="sp", causal=True,
                                            layout="zigzag", sinks=sinks),
      mesh=mesh, in_specs=(rows, rows, rows, P()), out_specs=rows)
  to = lambda x: ring_layout.to_ring_layout(x, 8, "zigzag")
  single = lambda q, k, v, sinks: to(flash_jax.flash_attention(q, k, v, causal=True,
                                                               sinks=sinks))
  ring = lambda q, k, v, sinks: attend(to(q), to(k), to(v), sinks)
  np.testing.assert_allclose(jax.jit(ring)(q, k, v, sinks), single(q, k, v, sinks), atol=2e-5)
  loss = lambda f: lambda *args: jnp.sum(jnp.sin(f(*args)))
  got = jax.jit(jax.grad(loss(ring), argnums=(0, 1, 2, 3)))(q, k, v, sinks)
  want = jax.grad(loss(single), argnums=(0, 1, 2, 3))(q, k, v, sinks)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=2e-5)


def _collectives(hlo):
  return set(re.findall(r"\b(all-gather|all-reduce|collective-permute|all-to-all|"
                        r"reduce-scatter)(?:-start)?\(", hlo))


def test_ring_communicates_by_collective_permute_only():
  case = Case("zigzag", "bfloat16", ("causal",))
  q, k, v, _ = make_inputs(case)
  mesh, rows = ring_mesh(), P(None, "sp")
  attend = jax.shard_map(
      functools.partial(ring_attention, axis_name="sp", causal=True, layout="zigzag"),
      mesh=mesh, in_specs=(rows, rows, rows), out_specs=rows, check_vma=False)
  grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32)),
                           argnums=(0, 1, 2)))
  sharded = [jax.device_put(x, jax.sharding.NamedSharding(mesh, rows)) for x in (q, k, v)]
  assert _collectives(jax.jit(attend).lower(*sharded).compile().as_text()) == {
      "collective-permute"}
  assert _collectives(grads.lower(*sharded).compile().as_text()) == {"collective-permute"}


def ring_bytes_per_device(devices: int, total_len: int) -> int:
  """Compiled per-device bytes (arguments + outputs + temporaries) of forward+backward."""
  mesh = ring_mesh((devices,), ("sp",))
  shape = jax.ShapeDtypeStruct((1, total_len, 2, 32), jnp.float32)
  rows = P(None, "sp")
  attend = jax.shard_map(functools.partial(ring_attention, axis_name="sp", causal=True),
                         mesh=mesh, in_specs=(rows, rows, rows), out_specs=rows,
                         check_vma=False)
  step = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v)), argnums=(0, 1, 2)),
                 in_shardings=(jax.sharding.NamedSharding(mesh, rows),) * 3)
  stats = step.lower(shape, shape, shape).compile().memory_analysis()
  return (stats.argument_size_in_bytes + stats.output_size_in_bytes
          + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def test_memory_per_device_falls_as_devices_are_added():
  sizes = {n: ring_bytes_per_device(n, total_len=2048) for n in (1, 2, 4, 8)}
  print("ring attention fwd+bwd bytes per device at T=2048:", sizes)
  assert sizes[1] > sizes[2] > sizes[4] > sizes[8], sizes


@pytest.mark.parametrize("layout", ring_layout.LAYOUTS)
def test_causal_work_per_step(layout):
  """Visible (query, key) cells per device and ring step: balanced for zigzag/striped."""
  n, total = 8, 64
  positions = ring_layout.ring_positions(total, n, layout).reshape(n, total // n)
  work = np.zeros((n, n), int)  # [step, device]
  for step in range(n):
    for device in range(n):
      keys = positions[(device - step) % n]
      work[step, device] = np.sum(keys[None, :] <= positions[device][:, None])
  if layout == "contiguous":
    assert (work == 0).any()  # devices idle on the masked half
  else:  # at every step, every device's work is equal up to one diagonal
    assert work.min() > 0 and np.all(work.max(axis=1) - work.min(axis=1) <= total // n), work


def test_errors():
  mesh, rows = ring_mesh(), P(None, "sp")
  q = jnp.ones((1, 64, 2, 16))
  with pytest.raises(ValueError, match="shard_map"):
    ring_attention(q, q, q, axis_name="sp")
  run = lambda **kw: jax.shard_map(functools.partial(ring_attention, axis_name="sp", **kw),
                                   mesh=mesh, in_specs=(rows,) * 3, out_specs=rows,
                                   check_vma=False)(q, q, q)
  with pytest.raises(NotImplementedError, match="striped"):
    run(layout="striped", causal=True, window=4)
  with pytest.raises(ValueError, match="layout"):
    run(layout="spiral")
  with pytest.raises(NotImplementedError, match="blockwise"):
    run(implementation="xla")
  with pytest.raises(ValueError, match="even"):
    jax.shard_map(functools.partial(ring_attention, axis_name="sp", layout="zigzag"),
                  mesh=mesh, in_specs=(rows,) * 3, out_specs=rows,
                  check_vma=False)(*(jnp.ones((1, 40, 2, 16)),) * 3)
  with pytest.raises(ValueError, match="not an axis"):
    sharded_ring_attention(q, q, q, mesh=mesh, seq_axis="seq")
