"""Tests for fmcejax.datasets: preparing from local archives and through tfds's download manager.

No test reaches the internet: sockets may connect to 127.0.0.1 only, where a threaded HTTP
server serves small synthetic archives in the exact official formats (tests/fake_data.py). The
builders' URLs and checksums are pointed at it the way tfds lets one do (a builder's `URL` /
`_cifar_info`, its `url_infos`), or tfds's real URL is answered through HTTP_PROXY.
"""

import dataclasses
import http.server
import io
import json
import os
import pathlib
import socket
import subprocess
import sys
import tarfile
import threading

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core import utils as tfds_utils
from tensorflow_datasets.core.download import checksums as tfds_checksums
from tensorflow_datasets.core.download import downloader as tfds_downloader

import fake_data
from conftest import SHARED_DATA
from fake_data import N_TEST, N_TRAIN, write_fake_idx, write_idx
from fmcejax import archives, builders, datasets, input_pipeline

REPO = pathlib.Path(__file__).resolve().parents[1]
CIFAR_BINARY = {"cifar10": "cifar-10-binary.tar.gz", "cifar100": "cifar-100-binary.tar.gz"}
_connect, _getaddrinfo = socket.socket.connect, socket.getaddrinfo
_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _loopback_connect(self, address, *args):
  if isinstance(address, tuple) and address[0] not in _LOOPBACK:
    raise AssertionError(f"a test tried to reach {address}")
  return _connect(self, address, *args)


def _loopback_getaddrinfo(host, *args, **kwargs):
  if host not in _LOOPBACK:
    raise AssertionError(f"a test tried to resolve {host}")
  return _getaddrinfo(host, *args, **kwargs)


@pytest.fixture(scope="module", autouse=True)
def loopback_only():
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(socket.socket, "connect", _loopback_connect)
    mp.setattr(socket, "getaddrinfo", _loopback_getaddrinfo)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
      mp.delenv(name, raising=False)
    yield


@pytest.fixture()
def no_download(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("tried to download")

  monkeypatch.setattr(tfds.download.DownloadManager, "download", refuse)


class _Handler(http.server.BaseHTTPRequestHandler):
  """Serves `server.files[path]`; `server.cut[path] = n` sends n bytes of it, then hangs up."""

  def do_GET(self):
    self.server.requests.append(self.path)
    body = self.server.files.get(self.path)
    if body is None:
      self.send_error(404)
      return
    self.send_response(200)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body[: self.server.cut.get(self.path, len(body))])
    self.close_connection = True

  def log_message(self, *args):
    pass


@pytest.fixture(scope="module")
def server():
  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
  httpd.daemon_threads = True
  httpd.files, httpd.cut, httpd.requests = {}, {}, []
  httpd.url = lambda path: f"http://127.0.0.1:{httpd.server_address[1]}{path}"
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield httpd
  httpd.shutdown()
  httpd.server_close()


def _url_info(name: str, data: bytes) -> tfds_checksums.UrlInfo:
  return tfds_checksums.UrlInfo(
    size=tfds_utils.Size(len(data)), checksum=fake_data.sha256(data), filename=name
  )


def point(monkeypatch, dataset: str, urls: dict[str, str], files: dict[str, bytes]) -> None:
  """Points the builder of `dataset` at `urls` (official name -> URL), registering the
  checksums of `files` (official name -> bytes) for them."""
  builder = builders.BUILDERS[dataset]
  if dataset in CIFAR_BINARY:
    (url,) = urls.values()
    monkeypatch.setattr(
      builder,
      "_cifar_info",
      property(lambda self: super(builder, self)._cifar_info._replace(url=url)),
    )
  else:
    base = {url.rsplit("/", 1)[0] + "/" for url in urls.values()}
    monkeypatch.setattr(builder, "URL", base.pop())
  monkeypatch.setattr(builder, "url_infos", {urls[n]: _url_info(n, d) for n, d in files.items()})


def serve(monkeypatch, server, dataset: str, files: dict[str, bytes]) -> dict[str, str]:
  """Serves `files` as the official files of `dataset`; returns official name -> URL."""
  urls = {name: server.url(f"/{dataset}/{name}") for name in files}
  server.files.update({f"/{dataset}/{name}": data for name, data in files.items()})
  point(monkeypatch, dataset, urls, files)
  return urls


