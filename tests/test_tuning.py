"""Tuning tables (flash_jax/tuning.py) and the tuner (flash_jax/tune.py).

The tests read the shipped tables instead of pinning their values: every table loads and
names its device; every config it gives for every call it covers is one the kernels
accept; the lookup falls back by compute capability and to the reference table; a
user's table overrides; the tuner's tiny mode writes a table that the loader reads back
and that changes the configs it covers.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import flash_jax
from flash_jax import device, tuning
from flash_jax.spec import AttentionSpec
from flash_jax.kernels.mosaic_gpu import compat
from flash_jax.kernels.mosaic_gpu import config as mosaic_config
from flash_jax.kernels.triton import config as triton_config

SCHEMAS = {"mosaic_gpu": mosaic_config.TUNING, "triton": triton_config.TUNING}
SHIPPED = [(name, path) for name, schema in SCHEMAS.items()
           for path in sorted(schema.directory.glob("*.json"))]
H100, H200 = "NVIDIA H100 80GB HBM3", "NVIDIA H200"


def _on(monkeypatch, kind, capability=(9, 0), multiprocessors=132):
  """Makes the current device look like `kind` to the configs."""
  monkeypatch.setattr(device, "kind", lambda: kind)
  monkeypatch.setattr(device, "compute_capability", lambda: capability)
  monkeypatch.setattr(device, "multiprocessor_count", lambda: multiprocessors)


def _spec(head_dim, dtype="bfloat16", causal=False, decode=False, paged=False, t=512, s=512):
  if decode or paged:
    t, s = 1, 4096
  return AttentionSpec(batch=2, q_len=t, kv_len=s, num_q_heads=8, num_kv_heads=2,
                       head_dim=head_dim, head_dim_v=head_dim, dtype=dtype, scale=0.1,
                       causal=causal, has_kv_lengths=decode,
                       page_size=64 if paged else None, num_pages=256 if paged else None)


def _key_combinations(schema):
  names = list(schema.keys)
  return [dict(zip(names, values)) for values in itertools.product(*schema.keys.values())]


# ---- the shipped tables -------------------------------------------------------------------

def test_the_gpu_tables_are_shipped():
  kinds = {name: tuning.shipped_kinds(schema) for name, schema in SCHEMAS.items()}
  assert all({H100, H200} <= set(found) for found in kinds.values()), kinds


@pytest.mark.parametrize("implementation,path", SHIPPED, ids=lambda x: getattr(x, "name", x))
def test_shipped_table_loads_and_names_its_device(implementation, path):
  table = tuning.read(path, SCHEMAS[implementation])
  assert table.implementation == implementation
  assert path.name == f"{tuning.file_stem(table.device_kind)}.json"
  assert table.entries and all(entry.reason.strip() for entry in table.entries)
  assert json.loads(path.read_text()) == json.loads(tuning.dumps(json.loads(path.read_text())))


@pytest.mark.parametrize("implementation", SCHEMAS)
def test_reference_table_sets_every_field_of_every_call(implementation):
  schema = SCHEMAS[implementation]
  for key in _key_combinations(schema):
    choice = tuning.lookup(schema, key, kind=schema.reference)
    assert choice.tables == (str(schema.shipped_path(schema.reference)),)
    assert set(schema.required) <= set(choice.fields), key


@pytest.mark.parametrize("kind", [H100, H200])
def test_every_triton_table_config_is_accepted(monkeypatch, kind):
  """Each table's config for every key it covers passes TritonConfig's validation and
  resolve, and fits the shared memory of the GPU it is for."""
  _on(monkeypatch, kind)
  schema = SCHEMAS["triton"]
  budget = triton_config.shared_memory_budget()
  for key in _key_combinations(schema):
    if key["paged"] and not key["decode"]:
      continue  # every paged call is decode-shaped
    spec = _spec(key["head_dim"], key["dtype"], key["causal"], key["decode"], key["paged"])
    assert triton_config.table_key(spec) == key
    assert tuning.lookup(schema, key).tables[0] == str(schema.shipped_path(kind))
    config = triton_config.resolve(triton_config.heuristic_config(spec), spec)
    assert all(getattr(config, f.name) is not None for f in dataclasses.fields(config))
    for kernel in ("fwd", "dkv", "dq"):
      assert triton_config.shared_memory_estimate(config, spec, kernel) <= budget, (key, kernel)


@pytest.mark.parametrize("kind", [H100, H200])
def test_every_mosaic_gpu_table_config_is_accepted(monkeypatch, kind):
  _on(monkeypatch, kind)
  schema = SCHEMAS["mosaic_gpu"]
  impl = flash_jax.dispatch.get_implementation("mosaic_gpu")
  for key in _key_combinations(schema):
    spec = _spec(key["head_dim"], key["dtype"], key["causal"])
    assert tuning.lookup(schema, key).tables[0] == str(schema.shipped_path(kind))
    config = impl.default_config(spec)
    impl.check_config(config)
    assert mosaic_config.resolve(config, spec) == config


def test_mosaic_gpu_table_configs_lower_for_cuda(monkeypatch):
  """Every distinct config of the shipped tables lowers, forward, backward and split-KV
  decode, to Mosaic GPU (jax.export for the cuda platform; no GPU needed)."""
  from flash_jax.kernels.mosaic_gpu.implementation import MosaicGPUImplementation
  monkeypatch.setattr(compat, "is_hopper", lambda: True)
  monkeypatch.setattr(MosaicGPUImplementation, "platforms", ("gpu", jax.default_backend()))
  schema = SCHEMAS["mosaic_gpu"]
  configs = {}  # (head dim, config) -> causal: each distinct config lowers once
  for kind in tuning.shipped_kinds(schema):
    for head_dim, causal in itertools.product(schema.keys["head_dim"], (False, True)):
      choice = tuning.lookup(schema, dict(head_dim=head_dim, causal=causal, dtype="bfloat16"),
                             kind=kind)
      fields = {name: value for name, value in choice.fields.items()
                if name not in mosaic_config.PLAN_FIELDS}
      configs.setdefault((head_dim, mosaic_config.MosaicGPUBlockSizes(**fields)), causal)
  for (head_dim, config), causal in configs.items():
    q = jax.ShapeDtypeStruct((1, 256, 2, head_dim), jnp.bfloat16)
    attn = lambda q, k, v: flash_jax.flash_attention(q, k, v, causal=causal,
                                                     implementation="mosaic_gpu",
                                                     block_sizes=config)
    grads = jax.grad(lambda *a: jnp.sum(attn(*a).astype(jnp.float32)), argnums=(0, 1, 2))
    for fn in (attn, grads):
      assert "mosaic_gpu" in jax.export.export(jax.jit(fn), platforms=["cuda"])(q, q, q).mlir_module()
    decode_q = jax.ShapeDtypeStruct((1, 1, 8, head_dim), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((1, 1000, 2, head_dim), jnp.bfloat16)
    text = jax.export.export(jax.jit(attn), platforms=["cuda"])(decode_q, cache, cache).mlir_module()
    assert "split_kv" in text


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_mosaic_gpu_split_candidates_are_table_entries(head_dim):
  """The tuner's split-KV candidates for mosaic_gpu are entries its table schema takes,
  the plan fields included, and each gives a config."""
  from flash_jax import tune
  schema = SCHEMAS["mosaic_gpu"]
  fields_list = tune.candidates("mosaic_gpu", "split", head_dim, tiny=False)
  assert len(fields_list) > 1
  for fields in fields_list:
    schema.validate(fields)
    assert set(fields) <= set(schema.fields)
    assert mosaic_config.MosaicGPUBlockSizes(**{
        k: v for k, v in fields.items() if k not in mosaic_config.PLAN_FIELDS})


# ---- lookup and fallback -------------------------------------------------------------------

@pytest.mark.parametrize("kind,capability,expected", [
    (H100, (9, 0), H100),
    ("NVIDIA H800", (9, 0), H100),  # other sm90 parts: by compute capability
    ("NVIDIA H20", (9, 0), H100),
    ("NVIDIA GH200 480GB", (9, 0), H100),
    ("NVIDIA A100-SXM4-80GB", (8, 0), H100),  # no table, other GPUs: the reference
    ("cpu", None, H100),  # interpret mode
])
def test_lookup_falls_back_to_the_h100_table(monkeypatch, kind, capability, expected):
  _on(monkeypatch, kind, capability)
  for schema in SCHEMAS.values():
    assert tuning.device_tables(schema) == (tuning.read(schema.shipped_path(expected), schema),)


def test_lookup_takes_the_device_table_first(monkeypatch):
  _on(monkeypatch, H200)
  for schema in SCHEMAS.values():
    origins = [t.origin for t in tuning.device_tables(schema)]
    assert origins == [str(schema.shipped_path(H200)), str(schema.shipped_path(schema.reference))]


def test_fallback_by_compute_capability_is_its_own_route(monkeypatch):
  """A capability's table counts for the unknown kinds of that capability only."""
  schema = dataclasses.replace(SCHEMAS["triton"], by_capability={9: H200})
  _on(monkeypatch, "NVIDIA H800", (9, 0))
  assert tuning.device_tables(schema)[0].device_kind == H200
  _on(monkeypatch, "NVIDIA A100-SXM4-80GB", (8, 0))
  assert tuning.device_tables(schema)[0].device_kind == schema.reference


