"""Multi-host data parallelism on one machine: 2 processes x 4 CPU devices against 1 x 8.

Both jobs run the real CLI (`python -m fmcejax.train`) on real MNIST with the same config and
global batch. The two-process job joins through FMCEJAX_COORDINATOR / FMCEJAX_NUM_PROCESSES /
FMCEJAX_PROCESS_ID (`parallel.initialize_distributed`, gloo collectives on CPU); each process
loads only its shard of every global batch.

What must hold:
  * the same results as one process, up to float32 reduction order: the gradient and BatchNorm
    all-reduces sum in another order across the gloo all-reduce, so results agree closely, not
    bitwise (tolerances: `METRIC_RTOL`, `PARAM_RTOL`/`ATOL`). The learning rate is 0.01: at the
    default 0.1 the first steps of this small CNN amplify any reduction-order difference to
    ~1e-3 in the loss after 32 steps, between 8 and 4 devices of ONE process just as much;
  * one writer: metrics.json, TensorBoard events and console epoch lines come from process 0
    only; Orbax checkpoints are written by both processes and finalised once;
  * re-running the finished command is a no-op (same files, no new checkpoint);
  * SIGTERM to one host (a preemption notice reaches each VM at its own moment) stops every
    host at the same step with one checkpoint, and re-running resumes to the uninterrupted
    result;
  * the stages that hand files to each other (probe snapshots -> CQI -> FMCS-Dataset ->
    FMCE-Net head) work across processes, and what two processes saved can be finished by one
    process on other devices (a pod's workdir continued on a workstation).

Slow (about 4 minutes on 2 cores). Every subprocess is bounded (`TIMEOUT`) and killed, with its
whole process group, if the test fails or times out.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import COLLECTIVE_TIMEOUT, SHARED_DATA

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 240  # seconds, per job (all its processes)
PROCESSES, LOCAL_DEVICES = 2, 4
STEPS_PER_EPOCH, EPOCHS = 16, 2  # 1024 examples / global batch 64
# Tolerances. Observed (2 CPU cores, 32 steps): losses within 5e-7 relative, accuracy equal;
# every parameter / BatchNorm leaf within 6e-4 of its largest entry (the BN biases, small and
# far from their init of 0; kernels within 1e-4); SGD momentum traces within 2e-2 (a trace is
# an average of the last gradients, which nearly cancel over a batch: one process on 4 devices
# vs 8 differs as much after 32 steps on a fixed batch). One step of the two jobs agrees to
# 3e-6, as 4 vs 8 devices of one process do. A real fault (a missing all-reduce, a host
# training on its half batch, another data order) moves all of these by O(1).
METRIC_RTOL = 1e-4
ACCURACY_ATOL = 1 / 256  # one of the 256 test images may flip between runs
PARAM_TOL = 5e-3  # max |difference| / max |reference| per leaf: params, batch_stats
MOMENTUM_TOL = 1e-1  # the same for the optimizer state

# `python -m fmcejax.train` that sends itself SIGTERM as its training loop logs step argv[1]: a
# preemption notice that reaches this host only, at a known step (an outside signal would race
# the loop, and may land at an epoch boundary or after the last step).
SIGTERM_AT_STEP = """
import os, runpy, signal, sys
from fmcejax import run_log
at, train = int(sys.argv.pop(1)), run_log.RunLog.train
def train_then_sigterm(self, step, scalars):
  train(self, step, scalars)
  if step == at:
    os.kill(os.getpid(), signal.SIGTERM)
