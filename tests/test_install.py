"""A plain (non-editable) install, as Colab, TPU VMs and `pip install git+URL` users get it: the
wheel built from this checkout, installed into a fresh venv that borrows this venv's
dependencies, runs the default config from a directory outside the checkout."""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]


def _run(args, **kwargs):
  result = subprocess.run(args, capture_output=True, text=True, **kwargs)
  assert result.returncode == 0, (args, result.stdout[-2000:], result.stderr[-3000:])
  return result


@pytest.mark.slow
def test_wheel_installs_and_runs_the_default_config_outside_the_checkout(tmp_path, mnist_tfds):
  wheels = tmp_path / "wheels"
  _run(
    [
      sys.executable,
      "-m",
      "pip",
      "wheel",
      "--no-deps",
      "--no-build-isolation",
      "-q",
      "-w",
      str(wheels),
      str(REPO),
    ],
    timeout=600,
  )
  venv = tmp_path / "venv"
  _run([sys.executable, "-m", "venv", str(venv)], timeout=300)
  python = venv / "bin" / "python"
  # The dependencies come from this venv (its site-packages as a plain path: the .pth files
  # there, this checkout's editable finder among them, are not read).
  site = _run(
    [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
  ).stdout.strip()
  Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
  _run(
    [
      str(python),
      "-m",
      "pip",
      "install",
      "-q",
      "--no-deps",
      "--no-index",
      *map(str, wheels.glob("fmcejax-*.whl")),
    ],
    timeout=600,
  )
  outside = tmp_path / "elsewhere"
  outside.mkdir()
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  where = _run(
    [str(python), "-c", "import fmcejax.configs.default as d; print(d.__file__)"],
    cwd=outside,
    env=env,
  ).stdout.strip()
  assert where.startswith(site), where
  result = _run(
    [
      str(python),
      "-m",
      "fmcejax.train",
      "--workdir=w",
      "--config.stages=probe",
      "--config.probe.epochs=1",
      "--config.probe.train_examples_limit=512",
      "--config.batch_size=64",
      "--config.progress_bar=False",
      f"--config.tfds_data_dir={mnist_tfds}",
    ],
    cwd=outside,
    env=env,
    timeout=600,
  )
  assert (outside / "w" / "probe" / "metrics.json").exists(), result.stderr[-2000:]
  # A shipped config by name: it loads from the install (then its bad epochs stop it, exit 2).
  named = subprocess.run(
    [str(python), "-m", "fmcejax.train", "--config=cifar10_resnet50", "--config.epochs=0"],
    cwd=outside,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert named.returncode == 2 and "'epochs'" in named.stderr, named.stderr[-2000:]