def official_files(dataset: str, directory: pathlib.Path, seed: int = 0):
  """(official name -> synthetic bytes, what they hold) for `dataset`."""
  if dataset in CIFAR_BINARY:
    data = fake_data.cifar_data(dataset, seed)
    return {CIFAR_BINARY[dataset]: fake_data.cifar_archive(CIFAR_BINARY[dataset], data)}, data
  write_fake_idx(directory / dataset)
  return {p.name: p.read_bytes() for p in (directory / dataset).iterdir()}, None


def read_all(dataset: str, split: str, tfds_dir: str) -> list[dict]:
  source = tfds.data_source(dataset, split=split, data_dir=tfds_dir, download=False)
  return [source[i] for i in range(len(source))]


def check_prepared(dataset: str, tfds_data_dir: str, expected) -> None:
  """The prepared dataset, read by tfds's own reader, holds exactly the served examples (in the
  order tfds writes them: shuffled by example key, as tfds's own builders' keys are)."""
  features = tfds.builder(dataset, data_dir=tfds_data_dir).info.features
  for split in ("train", "test"):
    examples = read_all(dataset, split, tfds_data_dir)
    images = np.stack([e["image"] for e in examples])
    labels = {
      key: np.array([e[key] for e in examples])
      for key in ("label", "coarse_label")
      if key in examples[0]
    }
    if expected is None:  # IDX: image i is filled with 3 * i, label i % 10
      n = N_TRAIN if split == "train" else N_TEST
      assert images.shape == (n, 28, 28, 1) and images.dtype == np.uint8
      order = fake_data.ids_of(images)
      np.testing.assert_array_equal(np.sort(order), np.arange(n))
      np.testing.assert_array_equal(labels["label"], order % 10)
      continue
    ids = [e["id"].decode() if isinstance(e["id"], bytes) else e["id"] for e in examples]
    order = np.array([int(i.removeprefix(f"{split}_")) for i in ids])
    np.testing.assert_array_equal(np.sort(order), np.arange(len(examples)))
    want_images, want_labels = expected[0][split]
    np.testing.assert_array_equal(images, want_images[order])
    assert set(labels) == set(want_labels)
    for key, values in want_labels.items():
      np.testing.assert_array_equal(labels[key], values[order])
  if expected is not None:
    for key, names in expected[1].items():
      assert features[key].names == names


@pytest.fixture(scope="module")
def downloads(server, tmp_path_factory):
  """dataset -> (info, tfds_data_dir, expected, URLs), each downloaded once per module."""
  done = {}

  def get(dataset):
    if dataset not in done:
      root = tmp_path_factory.mktemp(f"download_{dataset}_")
      files, expected = official_files(dataset, root / "made")
      tfds_dir = str(root / "tfds")
      with pytest.MonkeyPatch.context() as mp:
        urls = serve(mp, server, dataset, files)
        assert datasets.check_available(dataset, str(root / "empty"), tfds_dir) == datasets.DOWNLOAD
        info = datasets.prepare(dataset, str(root / "empty"), tfds_dir)
      done[dataset] = info, tfds_dir, expected, urls
    return done[dataset]

  return get


# ---------------------------------------------------------------------------------------------
# Offline preparation


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
  return fake_data.prepare_fake_mnist(tmp_path_factory.mktemp("mnist"))


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
  root = tmp_path_factory.mktemp("cifar")
  jpegs = fake_data.write_fake_cifar_jpeg(
    root / archives.CIFAR10_JPEG_ARCHIVE, {"train": 3, "test": 2}
  )
  tfds_dir = str(root / "tfds")
  return datasets.prepare("cifar10_jpeg", str(root), tfds_dir), tfds_dir, jpegs


def test_prepare_info_and_idempotent(mnist, tmp_path, no_download):
  info, tfds_dir = mnist
  assert info == dataclasses.replace(
    datasets.DATASET_INFO["mnist"], num_train=N_TRAIN, num_test=N_TEST
  )
  assert datasets.is_prepared("mnist", tfds_dir)
  assert datasets.check_available("mnist", str(tmp_path / "nowhere"), tfds_dir) is None
  # Prepared data is reused without looking at any archive.
  assert datasets.prepare("mnist", str(tmp_path / "nowhere"), tfds_dir) == info
  assert (pathlib.Path(tfds_dir) / "mnist" / "3.0.1").is_dir()


