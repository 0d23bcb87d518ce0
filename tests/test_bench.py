"""flash_jax.bench: the interleaved timing and a whole (tiny) run on the host platform."""

import contextlib
import json
import pathlib
import re
import subprocess
import sys
import types
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from flash_jax import bench
from flash_jax import bench_peers


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


def test_value_head_dim_problems(tmp_path, capsys):
  """'H:Hv' problems (MLA's 192:128): v and dout have Hv, FLOPs count 2·T·S·(H + Hv), and
  jax.nn (which needs Hv == H) is declined, not an error."""
  assert bench.parse_head_dims("192:128") == (192, 128) and bench.parse_head_dims("64") == (64, None)
  with pytest.raises(Exception, match="H or H:Hv"):
    bench.parse_head_dims("x")
  mla = bench.Problem(64, 32, False, "fwd", 128, 64, "float32", head_dim_v=16)
  # 2·T·S·(32 + 16) per head is the paper count 4·T·S·H at H = 24 (same batch and heads).
  assert mla.flops() == pytest.approx(bench.Problem(64, 24, False, "fwd", 128, 64,
                                                    "float32").flops())
  out = tmp_path / "rows.json"
  bench.main(["--seq-lens", "64", "--head-dims", "32:16", "--causal", "false", "--modes", "fwd",
              "--tokens", "128", "--model-dim", "64", "--dtype", "float32",
              "--implementations", "chunked", "--warmup", "1", "--repeats", "2",
              "--json", str(out)])
  rows = {r["implementation"]: r for r in json.loads(out.read_text())["rows"]}
  assert rows["chunked"]["head_dim_v"] == 16 and rows["chunked"]["tflops"] > 0
  assert rows["jax.nn[xla]"]["status"].startswith("n/a")
  assert "32/16" in capsys.readouterr().out


def test_dropout_problems(tmp_path):
  """--dropout times flash_jax's implementations with dropout; jax.nn (none) sits out."""
  out = tmp_path / "rows.json"
  bench.main(["--seq-lens", "64", "--head-dims", "32", "--causal", "true", "--modes", "fwd_bwd",
              "--tokens", "128", "--model-dim", "64", "--dtype", "float32", "--dropout", "0.1",
              "--implementations", "chunked", "--warmup", "1", "--repeats", "2",
              "--json", str(out)])
  rows = json.loads(out.read_text())["rows"]
  assert [(r["implementation"], r["dropout_rate"]) for r in rows] == [("chunked", 0.1)]
  assert rows[0]["tflops"] > 0
  with pytest.raises(SystemExit):
    bench.main(["--dropout", "0.1", "--peers", "torch"])


def test_cudnn_runs_both_ways_in_one_process():
  """--cudnn-deterministic adds cuDNN compiled with XLA's determinism switch (a jit
  compiler option, not the process-wide XLA_FLAGS); the option reaches the compilation."""
  fns = bench._contenders("gpu", [], cudnn_deterministic=True)
  assert fns[bench.CUDNN_DETERMINISTIC].compiler_options == bench.DETERMINISTIC_XLA
  assert bench.CUDNN_DETERMINISTIC not in bench._contenders("gpu", [])
  q = jnp.ones((1, 8, 2, 16))
  fwd_bwd = bench.timed_function(lambda q, k, v: jax.nn.dot_product_attention(q, k, v),
                                 "fwd_bwd", bench.DETERMINISTIC_XLA)
  assert jax.tree.map(jnp.shape, fwd_bwd(q, q, q, q)) == ((1, 8, 2, 16), ((1, 8, 2, 16),) * 3)


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


# ------------------------------------------------------------------ plots (bench_plot.py)

IMPLEMENTATIONS = ("chunked", "jax.nn[xla]", "torch.sdpa[cudnn]")  # one of each kind


def _run_json(tmp_path, rows, name="run.json", **header):
  path = tmp_path / name
  path.write_text(json.dumps(dict(device="Fake GPU", platform="gpu", jax="0.0", **header,
                                  rows=rows)))
  return path


