"""The performance tables and plot of the docs, regenerated from docs/measurements/*.json.

    python benchmarks/perf_tables.py           # rewrite them
    python benchmarks/perf_tables.py --check   # exit 1 if any is out of date (tests/test_docs.py)

Each measurement file is the JSON that `python -m flash_jax.bench --json FILE` writes
(device, jax, rows), named `<YYYY-MM-DD>_<what>.json`. The folder holds today's standing
only: a new run replaces the file it supersedes (git keeps the old one). Where two files
time the same problem for one implementation, the newer file (by the date in its name)
wins. A ratio is always taken against `jax.nn[cudnn]` in the same file, i.e. the same
process on the same card, since cards and runs differ by several percent.

Tables go between `<!-- perf_tables:NAME -->` and `<!-- /perf_tables -->` markers in
docs/performance.md (one per backend) and README.md (the head-dim-128 summary); the plot
is docs/performance.svg. Runs anywhere, no GPU (the decode tables reuse the bench's own
formatter, flash_jax.bench_decode.table).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
MEASUREMENTS = ROOT / "docs" / "measurements"
PERFORMANCE_MD = ROOT / "docs" / "performance.md"
README_MD = ROOT / "README.md"
PLOT = ROOT / "docs" / "performance.svg"

BASELINE = "jax.nn[cudnn]"
BACKENDS = ("mosaic_gpu", "triton", "mosaic_tpu")  # table order; absent ones are skipped
MODES = {"fwd": "forward", "fwd_bwd": "forward+backward"}
SUMMARY_HEAD_DIM = 128
MARKER = re.compile(r"(<!-- perf_tables:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /perf_tables -->)",
                    re.DOTALL)


@dataclasses.dataclass(frozen=True)
class Result:
  """One implementation's time on one problem, with cuDNN's from the same run."""
  mode: str
  head_dims: tuple[int, int]  # (H, Hv)
  seq_len: int
  causal: bool
  tflops: float
  baseline_tflops: float | None
  source: pathlib.Path
  device: str
  jax: str

  @property
  def ratio(self) -> float | None:
    return self.tflops / self.baseline_tflops if self.baseline_tflops else None

  @property
  def date(self) -> str:
    return self.source.name[:10]


def _runs(folder: pathlib.Path, decode: bool):
  """(path, run) of each measurement file, oldest first: the decode benchmark's files
  (`--decode`, "mode": "decode") or the others."""
  for path in sorted(folder.glob("*.json")):  # date-first names: older files first
    if not re.match(r"\d{4}-\d{2}-\d{2}_", path.name):
      raise ValueError(f"{path.name}: measurement files are named <YYYY-MM-DD>_<what>.json")
    run = json.loads(path.read_text())
    if (run.get("mode") == "decode") == decode:
      yield path, run


def load(folder: pathlib.Path = MEASUREMENTS) -> dict[str, dict[tuple, Result]]:
  """{implementation: {(mode, (H, Hv), seq_len, causal): Result}}, newest file winning."""
  results: dict[str, dict[tuple, Result]] = {}
  for path, run in _runs(folder, decode=False):
    # The paper protocol's rows: runs with dropout (`--dropout`) are quoted in prose.
    timed = [r for r in run["rows"] if "tflops" in r and not r.get("dropout_rate")]
    baseline = {_key(r): r["tflops"] for r in timed if r["implementation"] == BASELINE}
    for r in timed:
      if r["implementation"].startswith("jax.nn["):
        continue
      results.setdefault(r["implementation"], {})[_key(r)] = Result(
          *_key(r), tflops=r["tflops"], baseline_tflops=baseline.get(_key(r)), source=path,
          device=run["device"], jax=run["jax"])
  return results


def _key(row) -> tuple:
  head_dims = (row["head_dim"], row.get("head_dim_v") or row["head_dim"])
  return (row["mode"], head_dims, row["seq_len"], row["causal"])


def _dims(head_dims) -> str:
  """(128, 128) -> 'd128'; (192, 128) -> 'd192/128' (Hv != H)."""
  h, hv = head_dims
  return f"d{h}" if h == hv else f"d{h}/{hv}"


def _cell(result: Result | None) -> str:
  if result is None:
    return "–"
  ratio = f" ({result.ratio:.2f}×)" if result.ratio is not None else ""
  return f"{result.tflops:.0f}{ratio}"


def _provenance(results, link_base: str) -> str:
  """'Measured on <card>, <date>, JAX <ver> (files).' for each distinct run."""
  runs = {}
  for r in results:
    runs.setdefault((r.device, r.date, r.jax), set()).add(r.source.name)
  parts = []
  for (device, date, jax_version), names in sorted(runs.items(), key=lambda kv: kv[0][1]):
    files = ", ".join(f"[{n}]({link_base}{n})" for n in sorted(names))
    parts.append(f"{device}, {date}, JAX {jax_version} ({files})")
  return "Measured on " + "; ".join(parts) + "."


def backend_table(name: str, results: dict[tuple, Result], link_base: str) -> str:
  """Rows (mode, causal, seq), one column per head dim: TFLOP/s (ratio to cuDNN)."""
  head_dims = sorted({k[1] for k in results})
  rows = sorted({(k[0], k[3], k[2]) for k in results},
                key=lambda r: (list(MODES).index(r[0]), r[1], r[2]))
  lines = [f"| mode | causal | seq | " + " | ".join(_dims(d) for d in head_dims) + " |",
           "| --- | --- | ---: | " + " | ".join("---:" for _ in head_dims) + " |"]
  for mode, causal, seq in rows:
    cells = [_cell(results.get((mode, d, seq, causal))) for d in head_dims]
    lines.append(f"| {MODES[mode]} | {'yes' if causal else 'no'} | {seq} | "
                 + " | ".join(cells) + " |")
  return "\n".join([
      f"`{name}`, bf16, TFLOP/s (ratio to cuDNN in the same run). "
      + _provenance(results.values(), link_base), "", *lines, ""])


def summary_table(all_results, link_base: str) -> str:
  """Head dim 128 at the sequence lengths the first backend was timed at, every backend."""
  backends = [b for b in BACKENDS if b in all_results]
  summary = (SUMMARY_HEAD_DIM, SUMMARY_HEAD_DIM)
  keys = sorted({k for k in all_results[backends[0]] if k[1] == summary},
                key=lambda k: (list(MODES).index(k[0]), k[2], k[3]))
  lines = ["| mode | seq | causal | " + " | ".join(f"`{b}`" for b in backends) + " |",
           "| --- | ---: | --- | " + " | ".join("---:" for _ in backends) + " |"]
  shown = []
  for key in keys:
    cells = [all_results[b].get(key) for b in backends]
    shown += [c for c in cells if c is not None]
    lines.append(f"| {MODES[key[0]]} | {key[2]} | {'yes' if key[3] else 'no'} | "
                 + " | ".join(_cell(c) for c in cells) + " |")
  return "\n".join([
      f"bf16, head dim {SUMMARY_HEAD_DIM}, TFLOP/s (ratio to cuDNN in the same run). "
      + _provenance(shown, link_base), "", *lines, ""])


def decode_table(path: pathlib.Path, run, link_base: str) -> str:
  """One decode run (`python -m flash_jax.bench --decode`), as the bench prints it
  (`flash_jax.bench_decode.table`), with its provenance."""
  from flash_jax import bench_decode  # pylint: disable=import-outside-toplevel
  rated = bench_decode.RATED_BANDWIDTH.get(run["device"])
  protocol = {"loop": "calls inside one compiled loop", "call": "one host dispatch per call"}
  return "\n".join([
      f"bf16, ragged lengths 75–100% of S, page size 64; {protocol[run['protocol']]}; "
      f"TB/s of the K/V bytes that must be read"
      + (f" (share of the rated {rated / 1e12:.1f} TB/s)" if rated else "")
      + f", ratio to cuDNN in the same run. Measured on {run['device']}, {path.name[:10]}, "
      f"JAX {run['jax']} ([{path.name}]({link_base}{path.name})).", "",
      bench_decode.table(run["rows"], run["device"]), ""])


def decode_tables(link_base: str, folder: pathlib.Path = MEASUREMENTS) -> dict[str, str]:
  """{"decode-loop": table, "decode-call": table}: the newest decode run of each protocol."""
  newest = {}
  for path, run in _runs(folder, decode=True):
    newest[run["protocol"]] = (path, run)
  return {f"decode-{protocol}": decode_table(path, run, link_base)
          for protocol, (path, run) in newest.items()}


def fill(text: str, tables: dict[str, str], where: str) -> str:
  """Replaces each marked block's body; every marker must have a table and vice versa."""
  found = set()

  def replace(m):
    name = m.group("name")
    if name not in tables:
      raise KeyError(f"{where}: no table named {name!r} (known: {sorted(tables)})")
    found.add(name)
    return m.group(1) + tables[name] + m.group(4)

  text = MARKER.sub(replace, text)
  if missing := set(tables) - found:
    raise KeyError(f"{where}: no <!-- perf_tables:NAME --> marker for {sorted(missing)}")
  return text