def test_cifar10_jpeg_keeps_original_jpeg_bytes(cifar):
  info, tfds_dir, jpegs = cifar
  assert (info.num_train, info.num_test, info.image_shape, info.num_classes) == (
    30,
    20,
    (32, 32, 3),
    10,
  )
  assert info.augment and "JPEG" in info.note
  assert tfds.builder("cifar10_jpeg", data_dir=tfds_dir).info.features["label"].names == list(
    archives.CIFAR10_CLASSES
  )
  stored, loaded = {}, {}
  for split, n in (("train", 30), ("test", 20)):
    raw = tfds.data_source(
      "cifar10_jpeg",
      split=split,
      data_dir=tfds_dir,
      download=False,
      decoders={"image": tfds.decode.SkipDecoding()},
    )
    stored.update((raw[i]["image"], int(raw[i]["label"])) for i in range(n))
    arrays = input_pipeline.load_arrays(
      info, split=split, indices=np.arange(n), tfds_data_dir=tfds_dir
    )
    loaded.update(
      (image.tobytes(), int(label)) for image, label in zip(arrays["image"], arrays["label"])
    )
  # The archive's JPEG files, byte for byte (a re-encode, even a lossless one, differs), and
  # the loader decodes them to their pixels.
  assert stored == jpegs
  assert loaded == {
    np.asarray(PIL.Image.open(io.BytesIO(b))).tobytes(): y for b, y in jpegs.items()
  }


def test_fashion_mnist_from_search_list(tmp_path, monkeypatch, no_download):
  debian = write_fake_idx(tmp_path / "debian")
  monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", debian)
  monkeypatch.setenv(datasets.DATA_DIR_ENV, str(tmp_path / "empty"))
  monkeypatch.chdir(tmp_path)
  assert datasets.find_archives("fashion_mnist", "") == debian
  info = datasets.prepare("fashion_mnist", "", str(tmp_path / "tfds"))
  assert (info.name, info.num_train, info.num_test) == ("fashion_mnist", N_TRAIN, N_TEST)
  assert (
    tfds.builder("fashion_mnist", data_dir=str(tmp_path / "tfds")).info.features["label"].names[0]
    == "T-shirt/top"
  )