def _rows(head_dims=(64, 128), seq_lens=(512, 1024, 2048)):
  """A run's rows: every (mode, causal, head dim, seq) for IMPLEMENTATIONS, except one
  declined problem (a gap in its line)."""
  rows = []
  for mode in ("fwd", "fwd_bwd"):
    for head_dim in head_dims:
      for causal in (False, True):
        for seq_len in seq_lens:
          for i, name in enumerate(IMPLEMENTATIONS):
            row = dict(seq_len=seq_len, head_dim=head_dim, causal=causal, mode=mode,
                       tokens=16384, model_dim=2048, dtype="bfloat16", implementation=name)
            if (name, seq_len) == ("chunked", 1024):
              row.update(status="n/a: declined")
            else:
              row.update(ms=1.0, tflops=100.0 * (i + 1) + seq_len / 100)
            rows.append(row)
  return rows


def _nothing_runs(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError("--from-json must not run anything")
  for name in ("run", "time_contenders", "_inputs"):
    monkeypatch.setattr(bench, name, fail)


def test_plot_has_a_panel_per_problem_kind_and_a_line_per_implementation():
  pytest.importorskip("matplotlib")
  from flash_jax import bench_plot
  rows = _rows() + [  # d256 forward only: no d256 forward+backward panels
      dict(r, head_dim=256) for r in _rows(head_dims=(64,)) if r["mode"] == "fwd"]
  fig = bench_plot.figure(rows, title="Fake GPU")
  assert fig.get_suptitle() == "Fake GPU"
  panels = {ax.get_title(): ax for ax in fig.axes}
  expected = {f"{mode}, head dim {d}, {causal}"
              for mode in ("forward", "forward+backward") for d in (64, 128, 256)
              for causal in ("not causal", "causal")
              if not (d == 256 and mode == "forward+backward")}
  assert set(panels) == expected and len(fig.axes) == 10
  for ax in fig.axes:
    assert ax.get_xlabel() == "sequence length" and ax.get_ylabel() == "TFLOP/s"
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines) == list(IMPLEMENTATIONS)  # flash_jax's, then jax.nn's, then peers'
    assert list(lines["chunked"].get_xdata()) == [512, 2048]  # the declined problem: a gap
    assert list(lines["jax.nn[xla]"].get_xdata()) == [512, 1024, 2048]
    assert list(lines["jax.nn[xla]"].get_ydata()) == [205.12, 210.24, 220.48]
  assert [t.get_text() for t in fig.legends[0].get_texts()] == list(IMPLEMENTATIONS)
  with pytest.raises(ValueError, match="no timed rows"):
    bench_plot.figure([r for r in rows if "tflops" not in r])


def test_plot_from_json_runs_nothing(tmp_path, monkeypatch, capsys):
  pytest.importorskip("matplotlib")
  from flash_jax import bench_plot
  _nothing_runs(monkeypatch)
  rows = _rows()
  older = _run_json(tmp_path, [dict(r, tflops=1.0) if "tflops" in r else r for r in rows], "2026-01-01_a.json")
  newer = _run_json(tmp_path, [r for r in rows if r["implementation"] == "jax.nn[xla]"],
                    "2026-01-02_b.json")
  decode = _run_json(tmp_path, [], "2026-01-03_decode.json", mode="decode")
  out = tmp_path / "plot.png"
  bench.main(["--plot", str(out), "--from-json", str(older), str(newer), str(decode)])
  assert out.read_bytes().startswith(b"\x89PNG")
  captured = capsys.readouterr()
  assert "torch.sdpa[cudnn]" in captured.out and "(plot written to" in captured.out
  assert "skipped" in captured.err and "decode" in captured.err
  merged = bench_plot.load([older, newer])
  assert merged["title"] == "Fake GPU, JAX 0.0, bfloat16"
  by_name = {r["implementation"]: r["tflops"] for r in merged["rows"] if "tflops" in r
             and (r["mode"], r["head_dim"], r["causal"], r["seq_len"]) == ("fwd", 64, False, 512)}
  assert by_name == {"chunked": 1.0, "jax.nn[xla]": 205.12, "torch.sdpa[cudnn]": 1.0}
  with pytest.raises(ValueError, match="no bench rows"):
    bench_plot.load([decode])


def test_plot_from_the_measurement_files(tmp_path, monkeypatch):
  """The README's numbers can be plotted anywhere: no GPU, nothing run."""
  pytest.importorskip("matplotlib")
  _nothing_runs(monkeypatch)
  files = sorted(str(p) for p in (pathlib.Path(__file__).parent.parent / "docs"
                                  / "measurements").glob("*.json"))
  out = tmp_path / "performance.svg"
  bench.main(["--plot", str(out), "--from-json", *files])
  assert out.read_text().lstrip().startswith("<?xml")


