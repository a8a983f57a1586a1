"""The Colab notebook runs headless, top to bottom, on real MNIST with a tiny config.

Like papermill, the test inserts a cell after the one tagged "parameters" that overrides them
(a tiny config, a temporary workdir, the shared MNIST archives, a per-session tfds folder), then
executes every cell with nbclient in a kernel of this interpreter; any cell error fails the test.
Slow: about 2 minutes on 2 cores.
"""

import json
import sys
from pathlib import Path

import pytest

from conftest import SHARED_DATA

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "fmcejax_colab.ipynb"
CELL_TIMEOUT = 600  # seconds; the pipeline cell takes ~1.5 min here
TINY = {
  "dataset": "mnist",
  "backbone": "cnn",
  "stages": "all",
  "seeds": 2,
  "epochs": 1,
  "train_examples_limit": 512,
  "test_examples_limit": 256,
  "batch_size": 64,
  "eval_batch_size": 256,
  "probe.epochs": 6,
  "probe.train_examples_limit": 512,
  "fmcs.subset_size": 256,
  "fmce_net.epochs": 2,
  "fmce_net.batch_size": 64,
  "progress_bar": False,
}


def test_notebook_is_valid_and_has_a_parameters_cell():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1 and tagged[0].cell_type == "code"
  for name in ("WORKDIR", "DATA_DIR", "OVERRIDES"):
    assert name in tagged[0].source
  assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "stored outputs"
  # Data comes through the package (prepared, local archives or its own download): no flags.
  assert not [c for c in nb.cells if "DOWNLOAD" in c.source or "urlretrieve" in c.source]


@pytest.fixture()
def python_kernel(tmp_path, monkeypatch):
  """A 'python3' kernelspec for this interpreter, first on JUPYTER_PATH (a user-wide python3
  kernel of another Python must not be picked)."""
  spec = tmp_path / "jupyter" / "kernels" / "python3"
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(
    json.dumps(
      {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (test)",
        "language": "python",
      }
    )
  )
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("PYTHONUNBUFFERED", "1")
  return "python3"


@pytest.mark.slow
def test_notebook_runs_headless_on_real_mnist(tmp_path, mnist_tfds, python_kernel):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
  workdir = tmp_path / "workdir"
  injected = nbformat.v4.new_code_cell(
    f"WORKDIR = {str(workdir)!r}\nDATA_DIR = {str(SHARED_DATA)!r}\n"
    f"TFDS_DATA_DIR = {mnist_tfds!r}\nCONFIG = ''\n"
    f"OVERRIDES = {TINY!r}\n"
  )
  injected.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(index + 1, injected)

  client = nbclient.NotebookClient(
    nb,
    timeout=CELL_TIMEOUT,
    kernel_name=python_kernel,
    resources={"metadata": {"path": str(tmp_path)}},
  )
  try:
    client.execute()  # raises CellExecutionError on the first failing cell
  finally:
    nbformat.write(nb, tmp_path / "executed.ipynb")  # kept for a look when something fails

  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "fmcejax is already installed" in text  # the install cell skipped itself
  assert "[exit status 0" in text and "fmcejax: done" in text
  assert "fmcenetpp seed_1 epoch 1/1" in text  # console lines streamed into the notebook
  assert "gain of FMCE-Net++ over the baseline" in text
  rich = [o for o in outputs if o.output_type == "display_data"]
  markdown = [o.data["text/markdown"] for o in rich if "text/markdown" in o.data]
  assert any("| seed |" in m.lower() for m in markdown), "report.md not displayed"
  images = [o for o in rich if "image/png" in o.data]
  plots = sorted(p.name for p in workdir.glob("*.png"))
  assert len(plots) >= 3 and len(images) == len(plots) + 1  # the report's plots + the trajectory
  report = json.loads((workdir / "report.json").read_text())
  assert report["seeds"] == [0, 1] and len(report["fmcenetpp_accuracy"]) == 2
