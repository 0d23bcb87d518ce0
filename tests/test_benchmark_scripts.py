"""Smoke tests: the generation benchmarks run their --tiny problems on CPU (the GPU runs
use the same code at issue 17's sizes)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("flax")

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize("script", ["generate_gpu.py", "decode_step_gpu.py"])
def test_generation_benchmark_runs_tiny(script):
  proc = subprocess.run([sys.executable, str(BENCHMARKS / script), "--tiny"],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  if script == "generate_gpu.py":  # the table, with a row per layout and cache
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| mha")
            or line.startswith("| gqa")]
    assert len(rows) == 6, proc.stdout
  else:  # one JSON row per layout and cache, each timed
    rows = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 4 and all('"device_ms"' in row for row in rows), proc.stdout