def test_search_order(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.delenv(datasets.DATA_DIR_ENV, raising=False)
  write_fake_idx(tmp_path / "data" / "mnist")
  assert datasets.find_archives("mnist", "") == tmp_path / "data" / "mnist"
  write_fake_idx(tmp_path / "env" / "mnist")
  monkeypatch.setenv(datasets.DATA_DIR_ENV, str(tmp_path / "env"))
  assert datasets.find_archives("mnist", "") == tmp_path / "env" / "mnist"
  # An explicit data_dir is the only place looked at.
  assert datasets.find_archives("mnist", str(tmp_path / "elsewhere")) is None
  assert datasets.find_archives("cifar10", str(tmp_path)) is None
  # CIFAR: <root>/<archive> before <root>/<dataset>/<archive>, the binary before the python one.
  (tmp_path / "c" / "cifar10").mkdir(parents=True)
  root = tmp_path / "c"
  for path in (
    root / "cifar10" / "cifar-10-binary.tar.gz",
    root / "cifar-10-python.tar.gz",
    root / "cifar-10-binary.tar.gz",
  ):
    path.write_bytes(b"")
    assert datasets.find_archives("cifar10", str(root)) == path
  assert datasets.find_archives("cifar100", str(root)) is None


@pytest.mark.parametrize(
  "damage, culprit",
  [
    ("truncate", "train-images-idx3-ubyte.gz"),
    ("not_gzip", "t10k-labels-idx1-ubyte.gz"),
    ("bad_magic", "train-labels-idx1-ubyte.gz"),
    ("bad_shape", "t10k-images-idx3-ubyte.gz"),
    ("count_mismatch", "train-images-idx3-ubyte.gz"),
    ("label_range", "train-labels-idx1-ubyte.gz"),
  ],
)
def test_corrupt_archive_names_the_file(tmp_path, damage, culprit, no_download):
  directory = write_fake_idx(tmp_path / "data" / "mnist")
  path = directory / culprit
  if damage == "truncate":
    path.write_bytes(path.read_bytes()[:-40])
  elif damage == "not_gzip":
    path.write_bytes(b"not a gzip file")
  elif damage == "bad_magic":
    write_idx(path, np.zeros(N_TRAIN), 0x803)
  elif damage == "bad_shape":
    write_idx(path, np.zeros((N_TEST, 28, 27)), 0x803)
  elif damage == "count_mismatch":
    write_idx(path, np.zeros((N_TRAIN - 1, 28, 28)), 0x803)
  else:
    write_idx(path, np.full(N_TRAIN, 10), 0x801)
  tfds_dir = str(tmp_path / "tfds")
  with pytest.raises(datasets.DataError, match=culprit) as e:
    datasets.prepare("mnist", str(tmp_path / "data"), tfds_dir)
  assert e.value.field == "data_dir" and e.value.value == str(path)
  assert not datasets.is_prepared("mnist", tfds_dir)
  assert not (pathlib.Path(tfds_dir) / "mnist" / "3.0.1").exists()


def test_corrupt_cifar_jpeg(tmp_path):
  archive = tmp_path / archives.CIFAR10_JPEG_ARCHIVE
  with tarfile.open(archive, "w:gz") as tar:
    member = tarfile.TarInfo("train/cat/0000.jpg")
    member.size = 10
    tar.addfile(member, io.BytesIO(b"\xff\xd8\xff" + b"\0" * 7))
  with pytest.raises(datasets.DataError, match="train/cat/0000.jpg"):
    datasets.prepare("cifar10_jpeg", str(tmp_path), str(tmp_path / "tfds"))
  archive.write_bytes(archive.read_bytes()[:30])
  with pytest.raises(datasets.DataError, match=archives.CIFAR10_JPEG_ARCHIVE):
    datasets.prepare("cifar10_jpeg", str(tmp_path), str(tmp_path / "tfds"))


def test_failed_prepare_leaves_nothing_prepared(tmp_path, monkeypatch):
  write_fake_idx(tmp_path / "data" / "mnist")
  tfds_dir = str(tmp_path / "tfds")
  original = builders._IdxFiles._generate_examples

  def dies_midway(self, images, labels):
    for i, example in enumerate(original(self, images, labels)):
      if i == 10:
        raise RuntimeError("killed while writing")
      yield example

  monkeypatch.setattr(builders._IdxFiles, "_generate_examples", dies_midway)
  with pytest.raises(RuntimeError, match="killed while writing"):
    datasets.prepare("mnist", str(tmp_path / "data"), tfds_dir)
  assert not datasets.is_prepared("mnist", tfds_dir)
  assert [p.name for p in (pathlib.Path(tfds_dir) / "mnist").iterdir()] == []
  monkeypatch.undo()
  assert datasets.prepare("mnist", str(tmp_path / "data"), tfds_dir).num_train == N_TRAIN


def test_missing_data_says_where_to_put_files(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv(datasets.DATA_DIR_ENV, str(tmp_path / "env"))
  monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
  tfds_dir = str(tmp_path / "tfds")
  with pytest.raises(datasets.DataError) as e:
    datasets.prepare("mnist", "", tfds_dir, download=False)
  assert e.value.field == "data_dir"
  message = str(e.value)
  # All three ways: where it would be prepared, where archives were looked for, the download.
  for needle in (
    "train-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
    "<data_dir>/mnist/",
    str(tmp_path / "env" / "mnist"),
    "$FMCEJAX_DATA_DIR",
    "tfds build mnist",
    tfds_dir,
    "download=False",
    "download=True",
  ):
    assert needle in message
  with pytest.raises(datasets.DataError, match="apt-get install dataset-fashion-mnist"):
    datasets.check_available("fashion_mnist", "", tfds_dir, download=False)
  with pytest.raises(datasets.DataError, match="cifar10-jpeg.tar.gz") as e:
    datasets.check_available("cifar10_jpeg", str(tmp_path), tfds_dir)
  assert "cannot be downloaded" in str(e.value)
  with pytest.raises(datasets.DataError, match="cifar10_jpeg") as e:
    datasets.prepare("cifar10", "", tfds_dir, download=False)
  for needle in ("cifar-10-binary.tar.gz", "cifar-10-python.tar.gz", "<data_dir>/cifar10/"):
    assert needle in str(e.value)
  assert e.value.field == "data_dir"
  with pytest.raises(datasets.DataError) as e:
    datasets.find_archives("imagenet", "")
  assert (e.value.field, e.value.value) == ("dataset", "imagenet")
  # With downloads on, the check is cheap: it promises a download and fetches nothing.
  assert datasets.check_available("cifar100", "", tfds_dir) == datasets.DOWNLOAD
  assert not (pathlib.Path(tfds_dir) / "downloads").exists()


@pytest.mark.parametrize(
  "archive",
  [
    "cifar-10-binary.tar.gz",
    "cifar-10-python.tar.gz",
    "cifar-100-binary.tar.gz",
    "cifar-100-python.tar.gz",
  ],
)
def test_official_cifar_archives_offline(tmp_path, monkeypatch, no_download, archive):
  dataset = "cifar10" if archive.startswith("cifar-10-") else "cifar100"
  data = fake_data.cifar_data(dataset, seed=len(archive))
  content = fake_data.cifar_archive(archive, data)
  # The binary version at <data_dir>/<archive>, the python one at <data_dir>/<dataset>/<archive>.
  place = tmp_path / "data" / ("" if "binary" in archive else dataset) / archive
  place.parent.mkdir(parents=True, exist_ok=True)
  place.write_bytes(content)
  tfds_dir = str(tmp_path / "tfds")
  assert datasets.check_available(dataset, str(tmp_path / "data"), tfds_dir, False) == place
  # The official checksums are checked: a synthetic archive is refused, naming the file.
  with pytest.raises(datasets.DataError, match="is not the official") as e:
    datasets.prepare(dataset, str(tmp_path / "data"), tfds_dir, download=False)
  assert e.value.value == str(place) and not datasets.is_prepared(dataset, tfds_dir)
  if "binary" in archive:  # tfds's registered checksum of the official URL
    url = next(iter(builders.BUILDERS[dataset].url_infos))
    point(monkeypatch, dataset, {archive: url}, {archive: content})
  else:
    monkeypatch.setitem(archives.PYTHON_ARCHIVE_MD5, archive, fake_data.md5(content))
  info = datasets.prepare(dataset, str(tmp_path / "data"), tfds_dir, download=False)
  assert (info.num_train, info.num_test) == (fake_data.CIFAR_TRAIN, fake_data.CIFAR_TEST)
  assert info.num_classes == (10 if dataset == "cifar10" else 100)
  check_prepared(dataset, tfds_dir, data)


@pytest.mark.parametrize("archive", ["cifar-10-binary.tar.gz", "cifar-100-python.tar.gz"])
def test_corrupt_cifar_archive_names_the_file(tmp_path, monkeypatch, archive):
  dataset = "cifar10" if archive.startswith("cifar-10-") else "cifar100"
  content = fake_data.cifar_archive(archive, fake_data.cifar_data(dataset))
  with tarfile.open(fileobj=io.BytesIO(content)) as tar:  # drop the last train member's tail
    members = {m.name: tar.extractfile(m).read() for m in tar}
  name = next(n for n in members if n.endswith(("data_batch_5.bin", "/train")))
  members[name] = members[name][:-100]
  why = "not whole 3073-byte records" if "binary" in archive else "train is not a CIFAR python"
  content = fake_data._tar_gz(members)
  (tmp_path / archive).write_bytes(content)
  if "binary" in archive:
    point(monkeypatch, dataset, {archive: "https://x/" + archive}, {archive: content})
  else:
    monkeypatch.setitem(archives.PYTHON_ARCHIVE_MD5, archive, fake_data.md5(content))
  with pytest.raises(datasets.DataError, match=why) as e:
    datasets.prepare(dataset, str(tmp_path), str(tmp_path / "tfds"), download=False)
  assert e.value.value == str(tmp_path / archive)
  assert not datasets.is_prepared(dataset, str(tmp_path / "tfds"))


# ---------------------------------------------------------------------------------------------
# Downloads through tfds's download manager


@pytest.mark.parametrize("dataset", datasets.DOWNLOADABLE)
def test_builders_are_tfds_builders_with_the_official_sources(tmp_path, dataset):
  ours = builders.BUILDERS[dataset](data_dir=str(tmp_path))
  theirs = tfds.builder(dataset, data_dir=str(tmp_path))
  # tfds's builder stays the catalogue entry; ours writes what it reads.
  assert type(theirs).__module__.startswith("tensorflow_datasets.") and isinstance(
    ours, type(theirs)
  )
  assert (ours.name, ours.version, ours.data_dir) == (theirs.name, theirs.version, theirs.data_dir)
  assert repr(ours.info.features) == repr(theirs.info.features)
  registered = tfds_checksums.load_url_infos(
    tfds_utils.tfds_path() / "url_checksums" / f"{dataset}.txt"
  )
  assert ours.url_infos == registered
  if dataset in CIFAR_BINARY:
    assert set(registered) == {ours._cifar_info.url}
  else:
    assert set(registered) == {ours.URL + name for name in sum(archives.IDX_FILES.values(), ())}


@pytest.mark.parametrize("dataset", datasets.DOWNLOADABLE)
def test_download_prepares_a_standard_tfds_dataset(downloads, server, tmp_path, dataset):
  info, tfds_dir, expected, urls = downloads(dataset)
  n_train = N_TRAIN if expected is None else fake_data.CIFAR_TRAIN
  n_test = N_TEST if expected is None else fake_data.CIFAR_TEST
  assert info == dataclasses.replace(
    datasets.DATASET_INFO[dataset], num_train=n_train, num_test=n_test
  )
  version = tfds.builder(dataset, data_dir=tfds_dir).version
  assert (pathlib.Path(tfds_dir) / dataset / str(version)).is_dir()
  check_prepared(dataset, tfds_dir, expected)
  # tfds's cache: the checked files, under their checksum-named cache entries, nothing partial.
  cached = sorted(p.name for p in (pathlib.Path(tfds_dir) / "downloads" / dataset).iterdir())
  assert len(cached) == 2 * len(urls) and not [n for n in cached if ".tmp." in n]
  # Prepared: nothing is downloaded again; removed: the cache serves it without the network.
  requests = len(server.requests)
  assert datasets.prepare(dataset, str(tmp_path), tfds_dir) == info
  (pathlib.Path(tfds_dir) / dataset).rename(tmp_path / "moved")
  with pytest.MonkeyPatch.context() as mp:
    point(mp, dataset, urls, {name: server.files[f"/{dataset}/{name}"] for name in urls})
    assert datasets.prepare(dataset, str(tmp_path), tfds_dir) == info
  assert len(server.requests) == requests


@pytest.mark.parametrize("fault", ["checksum", "truncated", "http_404", "no_connection"])
def test_failed_download_is_one_clear_error_and_a_rerun_retries(
  server, tmp_path, monkeypatch, fault
):
  dataset, name = "cifar10", CIFAR_BINARY["cifar10"]
  good = fake_data.cifar_archive(name, fake_data.cifar_data(dataset))
  path = f"/{fault}/{name}"
  url = server.url(path)
  point(monkeypatch, dataset, {name: url}, {name: good})
  server.files[path] = good
  if fault == "checksum":  # a valid archive, but not the registered one
    server.files[path] = fake_data.cifar_archive(name, fake_data.cifar_data(dataset, seed=1))
  elif fault == "truncated":
    server.cut[path] = len(good) // 2
  elif fault == "http_404":
    del server.files[path]
  else:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{closed.getsockname()[1]}{path}"
    closed.close()
    monkeypatch.setattr(tfds_downloader, "MAX_RETRIES", 0)
    point(monkeypatch, dataset, {name: url}, {name: good})
  tfds_dir = tmp_path / "tfds"
  with pytest.raises(datasets.DataError) as e:
    datasets.prepare(dataset, str(tmp_path / "empty"), str(tfds_dir))
  message = str(e.value)
  assert (e.value.field, e.value.value) == ("download", url)
  for needle in (
    url,
    str(tfds_dir / "downloads" / dataset),
    str(tfds_dir / dataset / "3.0.2"),
    str(tmp_path / "empty" / name),
    "<data_dir>/cifar10/",
    "the same command again",
  ):
    assert needle in message, (needle, message)
  assert not datasets.is_prepared(dataset, str(tfds_dir))
  assert not (tfds_dir / dataset / "3.0.2").exists()
  left = (
    [p.name for p in (tfds_dir / "downloads" / dataset).glob("*")]
    if (tfds_dir / "downloads" / dataset).exists()
    else []
  )
  assert left == [], "a failed download must not stay in the download dir"
  # Once the right file is there, the same call succeeds.
  server.files[path], server.cut[path] = good, len(good)
  point(monkeypatch, dataset, {name: server.url(path)}, {name: good})
  assert datasets.prepare(dataset, str(tmp_path / "empty"), str(tfds_dir)).num_train == 50


def test_process_zero_first_then_the_others(downloads, server, tmp_path, monkeypatch):
  """The pipeline's order: process 0 prepares, then the others. On a shared tfds_data_dir they
  find it prepared (no second download); on per-host disks each downloads its own copy."""
  info, shared, _, urls = downloads("mnist")
  files = {name: server.files[f"/mnist/{name}"] for name in urls}
  point(monkeypatch, "mnist", urls, files)
  requests = len(server.requests)
  nowhere = str(tmp_path / "none")
  for _ in range(3):  # processes 1..3 on the shared directory
    assert datasets.prepare("mnist", nowhere, shared) == info
  assert len(server.requests) == requests
  assert datasets.prepare("mnist", nowhere, str(tmp_path / "host1")) == info
  assert len(server.requests) == requests + len(urls)


def test_cli_probe_stage_on_downloaded_cifar10(downloads, tmp_path):
  _, tfds_dir, _, _ = downloads("cifar10")
  workdir = tmp_path / "w"
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "fmcejax.train",
      f"--workdir={workdir}",
      "--config.dataset=cifar10",
      "--config.backbone=cnn",
      "--config.stages=probe",
      "--config.seeds=1",
      "--config.probe.epochs=1",
      "--config.batch_size=16",
      "--config.eval_batch_size=16",
      "--config.progress_bar=False",
      f"--config.tfds_data_dir={tfds_dir}",
      "--config.download=False",
      f"--config.data_dir={tmp_path / 'none'}",
    ],
    cwd=REPO,
    env={**os.environ, "PYTHONUNBUFFERED": "1"},
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  probe = json.loads((workdir / "probe" / "metrics.json").read_text())
  assert len(probe["losses"]) == 1 and np.isfinite(probe["losses"][0])


def test_cli_failed_download_exits_2_naming_the_url(tmp_path, server):
  """Through HTTP_PROXY the CLI asks for tfds's real Fashion-MNIST URL (plain http) and gets a
  404 from 127.0.0.1: one clear error, exit status 2, nothing prepared."""
  before = len(server.requests)
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "fmcejax.train",
      f"--workdir={tmp_path / 'w'}",
      "--config.dataset=fashion_mnist",
      f"--config.tfds_data_dir={tmp_path / 'tfds'}",
      f"--config.data_dir={tmp_path / 'none'}",
    ],
    cwd=REPO,
    env={**os.environ, "HTTP_PROXY": server.url(""), "NO_PROXY": ""},
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 2, result.stderr[-3000:]
  url = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/train-images-idx3-ubyte.gz"
  assert server.requests[before:] == [url]
  message = result.stderr.strip().splitlines()[-1]
  assert message.startswith("fmcejax: error:") and url in message and "HTTP code: 404" in message
  assert not datasets.is_prepared("fashion_mnist", str(tmp_path / "tfds"))


