"""Orbax checkpoints of training runs: identity, restore-latest-good, quarantine; probe snapshots.

A run's checkpoint holds its train state and its host-side progress (JSON), with the job's
identity, so a resumed run never continues another job's files. Orbax lists only finalized
checkpoints, so a write cut short by a kill is never a candidate; one that is listed but cannot be
read is moved aside and the one before it is used.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh

from fmcejax import parallel


class CheckpointMismatch(RuntimeError):
  """The run directory holds a checkpoint of a different job."""


def manager(directory: epath.PathLike, max_to_keep: int | None) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
    epath.Path(directory).absolute(),
    options=ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, enable_async_checkpointing=True
    ),
  )


def abstract(tree: Any) -> Any:
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, progress: dict[str, Any]) -> None:
  mngr.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress)
    ),
    force=True,
  )


def _check_identity(saved: dict[str, Any], expected: dict[str, Any], directory: Any) -> None:
  diffs = [
    f"{k}: checkpoint has {saved.get(k)!r}, this run has {v!r}"
    for k, v in expected.items()
    if saved.get(k) != v
  ]
  if diffs:
    raise CheckpointMismatch(
      f"{directory} holds a checkpoint of a different job ({'; '.join(diffs)}). Use another "
      "--workdir, or delete that directory to start this run from scratch."
    )


def _quarantine(mngr: ocp.CheckpointManager, bad_steps: list[int]) -> None:
  """Moves unreadable checkpoints aside (kept for inspection) so their steps can be re-saved."""
  directory = epath.Path(mngr.directory)

  def move() -> None:
    aside = directory.parent / f"{directory.name}.corrupt"
    aside.mkdir(exist_ok=True)
    for step in bad_steps:
      (directory / str(step)).rename(aside / f"{step}.{int(time.time())}")

  parallel.primary_writes("quarantine", move)  # every process reloads after the move
  mngr.reload()


def restore_latest_good(
  mngr: ocp.CheckpointManager, state: Any, identity: dict[str, Any], run_dir: Any
) -> tuple[Any, dict[str, Any]] | None:
  """(state, progress) of the newest readable checkpoint, or None if none exist.

  If checkpoints exist but none is readable the run stops rather than silently starting over.
  """
  candidates = sorted(mngr.all_steps(), reverse=True)
  errors = []
  for step in candidates:
    try:
      meta = mngr.restore(step, args=ocp.args.Composite(progress=ocp.args.JsonRestore()))
      _check_identity(meta.progress["identity"], identity, run_dir)
      out = mngr.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract(state)))
      )
    except CheckpointMismatch:
      raise
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back to the previous
      logging.error(
        "checkpoint %s/%d is unreadable (%s: %s); trying the previous one",
        mngr.directory,
        step,
        type(e).__name__,
        str(e)[:300],
      )
      errors.append(f"step {step}: {type(e).__name__}")
      continue
    if errors:
      _quarantine(mngr, [c for c in candidates if c > step])
      logging.warning(
        "resumed from step %d after skipping unreadable checkpoint(s): %s (moved to %s.corrupt)",
        step,
        ", ".join(errors),
        mngr.directory,
      )
    logging.info("%s: resumed from step %d", run_dir, step)
    return out.state, meta.progress
  if candidates:
    raise RuntimeError(
      f"no readable checkpoint in {mngr.directory} ({'; '.join(errors)}). Refusing to "
      "start over silently: delete that directory to restart this run from scratch."
    )
  return None


class Snapshots:
  """The probe's weights per epoch (`params` and `batch_stats`), kept until CQI picks markers."""

  def __init__(self, directory: epath.PathLike):
    self._manager = manager(directory, None)

  def __enter__(self) -> Snapshots:
    return self

  def __exit__(self, *exc: Any) -> None:
    self._manager.close()

  def save(self, epoch: int, state: Any) -> None:
    if epoch in self._manager.all_steps():  # re-trained after a kill: replace the earlier copy
      self._manager.delete(epoch)
    self._manager.save(
      epoch,
      args=ocp.args.StandardSave({"params": state.params, "batch_stats": state.batch_stats}),
      force=True,
    )
    self._manager.wait_until_finished()

  def restore(self, epoch: int, mesh: Mesh) -> Any:
    # Replicated over `mesh`, whatever devices saved it (a resumed run elsewhere).
    return self._manager.restore(
      epoch, args=ocp.args.StandardRestore(fallback_sharding=parallel.replicated(mesh))
    )

  def keep_only(self, epochs: Any) -> None:
    for step in self._manager.all_steps():
      if step not in epochs:
        self._manager.delete(step)
