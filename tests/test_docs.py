"""The README and docs/ as a user reads them: links that resolve, numbers that match the
measurement files, no development log, and the commands CI runs still written there."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import pathlib
import re
import sys

import pytest

import flash_jax

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").glob("*.md")])

# [text](target) and ![alt](target); targets with a scheme (https:, mailto:) are external.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# Repository paths named in prose or code spans, e.g. `kernels/triton/config.py`.
PATH = re.compile(r"(?<![\w/.-])((?:docs|flash_jax|kernels|benchmarks|examples|tests|measurements)"
                  r"/[\w./-]*\.(?:py|md|sh|json|svg|toml))(?![\w*])")
CODE_BLOCK = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)


def _name(path: pathlib.Path) -> str:
  return str(path.relative_to(ROOT))


def _anchors(markdown: str) -> set[str]:
  """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
  anchors = set()
  for heading in re.findall(r"^#+\s+(.*?)\s*$", CODE_BLOCK.sub("", markdown), re.MULTILINE):
    text = re.sub(r"[`*]", "", heading).lower()  # intraword _ stays, as on GitHub
    anchors.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
  return anchors


def _resolve(doc: pathlib.Path, target: str) -> pathlib.Path | None:
  for base in (doc.parent, ROOT):
    if (base / target).exists():
      return base / target
  return None


@pytest.mark.parametrize("doc", DOCS, ids=_name)
def test_relative_links_resolve(doc):
  text = doc.read_text()
  broken = []
  for target in LINK.findall(text):
    if re.match(r"[a-z]+:", target):
      continue
    path_part, _, anchor = target.partition("#")
    path = (doc.parent / path_part) if path_part else doc
    if not path.exists():
      broken.append(f"{target}: no such file")
    elif anchor and path.suffix == ".md" and anchor not in _anchors(path.read_text()):
      broken.append(f"{target}: no heading #{anchor} in {_name(path)}")
  assert not broken, f"{_name(doc)}: " + "; ".join(broken)


@pytest.mark.parametrize("doc", DOCS, ids=_name)
def test_named_paths_exist(doc):
  missing = sorted({p for p in PATH.findall(doc.read_text()) if _resolve(doc, p) is None})
  assert not missing, f"{_name(doc)} names files that do not exist: {missing}"


def test_anchor_rule_matches_github():
  assert _anchors("## 5. Two GPUs (measured)\n## `mosaic_gpu` (H100, H200)\n") == {
      "5-two-gpus-measured", "mosaic_gpu-h100-h200"}


# Words of a development log, not of a reference: work sessions, kernel version labels
# (v1..v9; "TPU v4" is a chip), commit hashes given as provenance.
LOG_WORDS = re.compile(r"\bsessions?\b|(?<!TPU )\bv\d\b|\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b")


@pytest.mark.parametrize("doc", [d for d in DOCS if d.name != "CHANGELOG.md"], ids=_name)
def test_no_development_log(doc):
  found = sorted({m.group(0) for m in LOG_WORDS.finditer(doc.read_text())})
  assert not found, f"{_name(doc)} reads like a log: {found}"


def test_performance_tables_match_measurements():
  spec = importlib.util.spec_from_file_location("perf_tables", ROOT / "benchmarks" / "perf_tables.py")
  perf_tables = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = perf_tables  # dataclasses look their module up there
  try:
    spec.loader.exec_module(perf_tables)
  finally:
    del sys.modules[spec.name]
  stale = [_name(p) for p in perf_tables.stale()]
  assert not stale, f"out of date: {stale}; run python benchmarks/perf_tables.py"


def test_readme_keeps_the_commands_ci_runs():
  readme = (ROOT / "README.md").read_text()
  for command in ("pip install . && python examples/quickstart.py",
                  'pip install -e ".[test]" && python -m pytest tests -q -n auto'):
    assert command in readme


def test_version_has_one_source_and_a_changelog_entry():
  assert importlib.metadata.version("flash_jax") == flash_jax.__version__
  changelog = (ROOT / "CHANGELOG.md").read_text()
  assert re.search(rf"^## \[{re.escape(flash_jax.__version__)}\]", changelog, re.MULTILINE)
