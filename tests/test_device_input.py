"""Device-resident batches: a pure function of (seed, step), epochs as permutations, the grain
pipeline's crop + flip, sharding over 8 CPU devices, and exact resume through `trainer.fit`."""

import collections
import functools
import os
import signal
import socket
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from conftest import COLLECTIVE_TIMEOUT

from fmcejax import datasets, device_input, input_pipeline, parallel, steps, trainer
from fmcejax.tools import bench_loop

N, BATCH = 100, 16  # 6 steps per epoch, 96 of the 100 examples used


def _arrays(n=N, shape=(8, 8, 1)):
  """Image i holds i everywhere (so a row tells its example), label i % 10."""
  ids = np.arange(n)
  return {
    "image": np.broadcast_to((ids % 256)[:, None, None, None], (n, *shape)).astype(np.uint8),
    "label": (ids % 10).astype(np.int32),
  }


def _batches(mesh, epochs=2, seed=3, augment=False, arrays=None):
  return device_input.train_batches(
    arrays or _arrays(), global_batch=BATCH, epochs=epochs, seed=seed, mesh=mesh, augment=augment
  )


@pytest.fixture(scope="module")
def mesh():
  return parallel.make_mesh()


def _host(batch):
  return jax.tree.map(np.asarray, batch)


def test_batches_are_global_sharded_and_typed(mesh):
  assert mesh.size == 8
  data = _batches(mesh)
  assert len(data) == 2 * 6 and data.steps_per_epoch == 6
  batch = next(data.iterator(0))
  chex.assert_shape(batch["image"], (BATCH, 8, 8, 1))
  chex.assert_type([batch["image"], batch["label"]], [np.uint8, np.int32])
  for value in batch.values():
    assert value.sharding == parallel.batch_sharding(mesh)
    assert {s.data.shape[0] for s in value.addressable_shards} == {BATCH // 8}


@pytest.mark.parametrize("augment", [False, True])
def test_batch_k_is_a_pure_function_of_seed_and_k(mesh, augment):
  arrays = _arrays(shape=(8, 8, 3))
  all_batches = [_host(b) for b in _batches(mesh, augment=augment, arrays=arrays).iterator(0)]
  for start in (0, 5, 6, 11):
    resumed = _host(next(_batches(mesh, augment=augment, arrays=arrays).iterator(start)))
    chex.assert_trees_all_equal(resumed, all_batches[start])
  other_seed = _host(next(_batches(mesh, seed=4, augment=augment, arrays=arrays).iterator(0)))
  assert not np.array_equal(other_seed["label"], all_batches[0]["label"]) or not np.array_equal(
    other_seed["image"], all_batches[0]["image"]
  )
  with pytest.raises(ValueError, match="start must lie"):
    next(_batches(mesh).iterator(13))


def test_the_global_batch_does_not_depend_on_the_mesh(mesh):
  """One device or eight: the same rows and the same augmentation (keys follow positions)."""
  one = parallel.make_mesh(jax.devices()[:1])
  arrays = _arrays(shape=(8, 8, 3))
  for step in (0, 7):
    a = _host(next(_batches(mesh, augment=True, arrays=arrays).iterator(step)))
    b = _host(next(_batches(one, augment=True, arrays=arrays).iterator(step)))
    chex.assert_trees_all_equal(a, b)


def test_each_epoch_is_a_permutation_without_repeats(mesh):
  data = _batches(mesh, epochs=3)
  epochs = []
  for epoch in range(3):
    ids = np.concatenate([_host(b)["image"][:, 0, 0, 0] for b in data.iterator(6 * epoch)][:6])
    assert len(ids) == len(set(ids)) == 96 and set(ids) <= set(range(N))
    np.testing.assert_array_equal(ids, np.asarray(data.permutation(epoch)))
    epochs.append(ids)
  assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch
  labels = np.concatenate([_host(b)["label"] for b in list(data.iterator(0))[:6]])
  np.testing.assert_array_equal(labels, epochs[0] % 10)  # labels travel with their images


def _crop_flip_candidates(image):
  """Every output `input_pipeline.random_crop_flip` can give for `image`, by (dy, dx, flip)."""

  class Fixed:
    def __init__(self, draw):
      self.draw = draw

    def integers(self, low, high):
      assert tuple(low) == (-4, -4, 0) and tuple(high) == (5, 5, 2)
      return self.draw

  out = {}
  for dy in range(-4, 5):
    for dx in range(-4, 5):
      for flip in (0, 1):
        element = input_pipeline.random_crop_flip(
          {"image": image, "label": 0}, Fixed(np.array([dy, dx, flip]))
        )
        out[(dy, dx, flip)] = element["image"]
  return out


def test_crop_and_flip_match_the_grain_augmentation(mesh):
  """Each augmented image is one of `random_crop_flip`'s 162 outputs for its source image, and
  the shifts and flips are spread as uniformly as grain's (9 x 9 shifts, flip 1/2)."""
  n, h = 64, 12
  rng = np.random.default_rng(0)
  images = rng.integers(1, 256, (n, h, h, 3), dtype=np.uint8)  # no zeros: padding shows
  data = device_input.train_batches(
    {"image": images, "label": np.arange(n, dtype=np.int32)},
    global_batch=64,
    epochs=12,
    seed=0,
    mesh=mesh,
    augment=True,
  )
  # Label i is image i: its 162 possible outputs, by their bytes (all distinct for noise).
  outputs = []
  for image in images:
    by_bytes = {v.tobytes(): k for k, v in _crop_flip_candidates(image).items()}
    assert len(by_bytes) == 162
    outputs.append(by_bytes)
  draws = collections.Counter()
  for batch in data.iterator(0):
    batch = _host(batch)
    for image, label in zip(batch["image"], batch["label"]):
      draw = outputs[label].get(image.tobytes())
      assert draw is not None, f"example {label}: not a random_crop_flip output"
      draws[draw] += 1
  total = sum(draws.values())
  assert total == 12 * 64
  dys = collections.Counter(k[0] for k in draws.elements())
  dxs = collections.Counter(k[1] for k in draws.elements())
  flips = sum(k[2] for k in draws.elements())
  assert set(dys) == set(dxs) == set(range(-4, 5))
  for counts in (dys, dxs):  # expected 85.3 each; 5 sigma ~ 44
    assert max(abs(c - total / 9) for c in counts.values()) < 44, counts
  assert abs(flips - total / 2) < 5 * np.sqrt(total / 4), flips


def test_fits_on_device_and_the_auto_rule():
  cifar, mnist = (datasets.DATASET_INFO[k] for k in ("cifar10", "mnist"))
  assert device_input.fits_on_device(cifar) and device_input.fits_on_device(mnist)
  big = datasets.DatasetInfo(
    "big", "big", 10, (64, 64, 3), (0.5,) * 3, (0.25,) * 3, 20000, 100, False
  )
  assert not device_input.fits_on_device(big)
  assert device_input.fits_on_device(big, limit=10000)  # 123 MB
  use = device_input.use_device_input
  assert use("auto", cifar, 0) and use("auto", big, 10000) and not use("auto", big, 0)
  assert use("on", mnist, 0) and not use("off", mnist, 0)
  with pytest.raises(ValueError, match="200 MB"):
    use("on", big, 0)
  with pytest.raises(ValueError, match="input_on_device"):
    use("sometimes", mnist, 0)


def test_bad_arrays_and_batches_are_refused(mesh):
  with pytest.raises(ValueError, match="uint8 images"):
    device_input.train_batches(
      {"image": np.zeros((8, 4, 4, 1), np.float32), "label": np.zeros(8, np.int32)},
      global_batch=8,
      epochs=1,
      seed=0,
      mesh=mesh,
    )
  with pytest.raises(ValueError, match="multiple of the 8 devices"):
    device_input.train_batches(_arrays(), global_batch=12, epochs=1, seed=0, mesh=mesh)


SHAPE = (28, 28, 1)


class _Head(nn.Module):
  """A frozen head on the linear model's logits: enough to put the RAL in the step."""

  @nn.compact
  def __call__(self, x, train):
    del train
    return nn.Dense(5)(x)


def _job(mesh, epochs=2, n=128, with_head=False):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, n)
  images = np.clip(rng.normal(20 * labels[:, None, None, None], 30, (n, *SHAPE)), 0, 255)
  data = device_input.train_batches(
    {"image": images.astype(np.uint8), "label": labels},
    global_batch=32,
    epochs=epochs,
    seed=0,
    mesh=mesh,
    augment=True,
  )
  lr = steps.learning_rate_schedule(0.05, "cosine", 2, 4 * epochs)
  return trainer.Job(
    model=bench_loop.Linear(10),  # the data path is under test: a model that compiles fast
    preprocess=functools.partial(steps.normalize, mean=(0.13,), std=(0.31,)),
    input_shape=SHAPE,
    train_data=data,
    steps_per_epoch=data.steps_per_epoch,
    epochs=epochs,
    global_batch=32,
    tx=steps.create_optimizer("sgd", lr, weight_decay=5e-4),
    learning_rate=lr,
    seed=0,
    identity={"job": "device"},
    **(_ral() if with_head else {}),
  )


