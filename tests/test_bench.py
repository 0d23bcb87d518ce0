"""flash_jax.bench: the interleaved timing and a whole (tiny) run on the host platform."""

import json

import jax.numpy as jnp
import pytest

from flash_jax import bench


def test_time_interleaved_rotates_order_and_drops_failures():
  order = []

  def call(name, fail_at=None):
    def run(i):
      order.append((i, name))
      if i == fail_at:
        raise RuntimeError("out of memory")
    return run

  calls = {"a": call("a"), "b": call("b"), "c": call("c", fail_at=1)}
  seconds, failed = bench.time_interleaved(calls, repeats=4)
  assert set(seconds) == {"a", "b"} and all(s >= 0 for s in seconds.values())
  assert set(failed) == {"c"} and "out of memory" in str(failed["c"])
  rounds = [[name for i, name in order if i == r] for r in range(4)]
  # Round i starts with the i-th name; "c" is not called again after it failed in round 1.
  assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["a", "b"], ["a", "b"]]
  assert bench.time_interleaved({}, repeats=3) == ({}, {})


def test_bench_runs_and_reports_every_contender(tmp_path, capsys):
  out = tmp_path / "rows.json"
  bench.main(["--seq-lens", "64", "--head-dims", "32", "--causal", "both",
              "--modes", "fwd", "fwd_bwd", "--tokens", "128", "--model-dim", "64",
              "--dtype", "float32", "--implementations", "chunked", "--warmup", "1",
              "--repeats", "2", "--json", str(out)])
  rows = json.loads(out.read_text())["rows"]
  assert {(r["mode"], r["causal"], r["implementation"]) for r in rows} == {
      (mode, causal, name) for mode in ("fwd", "fwd_bwd") for causal in (False, True)
      for name in ("chunked", "jax.nn[xla]")}
  for r in rows:
    assert r["batch"] == 2 and r["heads"] == 2
    assert r["tflops"] > 0 and r["ms"] > 0, r
    assert r["tflops"] == pytest.approx(
        bench.Problem(64, 32, r["causal"], r["mode"], 128, 64, "float32").flops()
        / (r["ms"] * 1e-3) / 1e12)
  table = capsys.readouterr().out
  assert "chunked" in table and "jax.nn[xla]" in table and "fwd_bwd" in table


def test_run_reports_declined_and_failing_contenders():
  problem = bench.Problem(64, 32, False, "fwd", 128, 64, "float32")

  def declines(q, k, v, causal):
    raise NotImplementedError("head_dim=32")

  def fails(q, k, v, causal):
    raise ValueError("broken")

  contenders = {"xla": lambda q, k, v, causal: q * 2, "declines": declines, "fails": fails}
  rows = {r["implementation"]: r for r in bench.run([problem], contenders, warmup=1,
                                                    repeats=2, log=None)}
  assert rows["xla"]["tflops"] > 0
  assert rows["declines"]["status"] == "n/a: head_dim=32"
  assert rows["fails"]["status"].startswith("error: ValueError: broken")
  lines = bench.compare_lines({"base": lambda x: x + 1, "other": lambda x: x * 2},
                              [(jnp.ones(8),)], flops=1e9, describe="d32", warmup=1, repeats=3,
                              base="base")
  assert lines[0].startswith("d32") and lines[0].endswith("1.00x") and "other" in lines[1]
