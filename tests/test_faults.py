"""Fault injection on the real command: SIGKILL at several points of the pipeline, re-run the same
command each time, and the final report equals an uninterrupted run's (exactly: CPU is
deterministic). Also: a second run on a busy workdir is refused."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SHARED_DATA

REPO = Path(__file__).resolve().parents[1]
TINY = [
  "--config.train_examples_limit=1024",
  "--config.test_examples_limit=256",
  "--config.batch_size=64",
  "--config.eval_batch_size=128",
  "--config.epochs=2",
  "--config.seeds=1",
  "--config.probe.epochs=6",
  "--config.probe.train_examples_limit=512",
  "--config.fmcs.subset_size=256",
  "--config.fmce_net.epochs=2",
  "--config.fmce_net.batch_size=64",
  "--config.checkpoint_every_steps=4",
  "--config.progress_bar=False",
  f"--config.data_dir={SHARED_DATA}",
]
# Report fields that hold results (not timings): these must match exactly.
RESULT_KEYS = (
  "baseline_accuracy",
  "fmcenetpp_accuracy",
  "gain_pp_mean",
  "gain_pp_std",
  "converged_epoch",
  "markers",
  "fmce_net_phase_accuracy",
  "fmcs_mae",
)


def _command(workdir, tfds_dir):
  return [
    sys.executable,
    "-m",
    "fmcejax.train",
    f"--workdir={workdir}",
    f"--config.tfds_data_dir={tfds_dir}",
    *TINY,
  ]


def _default_sigint():
  signal.signal(signal.SIGINT, signal.SIG_DFL)  # as in a terminal; a non-interactive parent may
  # have started this process with SIGINT ignored, which the child would inherit


def _start(workdir, tfds_dir, log=subprocess.PIPE):
  return subprocess.Popen(
    _command(workdir, tfds_dir),
    cwd=REPO,
    stdout=subprocess.DEVNULL,
    stderr=log,
    text=True,
    env={**os.environ, "PYTHONUNBUFFERED": "1"},
    preexec_fn=_default_sigint,
  )


def _steps(directory):
  return [p for p in directory.iterdir() if p.name.isdigit()] if directory.exists() else []


def _names(directory, event):
  """The entries of `directory` whose name marks `event`."""
  try:
    return {n for n in os.listdir(directory) if event(n)}
  except FileNotFoundError:
    return set()


def _stop_at_new(proc, directory, event, before, timeout=600):
  """Stops `proc` (SIGSTOP) once `directory` holds an entry marking `event` that is not in
  `before` (listed before `proc` started) and is still there once `proc` is stopped. False if
  `proc` ends or the time runs out first."""
  deadline = time.time() + timeout
  while proc.poll() is None and time.time() < deadline:
    if _names(directory, event) - before:
      proc.send_signal(signal.SIGSTOP)
      if _names(directory, event) - before:
        return True
      proc.send_signal(signal.SIGCONT)  # that entry went (a write was finalised): the next one
    time.sleep(0.02)
  return False


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, mnist_tfds):
  workdir = tmp_path_factory.mktemp("straight")
  result = subprocess.run(
    _command(workdir, mnist_tfds), cwd=REPO, capture_output=True, text=True, timeout=900
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads((workdir / "report.json").read_text())


@pytest.mark.slow
def test_sigkill_anywhere_then_rerun_gives_the_uninterrupted_report(
  tmp_path, mnist_tfds, uninterrupted
):
  w = tmp_path / "w"
  # Each kill point is an entry that the killed run itself creates (not one a previous run
  # left), seen while that run is alive; every one must land.
  kill_points = [
    ("inside probe training", w / "probe" / "checkpoints", str.isdigit),
    ("during a checkpoint write", w / "probe" / "checkpoints", lambda n: "checkpoint-tmp" in n),
    ("during fmcs_data extraction", w, lambda n: n == "fmcs_data"),
    ("during fmce_net", w / "fmce_net" / "run" / "checkpoints", str.isdigit),
    ("during baseline", w / "baseline" / "seed_0" / "checkpoints", str.isdigit),
    ("during fmcenetpp", w / "fmcenetpp" / "seed_0" / "checkpoints", str.isdigit),
  ]
  for i, (name, directory, event) in enumerate(kill_points):
    before = _names(directory, event)
    log = tmp_path / f"run_{i}.log"
    with open(log, "w") as stderr:
      proc = _start(w, mnist_tfds, stderr)
    try:
      landed = _stop_at_new(proc, directory, event, before)
      if landed and i == 0:
        # While this (stopped) run holds the workdir, a second run is refused with a clear message.
        busy = subprocess.run(
          _command(w, mnist_tfds), cwd=REPO, capture_output=True, text=True, timeout=300
        )
        assert busy.returncode == 2 and "in use by pid" in busy.stderr, busy.stderr[-2000:]
    finally:
      proc.kill()  # SIGKILL, which also ends a stopped process
      proc.wait(timeout=60)
    assert landed, (
      f"{name}: not reached, the run ended ({proc.returncode})\n{log.read_text()[-3000:]}"
    )
    assert proc.returncode == -signal.SIGKILL, (name, log.read_text()[-3000:])
  final = subprocess.run(
    _command(w, mnist_tfds), cwd=REPO, capture_output=True, text=True, timeout=900
  )
  assert final.returncode == 0, final.stderr[-3000:]
  report = json.loads((w / "report.json").read_text())
  for key in RESULT_KEYS:
    assert report[key] == uninterrupted[key], key


def _stop_at_checkpoint(w, tfds_dir, run, sig):
  """Starts (or resumes) the job, sends `sig` once `run` has a checkpoint; (exit status, stderr)."""
  proc = _start(w, tfds_dir)
  deadline = time.time() + 600
  while not _steps(w / run / "checkpoints") and time.time() < deadline:
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    time.sleep(0.05)
  proc.send_signal(sig)
  _, stderr = proc.communicate(timeout=300)
  return proc.returncode, stderr


@pytest.mark.slow
def test_sigterm_then_ctrl_c_checkpoint_and_the_rerun_gives_the_uninterrupted_report(
  tmp_path, mnist_tfds, uninterrupted
):
  """SIGTERM in the first baseline run exits 0, Ctrl-C in the resumed job's first FMCE-Net++
  run exits 130 (one line, no traceback); each writes a checkpoint, and the last re-run's
  report equals the uninterrupted job's."""
  w = tmp_path / "w"
  status, stderr = _stop_at_checkpoint(w, mnist_tfds, "baseline/seed_0", signal.SIGTERM)
  assert status == 0, stderr[-3000:]
  assert "SIGTERM received; checkpoint written" in stderr
  status, stderr = _stop_at_checkpoint(w, mnist_tfds, "fmcenetpp/seed_0", signal.SIGINT)
  assert status == 130, stderr[-3000:]
  assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
  assert "SIGINT received; checkpoint written" in stderr.strip().splitlines()[-1], stderr[-3000:]
  final = subprocess.run(
    _command(w, mnist_tfds), cwd=REPO, capture_output=True, text=True, timeout=900
  )
  assert final.returncode == 0, final.stderr[-3000:]
  report = json.loads((w / "report.json").read_text())
  for key in RESULT_KEYS:
    assert report[key] == uninterrupted[key], key


def test_a_second_ctrl_c_stops_at_once_without_a_traceback():
  """After the first Ctrl-C asked for a checkpoint, SIGINT is at its default again: the second
  one ends the process by the signal, whatever it is doing (here: sleeping, in Python)."""
  child = (
    "import os, signal, sys, time\n"
    "from fmcejax import trainer\n"
    "signal.signal(signal.SIGINT, trainer.request_preemption)\n"
    "os.kill(os.getpid(), signal.SIGINT)\n"
    "assert trainer.PREEMPTED.wait(10) and trainer.preemption_signal() == 'SIGINT'\n"
    "print('first handled', flush=True)\n"
    "time.sleep(120)\n"
  )
  proc = subprocess.Popen(
    [sys.executable, "-c", child],
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    preexec_fn=_default_sigint,
  )
  assert proc.stdout.readline() == "first handled\n", proc.stderr.read()
  proc.send_signal(signal.SIGINT)
  _, stderr = proc.communicate(timeout=30)  # not the 120 s sleep: killed by the signal
  assert proc.returncode == -signal.SIGINT, stderr
  assert "Ctrl-C again stops at once" in stderr and "Traceback" not in stderr, stderr
