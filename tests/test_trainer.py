"""The training loop: exact resume after a crash, SIGTERM, non-finite batches, foreign checkpoints.

On CPU the computation is deterministic, so "resume reproduces the uninterrupted run" is checked
bitwise (params, batch stats, optimizer state and the per-epoch history).
"""

import functools
import os
import signal

import chex
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmcejax import checkpointing, input_pipeline, models, parallel, steps, trainer

SHAPE = (28, 28, 1)
PREPROCESS = functools.partial(steps.normalize, mean=(0.13,), std=(0.31,))


def _elements(n, seed=0):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 10, n)
  # Class-dependent brightness so the task is learnable.
  images = np.clip(rng.normal(20 * labels[:, None, None, None], 30, (n, *SHAPE)), 0, 255)
  return [{"image": images[i].astype(np.uint8), "label": np.int32(labels[i])} for i in range(n)]


def _job(epochs=2, identity=None, train_map=None, preprocess=PREPROCESS, workers=0):
  train = input_pipeline.epoch_batches(
    grain.MapDataset.source(_elements(128)), global_batch=32, epochs=epochs, seed=0
  )
  if train_map is not None:
    train = train.map_with_index(train_map)
  lr = steps.learning_rate_schedule(0.05, "cosine", 2, 4 * epochs)
  evals = grain.MapDataset.source(_elements(40, seed=1))
  return trainer.Job(
    model=models.create_backbone("cnn", 10),
    preprocess=preprocess,
    input_shape=SHAPE,
    train_data=input_pipeline.HostBatches(train, parallel.make_mesh(), workers),
    steps_per_epoch=4,
    epochs=epochs,
    global_batch=32,
    tx=steps.create_optimizer("sgd", lr, weight_decay=5e-4),
    learning_rate=lr,
    seed=0,
    identity=identity or {"job": "test"},
    eval_data=evals,
    eval_batch_size=16,
  )


def _fit(job, run_dir, hook=None, **options):
  options = trainer.LoopOptions(progress_bar=False, log_every=3, **options)
  return trainer.fit(job, run_dir, parallel.make_mesh(), options, on_epoch_end=hook)


