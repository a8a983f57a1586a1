"""Every test process sees 8 CPU devices, so data parallelism is exercised everywhere."""

import os
import tempfile

# 8 CPU devices in every test process. XLA aborts a process whose collective waits over 40 s.
# The waits seen past that were a deadlock of unbounded run-ahead (fixed: `parallel.Pacer`); the
# margin keeps a collective that is merely slow on a loaded 2-core machine from aborting a test.
COLLECTIVE_TIMEOUT = "--xla_cpu_collective_call_terminate_timeout_seconds=900"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {COLLECTIVE_TIMEOUT}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests run the CLI in many processes that compile the same small steps: they share XLA's
# persistent compilation cache (the same executables, so the same results).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="fmcejax-test-jax-cache-")

import importlib.abc  # noqa: E402
import importlib.util  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from typing import NoReturn  # noqa: E402

import pytest  # noqa: E402

from fmcejax import datasets  # noqa: E402


def _real_data() -> tuple[object, str]:
  """The data root that holds the real MNIST archives, found as the product finds them
  ($FMCEJAX_DATA_DIR, ./data, ../shared/data), and the skip message when none does."""
  found = datasets.find_archives("mnist", "")
  searched = ", ".join(str(root / "mnist") for root in datasets.search_roots())
  return (found.parent if found else None), f"real MNIST archives not found (searched {searched})"


# The tests that need real data take it from here: `data_dir` for the CLI, and the skip.
SHARED_DATA, NO_REAL_DATA = _real_data()


@pytest.fixture(scope="session")
def mnist_tfds(tmp_path_factory) -> str:
  """Real MNIST (the official archives where the product looks for them), prepared once per
  test session."""
  if SHARED_DATA is None:
    pytest.skip(NO_REAL_DATA)
  from fmcejax import datasets

  tfds_dir = str(tmp_path_factory.mktemp("tfds"))
  datasets.prepare("mnist", str(SHARED_DATA), tfds_dir, download=False)
  return tfds_dir


class _TensorFlowStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """`import tensorflow` finds this stub, which records who imported it and then fails as an
  absent TensorFlow would: code that imports TF wherever it is installed is caught here too."""

  def __init__(self):
    self.imports: list[str] = []

  def find_spec(self, name, path=None, target=None):
    if name.partition(".")[0] != "tensorflow":
      return None
    return importlib.util.spec_from_loader(name, self)

  def create_module(self, spec):
    return None

  def exec_module(self, module):
    self.imports.append(
      f"import {module.__name__} from:\n{''.join(traceback.format_stack(limit=10))}"
    )
    raise ImportError(f"{module.__name__} is the tests' stub (tests.conftest.tensorflow_imports)")


@pytest.fixture
def tensorflow_imports(monkeypatch) -> list[str]:
  """The stacks of every `import tensorflow` during the test (a stub is importable meanwhile)."""
  for name in [n for n in sys.modules if n.partition(".")[0] == "tensorflow"]:
    monkeypatch.delitem(sys.modules, name)
  stub = _TensorFlowStub()
  monkeypatch.setattr(sys, "meta_path", [stub, *sys.meta_path])
  return stub.imports


# .ci/run sets CI=true and installs every optional tool; a test that needs one never hides
# behind a skip there.
IN_CI = os.environ.get("CI") == "true"
TORCH_INSTALL = "a CPU wheel of torch, as README.md's Tests section says"


def missing(what: str, install: str, *, module: bool = False) -> NoReturn:
  """A test needs `what`, absent here: skipped (the reason says how to install it), or in CI
  failed. `module`: called at a test module's top level."""
  message = f"{what} is not installed ({install})"
  if IN_CI:
    pytest.fail(f"{message}; CI (CI=true) runs every test", pytrace=False)
  pytest.skip(message, allow_module_level=module)
