"""Smoke tests: the examples train (or generate) a few steps on CPU in seconds."""

from __future__ import annotations

import importlib.util
import pathlib
import re
import subprocess
import sys

import jax
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


# ---- generate.py: decoding with paged and contiguous caches ------------------------------

GENERATE_TINY = ["--requests", "5", "--slots", "2", "--min-prompt", "3", "--max-prompt", "20",
                 "--new-tokens", "10", "--min-new-tokens", "4", "--prefill-chunk", "8",
                 "--page-size", "4", "--max-context", "40", "--layers", "2", "--d-model", "32",
                 "--heads", "4", "--kv-heads", "2", "--data-mb", "0.1", "--dtype", "float32",
                 "--no-progress"]


def test_generate_greedy_paged_equals_contiguous_flax_and_recomputation():
  """Greedy tokens agree: paged cache with continuous batching (5 prompts in 2 slots,
  chunked prefill beside decode steps), the modules' contiguous cache, Flax's own
  MultiHeadAttention decode cache, and full-forward recomputation (--check). The paged
  run takes runs of 3 decode steps per call and reads samples 5 steps behind; the
  contiguous one a step per call, read at once."""
  generate = load_example("generate")
  paged = generate.main(GENERATE_TINY + ["--check", "--steps-per-call", "3", "--read-every", "5"])
  assert paged["check"] is True, paged
  assert paged["calls"] < paged["steps"], paged  # some calls ran several decode steps
  contiguous = generate.main(GENERATE_TINY + ["--cache", "contiguous", "--steps-per-call", "1",
                                              "--read-every", "1"])
  assert contiguous["calls"] == contiguous["steps"], contiguous
  flax_cache = generate.main(GENERATE_TINY + ["--attention", "flax"])
  assert paged["generated"] == contiguous["generated"] == flax_cache["generated"]
  lengths = [len(tokens) for tokens in paged["generated"]]
  assert min(lengths) >= 4 and max(lengths) <= 10 and len(set(lengths)) > 1, lengths
  assert paged["mixed_steps"] > 0, paged  # prefill chunks shared steps with decoding
  # Continuous batching takes fewer steps than Flax's lockstep waves.
  assert paged["steps"] < flax_cache["steps"], (paged["steps"], flax_cache["steps"])
  assert paged["cache_mib"] < contiguous["cache_mib"]


def test_generate_command_line_samples_from_a_checkpoint(tmp_path):
  load_example("train_lm").main(TINY + ["--save", str(tmp_path)])
  proc = subprocess.run([sys.executable, str(EXAMPLES / "generate.py"), *GENERATE_TINY,
                         "--checkpoint", str(tmp_path), "--temperature", "0.8", "--top-k", "5",
                         "--show", "1"], capture_output=True, text=True, timeout=300, check=True)
  summary = [line for line in proc.stdout.splitlines() if line.startswith("SUMMARY ")]
  assert len(summary) == 1, proc.stdout
  fields = dict(re.findall(r"(\w+)=(\S+)", summary[0]))
  assert fields["cache"] == "paged" and int(fields["new_tokens"]) >= 5 * 4, fields
  assert float(fields["tokens_per_s"]) > 0 and float(fields["decode_step_ms"]) > 0, fields
  assert "--- generated" in proc.stdout

  generate = load_example("generate")
  config = generate.train_lm.ModelConfig(**generate.read_checkpoint_config(str(tmp_path)),
                                         attention="flash", dtype="float32",
                                         implementation=None, remat=False)
  params = lambda seed, checkpoint: generate.nnx.state(
      generate.load_model(config, checkpoint, seed), generate.nnx.Param)
  loaded, random = params(1, str(tmp_path)), params(1, None)
  assert jax.tree.all(jax.tree.map(np.array_equal, loaded, params(2, str(tmp_path))))
  assert not jax.tree.all(jax.tree.map(np.array_equal, loaded, random))
