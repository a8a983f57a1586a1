"""Tests for fmcejax.input_pipeline (the loaders) on a tiny fake MNIST (and real MNIST if slow).

Preparation is tested in test_datasets.py; fake IDX images are filled with 3 * id so a batch row
tells which example it is, and a bright left stripe makes flips visible (tests/fake_data.py).
"""

import dataclasses
import math
import multiprocessing
import os
import signal
import socket
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core.data_sources import base as tfds_data_sources

from conftest import NO_REAL_DATA, SHARED_DATA
import fake_data
from fake_data import N_TEST, N_TRAIN, ids_of
from fmcejax import datasets
from fmcejax import input_pipeline as ip


def _refuse(*args, **kwargs):
  raise AssertionError("the input pipeline tried to use the network / download")


@pytest.fixture(scope="module", autouse=True)
def no_network():
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(socket.socket, "connect", _refuse)
    mp.setattr(socket, "create_connection", _refuse)
    mp.setattr(tfds.download.DownloadManager, "download", _refuse)
    mp.setattr(tfds.download.DownloadManager, "download_and_extract", _refuse)
    yield


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
  return fake_data.prepare_fake_mnist(tmp_path_factory.mktemp("mnist"))


def all_batches(ds) -> list[dict]:
  return [ds[k] for k in range(len(ds))]


# ---------------------------------------------------------------------------------------------
# Loading


def test_mock_data_of_the_real_spec(monkeypatch):
  # tfds's mock sets `__getitems__` as a plain partial on a MagicMock, so it is called without
  # `self` and fails; let bulk reads go record by record through the mock's `__getitem__`.
  monkeypatch.setattr(
    tfds_data_sources.BaseDataSource, "__getitems__", lambda self, keys: [self[k] for k in keys]
  )
  info = dataclasses.replace(datasets.DATASET_INFO["mnist"], num_train=40)
  with tfds.testing.mock_data(num_examples=40):
    ds = ip.train_dataset(info, global_batch=8, epochs=2, seed=0, augment=True)
    batches = all_batches(ds)
  assert len(batches) == 10
  assert batches[0]["image"].shape == (8, 28, 28, 1) and batches[0]["image"].dtype == np.uint8
  assert batches[0]["label"].dtype == np.int32 and np.all(batches[0]["label"] < 10)


# ---------------------------------------------------------------------------------------------
# Training stream


def train(info, tfds_dir, **kwargs):
  kwargs = {"global_batch": 16, "epochs": 3, "seed": 0, **kwargs}
  return ip.train_dataset(info, tfds_data_dir=tfds_dir, **kwargs)


def test_train_deterministic_and_exact_length(mnist):
  info, tfds_dir = mnist
  a, b = all_batches(train(info, tfds_dir)), all_batches(train(info, tfds_dir))
  assert len(a) == 3 * ip.steps_per_epoch(info, 16) == 12
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert a[0]["image"].shape == (16, 28, 28, 1) and a[0]["label"].dtype == np.int32
  iterated = list(ip.make_iterator(train(info, tfds_dir)))
  assert len(iterated) == 12
  np.testing.assert_array_equal(iterated[7]["image"], a[7]["image"])
  c = all_batches(train(info, tfds_dir, seed=1))
  assert any((x["label"] != y["label"]).any() for x, y in zip(a, c))


def test_each_epoch_is_a_fresh_permutation_of_the_limited_split(mnist):
  info, tfds_dir = mnist
  limit, batch = 50, 16  # 3 steps per epoch, 2 examples of each epoch dropped
  first = ids_of(ip.load_arrays(info, indices=np.arange(limit), tfds_data_dir=tfds_dir)["image"])
  batches = all_batches(train(info, tfds_dir, limit=limit, global_batch=batch))
  assert len(batches) == 3 * ip.steps_per_epoch(info, batch, limit) == 9
  epochs = [
    np.concatenate([ids_of(b["image"]) for b in batches[3 * e : 3 * e + 3]]) for e in range(3)
  ]
  for ids in epochs:
    assert len(set(ids)) == 48 and set(ids) <= set(first)
  assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
  for b in batches:  # labels travel with their images
    np.testing.assert_array_equal(b["label"], ids_of(b["image"]) % 10)


