"""Tuning tables: the GPU kernels' default block sizes and schedules, kept as data.

A table is a JSON file for one implementation on one device kind, shipped in the
implementation's package (`kernels/<implementation>/tuning/<kind>.json`, the kind's runs
of characters other than letters and digits written as one "_") or written by
`python -m flash_jax.tune`:

  {
    "schema_version": 1,
    "implementation": "mosaic_gpu",
    "device_kind": "NVIDIA H100 80GB HBM3",     # jax.Device.device_kind; "*": any device
    "about": "where the numbers come from",     # optional
    "entries": [
      {"match": {"head_dim": [64, 128]},        # spec properties; a list: any of them
       "config": {"block_kv": 128},             # fields of the implementation's config
       "reason": "why: what was measured"},
      {"match": {"head_dim": 128, "causal": true}, "config": {"dkv_ping_pong": false},
       "reason": "..."}
    ]
  }

`match` names properties of the call that the implementation's `Schema.keys` lists (the
head dim, causal, dtype, ...); an empty match takes every call. A call's default config
takes each field from the first of these tables that sets it, and within a table from its
last matching entry (general entries first, specific ones after):

  1. the user's tables: `use_table(path)` (the newest first), then the files and folders
     named in the FLASH_JAX_TUNING_PATH environment variable (os.pathsep-separated, in
     that order); a user table counts on its own device kind or, with "*", on any;
  2. the table shipped for the device kind;
  3. the fallback table: for a device without a table of its own, the one named for its
     compute capability (`Schema.by_capability`: other sm90 parts such as H800, H20 or
     GH200 take the H100's), else the reference table (`Schema.reference`, which sets
     every field for every call: the built-in heuristic, for other GPUs and for CPU in
     interpret mode, where the backend's code then fits it to the device).

So a table may set a few fields only. Tables are read once and validated against the
implementation's schema; a bad table raises ValueError naming the file, the entry and
the field. A change of tables counts for calls traced afterwards.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import pathlib
import re
from collections.abc import Callable, Mapping
from typing import Any

from flash_jax import device

SCHEMA_VERSION = 1
ENV_VAR = "FLASH_JAX_TUNING_PATH"
ANY_DEVICE = "*"
# The implementations that keep tuning tables: the module holding each one's `TUNING`
# schema, imported when one of its tables is read.
SCHEMA_MODULES = {"mosaic_gpu": "flash_jax.kernels.mosaic_gpu.config",
                  "triton": "flash_jax.kernels.triton.config"}
_TABLE_KEYS = ("schema_version", "implementation", "device_kind", "about", "entries")
_ENTRY_KEYS = ("match", "config", "reason")


@dataclasses.dataclass(frozen=True)
class Schema:
  """What the tables of one implementation may say, and where its shipped tables lie.

  keys: each match key and the values it takes (`key(spec)` computes them for a call).
  fields: the config fields an entry may set; `required`: those a lookup must end with
  (the reference table sets them for every combination of keys). `plan_fields`: those
  of `fields` that are no config field but positive ints that plan a call (the split-KV
  plan's, split_kv.num_splits). `check(fields)`, given the others, raises ValueError for
  values the implementation's config rejects; `validate` checks a whole entry's config.
  """

  implementation: str
  directory: pathlib.Path
  keys: Mapping[str, tuple]
  key: Callable[[Any], dict]
  fields: tuple[str, ...]
  required: tuple[str, ...]
  check: Callable[[dict], None]
  plan_fields: tuple[str, ...] = ()
  # Devices without a table of their own: those of a compute capability (major) listed
  # here take its table (sm90: H800, H20, GH200, H100 PCIe share the H100's architecture);
  # every other one takes the reference, the card the defaults were measured on, whose
  # table sets every field for every call.
  reference: str = "NVIDIA H100 80GB HBM3"
  by_capability: Mapping[int, str] = dataclasses.field(
      default_factory=lambda: {9: "NVIDIA H100 80GB HBM3"})

  def __hash__(self):
    return hash(self.implementation)

  def validate(self, config: Mapping[str, Any]) -> None:
    """Raises ValueError (or TypeError) for an entry's config the implementation rejects."""
    for name in self.plan_fields:
      value = config.get(name, 1)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    self.check({name: value for name, value in config.items() if name not in self.plan_fields})

  def shipped_path(self, kind: str) -> pathlib.Path:
    return self.directory / f"{file_stem(kind)}.json"


@dataclasses.dataclass(frozen=True)
class Entry:
  match: Mapping[str, tuple]  # key -> the values it accepts
  config: Mapping[str, Any]
  reason: str

  def matches(self, key: Mapping[str, Any]) -> bool:
    return all(_value_in(key.get(name), values) for name, values in self.match.items())


@dataclasses.dataclass(frozen=True)
class Table:
  implementation: str
  device_kind: str
  entries: tuple[Entry, ...]
  origin: str  # the file it came from
  about: str | None = None

  def applies_to(self, kind: str | None) -> bool:
    return self.device_kind == ANY_DEVICE or self.device_kind == kind


@dataclasses.dataclass(frozen=True)
class Choice:
  """A lookup's result: the fields, and for each the table and the reason it came from."""

  fields: dict[str, Any]
  sources: dict[str, tuple[str, str]]  # field -> (table origin, reason)
  tables: tuple[str, ...]  # the tables consulted, first (the strongest) first


def file_stem(kind: str) -> str:
  """'NVIDIA H100 80GB HBM3' -> 'NVIDIA_H100_80GB_HBM3': a shipped table's file name."""
  return re.sub(r"[^A-Za-z0-9]+", "_", kind).strip("_")


def _value_in(value, values: tuple) -> bool:
  """`value` equals one of `values` with the same type (True is no 1 here)."""
  return any(value == v and type(value) is type(v) for v in values)


def schema_for(implementation: str) -> Schema:
  if implementation not in SCHEMA_MODULES:
    raise ValueError(f"tuning tables exist for {sorted(SCHEMA_MODULES)}, not "
                     f"{implementation!r}")
  try:
    module = importlib.import_module(SCHEMA_MODULES[implementation])
  except ImportError as e:
    raise ValueError(f"cannot read a {implementation!r} tuning table: the implementation "
                     f"is unavailable here ({type(e).__name__}: {e})") from e
  return module.TUNING


# ---- reading and checking tables ---------------------------------------------------------

def parse(data: Any, origin: str, schema: Schema | None = None) -> Table:
  """A Table from parsed JSON, checked against its implementation's schema."""
  def fail(where: str, message: str):
    raise ValueError(f"tuning table {origin}: {where}{': ' if where else ''}{message}")

  if not isinstance(data, dict):
    fail("", f"must be a JSON object, got {type(data).__name__}")
  unknown = sorted(set(data) - set(_TABLE_KEYS))
  if unknown:
    fail("", f"unknown keys {unknown}; a table has {list(_TABLE_KEYS)}")
  if data.get("schema_version") != SCHEMA_VERSION:
    fail("schema_version", f"must be {SCHEMA_VERSION}, got {data.get('schema_version')!r}")
  implementation = data.get("implementation")
  if schema is None:
    if not isinstance(implementation, str):
      fail("implementation", f"must name one of {sorted(SCHEMA_MODULES)}")
    schema = schema_for(implementation)
  if implementation != schema.implementation:
    fail("implementation", f"must be {schema.implementation!r}, got {implementation!r}")
  kind = data.get("device_kind")
  if not isinstance(kind, str) or not kind:
    fail("device_kind", f"must be a device kind such as 'NVIDIA H200' or '{ANY_DEVICE}', "
         f"got {kind!r}")
  about = data.get("about")
  if about is not None and not isinstance(about, str):
    fail("about", "must be a string")
  entries = data.get("entries")
  if not isinstance(entries, list):
    fail("entries", "must be a list")
  return Table(implementation, kind, tuple(_parse_entry(e, f"entries[{i}]", schema, fail)
                                           for i, e in enumerate(entries)), origin, about)


def _parse_entry(entry, where: str, schema: Schema, fail) -> Entry:
  if not isinstance(entry, dict):
    fail(where, "must be an object with 'match', 'config' and 'reason'")
  unknown = sorted(set(entry) - set(_ENTRY_KEYS))
  if unknown:
    fail(where, f"unknown keys {unknown}; an entry has {list(_ENTRY_KEYS)}")
  match, config, reason = entry.get("match"), entry.get("config"), entry.get("reason")
  if not isinstance(match, dict):
    fail(f"{where}.match", "must be an object ({} matches every call)")
  if not isinstance(config, dict) or not config:
    fail(f"{where}.config", "must be an object naming at least one field")
  if not isinstance(reason, str) or not reason.strip():
    fail(f"{where}.reason", "must say why (a non-empty string)")
  parsed_match = {}
  for name, value in match.items():
    if name not in schema.keys:
      fail(f"{where}.match", f"unknown key {name!r}; {schema.implementation} tables match "
           f"on {sorted(schema.keys)}")
    values = tuple(value) if isinstance(value, list) else (value,)
    allowed = schema.keys[name]
    bad = [v for v in values if not _value_in(v, allowed)]
    if not values or bad:
      fail(f"{where}.match.{name}", f"{value!r} is not one of {list(allowed)} (or a "
           "non-empty list of them)")
    parsed_match[name] = values
  unknown = sorted(set(config) - set(schema.fields))
  if unknown:
    fail(f"{where}.config", f"unknown fields {unknown}; {schema.implementation} tables "
         f"set {list(schema.fields)}")
  try:
    schema.validate(config)
  except (TypeError, ValueError) as e:
    fail(f"{where}.config", str(e))
  return Entry(parsed_match, dict(config), reason)


def dumps(table: Mapping) -> str:
  """A table (the JSON's content) as text: one line each for an entry's match, config and
  reason, so that a diff shows which entry changed."""
  entries = table.get("entries", [])
  lines = ["{"] + [f"  {json.dumps(key)}: {json.dumps(table[key])},"
                   for key in _TABLE_KEYS[:-1] if key in table]
  lines.append('  "entries": [')
  for i, entry in enumerate(entries):
    lines += ["    {"] + [f"      {json.dumps(key)}: {json.dumps(entry[key])}" + ("," if key != "reason" else "")
                          for key in _ENTRY_KEYS] + ["    }" + ("," if i < len(entries) - 1 else "")]
  return "\n".join(lines + ["  ]", "}"]) + "\n"


def read(path: str | os.PathLike, schema: Schema | None = None) -> Table:
  """One table file, checked (against `schema`, or its implementation's)."""
  path = pathlib.Path(path)
  try:
    data = json.loads(path.read_text())
  except OSError as e:
    raise ValueError(f"tuning table {path}: cannot be read ({e})") from e
  except json.JSONDecodeError as e:
    raise ValueError(f"tuning table {path}: not valid JSON ({e})") from e
  return parse(data, str(path), schema)


def read_tables(path: str | os.PathLike) -> tuple[Table, ...]:
  """The table in a file, or every *.json table in a folder (in name order)."""
  path = pathlib.Path(path)
  if path.is_dir():
    return tuple(read(p) for p in sorted(path.glob("*.json")))
  if not path.exists():
    raise ValueError(f"tuning table {path}: no such file or folder")
  return (read(path),)


@functools.cache
def _shipped(schema: Schema, kind: str) -> Table | None:
  path = schema.shipped_path(kind)
  return read(path, schema) if path.exists() else None


def shipped_kinds(schema: Schema) -> tuple[str, ...]:
  """The device kinds with a table shipped for `schema`'s implementation."""
  return tuple(read(p, schema).device_kind for p in sorted(schema.directory.glob("*.json")))


# ---- the user's tables ---------------------------------------------------------------

_registered: list[tuple[Table, ...]] = []


class UserTables:
  """Tables added by `use_table`; `remove()`, or leave the `with` block, to drop them."""

  def __init__(self, tables: tuple[Table, ...]):
    self.tables = tables

  def remove(self) -> None:
    if self.tables in _registered:
      _registered.remove(self.tables)

  def __enter__(self) -> UserTables:
    return self

  def __exit__(self, *exc) -> None:
    self.remove()


def use_table(table: str | os.PathLike | Mapping | Table) -> UserTables:
  """Makes the default configs come from `table` first: a table file, a folder of them,
  or a table as a dict (the JSON's content) or a parsed `Table`. Read and checked now
  (ValueError if bad); it counts for calls traced afterwards, above the tables named in
  FLASH_JAX_TUNING_PATH and the shipped ones. Returns a handle: `.remove()` drops it, and
  so does leaving `with use_table(...):`."""
  if isinstance(table, Table):
    tables = (table,)
  elif isinstance(table, Mapping):
    tables = (parse(dict(table), "<use_table dict>"),)
  else:
    tables = read_tables(table)
  _registered.append(tables)
  return UserTables(tables)


@functools.cache
def _env_tables(value: str) -> tuple[Table, ...]:
  tables = []
  for part in value.split(os.pathsep):
    if part:
      try:
        tables.extend(read_tables(part))
      except ValueError as e:
        raise ValueError(f"{ENV_VAR}={value!r}: {e}") from e
  return tuple(tables)


def user_tables() -> tuple[Table, ...]:
  """The user's tables, the strongest first: use_table's (newest first), then the
  environment's (in its order)."""
  registered = tuple(t for tables in reversed(_registered) for t in tables)
  return registered + _env_tables(os.environ.get(ENV_VAR, ""))


# ---- lookup -------------------------------------------------------------------------------

def device_tables(schema: Schema, kind: str | None = None,
                  capability: tuple[int, int] | None = None) -> tuple[Table, ...]:
  """The shipped tables for a device kind, the strongest first: its own, if any, then the
  fallback (by compute capability, else the reference). Default: the current device."""
  if kind is None:
    kind, capability = device.kind(), device.compute_capability()
  own = _shipped(schema, kind) if kind else None
  fallback_kind = schema.by_capability.get(capability[0]) if capability else None
  fallback = _shipped(schema, fallback_kind or schema.reference)
  if fallback is None:
    raise ValueError(f"no shipped {schema.implementation} table for "
                     f"{fallback_kind or schema.reference!r} in {schema.directory}")
  return (fallback,) if own is None or own is fallback else (own, fallback)


def lookup(schema: Schema, key: Mapping[str, Any], *, kind: str | None = None,
           capability: tuple[int, int] | None = None) -> Choice:
  """The config fields for a call whose match keys are `key` (`schema.key(spec)`), on the
  current device or the device `kind` given (with its compute `capability`)."""
  device_kind = device.kind() if kind is None else kind
  mine = tuple(t for t in user_tables()
               if t.implementation == schema.implementation and t.applies_to(device_kind))
  tables = mine + device_tables(schema, kind, capability)
  fields, sources = {}, {}
  for table in reversed(tables):  # the weakest first: stronger ones overwrite
    for entry in table.entries:
      if entry.matches(key):
        for name, value in entry.config.items():
          fields[name] = value
          sources[name] = (table.origin, entry.reason)
  missing = [name for name in schema.required if name not in fields]
  if missing:
    raise ValueError(f"no {schema.implementation} tuning entry sets {missing} for "
                     f"{dict(key)} (tables: {[t.origin for t in tables]})")
  return Choice(fields, sources, tuple(t.origin for t in tables))
