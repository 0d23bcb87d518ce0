"""Smoke tests: the examples train a few steps on CPU in seconds."""

from __future__ import annotations

import importlib.util
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("optax")

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
TINY = ["--steps", "4", "--warmup-steps", "1", "--seq-len", "32", "--batch", "2", "--layers", "1",
        "--d-model", "32", "--heads", "4", "--kv-heads", "2", "--data-mb", "0.25",
        "--log-every", "2"]


def load_example(name):
  spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up while it executes
  spec.loader.exec_module(module)
  return module


def test_train_lm_all_attentions_agree():
  train_lm = load_example("train_lm")
  results = {a: train_lm.main(TINY + ["--attention", a, "--dtype", "float32"])
             for a in train_lm.ATTENTIONS}
  for attention, r in results.items():
    assert np.isfinite([r["first_loss"], r["final_loss"], r["eval_loss"]]).all(), r
    assert r["step_ms"] > 0 and r["tokens_per_s"] > 0, r
  # One seed gives one model whatever the attention: the first losses agree.
  first = [r["first_loss"] for r in results.values()]
  assert max(first) - min(first) < 1e-3, results
  assert results["flash"]["implementation"] in train_lm.flash_jax.implementation_names()


def test_train_lm_command_line_prints_summary():
  proc = subprocess.run([sys.executable, str(EXAMPLES / "train_lm.py"), *TINY, "--remat"],
                        capture_output=True, text=True, timeout=300, check=True)
  summary = [line for line in proc.stdout.splitlines() if line.startswith("SUMMARY ")]
  assert len(summary) == 1, proc.stdout
  fields = dict(re.findall(r"(\w+)=(\S+)", summary[0]))
  assert fields["attention"] == "flash" and fields["seq_len"] == "32", fields
  assert float(fields["step_ms"]) > 0 and float(fields["tokens_per_s"]) > 0, fields


def test_linen_example():
  result = load_example("linen_example").main(
      ["--steps", "3", "--seq-len", "32", "--batch", "2", "--d-model", "32", "--data-mb", "0.25"])
  assert np.isfinite([result["first_loss"], result["final_loss"]]).all(), result