# ----------------------------------------------------------------------------- the plot

COLORS = {64: "#4c78a8", 128: "#f58518", 256: "#54a24b"}
GAP, GROUP_GAP, PANEL_H, TOP, LEFT = 1, 8, 170, 48, 48
Y_MAX = 1.4


def plot(all_results) -> str:
  """One panel per backend: each problem's ratio to cuDNN, bars coloured by head dim."""
  backends = [b for b in BACKENDS if b in all_results]
  panels, y = [], TOP
  width = 0
  for name in backends:
    svg, w = _panel(name, all_results[name], y)
    panels.append(svg)
    width = max(width, w)
    y += PANEL_H + 80
  legend = [f'<rect x="{LEFT + 200 + 60 * i}" y="8" width="10" height="10" fill="{c}"/>'
            f'<text x="{LEFT + 214 + 60 * i}" y="17">d{d}</text>'
            for i, (d, c) in enumerate(COLORS.items())]
  return "\n".join([
      f'<svg xmlns="http://www.w3.org/2000/svg" width="{width + 20}" height="{y - 40}" '
      f'font-family="sans-serif" font-size="10">',
      f'<rect width="100%" height="100%" fill="white"/>',
      f'<text x="{LEFT}" y="17" font-size="12">TFLOP/s ÷ cuDNN (same run)</text>',
      *legend, *panels, "</svg>", ""])