def test_no_device_takes_the_reference(monkeypatch):
  monkeypatch.setattr(device, "default_device", lambda: None)
  schema = SCHEMAS["triton"]
  assert tuning.device_tables(schema)[0].device_kind == schema.reference


# ---- the user's tables --------------------------------------------------------------------

def _table(implementation, entries, kind=tuning.ANY_DEVICE):
  return {"schema_version": 1, "implementation": implementation, "device_kind": kind,
          "entries": entries}


def _entry(config, match=None, reason="a test"):
  return {"match": match or {}, "config": config, "reason": reason}


D128 = _spec(128)


def test_use_table_overrides_the_fields_it_sets():
  before = triton_config.heuristic_config(D128)
  new_stages = 2 if before.num_stages != 2 else 3
  table = _table("triton", [_entry({"num_stages": new_stages}, {"head_dim": 128})])
  with tuning.use_table(table):
    during = triton_config.heuristic_config(D128)
    other = triton_config.heuristic_config(_spec(64))  # the entry does not match d64
  assert during == dataclasses.replace(before, num_stages=new_stages)
  assert other == triton_config.heuristic_config(_spec(64))
  assert triton_config.heuristic_config(D128) == before  # removed on leaving the block


def test_newest_user_table_wins_and_remove_drops_it():
  impl = flash_jax.dispatch.get_implementation("mosaic_gpu")
  spec = _spec(128)
  shipped = impl.default_config(spec)
  first = tuning.use_table(_table("mosaic_gpu", [_entry({"num_stages": 3})]))
  second = tuning.use_table(_table("mosaic_gpu", [_entry({"num_stages": 4})]))
  try:
    assert impl.default_config(spec).num_stages == 4
    second.remove()
    assert impl.default_config(spec).num_stages == 3
  finally:
    first.remove()
    second.remove()
  assert impl.default_config(spec) == shipped


