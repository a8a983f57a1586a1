"""One style for the whole tree: the formatter pinned in pyproject.toml (ruff format, 2-space
indents, 100 columns) leaves every file as it is, and pyflakes finds no unused import or name."""

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
