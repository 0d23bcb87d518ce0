"""Runs JAX's and Flax's own attention tests with flash_jax substituted.

JAX's tests of `jax.nn.dot_product_attention` (tests/nn_test.py, the DotProductAttention
tests) and Flax's attention tests (tests/nnx/nn/attention_test.py,
tests/linen/linen_attention_test.py) are an outside check of flash_jax's drop-ins,
`flash_jax.dot_product_attention` and `flash_jax.flax.dot_product_attention`. They are
not part of this repository: pass the files, or git checkouts of JAX and Flax to read
them from at the installed versions' tags:

  python tests/compat/run_outside_suites.py --jax-repo ~/src/jax --flax-repo ~/src/flax
  python tests/compat/run_outside_suites.py --jax-tests nn_test.py \\
      --nnx-tests attention_test.py --linen-tests linen_attention_test.py

(`git clone https://github.com/jax-ml/jax` / `https://github.com/google/flax`; the refs
default to jax-v<installed jax> and v<installed flax>, see --jax-ref / --flax-ref.)

Each suite runs in a fresh pytest process with flash_jax_substitution.py as a plugin:
the JAX tests twice (every call on flash_jax; then only the calls that name an
implementation, so that the tests' reference, implementation=None, is JAX's own), the
Flax tests once (Flax's dot_product_attention and its modules' default attention_fn
replaced). Tests of decode mode and complex dtypes are out of scope and reported apart.
Needs absl-py and scipy (JAX's tests import them). Exit status 1 if an in-scope test
fails.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree

HERE = pathlib.Path(__file__).resolve().parent

# Out of scope (issue 20): Flax's decode mode (its KV cache is another issue) and complex dtypes.
OUT_OF_SCOPE = {"decod": "decode mode", "dtype_infer": "complex64 inputs"}


def _read_from_git(repo: str, ref: str, path: str) -> str:
  return subprocess.run(["git", "-C", repo, "show", f"{ref}:{path}"], check=True,
                        capture_output=True, text=True).stdout


def _suites(args) -> list[tuple[str, str, str, str]]:
  """-> [(label, source text, FLASH_JAX_SUBSTITUTE mode, pytest -k filter)]."""
  suites = []
  jax_text = None
  if args.jax_tests:
    jax_text = pathlib.Path(args.jax_tests).read_text()
  elif args.jax_repo:
    import jax
    jax_text = _read_from_git(args.jax_repo, args.jax_ref or f"jax-v{jax.__version__}",
                              "tests/nn_test.py")
  if jax_text is not None:
    suites.append(("jax nn_test (every call on flash_jax)", jax_text, "jax",
                   "DotProductAttention"))
    suites.append(("jax nn_test (reference: jax.nn's own)", jax_text, "jax-answer",
                   "DotProductAttention"))
  flax_ref = None
  if args.flax_repo:
    import flax
    flax_ref = args.flax_ref or f"v{flax.__version__}"
  for label, path_arg, repo_path in (
      ("flax nnx attention_test", args.nnx_tests, "tests/nnx/nn/attention_test.py"),
      ("flax linen_attention_test", args.linen_tests, "tests/linen/linen_attention_test.py")):
    if path_arg:
      suites.append((label, pathlib.Path(path_arg).read_text(), "flax", ""))
    elif flax_ref:
      suites.append((label, _read_from_git(args.flax_repo, flax_ref, repo_path), "flax", ""))
  return suites


def _run(label: str, text: str, mode: str, select: str, workdir: pathlib.Path):
  """Runs one suite; -> [(test id, outcome, message)]."""
  name = label.split(" (")[0].replace(" ", "_") + f"_{mode.replace('-', '_')}.py"
  test_file, report = workdir / name, workdir / (name + ".xml")
  test_file.write_text(text)
  env = dict(os.environ, FLASH_JAX_SUBSTITUTE=mode,
             PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
  command = [sys.executable, "-m", "pytest", "-p", "flash_jax_substitution", "-p",
             "no:cacheprovider", "-q", f"--junitxml={report}", str(test_file)]
  if select:
    command += ["-k", select]
  subprocess.run(command, cwd=workdir, env=env, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)
  if not report.exists():
    return [(label, "error", "pytest wrote no report (import error?)")]
  results = []
  for case in ElementTree.parse(report).iter("testcase"):
    test_id = f"{case.get('classname', '').split('.')[-1]}.{case.get('name')}"
    outcome, message = "passed", ""
    for tag in ("failure", "error", "skipped"):
      node = case.find(tag)
      if node is not None:
        outcome = {"failure": "failed", "error": "failed", "skipped": "skipped"}[tag]
        message = (node.get("message") or "").splitlines()[0][:160] if node.get("message") else ""
        break
    results.append((test_id, outcome, message))
  return results


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--jax-tests", help="path of JAX's tests/nn_test.py")
  parser.add_argument("--nnx-tests", help="path of Flax's tests/nnx/nn/attention_test.py")
  parser.add_argument("--linen-tests", help="path of Flax's tests/linen/linen_attention_test.py")
  parser.add_argument("--jax-repo", help="a git checkout of JAX to read nn_test.py from")
  parser.add_argument("--jax-ref", help="its git ref (default: jax-v<installed jax>)")
  parser.add_argument("--flax-repo", help="a git checkout of Flax to read its tests from")
  parser.add_argument("--flax-ref", help="its git ref (default: v<installed flax>)")
  parser.add_argument("--verbose", action="store_true", help="list every test, passes too")
  args = parser.parse_args(argv)
  suites = _suites(args)
  if not suites:
    parser.error("give the test files or the git checkouts to read them from")

  unexpected = 0
  with tempfile.TemporaryDirectory() as tmp:
    for label, text, mode, select in suites:
      results = _run(label, text, mode, select, pathlib.Path(tmp))
      counts = {}
      lines = []
      for test_id, outcome, message in results:
        scope = next((why for pattern, why in OUT_OF_SCOPE.items()
                      if pattern in test_id.lower()), None)
        key = outcome if scope is None or outcome != "failed" else "failed (out of scope)"
        counts[key] = counts.get(key, 0) + 1
        if key == "failed":
          unexpected += 1
        if args.verbose or outcome == "failed":
          note = f" [{scope}]" if scope and outcome == "failed" else ""
          lines.append(f"  {outcome:7s} {test_id}{note}{': ' + message if message else ''}")
      summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
      print(f"{label}: {summary}")
      if lines:
        print("\n".join(lines))
  return 1 if unexpected else 0


if __name__ == "__main__":
  sys.exit(main())