def test_environment_tables_and_device_kinds(monkeypatch, tmp_path):
  """FLASH_JAX_TUNING_PATH names files or folders; a table counts on its own device kind
  (or on any, with "*"); use_table ranks above the environment."""
  folder = tmp_path / "tables"
  folder.mkdir()
  (folder / "mine.json").write_text(json.dumps(_table("triton", [_entry({"num_warps": 2})],
                                                      kind=device.kind())))
  (folder / "other.json").write_text(json.dumps(_table("triton", [_entry({"num_warps": 1})],
                                                       kind="NVIDIA B200")))
  monkeypatch.setenv(tuning.ENV_VAR, str(folder))
  assert triton_config.heuristic_config(D128).num_warps == 2
  choice = tuning.lookup(triton_config.TUNING, triton_config.table_key(D128))
  assert choice.sources["num_warps"] == (str(folder / "mine.json"), "a test")
  assert choice.sources["num_stages"][0] != str(folder / "mine.json")
  with tuning.use_table(_table("triton", [_entry({"num_warps": 16})])):
    assert triton_config.heuristic_config(D128).num_warps == 16
  monkeypatch.setenv(tuning.ENV_VAR, str(folder / "missing.json"))
  with pytest.raises(ValueError, match=f"{tuning.ENV_VAR}=.*missing.json: no such file"):
    triton_config.heuristic_config(D128)


def test_a_user_table_changes_what_flash_attention_runs():
  """The table reaches the kernels: a d16 forward block of 16 rows shows in the number of
  programs of the pallas_call (interpret mode on CPU)."""
  q = jax.random.normal(jax.random.PRNGKey(0), (1, 64, 2, 16), jnp.float32)
  call = lambda: jax.make_jaxpr(lambda q: flash_jax.flash_attention(
      q, q, q, implementation="triton", interpret=True))(q)
  with tuning.use_table(_table("triton", [_entry({"block_q": 16}, {"head_dim": 16})])):
    small = _pallas_grids(call().jaxpr)
  assert small and small != _pallas_grids(call().jaxpr)


def _pallas_grids(jaxpr) -> list:
  """The grid of every pallas_call in a jaxpr, nested jaxprs included."""
  grids = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      grids.append(eqn.params["grid_mapping"].grid)
    for value in eqn.params.values():
      inner = getattr(value, "jaxpr", value)
      if hasattr(inner, "eqns"):
        grids += _pallas_grids(inner)
  return grids