@pytest.mark.slow
def test_real_fashion_mnist_through_the_official_url_and_checksums(tmp_path, server, monkeypatch):
  """Nothing patched but the network: tfds's own URL, answered through HTTP_PROXY with the
  official files, checked against tfds's registered checksums."""
  if SHARED_DATA is None or not (SHARED_DATA / "fashion_mnist").is_dir():
    pytest.skip(f"no real Fashion-MNIST at {SHARED_DATA}")
  base = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
  for path in (SHARED_DATA / "fashion_mnist").glob("*.gz"):
    monkeypatch.setitem(server.files, base + path.name, path.read_bytes())
  monkeypatch.setenv("HTTP_PROXY", server.url(""))
  monkeypatch.setenv("NO_PROXY", "")
  info = datasets.prepare("fashion_mnist", str(tmp_path / "none"), str(tmp_path / "tfds"))
  assert (info.num_train, info.num_test) == (60000, 10000)
  labels = input_pipeline.load_arrays(
    info, split="test", indices=np.arange(10000), tfds_data_dir=str(tmp_path / "tfds")
  )["label"]
  assert np.bincount(labels).tolist() == [1000] * 10


def test_no_tensorflow_imported(server, tmp_path, monkeypatch, tensorflow_imports):
  """Download and prepare (and a local JPEG archive) while `import tensorflow` is watched."""
  files, _ = official_files("cifar100", tmp_path / "made")
  serve(monkeypatch, server, "cifar100", files)
  datasets.prepare("cifar100", str(tmp_path / "empty"), str(tmp_path / "tfds"))
  fake_data.write_fake_cifar_jpeg(tmp_path / archives.CIFAR10_JPEG_ARCHIVE, {"train": 1, "test": 1})
  datasets.prepare("cifar10_jpeg", str(tmp_path), str(tmp_path / "tfds"))
  assert not tensorflow_imports, tensorflow_imports[0]
