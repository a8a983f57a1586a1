"""The training loop shared by every stage that trains: checkpoints, exact resume, preemption.

A run is resumable at any checkpoint: the Orbax checkpoint holds the train state (params,
optimizer, step) and the host-side history. The step is also the loader's position (batch k of
the grain dataset, whatever the worker count, or of `device_input.DeviceBatches` is a pure
function of k), and the step's RNG is `fold_in(seed, step)`, so a resumed run repeats the
uninterrupted one. Metrics stay on device between log intervals; the host syncs only to log,
evaluate and checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from jax.sharding import Mesh

from fmcejax import device_input, input_pipeline, parallel, steps


class Preempted(Exception):
  """SIGTERM arrived; a checkpoint of the current step was written before raising."""


class NonFiniteError(RuntimeError):
  """A step produced a non-finite loss or gradient (its update was not applied)."""


class CheckpointMismatch(RuntimeError):
  """The run directory holds a checkpoint of a different job."""


@dataclasses.dataclass(frozen=True)
class Job:
  """Everything one training run needs; `identity` guards resume against another job's files."""
  model: nn.Module
  preprocess: Callable[[jax.Array], jax.Array]
  input_shape: tuple[int, ...]
  # epochs * steps_per_epoch batches: host-local (grain) or global, made on the devices
  train_data: grain.MapDataset | device_input.DeviceBatches
  steps_per_epoch: int
  epochs: int
  global_batch: int
  tx: optax.GradientTransformation
  learning_rate: optax.Schedule
  seed: int
  identity: dict[str, Any]
  eval_data: Callable[[], Iterator[dict[str, np.ndarray]]] | None = None
  eval_each_epoch: bool = True
  loss: steps.Loss = steps.Loss()
  head: steps.Head | None = None        # the frozen FMCE-Net, when one exists
  head_variables: Any = None
  train_with_head: bool = False         # RAL (FMCE-Net++) vs monitoring only (baseline)


@dataclasses.dataclass(frozen=True)
class LoopOptions:
  log_every: int = 50
  checkpoint_every_steps: int = 0
  keep_checkpoints: int = 2
  nan_policy: str = "error"             # error | skip
  progress_bar: bool = True
  description: str = ""
  input_workers: int = 0                # grain worker processes; 0 = a thread of this process


EpochHook = Callable[[int, steps.TrainState, list[dict[str, Any]]], bool]


PREEMPTED = threading.Event()


def request_preemption(signum=None, frame=None) -> None:
  """SIGTERM handler (TPU/GCE preemption notice): the loop checkpoints at its next step."""
  del signum, frame
  PREEMPTED.set()


@contextlib.contextmanager
def _sigterm_handled():
  previous = signal.signal(signal.SIGTERM, request_preemption)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


def _check_identity(saved: dict[str, Any], expected: dict[str, Any], directory: Path) -> None:
  diffs = [f"{k}: checkpoint has {saved.get(k)!r}, this run has {v!r}"
           for k, v in expected.items() if saved.get(k) != v]
  if diffs:
    raise CheckpointMismatch(
        f"{directory} holds a checkpoint of a different job ({'; '.join(diffs)}). Use another "
        "--workdir, or delete that directory to start this run from scratch.")


def checkpoint_manager(directory: Path, max_to_keep: int | None) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      directory.absolute(), options=ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep, create=True, enable_async_checkpointing=True))


def abstract(tree: Any) -> Any:
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _quarantine(manager: ocp.CheckpointManager, bad_steps: list[int]) -> None:
  """Moves unreadable checkpoints aside (kept for inspection) so their steps can be re-saved."""
  if jax.process_index() == 0:
    aside = Path(str(manager.directory) + ".corrupt")
    aside.mkdir(exist_ok=True)
    for step in bad_steps:
      target = aside / f"{step}.{int(time.time())}"
      (Path(manager.directory) / str(step)).rename(target)
  parallel.sync("quarantine")  # every process reloads after the move
  manager.reload()


def _restore_latest_good(manager: ocp.CheckpointManager, state: steps.TrainState,
                         identity: dict[str, Any], run_dir: Path):
  """(state, progress) of the newest readable checkpoint, or None if none exist.

  A checkpoint that fails to restore (truncated file, missing item) is reported and skipped for
  the one before it; if checkpoints exist but none is readable the run stops rather than
  silently starting from scratch. Orbax only lists finalized checkpoints, so a write cut short
  by a kill is never a candidate.
  """
  candidates = sorted(manager.all_steps(), reverse=True)
  errors = []
  for step in candidates:
    try:
      meta = manager.restore(step, args=ocp.args.Composite(progress=ocp.args.JsonRestore()))
      _check_identity(meta.progress["identity"], identity, run_dir)
      out = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract(state))))
    except CheckpointMismatch:
      raise
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back to the previous
      logging.error("checkpoint %s/%d is unreadable (%s: %s); trying the previous one",
                    manager.directory, step, type(e).__name__, str(e)[:300])
      errors.append(f"step {step}: {type(e).__name__}")
      continue
    if errors:
      _quarantine(manager, [c for c in candidates if c > step])
      logging.warning("resumed from step %d after skipping unreadable checkpoint(s): %s (moved "
                      "to %s.corrupt)", step, ", ".join(errors), manager.directory)
    logging.info("%s: resumed from step %d", run_dir, step)
    return out.state, meta.progress
  if candidates:
    raise RuntimeError(
        f"no readable checkpoint in {manager.directory} ({'; '.join(errors)}). Refusing to "
        "start over silently: delete that directory to restart this run from scratch.")
  return None