run_log.RunLog.train = train_then_sigterm
runpy.run_module("fmcejax.train", run_name="__main__", alter_sys=True)
"""

pytestmark = pytest.mark.slow


def _args(
  workdir: Path, tfds_dir: str, stages: str = "baseline", epochs: int = EPOCHS, limit: int = 1024
) -> list[str]:
  return [
    f"--workdir={workdir}",
    f"--config.stages={stages}",
    "--config.seeds=1",
    f"--config.epochs={epochs}",
    f"--config.train_examples_limit={limit}",
    "--config.test_examples_limit=256",
    "--config.batch_size=64",
    "--config.eval_batch_size=64",
    "--config.learning_rate=0.01",
    "--config.progress_bar=False",
    "--config.log_every=2",
    f"--config.data_dir={SHARED_DATA}",
    f"--config.tfds_data_dir={tfds_dir}",
  ]


def _free_port() -> int:
  try:
    import portpicker

    return portpicker.pick_unused_port()
  except ImportError:
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      return s.getsockname()[1]


def _env(devices: int, **extra: str) -> dict[str, str]:
  env = {
    k: v
    for k, v in os.environ.items()
    if k not in ("FMCEJAX_COORDINATOR", "FMCEJAX_NUM_PROCESSES", "FMCEJAX_PROCESS_ID")
  }
  env.update(
    PYTHONUNBUFFERED="1",
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {COLLECTIVE_TIMEOUT}",
    **extra,
  )
  return env


class Job:
  """The processes of one CLI job, each logging to its own file; killed as a group on failure."""

  def __init__(
    self, args: list[str], logdir: Path, processes: int, sigterm_at: dict[int, int] | None = None
  ):
    """`sigterm_at`: {process: step} where that process gets SIGTERM (`SIGTERM_AT_STEP`)."""
    self.logs = [logdir / f"process_{i}.log" for i in range(processes)]
    port = _free_port()
    self.procs = []
    try:
      for i in range(processes):
        extra = (
          {}
          if processes == 1
          else {
            "FMCEJAX_COORDINATOR": f"127.0.0.1:{port}",
            "FMCEJAX_NUM_PROCESSES": str(processes),
            "FMCEJAX_PROCESS_ID": str(i),
          }
        )
        devices = 8 if processes == 1 else LOCAL_DEVICES
        at = (sigterm_at or {}).get(i)
        entry = ["-m", "fmcejax.train"] if at is None else ["-c", SIGTERM_AT_STEP, str(at)]
        with open(self.logs[i], "w") as log:
          self.procs.append(
            subprocess.Popen(
              [sys.executable, *entry, *args],
              cwd=REPO,
              env=_env(devices, **extra),
              stdout=log,
              stderr=subprocess.STDOUT,
              start_new_session=True,
            )
          )
    except BaseException:
      self.kill()
      raise

  def output(self, i: int) -> str:
    return self.logs[i].read_text(errors="replace")

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        try:  # SIGKILL: SIGTERM is caught by the trainer, and a stuck collective ignores it
          os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
          pass
      p.wait()

  def wait(self, timeout: float = TIMEOUT, grace: float = 30) -> list[str]:
    """Waits for every process to exit 0; returns their outputs. Kills all and fails otherwise
    (a process that failed leaves the others blocked in a collective: they get `grace` s)."""
    deadline = time.monotonic() + timeout
    failed_at = None
    try:
      while any(p.poll() is None for p in self.procs):
        now = time.monotonic()
        if failed_at is None and any(p.poll() not in (None, 0) for p in self.procs):
          failed_at = now
        if now > deadline or (failed_at is not None and now > failed_at + grace):
          break
        time.sleep(0.2)
    finally:
      self.kill()
    codes = [p.returncode for p in self.procs]
    outputs = [self.output(i) for i in range(len(self.procs))]
    if codes != [0] * len(codes):
      report = "\n".join(
        f"--- process {i}: exit status {c} ---\n{o[-3000:]}"
        for i, (c, o) in enumerate(zip(codes, outputs))
      )
      pytest.fail(f"job did not finish with exit status 0 everywhere within {timeout} s:\n{report}")
    return outputs


def _run(args: list[str], logdir: Path, processes: int) -> list[str]:
  logdir.mkdir(parents=True, exist_ok=True)
  return Job(args, logdir, processes).wait()


def _run_dir(workdir: Path) -> Path:
  return workdir / "baseline" / "seed_0"


def _metrics(workdir: Path) -> dict:
  return json.loads((_run_dir(workdir) / "metrics.json").read_text())


def _checkpoint(workdir: Path):
  """(all steps, the last step's train state as numpy) of a run, on whatever devices we have."""
  import jax
  import orbax.checkpoint as ocp

  manager = ocp.CheckpointManager((_run_dir(workdir) / "checkpoints").absolute())
  try:
    steps = sorted(manager.all_steps())
    # The saved shardings name the devices of the job that wrote them (ids of two processes):
    # restore onto one local device instead.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    restored = manager.restore(
      steps[-1], args=ocp.args.Composite(state=ocp.args.StandardRestore(fallback_sharding=device))
    )
    return steps, jax.device_get(restored.state)
  finally:
    manager.close()