def _ral():
  variables = _Head().init(jax.random.PRNGKey(7), np.zeros((1, 10), np.float32), False)
  return {
    "head": steps.Head(model=_Head(), module="logits"),
    "head_variables": variables,
    "train_with_head": True,
    "loss": steps.Loss(alpha=optax.constant_schedule(0.3)),
  }


def _fit(job, mesh, run_dir, hook=None, **options):
  options = trainer.LoopOptions(**{"progress_bar": False, "log_every": 3} | options)
  return trainer.fit(job, run_dir, mesh, options, on_epoch_end=hook)


def test_fit_on_device_batches_resumes_exactly_after_sigterm(tmp_path, mesh):
  straight = _fit(_job(mesh), mesh, tmp_path / "straight")
  assert straight["steps"] == 8 and len(straight["history"]) == 2
  chex.assert_tree_all_finite(jax.device_get(straight["state"].params))

  def preempt_after_epoch_1(epoch, state, history):
    if epoch == 1:
      os.kill(os.getpid(), signal.SIGTERM)
    return False

  with pytest.raises(trainer.Preempted, match="checkpoint written at step 4"):
    _fit(_job(mesh), mesh, tmp_path / "resumed", preempt_after_epoch_1)
  resumed = _fit(_job(mesh), mesh, tmp_path / "resumed")
  for field in ("params", "batch_stats", "opt_state"):
    chex.assert_trees_all_equal(
      jax.device_get(getattr(resumed["state"], field)),
      jax.device_get(getattr(straight["state"], field)),
    )
  assert resumed["history"] == straight["history"]


