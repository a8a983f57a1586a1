"""Tests for fmcejax.input_pipeline on tiny fake archives written here (and real MNIST if slow).

Fake IDX images are filled with 3 * id so a batch row tells which example it is; a bright left
stripe makes flips visible.
"""

import dataclasses
import gzip
import io
import math
import pathlib
import socket
import struct
import sys
import tarfile
import time

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core.data_sources import base as tfds_data_sources

from fmcejax import input_pipeline as ip

N_TRAIN, N_TEST = 64, 32
SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


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


def _write_idx(path: pathlib.Path, array: np.ndarray, magic: int) -> None:
  header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def write_fake_idx(directory: pathlib.Path) -> pathlib.Path:
  directory.mkdir(parents=True, exist_ok=True)
  for split, n in (("train", N_TRAIN), ("test", N_TEST)):
    ids = np.arange(n)
    images = np.repeat(3 * ids, 28 * 28).reshape(n, 28, 28)
    images[:, :, :3] = 255
    images_name, labels_name = ip.IDX_FILES[split]
    _write_idx(directory / images_name, images, 0x803)
    _write_idx(directory / labels_name, ids % 10, 0x801)
  return directory


def ids_of(images: np.ndarray) -> np.ndarray:
  return images[:, 14, 14, 0].astype(np.int64) // 3


def write_fake_cifar(path: pathlib.Path, per_class: dict[str, int]) -> dict[bytes, int]:
  """A cifar10-jpeg.tar.gz of noise JPEGs; returns {decoded pixels: label}."""
  rng = np.random.default_rng(0)
  pixels = {}
  with tarfile.open(path, "w:gz") as tar:
    for split, count in per_class.items():
      for label, name in enumerate(ip.CIFAR10_CLASSES):
        for i in range(count):
          buffer = io.BytesIO()
          PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(
              buffer, format="JPEG", quality=75)
          data = buffer.getvalue()
          member = tarfile.TarInfo(f"{split}/{name}/{i:04d}.jpg")
          member.size = len(data)
          tar.addfile(member, io.BytesIO(data))
          pixels[np.asarray(PIL.Image.open(io.BytesIO(data))).tobytes()] = label
  return pixels


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
  root = tmp_path_factory.mktemp("mnist")
  write_fake_idx(root / "archives" / "mnist")
  tfds_dir = str(root / "tfds")
  return ip.prepare("mnist", str(root / "archives"), tfds_dir), tfds_dir


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
  root = tmp_path_factory.mktemp("cifar")
  pixels = write_fake_cifar(root / ip.CIFAR10_JPEG_ARCHIVE, {"train": 3, "test": 2})
  tfds_dir = str(root / "tfds")
  return ip.prepare("cifar10_jpeg", str(root), tfds_dir), tfds_dir, pixels


def all_batches(ds) -> list[dict]:
  return [ds[k] for k in range(len(ds))]


# ---------------------------------------------------------------------------------------------
# Preparation

def test_prepare_info_and_idempotent(mnist, tmp_path):
  info, tfds_dir = mnist
  assert info == dataclasses.replace(ip.DATASET_INFO["mnist"], num_train=N_TRAIN, num_test=N_TEST)
  assert ip.is_prepared("mnist", tfds_dir)
  assert ip.check_available("mnist", str(tmp_path / "nowhere"), tfds_dir) is None
  # Prepared data is reused without looking at any archive.
  assert ip.prepare("mnist", str(tmp_path / "nowhere"), tfds_dir) == info
  assert (pathlib.Path(tfds_dir) / "mnist" / "3.0.1").is_dir()


def test_cifar10_jpeg_keeps_original_jpeg_bytes(cifar):
  info, tfds_dir, pixels = cifar
  assert (info.num_train, info.num_test, info.image_shape, info.num_classes) == (30, 20,
                                                                                 (32, 32, 3), 10)
  assert info.augment and "JPEG" in info.note
  assert tfds.builder("cifar10_jpeg", data_dir=tfds_dir).info.features["label"].names == list(
      ip.CIFAR10_CLASSES)
  loaded = {}
  for split, n in (("train", 30), ("test", 20)):
    arrays = ip.load_arrays(info, split=split, indices=np.arange(n), tfds_data_dir=tfds_dir)
    loaded.update((image.tobytes(), int(label))
                  for image, label in zip(arrays["image"], arrays["label"]))
  # Same pixels as decoding the archive's JPEGs: a second (lossy) encode would change them.
  assert loaded == pixels