@pytest.mark.parametrize("change,message", [
    (dict(schema_version=2), "schema_version: must be 1"),
    (dict(implementation="cudnn"), "tuning tables exist for"),
    (dict(device_kind=""), "device_kind: must be a device kind"),
    (dict(extra=1), r"unknown keys \['extra'\]"),
    (dict(entries=[_entry({"block_q": 48})]), r"entries\[0\].config: .*block_q=48 must be a power of two"),
    (dict(entries=[_entry({"block_size": 64})]), r"entries\[0\].config: unknown fields \['block_size'\]"),
    (dict(entries=[_entry({"block_q": 64}, {"head_dim": 72})]),
     r"entries\[0\].match.head_dim: 72 is not one of \[16, 32, 64, 128, 256\]"),
    (dict(entries=[_entry({"block_q": 64}, {"window": True})]), r"unknown key 'window'"),
    (dict(entries=[_entry({"block_q": 64}, {"causal": 1})]), r"match.causal: 1 is not one of"),
    (dict(entries=[_entry({"block_q": 64}, reason=" ")]), r"entries\[0\].reason: must say why"),
    (dict(entries=[_entry({"split_min_blocks": 0})]), "split_min_blocks must be a positive int"),
    (dict(entries=[_entry({"num_stages_one_split": True})]),
     r"entries\[0\].config: num_stages_one_split must be a positive int, got True"),
    (dict(entries=[_entry({})]), r"entries\[0\].config: must be an object naming at least one"),
])
def test_bad_tables_raise_naming_the_place(change, message):
  with pytest.raises(ValueError, match=message):
    tuning.use_table({**_table("triton", [_entry({"num_warps": 4})]), **change})


def test_bad_files_raise_naming_the_file(tmp_path):
  path = tmp_path / "broken.json"
  path.write_text("{not json")
  with pytest.raises(ValueError, match="broken.json: not valid JSON"):
    tuning.use_table(path)
  path.write_text(json.dumps(_table("mosaic_gpu", [_entry({"block_q": 128})])))
  with pytest.raises(ValueError, match=r"broken.json: entries\[0\].config: block_q=128 must be 64"):
    tuning.use_table(path)
  path.write_text(json.dumps(_table("mosaic_gpu", [_entry({"split_min_blocks": 2.0})])))
  with pytest.raises(ValueError, match="split_min_blocks must be a positive int, got 2.0"):
    tuning.use_table(path)
  with pytest.raises(ValueError, match="no such file"):
    tuning.use_table(tmp_path / "absent.json")


# ---- the tuner ------------------------------------------------------------------------

def test_importing_flash_jax_does_not_import_the_tuner():
  code = ("import sys, flash_jax; flash_jax.tuning.use_table; "
          "assert 'flash_jax.tune' not in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """`python -m flash_jax.tune --tiny` for triton's forward and split-KV fields, with
  the forward candidate of 16-row blocks made wrong (its output shifted) so that the
  check must drop it."""
  from flash_jax import tune
  original = tune._attention  # pylint: disable=protected-access

  def wrong_for_16_rows(settings, causal, implementation=None):
    fn = original(settings, causal, implementation)

    def attention(q, k, v):
      candidate = tuning.user_tables()[0].entries[-1].config if tuning.user_tables() else {}
      shift = 1.0 if implementation is None and candidate.get("block_q") == 16 else 0.0
      return fn(q, k, v) + shift
    return attention

  out = tmp_path_factory.mktemp("tune") / "table.json"
  lines = []
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(tune, "_attention", wrong_for_16_rows)
    tune.main(["--implementation", "triton", "--tiny", "--groups", "fwd", "split",
               "--out", str(out)], log=lines.append)
  return out, lines


def test_tuner_drops_and_reports_a_wrong_candidate(tiny_run):
  out, lines = tiny_run
  assert any(line.strip().startswith("DROP block_q=16") and "out" in line and "FAIL" in line
             for line in lines), lines
  table = tuning.read(out)
  (fwd,) = [e for e in table.entries if "block_q" in e.config]
  assert fwd.config["block_q"] == 32 and "dropped 1: block_q=16" in fwd.reason


def test_tuner_table_is_read_back_and_changes_the_configs(tiny_run, monkeypatch):
  out, _ = tiny_run
  table = tuning.read(out)
  assert table.implementation == "triton" and table.device_kind == device.kind()
  assert {tuple(sorted(e.match)) for e in table.entries} == {
      ("causal", "dtype", "head_dim"), ("decode", "dtype", "head_dim")}
  # The tiny problems' calls: the training one (d32, causal, float32) and a decode one.
  specs = [_spec(32, "float32", causal=True, t=64, s=64), _spec(32, "float32", decode=True)]
  before = [triton_config.heuristic_config(spec) for spec in specs]
  monkeypatch.setenv(tuning.ENV_VAR, str(out))
  after = [triton_config.heuristic_config(spec) for spec in specs]
  for entry in table.entries:
    (spec_before, spec_after), = [(b, a) for s, b, a in zip(specs, before, after)
                                  if entry.matches(triton_config.table_key(s))]
    chosen = {name: getattr(spec_after, name, None) for name in entry.config}
    for name, value in entry.config.items():
      if name in triton_config.PLAN_FIELDS:
        continue
      assert chosen[name] == value, (name, entry)
    assert spec_after != spec_before