def _same(a, b):
  chex.assert_trees_all_equal(jax.device_get(a["state"].params), jax.device_get(b["state"].params))
  chex.assert_trees_all_equal(
    jax.device_get(a["state"].batch_stats), jax.device_get(b["state"].batch_stats)
  )
  chex.assert_trees_all_equal(
    jax.device_get(a["state"].opt_state), jax.device_get(b["state"].opt_state)
  )
  assert a["history"] == b["history"]
  assert a["steps"] == b["steps"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  result = _fit(_job(), tmp_path_factory.mktemp("straight"))
  assert len(result["history"]) == 2 and result["steps"] == 8
  chex.assert_tree_all_finite(jax.device_get(result["state"].params))
  return result


def test_fit_and_its_evaluations_pace_every_dispatch(tmp_path, monkeypatch):
  """`parallel.Pacer` on every train dispatch and every eval batch: a loop that runs further
  ahead of the devices can deadlock XLA's CPU client with several devices."""
  paced = []

  class Recording(parallel.Pacer):
    def __call__(self, out):
      paced.append("eval" if "correct" in out else "train")
      assert self.depth == parallel.MAX_IN_FLIGHT
      super().__call__(out)

  monkeypatch.setattr(parallel, "Pacer", Recording)
  result = _fit(_job(), tmp_path)
  assert paced.count("train") == result["steps"] == 8
  assert paced.count("eval") == 2 * 3  # each epoch: 40 test images in batches of 16


class Crash(Exception):
  pass


def test_crash_at_an_epoch_end_then_resume_equals_the_straight_run(tmp_path, straight):
  def crash_in_epoch_2(epoch, state, history):
    if epoch == 2:
      raise Crash
    return False

  with pytest.raises(Crash):
    _fit(_job(), tmp_path, crash_in_epoch_2)
  _same(_fit(_job(), tmp_path), straight)


def test_crash_mid_epoch_resumes_from_the_step_checkpoint(tmp_path, straight):
  crashed = {"done": False}

  def fail_once_at_batch_6(index, batch):
    if index == 6 and not crashed["done"]:
      crashed["done"] = True
      raise Crash
    return batch

  with pytest.raises(Crash):
    _fit(_job(train_map=fail_once_at_batch_6), tmp_path, checkpoint_every_steps=2)
  steps_saved = sorted(
    int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()
  )
  assert steps_saved and steps_saved[-1] <= 6
  _same(_fit(_job(), tmp_path, checkpoint_every_steps=2), straight)


def test_sigterm_checkpoints_and_resume_equals_the_straight_run(tmp_path, straight):
  def preempt_after_epoch_1(epoch, state, history):
    if epoch == 1:
      os.kill(os.getpid(), signal.SIGTERM)
    return False

  with pytest.raises(trainer.Preempted, match="checkpoint written at step 4"):
    _fit(_job(), tmp_path, preempt_after_epoch_1)
  _same(_fit(_job(), tmp_path), straight)


def test_loader_workers_change_nothing_and_resume_with_another_count(tmp_path, straight):
  """Grain worker processes load the same batches: preempted with 2 workers, resumed in-process,
  the run equals the straight one."""

  def preempt_after_epoch_1(epoch, state, history):
    if epoch == 1:
      os.kill(os.getpid(), signal.SIGTERM)
    return False

  with pytest.raises(trainer.Preempted, match="checkpoint written at step 4"):
    _fit(_job(workers=2), tmp_path, preempt_after_epoch_1)
  _same(_fit(_job(), tmp_path), straight)


def _nan_on_black_batches(images):
  """NaN whenever the whole batch is black: lets a test inject a poisoned batch."""
  return PREPROCESS(images) * (jnp.max(images) / jnp.max(images))


def _black_batch_5(index, batch):
  return {**batch, "image": np.zeros_like(batch["image"])} if index == 5 else batch


def test_nonfinite_batch_stops_with_step_and_epoch_and_no_bad_checkpoint(tmp_path):
  job = _job(train_map=_black_batch_5, preprocess=_nan_on_black_batches)
  with pytest.raises(trainer.NonFiniteError, match=r"step 6 \(epoch 2\)"):
    _fit(job, tmp_path)
  saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert saved == [4]


def test_nonfinite_batch_can_be_skipped(tmp_path):
  job = _job(train_map=_black_batch_5, preprocess=_nan_on_black_batches)
  result = _fit(job, tmp_path, nan_policy="skip")
  assert result["nonfinite_steps"] == 1 and result["steps"] == 8
  chex.assert_tree_all_finite(jax.device_get(result["state"].params))


def test_checkpoint_of_another_job_is_refused(tmp_path):
  _fit(_job(epochs=1, identity={"backbone": "cnn", "seed": 0}), tmp_path)
  with pytest.raises(
    checkpointing.CheckpointMismatch, match="seed: checkpoint has 0, this run has 1"
  ):
    _fit(_job(epochs=1, identity={"backbone": "cnn", "seed": 1}), tmp_path)


def _truncate_state_files(checkpoint_dir):
  files = [p for p in (checkpoint_dir / "state").rglob("*") if p.is_file() and p.stat().st_size]
  assert files
  for p in files:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, straight, caplog):
  def crash_at_step_7(index, batch):
    if index == 7:
      raise Crash
    return batch

  with pytest.raises(Crash):
    _fit(_job(train_map=crash_at_step_7), tmp_path, checkpoint_every_steps=2)
  saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert saved[-1] == 6
  _truncate_state_files(tmp_path / "checkpoints" / "6")
  _same(_fit(_job(), tmp_path, checkpoint_every_steps=2), straight)
  assert "checkpoints/6 is unreadable" in caplog.text.replace(str(tmp_path) + "/", "")


def test_no_readable_checkpoint_is_an_error_not_a_silent_restart(tmp_path):
  _fit(_job(epochs=1), tmp_path)
  for step_dir in (tmp_path / "checkpoints").iterdir():
    if step_dir.name.isdigit():
      _truncate_state_files(step_dir)
  with pytest.raises(RuntimeError, match="no readable checkpoint"):
    _fit(_job(epochs=1), tmp_path)
