"""`python -m fmcejax.study` on real MNIST, tiny: the grid, the sharing of work between arms,
pairing by seed, the controls' heads, resume after a kill, and bad grid values."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from conftest import SHARED_DATA

REPO = Path(__file__).resolve().parents[1]
TINY = [
  "--study.alphas=0.1,0.3",
  "--study.modules=conv2,conv3",
  "--config.seeds=2",
  "--config.train_examples_limit=1024",
  "--config.test_examples_limit=256",
  "--config.batch_size=64",
  "--config.eval_batch_size=128",
  "--config.epochs=1",
  "--config.probe.epochs=6",
  "--config.probe.train_examples_limit=512",
  "--config.fmcs.subset_size=256",
  "--config.fmce_net.epochs=2",
  "--config.fmce_net.batch_size=64",
  "--config.checkpoint_every_steps=4",
  "--config.progress_bar=False",
  f"--config.data_dir={SHARED_DATA}",
]


def _command(workdir, tfds_dir, *extra):
  return [
    sys.executable,
    "-m",
    "fmcejax.study",
    f"--workdir={workdir}",
    f"--config.tfds_data_dir={tfds_dir}",
    *TINY,
    *extra,
  ]


def _run(workdir, tfds_dir, *extra, timeout=1200):
  return subprocess.run(
    _command(workdir, tfds_dir, *extra), cwd=REPO, capture_output=True, text=True, timeout=timeout
  )


def _mtimes(workdir):
  return {
    str(p.relative_to(workdir)): p.stat().st_mtime_ns for p in Path(workdir).rglob("metrics.json")
  }


@pytest.fixture(scope="module")
def study(tmp_path_factory, mnist_tfds):
  workdir = tmp_path_factory.mktemp("study")
  result = _run(workdir, mnist_tfds)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, json.loads((workdir / "study.json").read_text())


@pytest.mark.slow
def test_the_grid_and_its_outputs(study):
  workdir, summary = study
  names = [a["name"] for a in summary["arms"]]
  assert len(names) == len(set(names)) == 2 * 2 + 2
  heads = [(a["head"], a["module"], a["alpha"]) for a in summary["arms"]]
  assert ("shuffled", "conv2", 0.1) in heads and ("random", "conv2", 0.1) in heads
  assert summary["seeds"] == [0, 1] and summary["dataset"] == "mnist"
  assert (workdir / "plot_study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert all(a["name"] in (workdir / "study.md").read_text() for a in summary["arms"])


def _seed_metrics(run_dir):
  """metrics.json of seeds 0 and 1 of one run (the baseline or an arm)."""
  return [json.loads((run_dir / f"seed_{s}" / "metrics.json").read_text()) for s in (0, 1)]


@pytest.mark.slow
def test_arms_pair_with_the_baseline_of_the_same_seed_and_the_ci_is_student_t(study):
  workdir, summary = study
  base = [m["test_accuracy"] for m in _seed_metrics(workdir / "baseline")]
  assert summary["baseline_accuracy"] == base
  for arm in summary["arms"]:
    runs = _seed_metrics(workdir / "arms" / arm["name"])
    gains = [(r["test_accuracy"] - b) * 100 for r, b in zip(runs, base)]
    assert arm["gains_pp"] == pytest.approx(gains) and arm["n"] == 2
    mean, std = np.mean(gains), np.std(gains, ddof=1)
    half = scipy.stats.t.ppf(0.975, 1) * std / np.sqrt(2)
    assert arm["ci95_pp"] == pytest.approx([mean - half, mean + half])
    assert len(arm["fmcs_per_epoch"]) == 1 and arm["fmcs_per_epoch"][0] is not None


@pytest.mark.slow
def test_baselines_report_the_first_trained_heads_fmcs_without_training_through_it(study):
  workdir, summary = study
  histories = [m["history"] for m in _seed_metrics(workdir / "baseline")]
  assert all(row["fmcs"] is not None and row["alpha"] == 0.0 for h in histories for row in h)
  assert summary["baseline_fmcs_per_epoch"] == pytest.approx(
    [np.mean([h[0]["fmcs"] for h in histories])]
  )
  assert (workdir / "plot_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_shared_work_runs_once_and_a_rerun_redoes_nothing(study, mnist_tfds):
  workdir, summary = study
  modules = Path(workdir) / "modules"
  assert sorted(p.name for p in modules.iterdir()) == ["conv2", "conv3"]
  assert sorted(p.name for p in (modules / "conv2").iterdir()) == [
    "fmce_net",
    "fmce_net_shuffled",
    "fmcs_data",
  ]  # the controls' module only
  assert sorted(p.name for p in (modules / "conv3").iterdir()) == ["fmce_net", "fmcs_data"]
  assert sorted(p.name for p in (Path(workdir) / "baseline").iterdir()) == ["seed_0", "seed_1"]
  before = _mtimes(workdir)
  # Both alphas' arms on conv2 read the FMCE-Net trained before the first of them ran.
  first_arm = min(
    before[f"arms/{a['name']}/seed_0/metrics.json"]
    for a in summary["arms"]
    if a["module"] == "conv2"
  )
  assert before["modules/conv2/fmce_net/metrics.json"] < first_arm
  again = _run(workdir, mnist_tfds)
  assert again.returncode == 0, again.stderr[-3000:]
  assert _mtimes(workdir) == before
  assert json.loads((workdir / "study.json").read_text()) == summary


@pytest.mark.slow
def test_the_control_heads_know_nothing(study):
  workdir, _ = study
  shuffled = json.loads(
    (Path(workdir) / "modules/conv2/fmce_net_shuffled/metrics.json").read_text()
  )
  trained = json.loads((Path(workdir) / "modules/conv2/fmce_net/metrics.json").read_text())
  assert shuffled["labels"] == "shuffled"
  # Chance is 1/K: its mean probability of the true phase is there, and its argmax (all but
  # constant for a head with nothing to go on) is right for a phase or two at most.
  assert abs(shuffled["phase_probability"] - 1 / 5) < 0.05, shuffled
  assert shuffled["phase_accuracy"] <= 0.4 < trained["phase_accuracy"], (shuffled, trained)
  from fmcejax import fmce_net, parallel
  from fmcejax.configs import mnist_cnn

  config = mnist_cnn.get_config()
  data = Path(workdir) / "modules/conv2/fmcs_data"
  mesh = parallel.make_mesh()
  head, random = fmce_net.head(config, data, None, "conv2", jnp.float32, mesh, seed=0)
  _, trained = fmce_net.head(
    config, data, Path(workdir) / "modules/conv2/fmce_net", "conv2", jnp.float32, mesh, seed=0
  )
  fresh = head.model.init(jax.random.PRNGKey(0), jnp.zeros((1, 7, 7, 32)), train=False)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(random), jax.device_get(fresh))
  differs = jax.tree.leaves(
    jax.tree.map(
      lambda a, b: not np.array_equal(a, b), jax.device_get(trained), jax.device_get(random)
    )
  )
  assert any(differs)


def _start_until_checkpoint(workdir, tfds_dir, arm):
  """The study started as in a terminal (SIGINT at its default), returned once `arm`'s seed 0
  has written a checkpoint."""
  proc = subprocess.Popen(
    _command(workdir, tfds_dir),
    cwd=REPO,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
  )
  checkpoints = workdir / "arms" / arm / "seed_0" / "checkpoints"
  deadline = time.time() + 900
  while not (checkpoints.exists() and any(p.name.isdigit() for p in checkpoints.iterdir())):
    assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
    time.sleep(0.05)
  return proc


@pytest.mark.slow
def test_ctrl_c_then_a_kill_stop_a_study_and_it_resumes_to_the_same_study_json(
  tmp_path, mnist_tfds, study
):
  """One study stopped twice: Ctrl-C in its first arm (exit 130, a checkpoint, one line), then,
  resumed, SIGKILL in its second arm; the third run finishes it as the uninterrupted study."""
  _, summary = study
  workdir = tmp_path / "w"
  proc = _start_until_checkpoint(workdir, mnist_tfds, "trained_conv2_convex_a0.1")
  proc.send_signal(signal.SIGINT)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 130, stderr[-3000:]
  assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
  assert "SIGINT received; checkpoint written" in stderr.strip().splitlines()[-1], stderr[-3000:]
  proc = _start_until_checkpoint(workdir, mnist_tfds, "trained_conv2_convex_a0.3")
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait(timeout=60)
  resumed = _run(workdir, mnist_tfds)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert json.loads((workdir / "study.json").read_text()) == summary


@pytest.mark.parametrize(
  "override,field",
  [
    ("--study.modules=conv9", "study.modules"),
    ("--study.alphas=0.1,1.5", "study.alphas"),
    ("--study.controls=shuffled,noise", "study.controls"),
  ],
)
def test_bad_grid_values_exit_2_naming_the_field(tmp_path, override, field):
  result = subprocess.run(
    [sys.executable, "-m", "fmcejax.study", f"--workdir={tmp_path / 'w'}", override],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 2, result.stderr[-2000:]
  assert f"'{field}'" in result.stderr.strip().splitlines()[-1]
  assert not (tmp_path / "w").exists()
