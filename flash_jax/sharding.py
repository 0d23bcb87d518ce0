"""flash_attention under jax.jit on sharded inputs: each device attends on its own shard.

A Pallas kernel is an opaque custom call to XLA's partitioners, which would replicate
(all-gather) its inputs. `partitioned(impl)` wraps an implementation's forward and
backward in `jax.experimental.custom_partitioning`, so the partitioner asks us how to
split them and each device runs the single-device implementation on its shard:

  * batch B and query heads Nq: split along the mesh axes that q is sharded over; no
    communication at all. K/V heads follow the query heads when Nkv divides evenly,
    otherwise (MQA, or fewer K/V heads than head shards) each device reads the one K/V
    head its query heads share, and dK/dV are summed over the head shards.
  * query length T: kept split (sequence parallelism by gathering K/V): each device
    attends its query rows to all keys, with q_offset shifted by the rows before its
    shard; dK/dV are summed over the sequence shards. Keys and values sharded along S
    are gathered: an S split cannot be served without communication, which is what
    `flash_jax.ring_attention` does instead (K/V travel around a ring, nothing gathered).
  * head dims: replicated.

With a bias, the forward also returns the implementation's per-row statistics (row
max, log-sum: `Implementation.forward_with_stats`), split like lse, so that rows whose
every key has a huge negative bias get the exact backward on a mesh too.

Dropout draws its keep-mask from global (batch, head, query, key) indices, which a
shard does not know, so calls with dropout are replicated (with a logged warning).
Attention sinks never enter these ops: flash_attention merges them into (out, lse)
afterwards in plain jnp (flash_jax/sinks.py), which XLA partitions by itself, so sinks
[Nq] follow the query heads' split with no communication (d(sinks) is summed over batch
and query-row shards).

Under Shardy (the default partitioner) a sharding rule in einsum notation guides
propagation; under GSPMD `infer_sharding_from_operands` does. Both end in `_partition`,
the one place the split is decided. `custom_partitioning` has no batching rule, so each
op is also a `custom_vmap` whose rule vmaps the plain, unpartitioned function.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap
from jax.experimental.custom_partitioning import ArrayMapping, SdyShardingRule, custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from flash_jax.implementation import BlockwiseImplementation, Implementation
from flash_jax.spec import AttentionArrays, AttentionSpec

logger = logging.getLogger("flash_jax")

_ARRAY_FIELDS = tuple(f.name for f in dataclasses.fields(AttentionArrays))
_BIAS_FACTORS = ("b", "n", "t", "s")  # the factors of a full [B, Nq, T, S] bias or mask


# ---- operands: the named, flat argument list of the partitioned ops ----------------------

# The backward's operands beyond q, k, v, bias and the mask arrays ([B, Nq, T] ones and
# out, dout), in their fixed order; row_max and log_sum only with per-row statistics.
_EXTRA_NAMES = ("out", "lse", "row_max", "log_sum", "dout", "delta")
_STATS_NAMES = ("row_max", "log_sum")


def _flatten(q, k, v, bias, arrays: AttentionArrays, **extras):
  """-> (names, operands): the non-None inputs in a fixed order, with static names."""
  named = [("q", q), ("k", k), ("v", v), ("bias", bias)]
  named += [(name, getattr(arrays, name)) for name in _ARRAY_FIELDS]
  named += [(name, extras.get(name)) for name in _EXTRA_NAMES]
  named = [(name, x) for name, x in named if x is not None]
  return tuple(name for name, _ in named), tuple(x for _, x in named)


def _unflatten(names, operands):
  """-> (q, k, v, bias, arrays, extras) where extras maps the _EXTRA_NAMES present."""
  by_name = dict(zip(names, operands))
  arrays = AttentionArrays(**{name: by_name.get(name) for name in _ARRAY_FIELDS})
  extras = {name: by_name[name] for name in _EXTRA_NAMES if name in by_name}
  return by_name["q"], by_name["k"], by_name["v"], by_name.get("bias"), arrays, extras


def _backward(impl, q, k, v, bias, arrays, extras, spec, config, interpret):
  """impl.backward on unflattened operands: (dq, dk, dv, dbias or None); the forward's
  statistics, when the extras carry them, go back as `stats=`."""
  stats = {"stats": tuple(extras[n] for n in _STATS_NAMES)} if "row_max" in extras else {}
  return impl.backward(q, k, v, bias, arrays, extras["out"], extras["lse"], extras["dout"],
                       extras["delta"], spec, config, interpret, **stats)


# ---- the split: which mesh axes divide which dimension -----------------------------------

@dataclasses.dataclass(frozen=True)
class _Split:
  """How one attention call is divided over a mesh (tuples of mesh axis names)."""

  batch: tuple[str, ...] = ()
  heads: tuple[str, ...] = ()  # query heads; K/V heads too when `kv_heads_split`
  q_seq: tuple[str, ...] = ()
  kv_heads_split: bool = True
  paged: bool = False  # k/v are page pools [P, page_size, Nkv, H]: split by heads only

  def _sizes(self, mesh):
    count = lambda axes: math.prod(mesh.shape[a] for a in axes)
    return count(self.batch), count(self.heads), count(self.q_seq)

  @staticmethod
  def _entry(axes):
    return axes if axes else None

  def partition_spec(self, name: str, shape) -> PartitionSpec:
    """The PartitionSpec of operand or result `name` (of global `shape`)."""
    b, h, t = self._entry(self.batch), self._entry(self.heads), self._entry(self.q_seq)
    kv_h = h if self.kv_heads_split else None
    if name in ("q", "out", "dout", "dq"):
      return PartitionSpec(b, t, h, None)  # [B, T, Nq, H]
    if name in ("k", "v") and self.paged:
      return PartitionSpec(None, None, kv_h, None)  # [P, page_size, Nkv, H]: pages shared
    if name in ("k", "v", "dk", "dv"):
      return PartitionSpec(b, None, kv_h, None)  # [B, S, Nkv, H]
    if name in ("lse", "delta") + _STATS_NAMES:
      return PartitionSpec(b, h, t)  # [B, Nq, T]
    if name in ("bias", "mask", "dbias"):  # [B?, Nq?, T?, S?]: split only full dims
      return PartitionSpec(*(axes if size > 1 else None
                             for axes, size in zip((b, h, t, None), shape)))
    if name in ("q_offset", "q_lengths", "kv_lengths"):
      return PartitionSpec(b)  # [B]
    if name == "q_segment_ids":
      return PartitionSpec(b, t)  # [B, T]
    if name in ("kv_segment_ids", "block_tables"):
      return PartitionSpec(b, None)  # [B, S], [B, pages_per_seq]
    if name == "dropout_seed":
      return PartitionSpec()
    raise AssertionError(f"unknown operand {name!r}")

  def local_spec(self, spec: AttentionSpec, mesh) -> AttentionSpec:
    """The spec each device's shard satisfies."""
    nb, nh, nt = self._sizes(mesh)
    local_shape = lambda shape: None if shape is None else tuple(
        size if size == 1 else size // parts for size, parts in zip(shape, (nb, nh, nt, 1)))
    return dataclasses.replace(
        spec, batch=spec.batch // nb, q_len=spec.q_len // nt,
        num_q_heads=spec.num_q_heads // nh,
        num_kv_heads=spec.num_kv_heads // nh if self.kv_heads_split else 1,
        bias_shape=local_shape(spec.bias_shape), mask_shape=local_shape(spec.mask_shape),
        has_q_offset=spec.has_q_offset or (bool(self.q_seq) and _uses_positions(spec)))

  def dbias_sum_axes(self, bias_shape) -> tuple[str, ...]:
    """Mesh axes over which a bias broadcast along a split dimension collects gradients."""
    axes = ()
    for split, size in zip((self.batch, self.heads, self.q_seq), bias_shape[:3]):
      if size == 1:
        axes += split
    return axes


def _uses_positions(spec: AttentionSpec) -> bool:
  """Whether query positions matter (causal or window rules read q_offset)."""
  return spec.causal or spec.window is not None


def _axes_of(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _choose_split(spec: AttentionSpec, mesh, q_sharding) -> _Split:
  """The split for a call whose q arrives with `q_sharding` (the partitioner's choice)."""
  if not isinstance(q_sharding, NamedSharding) or mesh.empty:
    return _Split()
  if spec.has_dropout:
    logger.warning("flash_jax: dropout reads global batch/head/row indices, so this call "
                   "runs replicated instead of on shards of %s", q_sharding.spec)
    return _Split()
  entries = tuple(q_sharding.spec) + (None,) * (4 - len(q_sharding.spec))
  size = lambda axes: math.prod(mesh.shape[a] for a in axes)
  batch, q_seq, heads = (_axes_of(e) for e in entries[:3])
  if spec.batch % size(batch):
    batch = ()
  if spec.q_len % size(q_seq):
    q_seq = ()
  kv_heads_split = True
  if heads:
    parts = size(heads)
    if spec.num_q_heads % parts:
      heads = ()
    elif spec.num_kv_heads % parts == 0:
      kv_heads_split = True
    elif parts % spec.num_kv_heads == 0:
      kv_heads_split = False  # every head shard lies inside one K/V head's group
    else:
      heads = ()
  return _Split(batch=batch, heads=heads, q_seq=q_seq, kv_heads_split=kv_heads_split,
                paged=spec.paged)


# ---- per-shard bodies -------------------------------------------------------------------

def _linear_index(axes):
  """This device's index along `axes` (major to minor, as a PartitionSpec entry splits)."""
  index = jnp.int32(0)
  for axis in axes:
    index = index * jax.lax.axis_size(axis) + jax.lax.axis_index(axis)
  return index


def _shard_count(axes) -> int:
  return math.prod(jax.lax.axis_size(axis) for axis in axes)


def _localize(q, k, v, arrays: AttentionArrays, split: _Split, local: AttentionSpec):
  """Shard-local inputs: q_offset/q_lengths shifted by the rows before this query shard;
  when K/V heads are not split, the one K/V head this head shard reads."""
  if split.q_seq:
    first_row = _linear_index(split.q_seq) * local.q_len
    q_offset = arrays.q_offset
    if local.has_q_offset:
      base = jnp.zeros((local.batch,), jnp.int32) if q_offset is None else q_offset
      q_offset = base + first_row
    q_lengths = None if arrays.q_lengths is None else arrays.q_lengths - first_row
    arrays = dataclasses.replace(arrays, q_offset=q_offset, q_lengths=q_lengths)
  if split.heads and not split.kv_heads_split:
    kv_head = _kv_head_of_shard(split, local, k.shape[2])
    k = jax.lax.dynamic_slice_in_dim(k, kv_head, 1, axis=2)  # [B, S, 1, H]
    v = jax.lax.dynamic_slice_in_dim(v, kv_head, 1, axis=2)
  return q, k, v, arrays


def _kv_head_of_shard(split: _Split, local: AttentionSpec, num_kv_heads: int):
  """The K/V head read by this head shard's query heads (all in one group)."""
  group = (local.num_q_heads * _shard_count(split.heads)) // num_kv_heads  # G = Nq / Nkv
  return (_linear_index(split.heads) * local.num_q_heads) // group


def _sum_kv_grad(grad, split: _Split, num_kv_heads: int, kv_head):
  """Per-shard dK or dV -> its all-shard sum, in float32 (queries split over T or heads)."""
  grad = grad.astype(jnp.float32)
  axes = split.q_seq
  if split.heads and not split.kv_heads_split:
    full_shape = grad.shape[:2] + (num_kv_heads,) + grad.shape[3:]
    grad = jax.lax.dynamic_update_slice_in_dim(jnp.zeros(full_shape, jnp.float32), grad,
                                               kv_head, axis=2)
    axes = axes + split.heads
  return jax.lax.psum(grad, axes) if axes else grad


# ---- the partitioned ops ------------------------------------------------------------------

def _forward(impl, q, k, v, bias, arrays, spec, config, interpret):
  """(out, lse), and the per-row statistics where `_passes_stats`."""
  if not _passes_stats(impl, spec):
    return impl.forward(q, k, v, bias, arrays, spec, config, interpret)
  out, lse, stats = impl.forward_with_stats(q, k, v, bias, arrays, spec, config, interpret)
  if stats is None:
    raise AssertionError(f"{impl.name} returned no statistics for a call with a bias")
  return (out, lse) + tuple(stats)


def _forward_body(impl, spec, config, interpret, names, *operands):
  q, k, v, bias, arrays, _ = _unflatten(names, operands)
  return _forward(impl, q, k, v, bias, arrays, spec, config, interpret)


def _backward_body(impl, spec, config, interpret, names, *operands):
  q, k, v, bias, arrays, extras = _unflatten(names, operands)
  dq, dk, dv, dbias = _backward(impl, q, k, v, bias, arrays, extras, spec, config, interpret)
  return (dq, dk, dv) if dbias is None else (dq, dk, dv, dbias)


def _passes_stats(impl, spec: AttentionSpec) -> bool:
  """Whether the partitioned forward returns `impl`'s per-row statistics: with a bias
  (the only way to put a huge negative value on every key of a row) when `impl` has
  them. Biased calls are never decode-shaped, so every shard's forward returns them."""
  overrides = type(impl).forward_with_stats is not BlockwiseImplementation.forward_with_stats
  return spec.has_bias and overrides


def _result_names(impl, spec: AttentionSpec, backward: bool):
  if not backward:
    return ("out", "lse") + (_STATS_NAMES if _passes_stats(impl, spec) else ())
  return ("dq", "dk", "dv") + (("dbias",) if spec.computes_dbias else ())


def _partition(impl, spec, config, interpret, names, backward, mesh, arg_shapes, result_shape):
  """custom_partitioning's callback: the split, the per-shard function and its shardings."""
  split = _choose_split(spec, mesh, arg_shapes[0].sharding)
  k_sharding = arg_shapes[1].sharding
  if isinstance(k_sharding, NamedSharding) and len(k_sharding.spec) > 1 and k_sharding.spec[1]:
    logger.info("flash_jax: keys/values sharded along their length (%s) are gathered; "
                "flash_jax.ring_attention attends over a split sequence without gathering",
                k_sharding.spec)
  local = split.local_spec(spec, mesh)
  shardings = lambda names, shapes: tuple(
      NamedSharding(mesh, split.partition_spec(name, shape.shape))
      for name, shape in zip(names, shapes))
  arg_shardings = shardings(names, arg_shapes)
  results = _result_names(impl, spec, backward)
  result_shardings = shardings(results, jax.tree.leaves(result_shape))

  def shard_forward(*operands):
    q, k, v, bias, arrays, _ = _unflatten(names, operands)
    q, k, v, arrays = _localize(q, k, v, arrays, split, local)
    return _forward(impl, q, k, v, bias, arrays, local, config, interpret)

  def shard_backward(*operands):
    q, k_full, v_full, bias, arrays, extras = _unflatten(names, operands)
    q, k, v, arrays = _localize(q, k_full, v_full, arrays, split, local)
    dq, dk, dv, dbias = _backward(impl, q, k, v, bias, arrays, extras, local, config,
                                  interpret)
    kv_head = (_kv_head_of_shard(split, local, spec.num_kv_heads)
               if split.heads and not split.kv_heads_split else None)
    dk = _sum_kv_grad(dk, split, spec.num_kv_heads, kv_head).astype(k_full.dtype)
    dv = _sum_kv_grad(dv, split, spec.num_kv_heads, kv_head).astype(v_full.dtype)
    if dbias is None:
      return dq, dk, dv
    sum_axes = split.dbias_sum_axes(spec.bias_shape)
    if sum_axes:
      dbias = jax.lax.psum(dbias.astype(jnp.float32), sum_axes).astype(bias.dtype)
    return dq, dk, dv, dbias

  return (mesh, shard_backward if backward else shard_forward, result_shardings,
          arg_shardings)


def _infer_result_shardings(impl, spec, config, interpret, names, backward, mesh, arg_shapes,
                            result_shape):
  """GSPMD's propagation callback: the result shardings `_partition` will produce."""
  split = _choose_split(spec, mesh, arg_shapes[0].sharding)
  return tuple(NamedSharding(mesh, split.partition_spec(name, shape.shape))
               for name, shape in zip(_result_names(impl, spec, backward),
                                      jax.tree.leaves(result_shape)))


def _sharding_rule(impl, spec, config, interpret, names, backward, mesh, operand_types,
                   result_types):
  """Shardy's propagation rule: dimensions that share a factor share their sharding.

  B, T, Nq and Nkv may be split (`_partition` decides how); S and the head dims must be
  replicated. Broadcast (size 1) bias/mask dims get factors of their own.
  """
  del config, interpret, mesh, operand_types, result_types
  factors = {"q": "b t n h", "k": "b s m h", "v": "b s m d", "out": "b t n d",
             "dout": "b t n d", "lse": "b n t", "delta": "b n t", "row_max": "b n t",
             "log_sum": "b n t", "q_offset": "b", "q_lengths": "b", "kv_lengths": "b",
             "q_segment_ids": "b t", "kv_segment_ids": "b s", "dropout_seed": "",
             "dq": "b t n h", "dk": "b s m h", "dv": "b s m d"}
  for name, shape in (("bias", spec.bias_shape), ("mask", spec.mask_shape)):
    if shape is not None:
      factors[name] = " ".join(f if size > 1 else f"{name}_{f}1"
                               for f, size in zip(_BIAS_FACTORS, shape))
  factors["dbias"] = factors.get("bias")
  if spec.paged:  # page pools: pages and their slots are never split; tables follow B
    factors.update(k="p c m h", v="p c m d", block_tables="b x")
  mapping = lambda name: ArrayMapping(*factors[name].split())
  operands = tuple(mapping(name) for name in names)
  results = tuple(mapping(name) for name in _result_names(impl, spec, backward))
  # Shardy wants special factors in order of first appearance in the rule.
  order = list(dict.fromkeys(f for m in operands + results for f in m))
  replicated = tuple(sorted({"s", "h", "d", "p", "c", "x"} & set(order), key=order.index))
  return SdyShardingRule(operands, results, need_replication_factors=replicated)


@functools.lru_cache(maxsize=256)
def _partitioned_op(impl, spec, config, interpret, names, backward):
  """The forward (backward) of `impl` for one static call, partitioned and vmappable."""
  body = functools.partial(_backward_body if backward else _forward_body,
                           impl, spec, config, interpret, names)
  statics = (impl, spec, config, interpret, names, backward)

  def op(*operands):
    return body(*operands)

  partitioned_op = custom_partitioning(op)
  partitioned_op.def_partition(
      partition=functools.partial(_partition, *statics),
      infer_sharding_from_operands=functools.partial(_infer_result_shardings, *statics),
      sharding_rule=functools.partial(_sharding_rule, *statics))

  # vmap of a partitioned op: custom_partitioning has no batching rule, so vmap the body.
  vmappable = custom_vmap(lambda *operands: tuple(partitioned_op(*operands)))

  @vmappable.def_vmap
  def _vmap_rule(axis_size, in_batched, *operands):
    in_axes = tuple(0 if batched else None for batched in in_batched)
    results = jax.vmap(body, in_axes=in_axes, axis_size=axis_size)(*operands)
    return tuple(results), tuple(True for _ in results)

  return vmappable


# ---- the wrapper implementation ---------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=True)
class PartitionedImplementation(BlockwiseImplementation):
  """`inner` with its forward and backward split over the mesh under jit; same name."""

  inner: BlockwiseImplementation

  @property
  def name(self):
    return self.inner.name

  @property
  def platforms(self):
    return self.inner.platforms

  @property
  def interpretable(self):
    return self.inner.interpretable

  @property
  def config_type(self):
    return self.inner.config_type

  @property
  def differentiable_backward(self):
    return self.inner.differentiable_backward

  def check(self, spec, *, platform, interpret):
    self.inner.check(spec, platform=platform, interpret=interpret)

  def check_spec(self, spec):
    self.inner.check_spec(spec)

  def check_config(self, config):
    self.inner.check_config(config)

  def default_config(self, spec):
    return self.inner.default_config(spec)

  def forward(self, q, k, v, bias, arrays, spec, config, interpret):
    out, lse, _ = self.forward_with_stats(q, k, v, bias, arrays, spec, config, interpret)
    return out, lse

  def forward_with_stats(self, q, k, v, bias, arrays, spec, config, interpret):
    if interpret:
      # Interpreted kernels are CPU tests and may use callbacks (effects), which
      # custom_partitioning cannot carry: they run unpartitioned.
      return self.inner.forward_with_stats(q, k, v, bias, arrays, spec, config, interpret)
    names, operands = _flatten(q, k, v, bias, arrays)
    op = _partitioned_op(self.inner, spec, config, interpret, names, False)
    out, lse, *stats = op(*operands)
    return out, lse, (tuple(stats) if stats else None)

  def backward(self, q, k, v, bias, arrays, out, lse, dout, delta, spec, config, interpret,
               stats=None):
    stats_kwargs = {} if stats is None else {"stats": stats}
    if interpret:
      return self.inner.backward(q, k, v, bias, arrays, out, lse, dout, delta, spec, config,
                                 interpret, **stats_kwargs)
    row_max, log_sum = (None, None) if stats is None else stats
    names, operands = _flatten(q, k, v, bias, arrays, out=out, lse=lse, row_max=row_max,
                               log_sum=log_sum, dout=dout, delta=delta)
    op = _partitioned_op(self.inner, spec, config, interpret, names, True)
    grads = op(*operands)
    dq, dk, dv = grads[:3]
    return dq, dk, dv, (grads[3] if spec.computes_dbias else None)

  def __repr__(self):
    return f"<flash_jax implementation {self.name!r}, partitioned under jit>"


def clear_caches() -> None:
  """Drops the partitioned ops built so far (they hold compiled code)."""
  _partitioned_op.cache_clear()


def partitioned(impl: Implementation) -> Implementation:
  """`impl`, partitioned over batch, heads and query rows when its inputs are sharded.

  Blockwise implementations (forward + backward) are wrapped; others (the materializing
  "xla" reference) are plain jnp, which XLA partitions by itself, and pass through, as
  does everything in a single-device process, where there is nothing to split.
  """
  if (isinstance(impl, PartitionedImplementation)
      or not isinstance(impl, BlockwiseImplementation) or jax.device_count() == 1):
    return impl
  return _wrap(impl)


@functools.cache
def _wrap(impl: BlockwiseImplementation) -> PartitionedImplementation:
  return PartitionedImplementation(impl)
