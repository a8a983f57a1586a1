"""The command line, as users run it: bad input, the baseline stage, the whole pipeline, resume."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SHARED_DATA

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=600, env=None):
  env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
  return subprocess.run(
    [sys.executable, "-m", "fmcejax.train", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


@pytest.mark.parametrize(
  "override,field,accepted",
  [
    ("--config.dataset=imagenet", "dataset", "mnist | fashion_mnist"),
    ("--config.backbone=vgg", "backbone", "cnn | resnet18 | resnet50 | shufflenet_v2"),
    ("--config.stages=probe,train", "stages", "probe, cqi, fmcs_data"),
    ("--config.batch_size=100", "batch_size", "multiple of the global device count (8)"),
    ("--config.alpha=1.5", "alpha", "[0.0, 1.0]"),
    ("--config.epochs=0", "epochs", "integer >= 1"),
    ("--config.module=stage9", "module", "conv1, conv2, conv3"),
    ("--config.seeds=-1", "seeds", "a count >= 1"),
    ("--config.input_workers=many", "input_workers", '"auto" (0 on CPU or under 4'),
    ("--config=/nonexistent.py", "config", "shipped config: cifar100_shufflenet_v2"),
    ("--config=fashion_mnist_cnn --config.epochs=0", "epochs", "integer >= 1"),  # a shipped name
    ("--config.fmcs.subset_size=10", "fmcs.subset_size", "at least 65 with"),
    ("--config.fmce_net.batch_size=100000", "fmce_net.batch_size", "at most 9995"),
    ("--config.fmcs.holdout_fraction=0.999", "fmcs.holdout_fraction", "at most 0.974"),
    ("--config.batch_size=4096 --config.stages=probe", "batch_size", "at most 2000, the probe's"),
  ],
)
def test_bad_input_is_one_clear_error_with_exit_status_2(tmp_path, override, field, accepted):
  result = run_cli(f"--workdir={tmp_path / 'w'}", *override.split(), timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  message = result.stderr.strip().splitlines()[-1]
  assert f"'{field}'" in message and accepted in message, message
  assert not (tmp_path / "w").exists(), "nothing may be written before validation passes"


@pytest.mark.parametrize("workdir", ["/proc/x", "/dev/null/run"])
def test_a_workdir_that_cannot_be_written_is_exit_2(workdir):
  result = run_cli(f"--workdir={workdir}", timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  message = result.stderr.strip().splitlines()[-1]
  assert "'workdir'" in message and "cannot be written" in message, message


def test_missing_data_names_where_to_put_the_files(tmp_path):
  result = run_cli(
    f"--workdir={tmp_path / 'w'}",
    f"--config.data_dir={tmp_path / 'nowhere'}",
    f"--config.tfds_data_dir={tmp_path / 'tfds'}",
    "--config.download=False",
    timeout=120,
  )
  assert result.returncode == 2
  message = result.stderr.strip().splitlines()[-1]
  assert "'data_dir'" in message and "train-images-idx3-ubyte.gz" in message, message
  assert "download=False" in message, message


def test_unknown_field_and_bad_type_exit_2(tmp_path):
  for override in ("--config.no_such_field=1", "--config.alpha=abc"):
    result = run_cli(f"--workdir={tmp_path}", override, timeout=120)
    assert result.returncode == 2, (override, result.stderr[-2000:])
    assert "bad command line" in result.stderr


QUICK = [
  "--config.train_examples_limit=4096",
  "--config.test_examples_limit=512",
  "--config.batch_size=64",
  "--config.eval_batch_size=256",
  "--config.epochs=2",
  "--config.progress_bar=False",
  f"--config.data_dir={SHARED_DATA}",
]


@pytest.mark.slow
def test_baseline_stage_on_real_mnist(tmp_path, mnist_tfds):
  workdir = tmp_path / "w"
  result = run_cli(
    f"--workdir={workdir}",
    f"--config.tfds_data_dir={mnist_tfds}",
    "--config.stages=baseline",
    "--config.seeds=1",
    *QUICK,
    "--config.input_workers=2",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  metrics = json.loads((workdir / "baseline" / "seed_0" / "metrics.json").read_text())
  for key in ("test_accuracy", "test_loss", "epochs", "images_per_second"):
    assert key in metrics
  assert metrics["epochs"] == 2 and metrics["images_per_second"] > 0
  assert 0.5 < metrics["test_accuracy"] <= 1.0  # 128 steps of a small CNN: well above chance
  assert list((workdir / "baseline" / "seed_0" / "tb").glob("events.out.tfevents.*"))
  # Same command again (in-process loading, a run-only field): the finished stage is skipped.
  again = run_cli(
    f"--workdir={workdir}",
    f"--config.tfds_data_dir={mnist_tfds}",
    "--config.stages=baseline",
    "--config.seeds=1",
    *QUICK,
  )
  assert again.returncode == 0
  assert json.loads((workdir / "baseline" / "seed_0" / "metrics.json").read_text()) == metrics
  # Another config in the same workdir is refused rather than mixed in.
  other = run_cli(
    f"--workdir={workdir}",
    f"--config.tfds_data_dir={mnist_tfds}",
    "--config.stages=baseline",
    "--config.seeds=1",
    *QUICK,
    "--config.alpha=0.3",
  )
  assert other.returncode == 2 and "'alpha'" in other.stderr


@pytest.mark.slow
def test_whole_pipeline_on_real_mnist_writes_a_consistent_report(tmp_path, mnist_tfds):
  workdir = tmp_path / "w"
  result = run_cli(
    f"--workdir={workdir}",
    f"--config.tfds_data_dir={mnist_tfds}",
    *QUICK,
    "--config.seeds=2",
    "--config.probe.epochs=6",
    "--config.probe.train_examples_limit=512",
    "--config.fmcs.subset_size=256",
    "--config.fmce_net.epochs=2",
    "--config.fmce_net.batch_size=64",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  for stage in ("probe", "cqi", "fmcs_data", "fmce_net", "baseline", "fmcenetpp", "report"):
    assert (workdir / stage / "metrics.json").exists(), stage
  cqi = json.loads((workdir / "probe" / "cqi.json").read_text())
  assert len(cqi["losses"]) == len(cqi["cqi"]) == 6
  assert cqi["converged_epoch"] == 6 and cqi["markers"] == [1, 2, 4, 5, 6]  # fallback T_c = T
  assert "never converged" in result.stderr
  snapshots = sorted(
    int(p.name) for p in (workdir / "probe" / "snapshots").iterdir() if p.name.isdigit()
  )
  assert snapshots == cqi["markers"], "non-marker snapshots are pruned"
  fmce = json.loads((workdir / "fmce_net" / "metrics.json").read_text())
  assert 0.0 <= fmce["phase_accuracy"] <= 1.0 and 0.0 <= fmce["fmcs_mae"] <= 1.0
  assert np.asarray(fmce["confusion"]).shape == (5, 5)
  report = json.loads((workdir / "report.json").read_text())
  assert report["dataset"] == "mnist" and report["backbone"] == "cnn"
  assert report["module"] == "conv3" and report["seeds"] == [0, 1]
  base, ral = np.asarray(report["baseline_accuracy"]), np.asarray(report["fmcenetpp_accuracy"])
  for seed, b, r in zip((0, 1), base, ral):
    assert (
      b
      == json.loads((workdir / "baseline" / f"seed_{seed}" / "metrics.json").read_text())[
        "test_accuracy"
      ]
    )
    assert (
      r
      == json.loads((workdir / "fmcenetpp" / f"seed_{seed}" / "metrics.json").read_text())[
        "test_accuracy"
      ]
    )
  gains = (ral - base) * 100
  assert report["gain_pp_mean"] == pytest.approx(gains.mean())
  assert report["gain_pp_std"] == pytest.approx(gains.std(ddof=1))
  assert report["converged_epoch"] == 6
  assert report["fmce_net_phase_accuracy"] == fmce["phase_accuracy"]
  for png in ("plot_cqi.png", "plot_accuracy.png", "plot_fmcs.png"):
    assert (workdir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "| 0 |" in (workdir / "report.md").read_text()  # the per-seed table
  assert list((workdir / "tb_report").glob("events.out.tfevents.*"))  # CQI + plots for TensorBoard
  history = json.loads((workdir / "fmcenetpp" / "seed_0" / "metrics.json").read_text())["history"]
  assert history[0]["fmcs"] is not None and history[0]["alpha"] == pytest.approx(0.1)


class TwoStageNet(nn.Module):
  """A user's own backbone, defined here: two conv-BN blocks, `(logits, {name: map})`."""

  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    features = {}
    for i, width in enumerate((8, 16)):
      x = nn.Conv(width, (3, 3), strides=2, dtype=self.dtype, name=f"conv{i}")(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train, dtype=self.dtype)(x))
      features[f"block{i}"] = x
    return nn.Dense(self.num_classes, dtype=self.dtype)(x.mean(axis=(1, 2))), features