def test_scan_steps_equal_one_dispatch_per_step(mesh):
  """k steps per dispatch train on the same batches with the same RNGs as the trainer's loop."""
  job = _job(mesh)
  data, rng = job.train_data, jax.random.PRNGKey(1)
  init = jax.jit(
    functools.partial(steps.create_train_state, job.model, job.tx, SHAPE),
    out_shardings=parallel.replicated(mesh),
  )
  train_fn = trainer.jit_train_step(
    mesh, preprocess=job.preprocess, head=None, loss=job.loss, compiler_options=None
  )
  state = init(jax.random.PRNGKey(0))
  losses = []
  for step, batch in enumerate(data.iterator(0)):
    state, metrics = train_fn(state, batch, rng, None)
    losses.append(float(metrics["loss"]))
  run = data.scan_steps(
    functools.partial(steps.train_step, preprocess=job.preprocess, loss=job.loss), rng
  )
  scanned = init(jax.random.PRNGKey(0))
  scanned_losses = []
  for step in range(0, len(data), 2):
    scanned, metrics = run(scanned, step, 2)
    chex.assert_shape(metrics["loss"], (2,))
    scanned_losses += jax.device_get(metrics["loss"]).tolist()
  np.testing.assert_allclose(scanned_losses, losses, rtol=1e-5)
  chex.assert_trees_all_close(
    jax.device_get(scanned.params), jax.device_get(state.params), rtol=1e-5, atol=1e-6
  )
  with pytest.raises(ValueError, match="cross an epoch end"):
    run(scanned, 3, 2)
  with pytest.raises(ValueError, match="n must lie"):
    run.compile(5, scanned)