def _evaluate_saved_head(workdir: Path) -> dict:
  """The FMCE-Net that `workdir`'s fmce_net stage saved, loaded here and evaluated on the
  held-out FMCS-Dataset as that stage evaluated it."""
  import jax.numpy as jnp
  from etils import epath

  from fmcejax import fmce_net, fmcs_data, parallel
  from fmcejax.configs import default

  config = default.get_config()  # the head's width and depth: the job's defaults
  data, mesh = epath.Path(workdir / "fmcs_data"), parallel.make_mesh()
  head, variables = fmce_net.head(
    config, data, epath.Path(workdir / "fmce_net"), "", jnp.float32, mesh
  )
  holdout = fmcs_data.dataset(data, "holdout")
  return fmce_net.evaluate(head.model, variables, holdout, mesh, config.fmce_net.batch_size)


def _assert_same_results(got: dict, want: dict) -> None:
  assert got["epochs"] == want["epochs"] == EPOCHS and got["steps"] == want["steps"]
  assert got["test_accuracy"] == pytest.approx(want["test_accuracy"], abs=ACCURACY_ATOL)
  assert got["test_loss"] == pytest.approx(want["test_loss"], rel=METRIC_RTOL)
  for g, w in zip(got["history"], want["history"], strict=True):
    assert g["epoch"] == w["epoch"]
    assert g["train_loss"] == pytest.approx(w["train_loss"], rel=METRIC_RTOL)
    assert g["test_loss"] == pytest.approx(w["test_loss"], rel=METRIC_RTOL)
    assert g["learning_rate"] == pytest.approx(w["learning_rate"], rel=1e-6)


def _assert_same_state(got, want) -> None:
  import jax

  got_leaves = jax.tree_util.tree_flatten_with_path(got)[0]
  want_leaves = jax.tree_util.tree_flatten_with_path(want)[0]
  assert [p for p, _ in got_leaves] == [p for p, _ in want_leaves]
  assert int(got["step"]) == int(want["step"])
  for (path, g), (_, w) in zip(got_leaves, want_leaves):
    name = jax.tree_util.keystr(path)
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    tol = MOMENTUM_TOL if name.startswith("['opt_state']") else PARAM_TOL
    error = np.abs(g - w).max() / max(np.abs(w).max(), 1e-12)
    assert error <= tol, f"{name}: max |difference| is {error:.1e} of max |reference|"


def _files(root: Path) -> dict[str, tuple[int, int]]:
  return {
    str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
    for p in sorted(root.rglob("*"))
    if p.is_file()
  }


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mnist_tfds):
  """The single-process run (8 devices) every multi-process result is compared with."""
  root = tmp_path_factory.mktemp("single")
  start = time.monotonic()
  _run(_args(root / "w", mnist_tfds), root / "logs", processes=1)
  print(f"single-process run: {time.monotonic() - start:.1f} s")
  return root / "w"


def test_two_processes_match_one_and_a_rerun_is_a_no_op(tmp_path, mnist_tfds, reference):
  workdir = tmp_path / "w"
  start = time.monotonic()
  outputs = _run(_args(workdir, mnist_tfds), tmp_path / "logs", processes=PROCESSES)
  print(f"two-process run: {time.monotonic() - start:.1f} s")
  assert all("fmcejax: done" in o for o in outputs)

  got, want = _metrics(workdir), _metrics(reference)
  _assert_same_results(got, want)
  got_steps, got_state = _checkpoint(workdir)
  want_steps, want_state = _checkpoint(reference)
  assert got_steps == want_steps == [STEPS_PER_EPOCH * e for e in range(1, EPOCHS + 1)]
  _assert_same_state(got_state, want_state)

  # One writer for our files: epoch lines and TensorBoard events from process 0 only.
  assert outputs[0].count(f"epoch {EPOCHS}/{EPOCHS}") == 1
  assert "epoch 1/" not in outputs[1]
  assert len(list((_run_dir(workdir) / "tb").glob("events.out.tfevents.*"))) == 1
  # Orbax wrote the checkpoint from both processes (each its own data files) and finalised it.
  last = _run_dir(workdir) / "checkpoints" / str(got_steps[-1])
  assert list(last.rglob("*process_1*")), "process 1 wrote no part of the checkpoint"

  # The same command again: the finished stage is skipped; nothing is rewritten or added.
  before = _files(workdir / "baseline")
  start = time.monotonic()
  outputs = _run(_args(workdir, mnist_tfds), tmp_path / "logs_rerun", processes=PROCESSES)
  print(f"two-process re-run (no-op): {time.monotonic() - start:.1f} s")
  assert all("fmcejax: done" in o for o in outputs)
  assert _files(workdir / "baseline") == before


