"""The training loop shared by every stage that trains: exact resume, preemption, metrics.

A run is resumable at any checkpoint (`checkpointing`): it holds the train state and the host-side
progress. The step is also the loader's position (batch k is a pure function of k, made on the
devices or by grain with any worker count), and the step's RNG is `fold_in(seed, step)`, so a
resumed run repeats the uninterrupted one. Metrics stay on device between log intervals; the host
syncs only to log, evaluate and checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import flax.linen as nn
import grain
import jax
import numpy as np
import optax
from etils import epath
from jax.sharding import Mesh

from fmcejax import checkpointing, evaluation, parallel, run_log, steps


class Preempted(Exception):
  """SIGTERM or Ctrl-C arrived; a checkpoint of the current step was written before raising."""


class NonFiniteError(RuntimeError):
  """A step produced a non-finite loss or gradient (its update was not applied)."""


class Batches(Protocol):
  """Training batches, batch k a pure function of k (`input_pipeline.HostBatches`,
  `device_input.DeviceBatches`; the latter can also run several steps in one dispatch,
  `scan_steps`)."""

  def __len__(self) -> int: ...

  def iterator(self, start: int) -> Iterator[dict[str, jax.Array]]:
    """Global batches sharded over the mesh, from batch `start`; closing it frees the loader."""


@dataclasses.dataclass(frozen=True)
class Job:
  """Everything one training run needs; `identity` guards resume against another job's files."""

  model: nn.Module
  preprocess: Callable[[jax.Array], jax.Array]
  input_shape: tuple[int, ...]
  train_data: Batches  # epochs * steps_per_epoch batches
  steps_per_epoch: int
  epochs: int
  global_batch: int
  tx: optax.GradientTransformation
  learning_rate: optax.Schedule
  seed: int
  identity: dict[str, Any]
  eval_data: grain.MapDataset | None = None  # examples; evaluated in padded global batches
  eval_batch_size: int = 1000
  eval_each_epoch: bool = True
  loss: steps.Loss = steps.Loss()
  head: steps.Head | None = None  # the frozen FMCE-Net, when one exists
  head_variables: Any = None
  train_with_head: bool = False  # RAL (FMCE-Net++) vs monitoring only (baseline)


@dataclasses.dataclass(frozen=True)
class LoopOptions:
  log_every: int = 50
  checkpoint_every_steps: int = 0
  keep_checkpoints: int = 2
  nan_policy: str = "error"  # error | skip
  progress_bar: bool = True
  description: str = ""
  steps_per_dispatch: int = 1  # > 1: `lax.scan` over device-resident batches (`scan_steps`)


EpochHook = Callable[[int, steps.TrainState, list[dict[str, Any]]], bool]

PREEMPTED = threading.Event()
_SIGNAL = {"name": "SIGTERM"}  # the last one received, for messages and the exit status


def request_preemption(signum: int = signal.SIGTERM, frame: Any = None) -> None:
  """SIGTERM (TPU/GCE preemption notice) and Ctrl-C handler: the loop checkpoints at its next
  step. A first Ctrl-C restores SIGINT's default action, so a second one stops at once."""
  del frame
  _SIGNAL["name"] = signal.Signals(signum).name
  if signum == signal.SIGINT:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.write(  # a signal handler may interrupt a print: one raw write
      2,
      b"fmcejax: Ctrl-C: stopping with a checkpoint at the next step; "
      b"Ctrl-C again stops at once, losing the work since the last checkpoint\n",
    )
  PREEMPTED.set()


def preemption_signal() -> str:
  """The name of the last signal that requested preemption (SIGTERM if none did)."""
  return _SIGNAL["name"]


@contextlib.contextmanager
def _sigterm_handled():
  previous = signal.signal(signal.SIGTERM, request_preemption)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


def jit_train_step(
  mesh: Mesh,
  *,
  preprocess: Callable[[jax.Array], jax.Array],
  head: steps.Head | None,
  loss: steps.Loss,
  compiler_options: dict[str, str] | None,
) -> Callable[..., Any]:
  """`steps.train_step` as `fit` runs it: state replicated and donated, batch sharded."""
  repl = parallel.replicated(mesh)
  return jax.jit(
    functools.partial(steps.train_step, preprocess=preprocess, head=head, loss=loss),
    in_shardings=(repl, parallel.batch_sharding(mesh), repl, repl),
    out_shardings=(repl, repl),
    donate_argnums=0,
    compiler_options=compiler_options,
  )


