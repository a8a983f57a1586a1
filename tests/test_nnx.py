"""Your own Flax NNX backbone: built per seed, train/eval mode reaching its BatchNorm and
Dropout, and the whole pipeline with SIGTERM and an exact resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import numpy as np
import pytest
from flax import nnx

import fake_data
from fmcejax import models

REPO = Path(__file__).resolve().parents[1]


class TinyNnx(nnx.Module):
  """A user's NNX backbone: conv, BatchNorm, dropout, `(logits, {name: map})`."""

  def __init__(self, num_classes: int, dtype, rngs: nnx.Rngs):
    self.conv0 = nnx.Conv(1, 8, (3, 3), strides=2, dtype=dtype, rngs=rngs)
    self.bn0 = nnx.BatchNorm(8, dtype=dtype, rngs=rngs)
    self.conv1 = nnx.Conv(8, 16, (3, 3), strides=2, dtype=dtype, rngs=rngs)
    self.bn1 = nnx.BatchNorm(16, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(0.3, rngs=rngs)
    self.head = nnx.Linear(16, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x, train: bool):
    x = nnx.relu(self.bn0(self.conv0(x), use_running_average=not train))
    features = {"block0": x}
    x = nnx.relu(self.bn1(self.conv1(x), use_running_average=not train))
    features["block1"] = x
    x = self.dropout(x.mean(axis=(1, 2)), deterministic=not train)
    return self.head(x), features


def tiny_nnx(num_classes, dtype, rngs):
  return TinyNnx(num_classes, dtype, rngs)


def nnx_without_rngs(num_classes, dtype):
  return TinyNnx(num_classes, dtype, nnx.Rngs(0))


def test_an_nnx_factory_without_rngs_is_refused_naming_rngs():
  with pytest.raises(ValueError, match=r"returned TinyNnx.*an NNX factory takes rngs"):
    models.create_backbone("test_nnx:nnx_without_rngs", 10)


def test_an_nnx_backbone_is_built_per_seed_and_train_mode_reaches_bn_and_dropout():
  model = models.create_backbone("test_nnx:tiny_nnx", 10)
  assert models.feature_names("test_nnx:tiny_nnx", 10, (28, 28, 1)) == ("block0", "block1")
  x = jax.random.uniform(jax.random.key(3), (8, 28, 28, 1))
  init = lambda seed: model.init(  # noqa: E731
    {"params": jax.random.key(seed), "dropout": jax.random.key(seed)}, x, train=False
  )
  variables, other = init(0), init(1)
  assert set(variables) == {"params", "batch_stats"}
  assert not np.array_equal(
    variables["params"]["head"]["kernel"], other["params"]["head"]["kernel"]
  )
  (logits, features), updates = model.apply(
    variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(7)}
  )
  chex.assert_shape(logits, (8, 10))
  chex.assert_shape(features["block1"], (8, 7, 7, 16))
  chex.assert_tree_all_finite(updates)
  assert not np.array_equal(
    updates["batch_stats"]["bn0"]["mean"], variables["batch_stats"]["bn0"]["mean"]
  )
  again, _ = model.apply(
    variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(7)}
  )
  other_drop, _ = model.apply(
    variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(8)}
  )
  np.testing.assert_array_equal(logits, again[0])  # dropout: a function of its key only
  assert not np.array_equal(logits, other_drop[0])
  eval_a, _ = model.apply(variables, x, train=False)
  eval_b, _ = model.apply(variables, x[::-1], train=False)
  np.testing.assert_allclose(eval_a, eval_b[::-1], rtol=1e-6)  # running stats: per example


# ---------------------------------------------------------------------------------------------
# The command line


TINY = [
  "--config.backbone=test_nnx:tiny_nnx",
  "--config.train_examples_limit=2048",
  "--config.batch_size=64",
  "--config.eval_batch_size=128",
  "--config.epochs=2",
  "--config.seeds=1",
  "--config.probe.epochs=5",
  "--config.probe.train_examples_limit=512",
  "--config.fmcs.subset_size=256",
  "--config.fmce_net.epochs=1",
  "--config.fmce_net.batch_size=64",
  "--config.checkpoint_every_steps=4",
  "--config.progress_bar=False",
  "--config.download=False",
]
RESULT_KEYS = ("baseline_accuracy", "fmcenetpp_accuracy", "gain_pp_mean", "markers", "fmcs_mae")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  fake_data.write_fake_idx(root / "archives" / "mnist", n_train=2048, n_test=256)
  return [f"--config.data_dir={root / 'archives'}", f"--config.tfds_data_dir={root / 'tfds'}"]


def _command(workdir, data, *extra):
  return [sys.executable, "-m", "fmcejax.train", f"--workdir={workdir}", *TINY, *data, *extra]


def _env():
  tests = str(Path(__file__).parent)
  path = os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))
  return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def _run(command):
  return subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)


def test_a_module_the_nnx_backbone_does_not_return_exits_2(tmp_path, data):
  result = _run(_command(tmp_path / "w", data, "--config.module=stage4"))
  assert result.returncode == 2, result.stderr[-2000:]
  message = result.stderr.strip().splitlines()[-1]
  assert "'module'" in message and "block0, block1" in message, message


@pytest.mark.slow
def test_the_whole_pipeline_on_an_nnx_backbone_resumes_exactly_after_sigterm(tmp_path, data):
  straight = _run(_command(tmp_path / "straight", data))
  assert straight.returncode == 0, straight.stderr[-3000:]
  w = tmp_path / "w"
  proc = subprocess.Popen(
    _command(w, data),
    cwd=REPO,
    env=_env(),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  checkpoints = w / "baseline" / "seed_0" / "checkpoints"
  deadline = time.time() + 600
  while not (checkpoints.exists() and any(p.name.isdigit() for p in checkpoints.iterdir())):
    assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0 and "SIGTERM received; checkpoint written" in stderr, stderr[-3000:]
  assert not (w / "baseline" / "seed_0" / "metrics.json").exists()
  resumed = _run(_command(w, data))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  report = json.loads((w / "report.json").read_text())
  expected = json.loads((tmp_path / "straight" / "report.json").read_text())
  assert report["backbone"] == "test_nnx:tiny_nnx" and report["module"] == "block1"
  for key in RESULT_KEYS:
    assert report[key] == expected[key], key
  for run in ("baseline", "fmcenetpp"):
    got, want = (
      json.loads((d / run / "seed_0" / "metrics.json").read_text())["history"]
      for d in (w, tmp_path / "straight")
    )
    assert [h["train_loss"] for h in got] == [h["train_loss"] for h in want], run