@pytest.mark.parametrize("with_head", [False, True])
def test_several_steps_per_dispatch_train_as_one_and_resume_exactly(
  tmp_path, mesh, monkeypatch, with_head
):
  """`fit` with 3 steps per dispatch (7 steps per epoch: dispatches of 3, 3 and 1 steps, both
  programs compiled before the first) trains like one step per dispatch, baseline and RAL, and
  SIGTERM between checkpoints resumes to the bitwise same run."""
  job = functools.partial(_job, mesh, n=7 * 32, with_head=with_head)
  options = {"steps_per_dispatch": 3, "checkpoint_every_steps": 5}
  single = _fit(job(), mesh, tmp_path / "single", checkpoint_every_steps=5)
  straight = _fit(job(), mesh, tmp_path / "straight", **options)
  assert straight["steps"] == single["steps"] == 14
  chex.assert_trees_all_close(
    jax.device_get(straight["state"].params),
    jax.device_get(single["state"].params),
    rtol=1e-5,
    atol=1e-6,
  )
  for a, b in zip(straight["history"], single["history"], strict=True):
    np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-5)

  events = []
  compile_, call = device_input.StepScan.compile, device_input.StepScan.__call__

  def compiling(self, n, state, head_variables=None):
    if n not in self._programs:
      events.append(("compile", n))
    return compile_(self, n, state, head_variables)

  def preempting(self, state, step, n, head_variables=None):
    events.append((step, n))
    if step == 10:  # its dispatch ends at step 13: no checkpoint due (5 and 10 are behind)
      os.kill(os.getpid(), signal.SIGTERM)
    return call(self, state, step, n, head_variables)

  monkeypatch.setattr(device_input.StepScan, "compile", compiling)
  monkeypatch.setattr(device_input.StepScan, "__call__", preempting)
  with pytest.raises(trainer.Preempted, match="checkpoint written at step 13"):
    _fit(job(), mesh, tmp_path / "resumed", **options)
  assert events == [("compile", 3), ("compile", 1), (0, 3), (3, 3), (6, 1), (7, 3), (10, 3)]
  assert sorted(int(p.name) for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == [10, 13]
  monkeypatch.undo()
  resumed = _fit(job(), mesh, tmp_path / "resumed", **options)
  for field in ("params", "batch_stats", "opt_state"):
    chex.assert_trees_all_equal(
      jax.device_get(getattr(resumed["state"], field)),
      jax.device_get(getattr(straight["state"], field)),
    )
  assert resumed["history"] == straight["history"]


_TWO_PROCESS_SCRIPT = """
import sys
import jax
import numpy as np
from jax.experimental import multihost_utils
from fmcejax import device_input, parallel
parallel.initialize_distributed()
mesh = parallel.make_mesh()
n = 100
ids = np.arange(n)
arrays = {"image": np.broadcast_to((ids % 256)[:, None, None, None], (n, 8, 8, 3)).astype(np.uint8),
          "label": (ids % 10).astype(np.int32)}
data = device_input.train_batches(arrays, global_batch=16, epochs=2, seed=3, mesh=mesh,
                                  augment=True)
batches = [next(data.iterator(k)) for k in (0, 7)]
got = multihost_utils.process_allgather(batches, tiled=True)

def step(state, batch, rng, head_variables):  # a "step" that sums its batch over both hosts
  total = batch["image"].sum(dtype="float32") + batch["label"].sum(dtype="float32")
  return state + total, {"loss": total}

scan = data.scan_steps(step, jax.random.PRNGKey(0))
state, metrics = scan(parallel.replicate(np.zeros((), np.float32), mesh), 6, 3)
sums = np.asarray(metrics["loss"].addressable_data(0))
if jax.process_index() == 0:
  np.savez(sys.argv[1], *[b[key] for b in got for key in ("image", "label")], sums)
"""


@pytest.mark.slow
def test_two_processes_make_the_single_process_batches(tmp_path, mesh):
  """2 processes x 4 CPU devices (gloo): each device of each host gathers its rows; together
  they are the one-process batch, also inside several steps per dispatch."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": f"--xla_force_host_platform_device_count=4 {COLLECTIVE_TIMEOUT}",
    "FMCEJAX_COORDINATOR": f"127.0.0.1:{port}",
    "FMCEJAX_NUM_PROCESSES": "2",
  }
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", _TWO_PROCESS_SCRIPT, str(tmp_path / "b.npz")],
      env={**env, "FMCEJAX_PROCESS_ID": str(i)},
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  try:
    outputs = [p.communicate(timeout=180)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
  got = np.load(tmp_path / "b.npz")
  arrays = _arrays(shape=(8, 8, 3))  # as the script makes them
  for i, k in enumerate((0, 7)):
    want = _host(next(_batches(mesh, augment=True, arrays=arrays).iterator(k)))
    np.testing.assert_array_equal(got[f"arr_{2 * i}"], want["image"])
    np.testing.assert_array_equal(got[f"arr_{2 * i + 1}"], want["label"])
  data = _batches(mesh, augment=True, arrays=arrays)
  want = [sum(float(v.sum()) for v in _host(next(data.iterator(k))).values()) for k in (6, 7, 8)]
  np.testing.assert_allclose(got["arr_4"], want)