def jit_eval_step(
  mesh: Mesh, *, preprocess: Callable[[jax.Array], jax.Array], head: steps.Head | None
) -> Callable[..., Any]:
  """`steps.eval_step` as `fit` evaluates: `fn((state, head_variables), global_batch)`."""
  return evaluation.jit(
    lambda v, batch: steps.eval_step(v[0], batch, v[1], preprocess=preprocess, head=head), mesh
  )


def _preempted(at_boundary: bool) -> bool:
  """The one place that decides preemption. Saving is collective and each host gets SIGTERM at
  its own moment, so with several processes all decide together, at steps where all check."""
  if jax.process_count() == 1:
    return PREEMPTED.is_set()
  return at_boundary and parallel.any_process(PREEMPTED.is_set())


def fit(
  job: Job,
  run_dir: epath.PathLike,
  mesh: Mesh,
  options: LoopOptions,
  on_epoch_end: EpochHook | None = None,
) -> dict[str, Any]:
  """Trains `job` to the end (or to an early stop by `on_epoch_end`), resuming if it can.

  Returns the final metrics: test accuracy/loss, images/s, the per-epoch history and the state.
  """
  run_dir = epath.Path(run_dir)
  evaluate = _evaluator(job, mesh)
  head_variables = (
    parallel.replicate(job.head_variables, mesh) if job.head_variables is not None else None
  )
  manager = checkpointing.manager(run_dir / "checkpoints", options.keep_checkpoints)
  state, progress = _start(job, mesh, manager, run_dir)
  meter = _Meter(job, options, progress)
  step, total = int(jax.device_get(state.step)), job.steps_per_epoch * job.epochs
  rng = parallel.replicate(jax.random.PRNGKey(job.seed + 1), mesh)
  log = run_log.RunLog(
    run_dir / "tb", options.description, options.progress_bar, job.epochs, total, step
  )
  try:
    with (
      _sigterm_handled(),
      _stepper(job, mesh, options, rng, state, head_variables, step) as (advance, k),
    ):
      pace = parallel.Pacer()
      while step < total and not meter.progress["stopped_early"]:
        n = _dispatch_size(step, k, job.steps_per_epoch)
        state, metrics = advance(state, step, n)
        step += n
        pace(metrics)
        meter.pending.append(metrics)
        log.advance(n)
        epoch_end = step % job.steps_per_epoch == 0
        due = epoch_end or _crossed(step, n, options.checkpoint_every_steps)
        logged = _crossed(step, n, options.log_every)
        if due or logged or not meter.warm:
          log.train(step, meter.sync(step, manager))
        if epoch_end:
          record = meter.end_epoch(step, evaluate(state, head_variables, step == total))
          log.epoch(step, record)
          if on_epoch_end is not None and on_epoch_end(
            record["epoch"], state, meter.progress["history"]
          ):
            meter.progress["stopped_early"] = True
          meter.restart_clock()
        preempted = _preempted(due or logged)
        if preempted:
          log.train(step, meter.sync(step, manager))
        if due or preempted:
          checkpointing.save(manager, step, state, meter.progress)
          meter.restart_clock()
        if preempted:
          manager.wait_until_finished()
          PREEMPTED.clear()  # handled: this process may train again (notebooks, tests)
          raise Preempted(
            f"{options.description}: {preemption_signal()} received; checkpoint written at "
            f"step {step}. Re-run the same command to resume."
          )
  finally:
    manager.wait_until_finished()
    manager.close()
    log.close()
  return meter.result(step, state, evaluate(state, head_variables, True))


