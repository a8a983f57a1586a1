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