def test_a_run_plots_its_rows_peers_included(tmp_path, monkeypatch, capsys):
  pytest.importorskip("matplotlib")
  from flash_jax import bench_plot
  monkeypatch.setitem(bench_peers.PEERS, "torch",
                      lambda platform: bench_peers.TorchSDPA(*fake_torch()))
  drawn = []
  monkeypatch.setattr(bench_plot, "save", lambda rows, path, title: drawn.append(
      (bench_plot.figure(rows, title=title), path)) or path)
  bench.main([*TINY, "--causal", "false", "--modes", "fwd", "--peers", "torch",
              "--plot", str(tmp_path / "out.png"), "--json", str(tmp_path / "rows.json")])
  (fig, path), = drawn
  assert path == str(tmp_path / "out.png") and "(plot written to" in capsys.readouterr().out
  assert [ax.get_title() for ax in fig.axes] == ["forward, head dim 32, not causal"]
  assert [line.get_label() for line in fig.axes[0].get_lines()] == [
      "chunked", "jax.nn[xla]", "torch.sdpa[cudnn]", "torch.sdpa[flash]"]


def test_matplotlib_is_not_imported_without_plot():
  code = "import sys, flash_jax, flash_jax.bench; assert 'matplotlib' not in sys.modules"
  subprocess.run([sys.executable, "-c", code], check=True)


def test_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch, capsys):
  from flash_jax import bench_plot
  _nothing_runs(monkeypatch)
  for module in ("matplotlib", "matplotlib.figure"):
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
  with pytest.raises(ImportError, match=re.escape("pip install 'flash_jax[plot]'")):
    bench_plot.require_matplotlib()
  with pytest.raises(SystemExit):  # before anything runs, not after a long run
    bench.main(["--plot", str(tmp_path / "out.png"), "--seq-lens", "64"])
  assert "flash_jax[plot]" in capsys.readouterr().err
  assert not (tmp_path / "out.png").exists()


# ------------------------------------------------------------------ peers (bench_peers.py)

class FakeTensor:
  """The little of torch.Tensor that bench_peers uses, over a numpy array."""

  def __init__(self, array, device="cpu"):
    self.array, self.device, self.requires_grad = array, device, False

  def view(self, dtype):
    return FakeTensor(self.array.view(dtype), self.device)

  def to(self, device):
    return FakeTensor(self.array.copy(), device)

  def requires_grad_(self, requires_grad=True):
    self.requires_grad = requires_grad
    return self


def fake_torch(*, cuda=True, unsupported=()):
  """Stand-ins for the modules torch and torch.nn.attention, recording the calls: SDPA
  serves every call, except that the backends in `unsupported` find no kernel for causal
  calls (warning why, then raising, as PyTorch does)."""
  calls = []
  backend = []

  @contextlib.contextmanager
  def sdpa_kernel(chosen):
    backend.append(chosen)
    yield
    backend.pop()

  def sdpa(q, k, v, *, is_causal):
    assert q.device == k.device == v.device == "cuda"
    if is_causal and backend[-1] in unsupported:
      warnings.warn(f"{backend[-1]} has no causal kernel here")
      raise RuntimeError("No available kernel. Aborting execution.")
    calls.append(("sdpa", backend[-1], q.array.shape, is_causal))
    return FakeTensor(q.array, q.device)

  def grad(out, inputs, *, grad_outputs):
    assert all(t.requires_grad for t in inputs) and grad_outputs.device == "cuda"
    calls.append(("grad", backend[-1]))
    return inputs

  torch = types.SimpleNamespace(
      __version__="0.0+fake", bfloat16=ml_dtypes.bfloat16, from_numpy=FakeTensor,
      cuda=types.SimpleNamespace(is_available=lambda: cuda,
                                 synchronize=lambda: calls.append(("sync",))),
      backends=types.SimpleNamespace(cudnn=types.SimpleNamespace(version=lambda: 91000)),
      nn=types.SimpleNamespace(functional=types.SimpleNamespace(
          scaled_dot_product_attention=sdpa)),
      autograd=types.SimpleNamespace(grad=grad), calls=calls)
  attention = types.SimpleNamespace(
      sdpa_kernel=sdpa_kernel,
      SDPBackend=types.SimpleNamespace(CUDNN_ATTENTION="cudnn", FLASH_ATTENTION="flash"))
  return torch, attention


