"""Plots of `python -m flash_jax.bench` runs: TFLOP/s against sequence length, as the
FlashAttention papers show them.

    python -m flash_jax.bench --plot out.png                   # run, then plot
    python -m flash_jax.bench --plot out.svg --from-json docs/measurements/*.json

One panel per (mode, causal, head dim): rows of the grid are forward / forward+backward,
not causal / causal; columns are head dims. One line per implementation: flash_jax's
solid, jax.nn's dashed, peers' (`--peers`) dash-dotted, each in the same colour in every
panel. matplotlib is an optional dependency (`pip install "flash_jax[plot]"`), imported
only here and only when a plot is drawn; it draws on a bare `Figure`, so no GUI backend
and no pyplot state are involved.
"""

from __future__ import annotations

import json
import pathlib

EXTRA = "flash_jax[plot]"
MODES = {"fwd": "forward", "fwd_bwd": "forward+backward"}
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
          "#7f7f7f", "#bcbd22", "#17becf")  # matplotlib's tab10, by first appearance


def require_matplotlib():
  """matplotlib's Figure class, or an ImportError that says which extra to install."""
  try:
    from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"plotting needs matplotlib, an optional dependency of flash_jax: "
                      f"pip install '{EXTRA}' (or pip install matplotlib)") from e
  return Figure


def load(paths) -> dict:
  """The rows of earlier runs' JSON files (`python -m flash_jax.bench --json FILE`), merged:
  where two files time the same problem for one implementation, the later file wins
  (pass files oldest first, e.g. docs/measurements/*.json, whose names start with the
  date). Decode runs (`--decode`) are not plotted and are skipped. Returns {"rows": [...],
  "title": "<device>, JAX <version>, <dtype>; ...", "skipped": [paths of decode runs]}."""
  merged, sources, skipped = {}, {}, []
  for path in map(pathlib.Path, paths):
    run = json.loads(path.read_text())
    if run.get("mode") == "decode":
      skipped.append(str(path))
      continue
    for row in run["rows"]:
      merged[(row["implementation"], *_problem(row))] = row
      sources[(run.get("device", "?"), run.get("jax", "?"), row.get("dtype", "?"))] = None
  if not merged:
    raise ValueError(f"no bench rows to plot in {', '.join(map(str, paths))}"
                     + (" (decode runs are not plotted)" if skipped else ""))
  return dict(rows=list(merged.values()), title=_title(sources), skipped=skipped)


def _title(sources) -> str:
  """'<device>, JAX <version>, <dtype>' for each distinct (device, jax, dtype)."""
  return "; ".join(f"{device}, JAX {jax_version}, {dtype}"
                   for device, jax_version, dtype in sources)


def head_dims(row) -> tuple[int, int]:
  """(H, Hv) of a bench row (rows without "head_dim_v" have Hv = H)."""
  return row["head_dim"], row.get("head_dim_v") or row["head_dim"]


def head_dims_label(row) -> str:
  """'128', or '192/128' where Hv != H."""
  h, hv = head_dims(row)
  return str(h) if hv == h else f"{h}/{hv}"


def _problem(row) -> tuple:
  return (row["mode"], head_dims(row), row["causal"], row["seq_len"])


def figure(rows, *, title: str | None = None):
  """A matplotlib Figure of `rows` (the bench's rows; those without "tflops", declined or
  failed, leave a gap): one panel per (mode, causal, head dim) present, one line per
  implementation, TFLOP/s against sequence length on a log-2 axis."""
  Figure = require_matplotlib()  # pylint: disable=invalid-name
  timed = [r for r in rows if "tflops" in r]
  if not timed:
    raise ValueError("no timed rows to plot (every contender declined or failed)")
  # flash_jax's implementations first, then jax.nn's, then peers', each in order of appearance.
  names = sorted(dict.fromkeys(r["implementation"] for r in rows), key=_kind)
  sections = sorted({(r["mode"], r["causal"]) for r in timed},
                    key=lambda s: (list(MODES).index(s[0]), s[1]))
  dims = sorted({head_dims(r) for r in timed})
  fig = Figure(figsize=(4.2 * len(dims), 3.2 * len(sections) + 0.8), layout="constrained")
  grid = fig.subplots(len(sections), len(dims), squeeze=False)
  handles = {}
  for (mode, causal), panels in zip(sections, grid):
    for dim, ax in zip(dims, panels):
      here = [r for r in timed if (r["mode"], r["causal"], head_dims(r)) == (mode, causal, dim)]
      if not here:  # e.g. a head dim timed forward only
        ax.remove()
        continue
      for i, name in enumerate(names):
        points = sorted((r["seq_len"], r["tflops"]) for r in here if r["implementation"] == name)
        if points:
          seqs, tflops = zip(*points)
          handles[name], = ax.plot(seqs, tflops, label=name, color=COLORS[i % len(COLORS)],
                                   **_style(name))
      seq_lens = sorted({r["seq_len"] for r in here})
      ax.set_xscale("log", base=2)
      ax.set_xticks(seq_lens, [_seq_label(s) for s in seq_lens])
      ax.minorticks_off()
      ax.set_ylim(bottom=0)
      ax.grid(alpha=0.3)
      ax.set_title(f"{MODES.get(mode, mode)}, head dim {head_dims_label(here[0])}, "
                   f"{'causal' if causal else 'not causal'}", fontsize=10)
      ax.set_xlabel("sequence length")
      ax.set_ylabel("TFLOP/s")
  ordered = [name for name in names if name in handles]
  fig.legend([handles[n] for n in ordered], ordered, loc="outside lower center",
             ncols=min(len(ordered), 5), frameon=False)
  if title:
    fig.suptitle(title)
  return fig


def save(rows, path, *, title: str | None = None) -> pathlib.Path:
  """Draws `figure(rows, title=...)` to `path`; the format follows its suffix (png, svg,
  pdf)."""
  path = pathlib.Path(path)
  figure(rows, title=title).savefig(path, dpi=150)
  return path


def _kind(name: str) -> int:
  """0: a flash_jax implementation ("mosaic_gpu"), 1: jax.nn ("jax.nn[cudnn]"), 2: a peer
  ("torch.sdpa[cudnn]")."""
  return 0 if "[" not in name else 1 if name.startswith("jax.nn[") else 2


def _style(name: str) -> dict:
  linestyle, marker = (("-", "o"), ("--", "s"), ("-.", "^"))[_kind(name)]
  return dict(linestyle=linestyle, marker=marker, markersize=4)


def _seq_label(seq_len: int) -> str:
  return f"{seq_len // 1024}k" if seq_len >= 1024 and seq_len % 1024 == 0 else str(seq_len)