class _Writer:
  """TensorBoard scalars from process 0 only."""

  def __init__(self, logdir: Path):
    self._tb = None
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(str(logdir))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if self._tb is not None:
      for k, v in values.items():
        if v is not None and np.isfinite(v):
          self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def jit_train_step(mesh: Mesh, *, preprocess: Callable[[jax.Array], jax.Array],
                   head: steps.Head | None, loss: steps.Loss,
                   compiler_options: dict[str, str] | None) -> Callable[..., Any]:
  """`steps.train_step` as `fit` runs it: state replicated and donated, batch sharded."""
  repl = parallel.replicated(mesh)
  return jax.jit(
      functools.partial(steps.train_step, preprocess=preprocess, head=head, loss=loss),
      in_shardings=(repl, parallel.batch_sharding(mesh), repl, repl),
      out_shardings=(repl, repl), donate_argnums=0, compiler_options=compiler_options)


def fit(job: Job, run_dir: Path, mesh: Mesh, options: LoopOptions,
        on_epoch_end: EpochHook | None = None) -> dict[str, Any]:
  """Trains `job` to the end (or to an early stop by `on_epoch_end`), resuming if it can.

  Returns the final metrics: test accuracy/loss, images/s and the per-epoch history.
  """
  run_dir = Path(run_dir)
  repl = parallel.replicated(mesh)
  data = parallel.batch_sharding(mesh)
  head = job.head
  train_head = head if job.train_with_head else None
  xla = parallel.compiler_options(mesh)
  train_fn = jit_train_step(mesh, preprocess=job.preprocess, head=train_head, loss=job.loss,
                            compiler_options=xla)
  eval_fn = jax.jit(functools.partial(steps.eval_step, preprocess=job.preprocess, head=head),
                    in_shardings=(repl, data, repl), out_shardings=repl, compiler_options=xla)
  init_fn = jax.jit(functools.partial(steps.create_train_state, job.model, job.tx,
                                      job.input_shape), out_shardings=repl,
                    compiler_options=xla)
  head_variables = (parallel.replicate(job.head_variables, mesh)
                    if job.head_variables is not None else None)

  state = init_fn(jax.random.PRNGKey(job.seed))
  progress: dict[str, Any] = {"history": [], "loss_sum": 0.0, "loss_count": 0,
                              "stopped_early": False, "nonfinite_steps": 0,
                              "images": 0, "train_seconds": 0.0, "identity": job.identity}
  manager = checkpoint_manager(run_dir / "checkpoints", options.keep_checkpoints)
  restored = _restore_latest_good(manager, state, job.identity, run_dir)
  if restored is not None:
    state, progress = restored
  total = job.steps_per_epoch * job.epochs
  step = int(jax.device_get(state.step))
  writer = _Writer(run_dir / "tb")
  base_rng = jax.random.PRNGKey(job.seed + 1)
  pending: list[dict[str, jax.Array]] = []
  clock = time.perf_counter()
  timing = {"warm": False}

  def sync() -> None:
    """Brings the pending step metrics to the host; the only per-interval device sync."""
    if not pending:
      return
    values = jax.device_get(pending)
    now = time.perf_counter()
    nonlocal clock
    if timing["warm"]:
      progress["images"] += len(values) * job.global_batch
      progress["train_seconds"] += now - clock
    timing["warm"] = True
    clock = now
    first = step - len(values)
    bad = [first + i + 1 for i, v in enumerate(values) if v["nonfinite"]]
    if bad:
      progress["nonfinite_steps"] += len(bad)
      epoch = (bad[0] - 1) // job.steps_per_epoch + 1
      if options.nan_policy == "error":
        raise NonFiniteError(
            f"{options.description}: non-finite loss or gradient at step {bad[0]} (epoch "
            f"{epoch}); the update was not applied and no checkpoint was written after it. "
            f"Last good checkpoint: step {manager.latest_step()}. Lower the learning rate, "
            "check the data, or set --config.nan_policy=skip to skip such batches.")
      logging.warning("%s: skipped %d non-finite batch(es), first at step %d (epoch %d)",
                      options.description, len(bad), bad[0], epoch)
    for v in values:
      if not v["nonfinite"]:
        progress["loss_sum"] += float(v["loss"])
        progress["loss_count"] += 1
    last = values[-1]
    scalars = {f"train/{k}": float(last[k]) for k in ("loss", "ce", "conv", "fmcs", "alpha",
                                                       "accuracy") if k in last}
    scalars["train/learning_rate"] = float(job.learning_rate(step))
    if progress["train_seconds"] > 0:
      scalars["train/images_per_second"] = progress["images"] / progress["train_seconds"]
    writer.scalars(step, scalars)
    if bar is not None:
      bar.set_postfix(loss=f"{float(last['loss']):.4f}",
                      img_s=f"{scalars.get('train/images_per_second', 0.0):.0f}")
    pending.clear()

  def save() -> None:
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress)), force=True)

  def evaluate() -> dict[str, float]:
    sums = None
    for local in job.eval_data():
      out = eval_fn(state, parallel.global_batch(local, mesh), head_variables)
      sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    sums = jax.device_get(sums)
    result = {"test_accuracy": float(sums["correct"] / sums["count"]),
              "test_loss": float(sums["loss"] / sums["count"])}
    result["fmcs"] = float(sums["fmcs"] / sums["count"]) if "fmcs" in sums else None
    return result

  show = options.progress_bar and jax.process_index() == 0
  bar = tqdm.tqdm(total=total, initial=step, desc=options.description, unit="step",
                  dynamic_ncols=True, leave=False) if show else None
  # One batch per step, and batch k is a pure function of k: the step is the loader position.
  # Created last, next to the `finally` that stops its worker processes.
  if isinstance(job.train_data, grain.MapDataset):
    iterator = input_pipeline.make_iterator(job.train_data, start=step,
                                            workers=options.input_workers)
    to_global = functools.partial(parallel.global_batch, mesh=mesh)
  else:  # already global arrays on the mesh
    iterator, to_global = job.train_data.iterator(step), lambda batch: batch
  try:
    with _sigterm_handled():
      while step < total and not progress["stopped_early"]:
        batch = to_global(next(iterator))
        state, metrics = train_fn(state, batch, jax.random.fold_in(base_rng, step),
                                  head_variables)
        pending.append(metrics)
        step += 1
        if bar is not None:
          bar.update(1)
        epoch_end = step % job.steps_per_epoch == 0
        periodic = bool(options.checkpoint_every_steps) and (
            step % options.checkpoint_every_steps == 0)
        logged = step % options.log_every == 0
        # Saving is collective and each host gets SIGTERM at its own moment: with several
        # processes, all stop together at the next step where every one checks (below).
        preempted = PREEMPTED.is_set() and jax.process_count() == 1
        if epoch_end or periodic or preempted or logged or not timing["warm"]:
          sync()
        if epoch_end:
          epoch = step // job.steps_per_epoch
          record = {"epoch": epoch,
                    "train_loss": progress["loss_sum"] / max(progress["loss_count"], 1),
                    "alpha": float(metrics["alpha"]),
                    "learning_rate": float(job.learning_rate(step - 1))}
          progress["loss_sum"], progress["loss_count"] = 0.0, 0
          if job.eval_data is not None and (job.eval_each_epoch or step == total):
            record.update(evaluate())
          progress["history"].append(record)
          writer.scalars(step, {f"epoch/{k}": v for k, v in record.items()
                                if k != "epoch" and v is not None})
          _log_epoch(options.description, job.epochs, record)
          if on_epoch_end is not None and on_epoch_end(epoch, state, progress["history"]):
            progress["stopped_early"] = True
          clock = time.perf_counter()
        if jax.process_count() > 1:
          if epoch_end or periodic or logged:  # the same steps on every host; metrics synced
            preempted = parallel.any_process(PREEMPTED.is_set())
        elif PREEMPTED.is_set() and not preempted:  # arrived during evaluation or the hook
          preempted = True
          sync()
        if epoch_end or periodic or preempted:
          save()
          clock = time.perf_counter()
        if preempted:
          manager.wait_until_finished()
          PREEMPTED.clear()  # handled: this process may train again (notebooks, tests)
          raise Preempted(f"{options.description}: SIGTERM received; checkpoint written at "
                          f"step {step}. Re-run the same command to resume.")
  finally:
    iterator.close()
    manager.wait_until_finished()
    manager.close()
    writer.close()
    if bar is not None:
      bar.close()

  history = progress["history"]
  last = history[-1]
  if "test_accuracy" not in last and job.eval_data is not None:
    last.update(evaluate())
  return {"test_accuracy": last.get("test_accuracy"), "test_loss": last.get("test_loss"),
          "epochs": len(history), "steps": step,
          "images_per_second": (progress["images"] / progress["train_seconds"]
                                if progress["train_seconds"] else None),
          "nonfinite_steps": progress["nonfinite_steps"],
          "stopped_early": progress["stopped_early"], "history": history,
          "state": state}


def _log_epoch(description: str, epochs: int, record: dict[str, Any]) -> None:
  parts = [f"{description} epoch {record['epoch']}/{epochs}",
           f"train_loss {record['train_loss']:.4f}"]
  if record.get("test_accuracy") is not None:
    parts += [f"test_acc {100 * record['test_accuracy']:.2f}%",
              f"test_loss {record['test_loss']:.4f}"]
  if record.get("fmcs") is not None:
    parts.append(f"fmcs {record['fmcs']:.3f}")
  if jax.process_index() == 0:
    tqdm.tqdm.write(" | ".join(parts))