TINY = ["--seq-lens", "64", "--head-dims", "32", "--causal", "both", "--tokens", "128",
        "--model-dim", "64", "--dtype", "float32", "--implementations", "chunked",
        "--warmup", "1", "--repeats", "2"]


@pytest.mark.filterwarnings("ignore:flash has no causal kernel")
def test_peers_are_timed_beside_the_others(tmp_path, monkeypatch, capsys):
  torch, attention = fake_torch(unsupported=("flash",))
  monkeypatch.setitem(bench_peers.PEERS, "torch",
                      lambda platform: bench_peers.TorchSDPA(torch, attention))
  out = tmp_path / "rows.json"
  bench.main([*TINY, "--modes", "fwd", "fwd_bwd", "--peers", "torch", "--json", str(out)])
  run = json.loads(out.read_text())
  assert run["peers"] == {"torch": "torch 0.0+fake, cuDNN 91000"}
  rows = {(r["mode"], r["causal"], r["implementation"]): r for r in run["rows"]}
  names = ("chunked", "jax.nn[xla]", "torch.sdpa[cudnn]", "torch.sdpa[flash]")
  assert set(rows) == {(mode, causal, name) for mode in ("fwd", "fwd_bwd")
                       for causal in (False, True) for name in names}
  for (mode, causal, name), r in rows.items():
    if name == "torch.sdpa[flash]" and causal:
      assert r["status"] == "n/a: torch.sdpa[flash]: flash has no causal kernel here", r
    else:
      assert r["tflops"] > 0, r
  captured = capsys.readouterr()
  assert "peer torch: torch 0.0+fake" in captured.out
  assert "torch.sdpa[cudnn]" in captured.out.split("---")[0]  # a column of the table
  progress = [line for line in captured.err.splitlines() if line.startswith("[")]
  assert len(progress) == 4 * len(names) and progress[0].startswith("[1/4]")
  assert sum("torch.sdpa[cudnn]" in line for line in progress) == 4
  # SDPA saw [B, N, T, H] = [2, 2, 64, 32] on the device, with the gradients only for
  # fwd_bwd, and each timed call waited for the device.
  sdpa = [c for c in torch.calls if c[0] == "sdpa"]
  assert {c[2] for c in sdpa} == {(2, 2, 64, 32)}
  assert {(c[1], c[3]) for c in sdpa} == {("cudnn", False), ("cudnn", True), ("flash", False)}
  assert 0 < sum(c[0] == "grad" for c in torch.calls) < len(sdpa)
  assert sum(c == ("sync",) for c in torch.calls) == len(sdpa)


def test_torch_peer_copies_inputs_in_its_layout():
  torch, attention = fake_torch()
  peer = bench_peers.TorchSDPA(torch, attention)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 3, 4), jnp.bfloat16)  # [B, T, N, H]
  tensor = peer.to_torch(x, requires_grad=True)
  assert tensor.device == "cuda" and tensor.requires_grad
  assert tensor.array.dtype == ml_dtypes.bfloat16 and tensor.array.flags.c_contiguous
  np.testing.assert_array_equal(tensor.array, np.swapaxes(np.asarray(x), 1, 2))


def test_peers_unavailable_are_reported_not_errors(tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "torch", None)  # PyTorch absent
  out = tmp_path / "rows.json"
  bench.main([*TINY, "--causal", "false", "--modes", "fwd", "--peers", "torch",
              "--json", str(out)])
  run = json.loads(out.read_text())
  assert run["peers"] == {"torch": "unavailable: PyTorch is not installed"}
  assert {r["implementation"] for r in run["rows"]} == {"chunked", "jax.nn[xla]"}
  assert "peer torch: unavailable: PyTorch is not installed" in capsys.readouterr().out
  # Installed, but without CUDA, or beside JAX on the CPU:
  torch, attention = fake_torch(cuda=False)
  with pytest.raises(bench_peers.PeerUnavailable, match="sees no CUDA device"):
    bench_peers.TorchSDPA(torch, attention)
  torch, attention = fake_torch()
  monkeypatch.setitem(sys.modules, "torch", torch)
  monkeypatch.setitem(sys.modules, "torch.nn.attention", attention)
  assert bench_peers.load(["torch"], "cpu") == (
      [], {"torch": "unavailable: JAX runs on cpu; the PyTorch peers are timed on the same "
                    "NVIDIA GPU as JAX"})
  assert isinstance(bench_peers.load_torch("gpu"), bench_peers.TorchSDPA)