def test_fashion_mnist_from_search_list(tmp_path, monkeypatch):
  debian = write_fake_idx(tmp_path / "debian")
  monkeypatch.setattr(ip, "DEBIAN_FASHION_MNIST", debian)
  monkeypatch.setenv(ip.DATA_DIR_ENV, str(tmp_path / "empty"))
  monkeypatch.chdir(tmp_path)
  assert ip.find_archives("fashion_mnist", "") == debian
  info = ip.prepare("fashion_mnist", "", str(tmp_path / "tfds"))
  assert (info.name, info.num_train, info.num_test) == ("fashion_mnist", N_TRAIN, N_TEST)
  assert tfds.builder("fashion_mnist", data_dir=str(tmp_path / "tfds")).info.features[
      "label"].names[0] == "T-shirt/top"


def test_search_order(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.delenv(ip.DATA_DIR_ENV, raising=False)
  write_fake_idx(tmp_path / "data" / "mnist")
  assert ip.find_archives("mnist", "") == tmp_path / "data" / "mnist"
  write_fake_idx(tmp_path / "env" / "mnist")
  monkeypatch.setenv(ip.DATA_DIR_ENV, str(tmp_path / "env"))
  assert ip.find_archives("mnist", "") == tmp_path / "env" / "mnist"
  # An explicit data_dir is the only place looked at.
  assert ip.find_archives("mnist", str(tmp_path / "elsewhere")) is None
  assert ip.find_archives("cifar10", str(tmp_path)) is None


@pytest.mark.parametrize("damage, culprit", [
    ("truncate", "train-images-idx3-ubyte.gz"),
    ("not_gzip", "t10k-labels-idx1-ubyte.gz"),
    ("bad_magic", "train-labels-idx1-ubyte.gz"),
    ("bad_shape", "t10k-images-idx3-ubyte.gz"),
    ("count_mismatch", "train-images-idx3-ubyte.gz"),
    ("label_range", "train-labels-idx1-ubyte.gz"),
])
def test_corrupt_archive_names_the_file(tmp_path, damage, culprit):
  directory = write_fake_idx(tmp_path / "data" / "mnist")
  path = directory / culprit
  if damage == "truncate":
    path.write_bytes(path.read_bytes()[:-40])
  elif damage == "not_gzip":
    path.write_bytes(b"not a gzip file")
  elif damage == "bad_magic":
    _write_idx(path, np.zeros(N_TRAIN), 0x803)
  elif damage == "bad_shape":
    _write_idx(path, np.zeros((N_TEST, 28, 27)), 0x803)
  elif damage == "count_mismatch":
    _write_idx(path, np.zeros((N_TRAIN - 1, 28, 28)), 0x803)
  else:
    _write_idx(path, np.full(N_TRAIN, 10), 0x801)
  tfds_dir = str(tmp_path / "tfds")
  with pytest.raises(ip.DataError, match=culprit) as e:
    ip.prepare("mnist", str(tmp_path / "data"), tfds_dir)
  assert e.value.field == "data_dir" and e.value.value == str(path)
  assert not ip.is_prepared("mnist", tfds_dir)
  assert not (pathlib.Path(tfds_dir) / "mnist" / "3.0.1").exists()


def test_corrupt_cifar_jpeg(tmp_path):
  archive = tmp_path / ip.CIFAR10_JPEG_ARCHIVE
  with tarfile.open(archive, "w:gz") as tar:
    member = tarfile.TarInfo("train/cat/0000.jpg")
    member.size = 10
    tar.addfile(member, io.BytesIO(b"\xff\xd8\xff" + b"\0" * 7))
  with pytest.raises(ip.DataError, match="train/cat/0000.jpg"):
    ip.prepare("cifar10_jpeg", str(tmp_path), str(tmp_path / "tfds"))
  archive.write_bytes(archive.read_bytes()[:30])
  with pytest.raises(ip.DataError, match=ip.CIFAR10_JPEG_ARCHIVE):
    ip.prepare("cifar10_jpeg", str(tmp_path), str(tmp_path / "tfds"))


def test_failed_prepare_leaves_nothing_prepared(tmp_path, monkeypatch):
  write_fake_idx(tmp_path / "data" / "mnist")
  tfds_dir = str(tmp_path / "tfds")
  original = ip._LocalIdxFiles._generate_examples

  def dies_midway(self, images, labels):
    for i, example in enumerate(original(self, images, labels)):
      if i == 10:
        raise RuntimeError("killed while writing")
      yield example

  monkeypatch.setattr(ip._LocalIdxFiles, "_generate_examples", dies_midway)
  with pytest.raises(RuntimeError, match="killed while writing"):
    ip.prepare("mnist", str(tmp_path / "data"), tfds_dir)
  assert not ip.is_prepared("mnist", tfds_dir)
  assert [p.name for p in (pathlib.Path(tfds_dir) / "mnist").iterdir()] == []
  monkeypatch.undo()
  assert ip.prepare("mnist", str(tmp_path / "data"), tfds_dir).num_train == N_TRAIN


def test_missing_data_says_where_to_put_files(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv(ip.DATA_DIR_ENV, str(tmp_path / "env"))
  monkeypatch.setattr(ip, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
  tfds_dir = str(tmp_path / "tfds")
  with pytest.raises(ip.DataError) as e:
    ip.prepare("mnist", "", tfds_dir)
  assert e.value.field == "data_dir"
  message = str(e.value)
  for needle in ("train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "<data_dir>/mnist/",
                 str(tmp_path / "env" / "mnist"), "$FMCEJAX_DATA_DIR", "tfds build mnist",
                 tfds_dir):
    assert needle in message
  with pytest.raises(ip.DataError, match="apt-get install dataset-fashion-mnist"):
    ip.check_available("fashion_mnist", "", tfds_dir)
  with pytest.raises(ip.DataError, match="cifar10-jpeg.tar.gz"):
    ip.check_available("cifar10_jpeg", str(tmp_path), tfds_dir)
  with pytest.raises(ip.DataError, match="cifar10_jpeg") as e:
    ip.prepare("cifar10", "", tfds_dir)
  assert e.value.field == "dataset"
  with pytest.raises(ip.DataError) as e:
    ip.find_archives("imagenet", "")
  assert (e.value.field, e.value.value) == ("dataset", "imagenet")


def test_mock_data_of_the_real_spec(monkeypatch):
  # tfds's mock sets `__getitems__` as a plain partial on a MagicMock, so it is called without
  # `self` and fails; let bulk reads go record by record through the mock's `__getitem__`.
  monkeypatch.setattr(tfds_data_sources.BaseDataSource, "__getitems__",
                      lambda self, keys: [self[k] for k in keys])
  info = dataclasses.replace(ip.DATASET_INFO["mnist"], num_train=40)
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
  epochs = [np.concatenate([ids_of(b["image"]) for b in batches[3 * e:3 * e + 3]])
            for e in range(3)]
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
  hosts = [all_batches(train(info, tfds_dir, augment=augment, process_index=p,
                             process_count=process_count)) for p in range(process_count)]
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
  crops = [padded[y:y + 28, x:x + 28] for y in range(9) for x in range(9)]
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
  hosts = [list(ip.eval_batches(info, global_batch=12, limit=limit, process_index=p,
                                process_count=process_count, tfds_data_dir=tfds_dir))
           for p in range(process_count)]
  assert {len(h) for h in hosts} == {math.ceil(n / 12)}
  seen = []
  for batch in (b for h in hosts for b in h):
    assert batch["image"].shape == (12 // process_count, 28, 28, 1)
    assert batch["mask"].dtype == np.float32 and batch["label"].dtype == np.int32
    real = batch["mask"] == 1
    assert set(np.unique(batch["mask"])) <= {0.0, 1.0}
    assert not batch["image"][~real].any() and not batch["label"][~real].any()
    seen.extend(ids_of(batch["image"][real]))
  expected = ids_of(ip.load_arrays(info, split="test", indices=np.arange(n),
                                   tfds_data_dir=tfds_dir)["image"])
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


def test_no_tensorflow_imported(mnist):
  assert "tensorflow" not in sys.modules


# ---------------------------------------------------------------------------------------------
# Real data

@pytest.mark.slow
def test_real_mnist(tmp_path):
  if not (SHARED_DATA / "mnist").is_dir():
    pytest.skip(f"no real MNIST at {SHARED_DATA}")
  start = time.perf_counter()
  info = ip.prepare("mnist", str(SHARED_DATA), str(tmp_path))
  print(f"prepared real MNIST in {time.perf_counter() - start:.1f}s")
  assert (info.num_train, info.num_test) == (60000, 10000)
  for split, n in (("train", 60000), ("test", 10000)):
    labels = ip.load_arrays(info, split=split, indices=np.arange(n),
                            tfds_data_dir=str(tmp_path))["label"]
    counts = np.bincount(labels, minlength=10)
    assert len(counts) == 10 and counts.min() > 0.08 * n and counts.max() < 0.12 * n
  start = time.perf_counter()
  ds = ip.train_dataset(info, global_batch=128, epochs=1, seed=0, tfds_data_dir=str(tmp_path))
  print(f"train_dataset (decodes the split) in {time.perf_counter() - start:.1f}s")
  start = time.perf_counter()
  seen = sum(len(b["label"]) for b in ip.make_iterator(ds))
  print(f"one epoch at batch 128: {seen / (time.perf_counter() - start):.0f} images/s")
  assert seen == 468 * 128