def _panel(name, results, top) -> tuple[str, int]:
  """The paper's head dims (COLORS) only; the tables show every head dim measured."""
  results = {k: r for k, r in results.items() if k[1][0] in COLORS and k[1][0] == k[1][1]}
  head_dims = sorted({k[1] for k in results})
  groups = sorted({(k[0], k[3], k[2]) for k in results},
                  key=lambda r: (list(MODES).index(r[0]), r[1], r[2]))
  y_of = lambda ratio: top + PANEL_H * (1 - min(ratio, Y_MAX) / Y_MAX)
  bar = max(7, min(18, 560 // (len(groups) * len(head_dims))))  # few problems: wider bars
  out, x = [], LEFT + GROUP_GAP
  section_start, section = x, None
  sections = []
  for mode, causal, seq in groups:
    if (mode, causal) != section:
      if section is not None:
        sections.append((section, section_start, x - GROUP_GAP))
        x += 2 * GROUP_GAP
      section, section_start = (mode, causal), x
    start = x
    for d in head_dims:
      r = results.get((mode, d, seq, causal))
      if r is not None and r.ratio is not None:
        out.append(f'<rect x="{x}" y="{y_of(r.ratio):.1f}" width="{bar}" '
                   f'height="{top + PANEL_H - y_of(r.ratio):.1f}" fill="{COLORS[d[0]]}">'
                   f'<title>{MODES[mode]} {_dims(d)} s{seq} {"causal" if causal else "full"}: '
                   f'{r.ratio:.2f}×</title></rect>')
      x += bar + GAP
    label = f"{seq // 1024}k" if seq >= 1024 else str(seq)
    out.append(f'<text x="{(start + x) / 2:.1f}" y="{top + PANEL_H + 11}" '
               f'text-anchor="middle" font-size="8">{label}</text>')
    x += GROUP_GAP
  sections.append((section, section_start, x - GROUP_GAP))
  for (mode, causal), a, b in sections:
    for line, text in enumerate((MODES[mode], "causal" if causal else "full")):
      out.append(f'<text x="{(a + b) / 2:.1f}" y="{top + PANEL_H + 24 + 11 * line}" '
                 f'text-anchor="middle">{text}</text>')
  right = x
  devices = ", ".join(sorted({r.device for r in results.values()}))
  axis = [f'<text x="{LEFT}" y="{top - 8}" font-size="11"><tspan font-weight="bold">{name}</tspan>'
          f' ({devices})</text>',
          f'<line x1="{LEFT}" y1="{top + PANEL_H}" x2="{right}" y2="{top + PANEL_H}" stroke="black"/>',
          f'<line x1="{LEFT}" y1="{top}" x2="{LEFT}" y2="{top + PANEL_H}" stroke="black"/>']
  for tick in (0.0, 0.5, 1.0):
    ty = y_of(tick)
    axis.append(f'<text x="{LEFT - 4}" y="{ty + 3:.1f}" text-anchor="end">{tick:.1f}</text>')
    style = 'stroke="#c00" stroke-dasharray="4 3"' if tick == 1.0 else 'stroke="#ddd"'
    axis.append(f'<line x1="{LEFT}" y1="{ty:.1f}" x2="{right}" y2="{ty:.1f}" {style}/>')
  return "\n".join(axis + out), right


# ------------------------------------------------------------------------------ driver

def render() -> dict[pathlib.Path, str]:
  """{path: the file's content as it should be}."""
  all_results = load()
  link_from_docs = os.path.relpath(MEASUREMENTS, PERFORMANCE_MD.parent) + "/"
  link_from_root = os.path.relpath(MEASUREMENTS, README_MD.parent) + "/"
  docs_tables = {b: backend_table(b, all_results[b], link_from_docs)
                 for b in BACKENDS if b in all_results}
  docs_tables.update(decode_tables(link_from_docs))
  readme_tables = {"summary": summary_table(all_results, link_from_root),
                   "decode": decode_tables(link_from_root).get("decode-loop", "")}
  return {
      PERFORMANCE_MD: fill(PERFORMANCE_MD.read_text(), docs_tables, PERFORMANCE_MD.name),
      README_MD: fill(README_MD.read_text(), readme_tables, README_MD.name),
      PLOT: plot(all_results),
  }


def stale() -> list[pathlib.Path]:
  """The files whose content differs from what render() gives."""
  return [p for p, text in render().items() if not p.exists() or p.read_text() != text]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true", help="only report files that are out of date")
  args = parser.parse_args(argv)
  if args.check:
    out_of_date = stale()
    for p in out_of_date:
      print(f"out of date: {p.relative_to(ROOT)} (run python benchmarks/perf_tables.py)")
    return 1 if out_of_date else 0
  for path, text in render().items():
    if not path.exists() or path.read_text() != text:
      path.write_text(text)
      print(f"wrote {path.relative_to(ROOT)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