@contextlib.contextmanager
def _stepper(
  job: Job,
  mesh: Mesh,
  options: LoopOptions,
  rng: jax.Array,
  state: Any,
  head_variables: Any,
  start: int,
) -> Iterator[tuple[Callable[[Any, int, int], tuple[Any, Any]], int]]:
  """`(advance, k)`: `advance(state, step, n)` trains steps `step .. step + n - 1` (n <= k) and
  returns the state and their metrics. With device-resident batches and `steps_per_dispatch` > 1
  that is one `lax.scan` (`DeviceBatches.scan_steps`), one program per dispatch length, all
  compiled here, before the first step; else one jitted step per batch of the loader (k = 1).
  The step's function is the same either way."""
  head = job.head if job.train_with_head else None
  compiler_options = parallel.compiler_options(mesh)
  k, spe = options.steps_per_dispatch, job.steps_per_epoch
  if k > 1 and hasattr(job.train_data, "scan_steps"):
    step_fn = functools.partial(
      steps.train_step, preprocess=job.preprocess, head=head, loss=job.loss
    )
    scan = job.train_data.scan_steps(step_fn, rng, compiler_options)
    step, total = start, spe * job.epochs
    while step < total:
      n = _dispatch_size(step, k, spe)
      scan.compile(n, state, head_variables)
      step += n
    yield (lambda state, step, n: scan(state, step, n, head_variables)), k
    return
  train_fn = jit_train_step(
    mesh, preprocess=job.preprocess, head=head, loss=job.loss, compiler_options=compiler_options
  )
  with contextlib.closing(job.train_data.iterator(start)) as batches:
    yield (lambda state, step, n: train_fn(state, next(batches), rng, head_variables)), 1


def _crossed(step: int, n: int, every: int) -> bool:
  """Whether the dispatch of steps `step - n + 1 .. step` reached a multiple of `every` (0: never):
  log and checkpoint cadences hold at the first dispatch boundary at or after each multiple."""
  return bool(every) and step // every > (step - n) // every


def _dispatch_size(step: int, k: int, steps_per_epoch: int) -> int:
  """Steps in the dispatch from `step`: up to the next multiple of `k` within the epoch and never
  past its end, so a run has at most two lengths (k and the epoch's remainder). A pure function of
  the step, so a resumed run dispatches (and rounds) exactly as the uninterrupted one."""
  index = step % steps_per_epoch
  return min(k - index % k, steps_per_epoch - index)


def _start(
  job: Job, mesh: Mesh, manager: Any, run_dir: epath.Path
) -> tuple[steps.TrainState, dict[str, Any]]:
  """The run's state and host-side progress: from the newest readable checkpoint, or fresh."""
  init_fn = jax.jit(
    functools.partial(steps.create_train_state, job.model, job.tx, job.input_shape),
    out_shardings=parallel.replicated(mesh),
    compiler_options=parallel.compiler_options(mesh),
  )
  state = init_fn(jax.random.PRNGKey(job.seed))
  restored = checkpointing.restore_latest_good(manager, state, job.identity, run_dir)
  if restored is not None:
    return restored
  progress = {"history": [], "loss_sum": 0.0, "loss_count": 0, "stopped_early": False}
  progress |= {"nonfinite_steps": 0, "images": 0, "train_seconds": 0.0, "identity": job.identity}
  return state, progress


def _evaluator(job: Job, mesh: Mesh) -> Callable[[Any, Any, bool], Callable[[], dict]]:
  """`evaluate(state, head_variables, final)`: a thunk computing test metrics when this epoch
  evaluates (every epoch, or only the final one), else None."""
  if job.eval_data is None:
    return lambda *_: None
  fn = jit_eval_step(mesh, preprocess=job.preprocess, head=job.head)

  def run(state, head_variables) -> dict[str, float | None]:
    sums = evaluation.over_dataset(
      fn, (state, head_variables), job.eval_data, mesh, global_batch=job.eval_batch_size
    )
    return {
      "test_accuracy": float(sums["correct"] / sums["count"]),
      "test_loss": float(sums["loss"] / sums["count"]),
      "fmcs": float(sums["fmcs"] / sums["count"]) if "fmcs" in sums else None,
    }

  return lambda state, head_variables, final: (
    functools.partial(run, state, head_variables) if job.eval_each_epoch or final else None
  )