def two_stage_net(num_classes, dtype):
  return TwoStageNet(num_classes=num_classes, dtype=dtype)


@pytest.mark.slow
def test_the_whole_pipeline_runs_on_your_own_backbone(tmp_path, mnist_tfds):
  tests = str(Path(__file__).parent)
  env = {"PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))}
  byo = ["--config.backbone=test_cli:two_stage_net", f"--config.tfds_data_dir={mnist_tfds}"]
  bad = run_cli(
    f"--workdir={tmp_path / 'bad'}", *byo, "--config.module=stage4", env=env, timeout=300
  )
  assert bad.returncode == 2, bad.stderr[-2000:]
  assert "'module'" in bad.stderr and "block0, block1" in bad.stderr
  workdir = tmp_path / "w"
  result = run_cli(
    f"--workdir={workdir}",
    *byo,
    *QUICK,
    "--config.seeds=1",
    "--config.epochs=1",
    "--config.probe.epochs=5",
    "--config.probe.train_examples_limit=512",
    "--config.fmcs.subset_size=256",
    "--config.fmce_net.epochs=1",
    "--config.fmce_net.batch_size=64",
    env=env,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((workdir / "report.json").read_text())
  assert report["backbone"] == "test_cli:two_stage_net"
  assert report["module"] == "block1"  # the last feature map the model returns
  assert 0.0 <= report["fmcenetpp_accuracy"][0] <= 1.0