@pytest.mark.parametrize("process_count", [2, 4])
@pytest.mark.parametrize("augment", [False, True])
def test_host_shards_partition_each_global_batch(mnist, process_count, augment):
  info, tfds_dir = mnist
  single = all_batches(train(info, tfds_dir, augment=augment))
  hosts = [
    all_batches(
      train(info, tfds_dir, augment=augment, process_index=p, process_count=process_count)
    )
    for p in range(process_count)
  ]
  for k, whole in enumerate(single):
    shards = [h[k] for h in hosts]
    assert all(s["image"].shape[0] == 16 // process_count for s in shards)
    ids = np.concatenate([ids_of(s["image"]) for s in shards])
    if not augment:
      assert len(set(ids)) == 16 and sorted(ids) == sorted(ids_of(whole["image"]))
    # Row t of host p is row t * P + p of the global batch, augmentation included.
    for p, shard in enumerate(shards):
      np.testing.assert_array_equal(shard["image"], whole["image"][p::process_count])
      np.testing.assert_array_equal(shard["label"], whole["label"][p::process_count])


def _crops_and_flips(image: np.ndarray) -> list[np.ndarray]:
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
  crops = [padded[y : y + 28, x : x + 28] for y in range(9) for x in range(9)]
  return crops + [c[:, ::-1] for c in crops]


def test_augmentation(mnist):
  info, tfds_dir = mnist
  plain = all_batches(train(info, tfds_dir, augment=False))
  aug = all_batches(train(info, tfds_dir, augment=True))
  again = all_batches(train(info, tfds_dir, augment=True))
  other = all_batches(train(info, tfds_dir, augment=True, seed=1))
  originals = {int(i): img for b in plain for i, img in zip(ids_of(b["image"]), b["image"])}
  changed = 0
  for p, a, g in zip(plain, aug, again):
    np.testing.assert_array_equal(p["label"], a["label"])  # same order as without augmentation
    np.testing.assert_array_equal(a["image"], g["image"])
    assert a["image"].shape == p["image"].shape and a["image"].dtype == np.uint8
    for ident, image in zip(ids_of(p["image"]), a["image"]):
      assert any(np.array_equal(image, c) for c in _crops_and_flips(originals[int(ident)]))
    changed += int((a["image"] != p["image"]).any(axis=(1, 2, 3)).sum())
  assert changed > len(plain) * 16 // 2
  assert any((a["image"] != o["image"]).any() for a, o in zip(aug, other))


def test_iterator_resumes_at_a_batch_index_with_any_worker_count(mnist):
  """The trainer resumes the loader at its step: `make_iterator(ds, start=k)` continues an
  iterator that yielded k batches, with the same augmentation, in-process or with grain worker
  processes (which must not change a single pixel)."""
  info, tfds_dir = mnist
  ds = train(info, tfds_dir, augment=True)
  expected = all_batches(ds)
  it = ip.make_iterator(ds)
  for _ in range(5):
    next(it)
  rest = list(it)
  assert len(rest) == len(expected) - 5
  for workers in (0, 2):
    resumed = ip.make_iterator(train(info, tfds_dir, augment=True), start=5, workers=workers)
    got = list(resumed)
    resumed.close()
    assert len(got) == len(rest), workers
    for g, r, e in zip(got, rest, expected[5:]):
      np.testing.assert_array_equal(g["image"], r["image"])
      np.testing.assert_array_equal(g["image"], e["image"])
      np.testing.assert_array_equal(g["label"], e["label"])
  assert list(ip.make_iterator(ds, start=len(ds))) == []
  with pytest.raises(ValueError, match="start must lie in"):
    ip.make_iterator(ds, start=len(ds) + 1)


def test_bad_batch_settings(mnist):
  info, tfds_dir = mnist
  with pytest.raises(ValueError, match="no full batch"):
    train(info, tfds_dir, global_batch=128)
  with pytest.raises(ValueError, match="multiple of the process count"):
    train(info, tfds_dir, global_batch=18, process_count=4)
  assert ip.steps_per_epoch(100, 32) == 3 and ip.steps_per_epoch(info, 16, limit=40) == 2


# ---------------------------------------------------------------------------------------------
# Evaluation and probes


@pytest.mark.parametrize("process_count", [1, 2, 4])
@pytest.mark.parametrize("limit", [0, 30])
def test_eval_covers_every_example_once(mnist, process_count, limit):
  info, tfds_dir = mnist
  n = limit or N_TEST
  examples = ip.examples(info, "test", limit, tfds_dir)
  hosts = [
    list(ip.padded_batches(examples, global_batch=12, process_index=p, process_count=process_count))
    for p in range(process_count)
  ]
  assert {len(h) for h in hosts} == {math.ceil(n / 12)}
  seen = []
  for batch in (b for h in hosts for b in h):
    assert batch["image"].shape == (12 // process_count, 28, 28, 1)
    assert batch["mask"].dtype == np.float32 and batch["label"].dtype == np.int32
    real = batch["mask"] == 1
    assert set(np.unique(batch["mask"])) <= {0.0, 1.0}
    assert not batch["image"][~real].any() and not batch["label"][~real].any()
    seen.extend(ids_of(batch["image"][real]))
  expected = ids_of(
    ip.load_arrays(info, split="test", indices=np.arange(n), tfds_data_dir=tfds_dir)["image"]
  )
  assert sorted(seen) == sorted(expected) and len(set(seen)) == n


def test_subset_indices_and_load_arrays(mnist):
  info, tfds_dir = mnist
  idx = ip.subset_indices(N_TRAIN, 10, seed=3)
  np.testing.assert_array_equal(idx, ip.subset_indices(N_TRAIN, 10, seed=3))
  assert len(set(idx)) == 10 and np.all(np.diff(idx) > 0) and idx.max() < N_TRAIN
  assert not np.array_equal(idx, ip.subset_indices(N_TRAIN, 10, seed=4))
  assert len(ip.subset_indices(N_TRAIN, 1000, seed=0)) == N_TRAIN
  arrays = ip.load_arrays(info, indices=idx, tfds_data_dir=tfds_dir)
  assert arrays["image"].shape == (10, 28, 28, 1) and arrays["label"].dtype == np.int32
  np.testing.assert_array_equal(arrays["label"], ids_of(arrays["image"]) % 10)
  with pytest.raises(IndexError):
    ip.load_arrays(info, indices=np.array([N_TRAIN]), tfds_data_dir=tfds_dir)


def test_no_tensorflow_imported(tmp_path, tensorflow_imports):
  """Prepare, load and iterate (augmented, with a worker) while `import tensorflow` is watched."""
  info, tfds_dir = fake_data.prepare_fake_mnist(tmp_path)
  ip.load_arrays(info, indices=np.arange(4), tfds_data_dir=tfds_dir)
  ds = ip.train_dataset(
    info, global_batch=8, epochs=1, seed=0, augment=True, tfds_data_dir=tfds_dir
  )
  iterator = ip.make_iterator(ds, workers=1)
  next(iterator)
  iterator.close()
  assert not tensorflow_imports, tensorflow_imports[0]


# ---------------------------------------------------------------------------------------------
# Real data


@pytest.mark.slow
def test_real_mnist(tmp_path):
  if SHARED_DATA is None:
    pytest.skip(NO_REAL_DATA)
  start = time.perf_counter()
  info = datasets.prepare("mnist", str(SHARED_DATA), str(tmp_path), download=False)
  print(f"prepared real MNIST in {time.perf_counter() - start:.1f}s")
  assert (info.num_train, info.num_test) == (60000, 10000)
  for split, n in (("train", 60000), ("test", 10000)):
    labels = ip.load_arrays(info, split=split, indices=np.arange(n), tfds_data_dir=str(tmp_path))[
      "label"
    ]
    counts = np.bincount(labels, minlength=10)
    assert len(counts) == 10 and counts.min() > 0.08 * n and counts.max() < 0.12 * n
  start = time.perf_counter()
  ds = ip.train_dataset(info, global_batch=128, epochs=1, seed=0, tfds_data_dir=str(tmp_path))
  print(f"train_dataset (decodes the split) in {time.perf_counter() - start:.1f}s")
  start = time.perf_counter()
  seen = sum(len(b["label"]) for b in ip.make_iterator(ds))
  print(f"one epoch at batch 128: {seen / (time.perf_counter() - start):.0f} images/s")
  assert seen == 468 * 128


def test_grain_workers_outlive_a_ctrl_c_to_the_process_group(mnist):
  """A terminal's Ctrl-C reaches the grain workers too: they leave it to the main process (which
  checkpoints and then closes them) and keep loading, so no batch is lost or changed."""
  info, tfds_dir = mnist
  expected = all_batches(train(info, tfds_dir, augment=True))
  it = ip.make_iterator(train(info, tfds_dir, augment=True), workers=2)
  got = [next(it), next(it)]  # one batch from each worker: both have started (and set up)
  workers = multiprocessing.active_children()
  assert len(workers) >= 2
  for worker in workers:
    os.kill(worker.pid, signal.SIGINT)
  time.sleep(1)
  got += list(it)
  it.close()
  assert len(got) == len(expected)
  for g, e in zip(got, expected):
    np.testing.assert_array_equal(g["image"], e["image"])