@dataclasses.dataclass
class _Meter:
  """The run's host-side state: the checkpointed `progress` (JSON), the step metrics not yet
  brought to the host, and the clock that excludes compilation, evaluation and saving."""

  job: Job
  options: LoopOptions
  progress: dict[str, Any]
  pending: list[dict[str, jax.Array]] = dataclasses.field(default_factory=list)
  last: dict[str, Any] = dataclasses.field(default_factory=dict)  # the last synced step's metrics
  warm: bool = False
  clock: float = dataclasses.field(default_factory=time.perf_counter)

  def restart_clock(self) -> None:
    self.clock = time.perf_counter()

  def sync(self, step: int, manager: Any) -> dict[str, float]:
    """Brings the pending step metrics to the host (the only per-interval device sync) and
    returns the scalars to log."""
    if not self.pending:
      return {}
    values, p = [row for v in jax.device_get(self.pending) for row in _rows(v)], self.progress
    self.pending = []
    now = time.perf_counter()
    if self.warm:  # the first sync follows the compilation
      p["images"] += len(values) * self.job.global_batch
      p["train_seconds"] += now - self.clock
    self.warm, self.clock = True, now
    bad = [step - len(values) + i + 1 for i, v in enumerate(values) if v["nonfinite"]]
    if bad:
      self._nonfinite(bad, manager)
    for v in values:
      if not v["nonfinite"]:
        p["loss_sum"] += float(v["loss"])
        p["loss_count"] += 1
    scalars = {
      f"train/{k}": float(values[-1][k])
      for k in ("loss", "ce", "conv", "fmcs", "alpha", "accuracy")
      if k in values[-1]
    }
    self.last = values[-1]
    scalars["train/learning_rate"] = float(self.job.learning_rate(step))
    scalars["train/images_per_second"] = self.images_per_second()
    return scalars

  def _nonfinite(self, bad: list[int], manager: Any) -> None:
    self.progress["nonfinite_steps"] += len(bad)
    epoch = (bad[0] - 1) // self.job.steps_per_epoch + 1
    if self.options.nan_policy == "error":
      raise NonFiniteError(
        f"{self.options.description}: non-finite loss or gradient at step {bad[0]} (epoch "
        f"{epoch}); the update was not applied and no checkpoint was written after it. "
        f"Last good checkpoint: step {manager.latest_step()}. Lower the learning rate, "
        "check the data, or set --config.nan_policy=skip to skip such batches."
      )
    logging.warning(
      "%s: skipped %d non-finite batch(es), first at step %d (epoch %d)",
      self.options.description,
      len(bad),
      bad[0],
      epoch,
    )

  def images_per_second(self) -> float | None:
    p = self.progress
    return p["images"] / p["train_seconds"] if p["train_seconds"] else None

  def end_epoch(self, step: int, evaluate: Callable[[], dict] | None) -> dict[str, Any]:
    """The epoch's record; the step metrics are synced (every epoch end is)."""
    p = self.progress
    record = {
      "epoch": step // self.job.steps_per_epoch,
      "train_loss": p["loss_sum"] / max(p["loss_count"], 1),
      "alpha": float(self.last["alpha"]),
      "learning_rate": float(self.job.learning_rate(step - 1)),
    }
    p["loss_sum"], p["loss_count"] = 0.0, 0
    if evaluate is not None:
      record.update(evaluate())
    p["history"].append(record)
    return record

  def result(
    self, step: int, state: steps.TrainState, evaluate: Callable[[], dict] | None
  ) -> dict[str, Any]:
    history = self.progress["history"]
    last = history[-1]
    if "test_accuracy" not in last and evaluate is not None:  # stopped before the final epoch
      last.update(evaluate())
    return {
      "test_accuracy": last.get("test_accuracy"),
      "test_loss": last.get("test_loss"),
      "epochs": len(history),
      "steps": step,
      "images_per_second": self.images_per_second(),
      "nonfinite_steps": self.progress["nonfinite_steps"],
      "stopped_early": self.progress["stopped_early"],
      "history": history,
      "state": state,
    }


def _rows(metrics: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
  """One step's metrics, or a scan's stacked over its steps, as one dict per step."""
  if np.ndim(metrics["loss"]) == 0:
    return [metrics]
  return [dict(zip(metrics, values)) for values in zip(*metrics.values())]
