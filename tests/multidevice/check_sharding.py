"""flash_attention under jax.jit on sharded inputs (8 CPU devices; see runner.py).

Each case shards q, k, v (and the mask arrays) over a mesh, and checks that the jitted
call and its gradients equal the unsharded call, that the outputs stay sharded, and that
the compiled HLO moves no more than the split requires (no all-gather of the inputs for
batch/head splits).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import flash_jax
from flash_jax import chunked, sharding
from flash_jax import spec as spec_lib

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (runner.py)")


def auto_mesh(shape, names):
  return Mesh(np.array(jax.devices()[:int(np.prod(shape))]).reshape(shape), names)


def explicit_mesh(shape, names):
  return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Explicit,) * len(shape))


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  mesh: tuple  # (shape, names)
  batch: int
  length: int
  heads: tuple[int, int]  # (Nq, Nkv)
  q_spec: P
  kv_spec: P
  features: tuple[str, ...] = ()
  forbidden: tuple[str, ...] = ("all-gather",)  # collectives the compiled HLO must not have
  explicit: bool = False
  dtype: str = "float32"
  head_dim: int = 16


CASES = (
    Case("batch-over-8", ((8,), ("x",)), 8, 32, (2, 2), P("x"), P("x"), ("causal",),
         forbidden=("all-gather", "all-reduce", "collective-permute", "all-to-all")),
    Case("heads-over-8", ((8,), ("x",)), 1, 32, (8, 8), P(None, None, "x"),
         P(None, None, "x"), ("window", "softcap"),
         forbidden=("all-gather", "all-reduce", "collective-permute", "all-to-all")),
    Case("batch2-heads4-gqa", ((2, 4), ("data", "model")), 2, 48, (8, 4),
         P("data", None, "model"), P("data", None, "model"), ("causal", "segment_ids", "bias"),
         forbidden=("all-gather", "all-reduce", "collective-permute", "all-to-all")),
    Case("mqa-heads4", ((2, 4), ("data", "model")), 2, 32, (8, 1), P("data", None, "model"),
         P("data"), ("causal",)),  # dK/dV are summed over head shards: all-reduce allowed
    Case("gqa-fewer-kv-heads", ((2, 4), ("data", "model")), 2, 32, (8, 2),
         P("data", None, "model"), P("data"), ("window",)),
    Case("broadcast-bias-lengths", ((2, 4), ("data", "model")), 4, 40, (4, 4),
         P("data", None, "model"), P("data", None, "model"),
         ("bias_broadcast", "lengths", "mask")),
    Case("explicit-mesh", ((2, 4), ("data", "model")), 2, 32, (4, 4), P("data", None, "model"),
         P("data", None, "model"), ("causal", "segment_ids"), explicit=True,
         forbidden=("all-gather", "all-reduce", "collective-permute", "all-to-all")),
    Case("bfloat16-batch-heads", ((2, 4), ("data", "model")), 2, 64, (4, 4),
         P("data", None, "model"), P("data", None, "model"), ("causal",), dtype="bfloat16",
         forbidden=("all-gather", "all-reduce", "collective-permute", "all-to-all")),
    # Sequence-sharded inputs: queries stay split, keys and values are gathered.
    Case("query-rows-over-8", ((8,), ("x",)), 1, 64, (4, 2), P(None, "x"), P(None, "x"),
         ("causal", "segment_ids", "lengths"), forbidden=()),
    Case("dropout-replicates", ((8,), ("x",)), 8, 16, (2, 2), P("x"), P("x"), ("dropout",),
         forbidden=()),
    # Sinks [Nq] split with the heads: no communication, d(sinks) stays on its head shard.
    Case("heads-over-8-sinks", ((8,), ("x",)), 2, 32, (8, 8), P(None, None, "x"),
         P(None, None, "x"), ("causal", "sinks"),
         forbidden=("all-gather", "all-reduce", "collective-permute", "all-to-all")),
    # Batch split too: d(sinks) is summed over the batch shards (one all-reduce of [Nq]).
    Case("batch2-heads4-gqa-sinks", ((2, 4), ("data", "model")), 2, 48, (8, 4),
         P("data", None, "model"), P("data", None, "model"), ("window", "lengths", "sinks"),
         forbidden=("all-gather", "all-reduce", "collective-permute", "all-to-all")),
)


def make_inputs(case: Case, seed=0):
  keys = iter(jax.random.split(jax.random.PRNGKey(seed), 10))
  b, t, (nq, nkv), h = case.batch, case.length, case.heads, case.head_dim
  dtype = jnp.dtype(case.dtype)
  q = jax.random.normal(next(keys), (b, t, nq, h), dtype)
  k = jax.random.normal(next(keys), (b, t, nkv, h), dtype)
  v = jax.random.normal(next(keys), (b, t, nkv, h), dtype)
  kwargs, arrays = {}, {}
  f = set(case.features)
  if "causal" in f:
    kwargs["causal"] = True
  if "window" in f:
    kwargs["window"] = (7, 3)
  if "softcap" in f:
    kwargs["softcap"] = 3.0
  if "segment_ids" in f:
    arrays["segment_ids"] = (jnp.arange(t)[None, :] * 3 // t + jnp.arange(b)[:, None]) % 3
  if "bias" in f:
    arrays["bias"] = jax.random.normal(next(keys), (b, nq, t, t), jnp.float32)
  if "huge_bias_rows" in f:
    # Rows whose every key has one huge negative bias (lse ~ the bias, which rounds the
    # log-sum away: the backward needs the forward's per-row statistics).
    arrays["bias"] = arrays["bias"].at[:, :, 1].set(-1e9).at[:, :, 4].set(-1e20)
  if "bias_broadcast" in f:
    arrays["bias"] = jax.random.normal(next(keys), (1, nq, 1, t), jnp.float32)
  if "lengths" in f:
    arrays["kv_lengths"] = jax.random.randint(next(keys), (b,), 1, t + 1)
    arrays["q_lengths"] = jax.random.randint(next(keys), (b,), 1, t + 1)
  if "mask" in f:
    arrays["mask"] = jax.random.bernoulli(next(keys), 0.8, (b, 1, t, t))
  if "dropout" in f:
    kwargs["dropout_rate"] = 0.2
    arrays["dropout_rng"] = next(keys)
  if "sinks" in f:
    arrays["sinks"] = np.log(t) + 2.0 * jax.random.normal(next(keys), (nq,))
  return q, k, v, kwargs, arrays


def array_spec(name, case: Case, shape):
  """How the test shards each mask array: along batch (and rows) like q."""
  b, t = case.q_spec[0] if len(case.q_spec) else None, (
      case.q_spec[1] if len(case.q_spec) > 1 else None)
  h = case.q_spec[2] if len(case.q_spec) > 2 else None
  if name == "segment_ids":
    return P(b, t)
  if name in ("bias", "mask"):
    return P(*(axes if size > 1 else None for axes, size in zip((b, h, t, None), shape)))
  if name in ("kv_lengths", "q_lengths"):
    return P(b)
  if name == "sinks":
    return P(h)
  return P()


def shard_all(case: Case, mesh, q, k, v, arrays):
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  sharded = {name: put(x, array_spec(name, case, np.shape(x))) for name, x in arrays.items()
             if name != "dropout_rng"}
  if "dropout_rng" in arrays:
    sharded["dropout_rng"] = arrays["dropout_rng"]
  return put(q, case.q_spec), put(k, case.kv_spec), put(v, case.kv_spec), sharded


def attention_fn(kwargs):
  def attend(q, k, v, arrays):
    return flash_jax.flash_attention(q, k, v, return_lse=True, **kwargs, **arrays)
  return attend


def loss_fn(kwargs, seed=3):
  """<out, dout> + <lse, dlse> for fixed random cotangents: exercises dout and dlse."""
  def loss(q, k, v, arrays):
    out, lse = attention_fn(kwargs)(q, k, v, arrays)
    keys = jax.random.split(jax.random.PRNGKey(seed))
    dout = jax.random.normal(keys[0], out.shape, jnp.float32)
    dlse = jax.random.normal(keys[1], lse.shape, jnp.float32)
    return (jnp.sum(out.astype(jnp.float32) * dout)
            + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * dlse))
  return loss


DIFFERENTIABLE = ("bias", "sinks")  # entries of `arrays` with gradients


def grad_fn(kwargs):
  """-> (dq, dk, dv, *gradients of the DIFFERENTIABLE entries of arrays, in that order)."""
  loss = loss_fn(kwargs)
  def grads(q, k, v, arrays):
    extras = {n: x for n, x in arrays.items() if n in DIFFERENTIABLE}
    rest = {n: x for n, x in arrays.items() if n not in DIFFERENTIABLE}
    dq, dk, dv, dextras = jax.grad(lambda q, k, v, extras: loss(q, k, v, {**rest, **extras}),
                                   argnums=(0, 1, 2, 3))(q, k, v, extras)
    return (dq, dk, dv) + tuple(dextras[n] for n in DIFFERENTIABLE if n in dextras)
  return grads


def grad_names(arrays):
  return ("dq", "dk", "dv") + tuple(f"d{n}" for n in DIFFERENTIABLE if n in arrays)


def assert_close(name, x, ref, dtype):
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  assert not np.isnan(x).any(), f"{name}: NaN"
  scale = max(1.0, float(np.max(np.abs(np.where(np.isfinite(ref), ref, 0.0)))))
  tol = {"float32": 2e-5, "bfloat16": 2e-2}[dtype] * scale
  np.testing.assert_allclose(x, ref, rtol=0, atol=tol, err_msg=name)


def padded(spec, ndim=4):
  return tuple(spec) + (None,) * (ndim - len(spec))


def collectives(hlo: str) -> set[str]:
  return set(re.findall(r"\b(all-gather|all-reduce|collective-permute|all-to-all|"
                        r"reduce-scatter)(?:-start)?\(", hlo))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_sharded_equals_unsharded(case: Case):
  mesh = (explicit_mesh if case.explicit else auto_mesh)(*case.mesh)
  q, k, v, kwargs, arrays = make_inputs(case)
  sq, sk, sv, sarrays = shard_all(case, mesh, q, k, v, arrays)
  forward = jax.jit(attention_fn(kwargs))
  out, lse = forward(sq, sk, sv, sarrays)
  ref_out, ref_lse = jax.jit(attention_fn(kwargs))(q, k, v, arrays)  # one device
  assert_close("out", out, ref_out, case.dtype)
  assert_close("lse", lse, ref_lse, "float32")
  if "dropout" not in case.features:
    assert padded(out.sharding.spec)[:3] == padded(case.q_spec)[:3], out.sharding.spec
  found = collectives(forward.lower(sq, sk, sv, sarrays).compile().as_text())
  assert not found & set(case.forbidden), f"forward HLO has {found & set(case.forbidden)}"
  jaxpr = str(jax.make_jaxpr(attention_fn(kwargs))(sq, sk, sv, sarrays))
  assert "custom_partitioning" in jaxpr, "flash_attention did not wrap its implementation"

  grads = jax.jit(grad_fn(kwargs))
  got = grads(sq, sk, sv, sarrays)
  want = jax.jit(grad_fn(kwargs))(q, k, v, arrays)
  assert len(got) == len(grad_names(arrays))
  for name, g, r in zip(grad_names(arrays), got, want):
    assert g.shape == r.shape and g.dtype == r.dtype, name
    assert_close(name, g, r, case.dtype)
  found = collectives(grads.lower(sq, sk, sv, sarrays).compile().as_text())
  # A gradient broadcast over a split dimension is summed over its shards: a broadcast
  # bias's, and d(sinks) [Nq] when batch or query rows are split.
  rows_split = any(padded(case.q_spec)[:2])
  summed = "bias_broadcast" in case.features or ("sinks" in case.features and rows_split)
  backward_forbidden = set(case.forbidden) - {"all-reduce"} if summed else set(case.forbidden)
  assert not found & backward_forbidden, f"gradient HLO has {found & backward_forbidden}"


@pytest.mark.parametrize("q_spec", [P("data", None, "model"), P("data", "model")],
                         ids=["batch-heads", "batch-rows"])
def test_huge_bias_rows_match_the_reference(q_spec):
  """Rows whose every key has one huge negative bias: lse rounds their log-sum away, so
  the sharded backward needs the forward's per-row statistics to match the unwrapped
  xla reference (with lse alone P would sum to S, not 1)."""
  case = Case("huge-bias-rows", ((2, 4), ("data", "model")), 2, 32, (8, 4), q_spec,
              P("data"), ("bias", "huge_bias_rows"))
  mesh = auto_mesh(*case.mesh)
  q, k, v, kwargs, arrays = make_inputs(case)
  sq, sk, sv, sarrays = shard_all(case, mesh, q, k, v, arrays)
  got = jax.jit(grad_fn(kwargs))(sq, sk, sv, sarrays)
  want = jax.jit(grad_fn(dict(kwargs, implementation="xla")))(q, k, v, arrays)
  for name, g, r in zip(grad_names(arrays), got, want):
    assert_close(name, g, r, case.dtype)


def test_query_rows_stay_split_and_only_kv_is_gathered():
  case = CASES[[c.name for c in CASES].index("query-rows-over-8")]
  mesh = auto_mesh(*case.mesh)
  q, k, v, kwargs, arrays = make_inputs(case)
  sq, sk, sv, sarrays = shard_all(case, mesh, q, k, v, arrays)
  forward = jax.jit(attention_fn(kwargs))
  out, lse = forward(sq, sk, sv, sarrays)
  assert padded(out.sharding.spec)[1] == "x" and padded(lse.sharding.spec, 3)[2] == "x"
  hlo = forward.lower(sq, sk, sv, sarrays).compile().as_text()
  gathered = re.findall(r"= (\w+\[[\d,]*\])[^\n]*all-gather(?:-start)?\(", hlo)
  assert gathered, "keys and values sharded over S must be gathered"
  q_shape = f"f32[{','.join(map(str, q.shape))}]"
  assert q_shape not in gathered, f"q was gathered: {gathered}"


def test_gspmd_partitioner():
  """The same split under the GSPMD partitioner (infer_sharding_from_operands)."""
  case = CASES[[c.name for c in CASES].index("batch2-heads4-gqa")]
  previous = jax.config.jax_use_shardy_partitioner
  jax.config.update("jax_use_shardy_partitioner", False)
  try:
    mesh = auto_mesh(*case.mesh)
    q, k, v, kwargs, arrays = make_inputs(case, seed=1)
    sq, sk, sv, sarrays = shard_all(case, mesh, q, k, v, arrays)
    forward = jax.jit(attention_fn(kwargs))
    out, lse = forward(sq, sk, sv, sarrays)
    ref_out, ref_lse = jax.jit(attention_fn(kwargs))(q, k, v, arrays)
    assert_close("out", out, ref_out, "float32")
    assert_close("lse", lse, ref_lse, "float32")
    assert not collectives(forward.lower(sq, sk, sv, sarrays).compile().as_text())
    got = jax.jit(grad_fn(kwargs))(sq, sk, sv, sarrays)
    want = jax.jit(grad_fn(kwargs))(q, k, v, arrays)
    for name, g, r in zip(("dq", "dk", "dv", "dbias"), got, want):
      assert_close(name, g, r, "float32")
  finally:
    jax.config.update("jax_use_shardy_partitioner", previous)


class RecordingChunked(chunked.ChunkedImplementation):
  """The chunked implementation, noting the spec each traced forward/backward sees."""

  def __init__(self):
    self.seen = []

  def forward(self, q, k, v, bias, arrays, spec, config, interpret):
    self.seen.append(("forward", spec.batch, spec.q_len, spec.num_q_heads, spec.num_kv_heads))
    return super().forward(q, k, v, bias, arrays, spec, config, interpret)

  def backward(self, *args):
    spec = args[-3]
    self.seen.append(("backward", spec.batch, spec.q_len, spec.num_q_heads, spec.num_kv_heads))
    return super().backward(*args)


def test_each_device_runs_the_implementation_on_its_shard():
  recording = RecordingChunked()
  impl = sharding.partitioned(recording)
  mesh = auto_mesh((2, 4), ("data", "model"))
  q = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 8, 16))
  k = v = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 4, 16))
  spec, *_, arrays = spec_lib.normalize(q, k, v, causal=True)
  put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data", None, "model")))

  def loss(q, k, v):
    out, lse = impl(q, k, v, None, arrays, spec, impl.default_config(spec), False)
    return jnp.sum(out * out) + jnp.sum(lse)

  jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(put(q), put(k), put(v))
  assert ("forward", 2, 16, 2, 1) in recording.seen  # B/2, T, Nq/4, Nkv/4
  assert ("backward", 2, 16, 2, 1) in recording.seen


def test_vmap_of_partitioned_attention():
  """custom_partitioning has no batching rule: vmap takes the plain implementation."""
  mesh = auto_mesh((8,), ("x",))
  q = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 16, 2, 16))
  k = jax.random.normal(jax.random.PRNGKey(1), (3, 8, 16, 2, 16))
  put = lambda x: jax.device_put(x, NamedSharding(mesh, P(None, "x")))
  attend = lambda q, k: flash_jax.flash_attention(q, k, k, causal=True)
  got = jax.jit(jax.vmap(attend))(put(q), put(k))
  want = jnp.stack([attend(q[i], k[i]) for i in range(3)])
  assert_close("out", got, want, "float32")
  grads = jax.jit(jax.grad(lambda q, k: jnp.sum(jax.vmap(attend)(q, k) ** 2), argnums=(0, 1)))
  got = grads(put(q), put(k))
  want = jax.grad(lambda q, k: sum(jnp.sum(attend(q[i], k[i]) ** 2) for i in range(3)),
                  argnums=(0, 1))(q, k)
  for name, g, r in zip(("dq", "dk"), got, want):
    assert_close(name, g, r, "float32")


def test_reference_implementation_is_not_wrapped():
  impl = flash_jax.dispatch.get_implementation("xla")
  assert sharding.partitioned(impl) is impl
  inner = flash_jax.dispatch.get_implementation("chunked")
  wrapped = sharding.partitioned(inner)
  assert wrapped.name == "chunked" and sharding.partitioned(wrapped) is wrapped
  assert wrapped == sharding.partitioned(inner) and hash(wrapped) == hash(sharding.partitioned(inner))


def test_inside_shard_map_over_some_axes():
  """shard_map manual over "data", "model" left to the partitioner (heads split)."""
  mesh = auto_mesh((2, 4), ("data", "model"))
  q = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 8, 16))
  attend = lambda q: flash_jax.flash_attention(q, q, q, causal=True)
  per_data = jax.shard_map(attend, mesh=mesh, in_specs=P("data"), out_specs=P("data"),
                           axis_names={"data"})
  sq = jax.device_put(q, NamedSharding(mesh, P("data", None, "model")))
  assert_close("out", jax.jit(per_data)(sq), attend(q), "float32")
  loss = lambda f: lambda q: jnp.sum(f(q) ** 2)
  assert_close("dq", jax.jit(jax.grad(loss(per_data)))(sq), jax.grad(loss(attend))(q),
               "float32")


PAGED_CASES = (
    # (name, mesh, q spec, page-pool spec, table/length spec, (Nq, Nkv))
    ("paged-batch-over-8", ((8,), ("x",)), P("x"), P(), P("x"), (4, 2)),
    ("paged-heads-over-4", ((4,), ("x",)), P(None, None, "x"), P(None, None, "x"), P(), (8, 4)),
    ("paged-batch2-heads4", ((2, 4), ("data", "model")), P("data", None, "model"),
     P(None, None, "model"), P("data"), (8, 4)),
)


@pytest.mark.parametrize("case", PAGED_CASES, ids=lambda c: c[0])
def test_paged_sharded_equals_unsharded(case):
  """paged_attention under jit on batch/head-sharded queries and pools: each device
  attends on its shard, no all-gather."""
  name, mesh_shape, q_spec, pool_spec, table_spec, (nq, nkv) = case
  mesh = auto_mesh(*mesh_shape)
  b, t, page_size, pages_per_seq, h = 8, 2, 4, 5, 16
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(keys[0], (b, t, nq, h))
  pool = b * pages_per_seq
  k_pages = jax.random.normal(keys[1], (pool, page_size, nkv, h))
  v_pages = jax.random.normal(keys[2], (pool, page_size, nkv, h))
  tables = jax.random.permutation(keys[3], pool).reshape(b, pages_per_seq).astype(jnp.int32)
  lengths = jnp.arange(b, dtype=jnp.int32) * 2 + 3
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  args = (put(q, q_spec), put(k_pages, pool_spec), put(v_pages, pool_spec),
          put(tables, table_spec), put(lengths, table_spec))
  attend = jax.jit(lambda *a: flash_jax.paged_attention(*a, return_lse=True, window=(6, 0)))
  out, lse = attend(*args)
  ref_out, ref_lse = attend(q, k_pages, v_pages, tables, lengths)
  assert_close("out", out, ref_out, "float32")
  assert_close("lse", lse, ref_lse, "float32")
  assert padded(out.sharding.spec)[:3] == padded(q_spec)[:3], out.sharding.spec
  found = collectives(attend.lower(*args).compile().as_text())
  assert "all-gather" not in found, f"paged forward HLO has {found}"
  assert "custom_partitioning" in str(jax.make_jaxpr(attend)(*args))
