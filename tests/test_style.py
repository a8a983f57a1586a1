"""One style for the whole tree: the formatter pinned in pyproject.toml (ruff format, 2-space
indents, 100 columns) leaves every file as it is, and pyflakes finds no unused import or name."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TREE = ["fmcejax", "tests", "configs", "launch", "docs/bench"]


def _ruff(*args):
  ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
  if ruff is None:
    pytest.skip("ruff is not installed (pip install -e '.[test]')")
  return subprocess.run([ruff, *args, *TREE], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_the_tree_is_formatted():
  result = _ruff("format", "--check")
  assert result.returncode == 0, result.stdout + result.stderr


def test_no_unused_imports_or_undefined_names():
  result = _ruff("check", "--select", "F,E9")
  assert result.returncode == 0, result.stdout + result.stderr


def _modules():
  return sorted((REPO / "fmcejax").rglob("*.py"))


def _name(path):
  """The module's dotted name below `fmcejax` ("train", "tools.bench")."""
  return ".".join(path.relative_to(REPO / "fmcejax").with_suffix("").parts)


def test_modules_and_functions_stay_small():
  """About 400 lines a module and at most 80 a function, the sizes of the Flax examples."""
  for path in _modules():
    source = path.read_text()
    assert source.count("\n") <= 450, f"{path.name}: {source.count(chr(10))} lines"
    for node in ast.walk(ast.parse(source)):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        length = node.end_lineno - node.lineno + 1
        assert length <= 80, f"{path.name}: {node.name} has {length} lines"


def test_no_import_cycle_between_modules():
  """Module-level `fmcejax` imports form no cycle (function-level imports are lazy by design)."""
  graph, names = {}, {_name(p) for p in _modules()}
  for path in _modules():
    deps = set()
    for node in ast.parse(path.read_text()).body:
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fmcejax"):
        package = node.module.removeprefix("fmcejax").lstrip(".")
        within = [f"{package}.{a.name}".lstrip(".") for a in node.names]
        deps |= {n for n in within if n in names} or {package}
    graph[_name(path)] = deps & names

  def visit(name, path):
    assert name not in path, f"import cycle: {' -> '.join([*path, name])}"
    for dep in graph.get(name, ()):
      visit(dep, [*path, name])

  for name in graph:
    visit(name, [])
