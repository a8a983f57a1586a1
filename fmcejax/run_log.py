"""What a person watches while `trainer.fit` runs: TensorBoard scalars, a progress bar and one
line per epoch, all from process 0 only."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import tqdm
from etils import epath


class RunLog:
  """The run's TensorBoard writer and progress bar (`progress_bar`), from process 0 only."""

  def __init__(
    self,
    logdir: epath.Path,
    description: str,
    progress_bar: bool,
    epochs: int,
    total: int,
    step: int,
  ):
    self._description, self._epochs = description, epochs
    self._tb = self._bar = None
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(str(logdir))
      if progress_bar:
        self._bar = tqdm.tqdm(
          total=total,
          initial=step,
          desc=description,
          unit="step",
          dynamic_ncols=True,
          leave=False,
        )

  def _scalars(self, step: int, values: dict[str, float | None]) -> None:
    if self._tb is not None:
      for k, v in values.items():
        if v is not None and np.isfinite(v):
          self._tb.add_scalar(k, v, step)

  def advance(self, n: int) -> None:
    if self._bar is not None:
      self._bar.update(n)

  def train(self, step: int, scalars: dict[str, float | None]) -> None:
    self._scalars(step, scalars)
    if self._bar is not None and scalars:
      self._bar.set_postfix(
        loss=f"{scalars['train/loss']:.4f}",
        img_s=f"{scalars['train/images_per_second'] or 0.0:.0f}",
      )

  def epoch(self, step: int, record: dict[str, Any]) -> None:
    self._scalars(step, {f"epoch/{k}": v for k, v in record.items() if k != "epoch"})
    if jax.process_index() == 0:
      parts = [
        f"{self._description} epoch {record['epoch']}/{self._epochs}",
        f"train_loss {record['train_loss']:.4f}",
      ]
      if record.get("test_accuracy") is not None:
        parts += [
          f"test_acc {100 * record['test_accuracy']:.2f}%",
          f"test_loss {record['test_loss']:.4f}",
        ]
      if record.get("fmcs") is not None:
        parts.append(f"fmcs {record['fmcs']:.3f}")
      tqdm.tqdm.write(" | ".join(parts))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
    if self._bar is not None:
      self._bar.close()