def test_sigterm_to_one_host_stops_all_and_resume_matches(tmp_path, mnist_tfds, reference):
  """A preemption notice reaches each VM at its own moment; here only process 0 gets one, as it
  logs a step in the middle of epoch 2."""
  workdir = tmp_path / "w"
  (tmp_path / "logs").mkdir()
  stop = STEPS_PER_EPOCH + 4
  job = Job(_args(workdir, mnist_tfds), tmp_path / "logs", PROCESSES, sigterm_at={0: stop})
  outputs = job.wait()
  assert all("SIGTERM received" in o for o in outputs), outputs[1][-2000:]
  steps, _ = _checkpoint(workdir)
  assert steps == [STEPS_PER_EPOCH, stop], "every host stops at the step process 0 was told at"
  assert not (_run_dir(workdir) / "metrics.json").exists()

  outputs = _run(_args(workdir, mnist_tfds), tmp_path / "logs_resume", processes=PROCESSES)
  assert all("fmcejax: done" in o for o in outputs)
  _assert_same_results(_metrics(workdir), _metrics(reference))
  _assert_same_state(_checkpoint(workdir)[1], _checkpoint(reference)[1])


def test_pipeline_stages_across_processes_then_finished_by_one(tmp_path, mnist_tfds):
  workdir = tmp_path / "w"
  tiny = [
    "--config.probe.epochs=6",
    "--config.probe.train_examples_limit=512",
    "--config.fmcs.subset_size=256",
    "--config.fmce_net.epochs=2",
    "--config.fmce_net.batch_size=64",
  ]
  first = _args(workdir, mnist_tfds, "probe,cqi,fmcs_data,fmce_net", 1, 512) + tiny
  outputs = _run(first, tmp_path / "logs_two", processes=PROCESSES)
  assert all("fmcejax: done" in o for o in outputs)
  cqi = json.loads((workdir / "probe" / "cqi.json").read_text())
  index = json.loads((workdir / "fmcs_data" / "index.json").read_text())
  assert index["markers"] == cqi["markers"] and len(cqi["markers"]) == 5
  snapshots = sorted(
    int(p.name) for p in (workdir / "probe" / "snapshots").iterdir() if p.name.isdigit()
  )
  assert snapshots == cqi["markers"], "the CQI stage prunes non-marker snapshots"
  for phase in range(5):
    assert np.load(workdir / "fmcs_data" / f"phase_{phase}.npy").shape[0] == 256
  # The FMCE-Net head saved by two processes (devices 0-3 of each) loads in this one (8 devices)
  # as the head they trained: the same held-out evaluation as theirs.
  saved = json.loads((workdir / "fmce_net" / "metrics.json").read_text())
  loaded = _evaluate_saved_head(workdir)
  assert loaded["confusion"] == saved["confusion"]
  for key in ("fmcs_mae", "phase_probability"):
    assert loaded[key] == pytest.approx(saved[key], rel=1e-5), key

  # ...and the one-process CLI trains with it.
  second = _args(workdir, mnist_tfds, "baseline,fmcenetpp,report", 1, 512) + tiny
  outputs = _run(second, tmp_path / "logs_one", processes=1)
  assert "fmcejax: done" in outputs[0]
  report = json.loads((workdir / "report.json").read_text())
  assert report["seeds"] == [0] and len(report["fmcenetpp_accuracy"]) == 1
