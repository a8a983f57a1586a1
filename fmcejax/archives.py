"""The official dataset archive formats, read with numpy/PIL into arrays (no TensorFlow).

Every reader validates what it reads, so a bad file fails here with a DataError naming it, before
tfds writes anything, not midway through a run. datasets.py turns the arrays into tfds datasets.
"""

from __future__ import annotations

import gzip
import io
import pathlib
import pickle
import re
import tarfile
import zlib
from collections.abc import Callable

import numpy as np
import PIL.Image

CIFAR10_CLASSES = (
  "airplane",
  "automobile",
  "bird",
  "cat",
  "deer",
  "dog",
  "frog",
  "horse",
  "ship",
  "truck",
)
IDX_FILES = {  # split -> (images, labels), the official names
  "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
  "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CIFAR10_JPEG_ARCHIVE = "cifar10-jpeg.tar.gz"
# Official CIFAR archive -> (its top directory, train members, test members, label-name members
# by label key). Binary records are the label bytes in the key order given, then 3072 pixel bytes
# (channel-major); python members are pickled dicts with bytes keys.
CIFAR_LAYOUTS = {
  "cifar-10-binary.tar.gz": (
    "cifar-10-batches-bin",
    tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    ("test_batch.bin",),
    {"label": "batches.meta.txt"},
  ),
  "cifar-100-binary.tar.gz": (
    "cifar-100-binary",
    ("train.bin",),
    ("test.bin",),
    {"coarse_label": "coarse_label_names.txt", "label": "fine_label_names.txt"},
  ),
  "cifar-10-python.tar.gz": (
    "cifar-10-batches-py",
    tuple(f"data_batch_{i}" for i in range(1, 6)),
    ("test_batch",),
    {"label": "batches.meta"},
  ),
  "cifar-100-python.tar.gz": (
    "cifar-100-python",
    ("train",),
    ("test",),
    {"coarse_label": "meta", "label": "meta"},
  ),
}
# Python members: label key -> (key of its labels in a batch, key of its names in the meta dict).
_PICKLE_KEYS = {
  "cifar-10-python.tar.gz": {"label": (b"labels", b"label_names")},
  "cifar-100-python.tar.gz": {
    "coarse_label": (b"coarse_labels", b"coarse_label_names"),
    "label": (b"fine_labels", b"fine_label_names"),
  },
}
_CIFAR_PIXELS = 3 * 32 * 32


class DataError(Exception):
  """Data the run cannot use: an unknown dataset, missing or corrupt files, a failed download.

  `field` is the setting to change ("dataset", "data_dir" or "download"), `value` its value (or
  the bad file / URL), `why` what is wrong and `accepted` what would work, so the CLI can say it
  like a config error.
  """

  def __init__(self, field: str, value: object, why: str, accepted: str = ""):
    self.field, self.value, self.why, self.accepted = field, value, why, accepted
    self.message = why + (f" Accepted: {accepted}" if accepted else "")
    super().__init__(self.message)


def _bad(path: pathlib.Path, why: str) -> DataError:
  return DataError("data_dir", str(path), why)


def check_checksum(path: pathlib.Path, algorithm: Callable, expected: str) -> None:
  """Fails unless `path` hashes to `expected` (its official checksum)."""
  digest = algorithm()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  if digest.hexdigest() != expected:
    raise DataError(
      "data_dir",
      str(path),
      f"{path} is not the official {path.name}: its "
      f"{digest.name} is {digest.hexdigest()}, the official one {expected} (a "
      "truncated or changed copy?).",
      "the archive as published on https://www.cs.toronto.edu/~kriz/cifar.html",
    )


# ---------------------------------------------------------------------------------------------
# MNIST-type IDX files.


def _read_gz(path: pathlib.Path) -> bytes:
  try:
    with gzip.open(path, "rb") as f:
      return f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise _bad(path, f"{path} is not a readable gzip file ({e}).") from e


def _parse_idx(path: pathlib.Path, magic: int, dims: tuple[int, ...]) -> np.ndarray:
  """Parses one IDX file: big-endian magic, a uint32 count per dimension, then uint8 data."""
  raw = _read_gz(path)
  header = 4 + 4 * (1 + len(dims))
  if len(raw) < header:
    raise _bad(path, f"{path} is truncated (no IDX header).")
  fields = np.frombuffer(raw, ">u4", count=1 + 1 + len(dims))
  if fields[0] != magic:
    raise _bad(path, f"{path} has IDX magic {int(fields[0]):#x}, expected {magic:#x}.")
  if tuple(int(d) for d in fields[2:]) != dims:
    raise _bad(path, f"{path} holds items of shape {tuple(fields[2:].tolist())}, expected {dims}.")
  count = int(fields[1])
  data = np.frombuffer(raw, np.uint8, offset=header)
  if data.size != count * int(np.prod(dims)):
    raise _bad(
      path,
      f"{path} is truncated or padded: header says {count} items, data holds {data.size} bytes.",
    )
  return data.reshape(count, *dims)


def read_idx_split(
  images_path: pathlib.Path, labels_path: pathlib.Path, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
  """Images uint8 [N, 28, 28] and labels uint8 [N] of one split's two IDX .gz files."""
  images = _parse_idx(images_path, 0x803, (28, 28))
  labels = _parse_idx(labels_path, 0x801, ())
  if len(images) != len(labels):
    raise _bad(
      images_path,
      f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} labels.",
    )
  if labels.size and labels.max() >= num_classes:
    raise _bad(labels_path, f"{labels_path} holds label {labels.max()}, expected < {num_classes}.")
  return images, labels


# ---------------------------------------------------------------------------------------------
# CIFAR: the official binary and python archives, and the project's JPEG copy.


def _read_members(archive: pathlib.Path, wanted: set[str]) -> dict[str, bytes]:
  try:
    with tarfile.open(archive, "r:gz") as tar:
      members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile() and m.name in wanted}
  except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
    raise _bad(archive, f"{archive} is not a readable tar.gz archive ({e}).") from e
  if missing := sorted(wanted - members.keys()):
    raise _bad(archive, f"{archive} lacks {', '.join(missing)}.")
  return members


class _ArrayUnpickler(pickle.Unpickler):
  """Unpickles plain data and numpy arrays only (CIFAR's python batches), never other code.

  `numpy.core` (the official Python 2 pickles) is numpy 2's `numpy._core`; `_codecs.encode` is how
  a Python 3 pickle of protocol 2 stores bytes."""

  def find_class(self, module: str, name: str):
    if (
      module.split(".")[0] == "numpy"
      and name in ("_reconstruct", "ndarray", "dtype")
      or (module, name) == ("_codecs", "encode")
    ):
      if hasattr(np, "_core"):
        module = module.replace("numpy.core", "numpy._core")
      return super().find_class(module, name)
    raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(archive: pathlib.Path, member: str, data: bytes) -> dict:
  try:
    batch = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
    raise _bad(archive, f"{archive}: {member} is not a CIFAR python batch ({e}).") from e
  if not isinstance(batch, dict):
    raise _bad(archive, f"{archive}: {member} is not a CIFAR python batch (a dict).")
  return batch


def _cifar_split(archive, official_name, members, keys, data: dict[str, bytes]):
  """(images uint8 [N, 32, 32, 3], {label key: labels [N]}) of one split's members."""
  if "binary" in official_name:
    record = len(keys) + _CIFAR_PIXELS
    raw = b"".join(data[m] for m in members)
    if len(raw) % record:
      raise _bad(
        archive,
        f"{archive}: {', '.join(members)} hold {len(raw)} bytes, not whole "
        f"{record}-byte records (truncated?).",
      )
    rows = np.frombuffer(raw, np.uint8).reshape(-1, record)
    pixels, labels = rows[:, len(keys) :], {k: rows[:, i] for i, k in enumerate(keys)}
  else:
    batches = [_unpickle(archive, m, data[m]) for m in members]
    pickle_keys = _PICKLE_KEYS[official_name]
    try:
      pixels = np.concatenate([np.asarray(b[b"data"], np.uint8) for b in batches])
      labels = {
        k: np.concatenate([np.asarray(b[pickle_keys[k][0]], np.int64) for b in batches])
        for k in keys
      }
    except (KeyError, ValueError, TypeError) as e:
      raise _bad(
        archive,
        f"{archive}: {', '.join(members)} lack CIFAR's data or labels ({type(e).__name__}: {e}).",
      ) from e
    if (
      pixels.ndim != 2
      or pixels.shape[1] != _CIFAR_PIXELS
      or any(len(v) != len(pixels) for v in labels.values())
    ):
      raise _bad(
        archive,
        f"{archive}: {', '.join(members)} hold data of shape {pixels.shape} "
        f"and {[len(v) for v in labels.values()]} labels, expected (N, 3072) and N.",
      )
  images = np.ascontiguousarray(pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
  return images, labels


def read_cifar(archive: pathlib.Path, official_name: str, num_classes: dict[str, int]):
  """Reads an official CIFAR archive, binary or python version, by its `official_name`.

  `num_classes` maps each label key ("label", and "coarse_label" for CIFAR-100) to its class
  count. Returns ({split: (images uint8 [N, 32, 32, 3], {key: labels [N]})}, {key: class names}).
  """
  top, train, test, name_files = CIFAR_LAYOUTS[official_name]
  keys = list(name_files)
  data = _read_members(archive, {f"{top}/{m}" for m in (*train, *test, *name_files.values())})
  data = {name.split("/", 1)[1]: value for name, value in data.items()}
  splits = {
    split: _cifar_split(archive, official_name, members, keys, data)
    for split, members in (("train", train), ("test", test))
  }
  if "binary" in official_name:
    names = {k: [n for n in data[f].decode().split("\n") if n] for k, f in name_files.items()}
  else:
    meta = _unpickle(archive, name_files[keys[0]], data[name_files[keys[0]]])
    names = {
      k: [
        n.decode() if isinstance(n, bytes) else str(n)
        for n in meta.get(_PICKLE_KEYS[official_name][k][1], [])
      ]
      for k in keys
    }
  for key, count in num_classes.items():
    if len(names[key]) != count:
      raise _bad(archive, f"{archive} names {len(names[key])} classes for {key}, expected {count}.")
    for split, (_, labels) in splits.items():
      if labels[key].size and labels[key].max() >= count:
        raise _bad(
          archive, f"{archive}: {split} holds {key} {labels[key].max()}, expected < {count}."
        )
  return splits, names


def read_cifar10_jpeg(archive: pathlib.Path) -> dict[str, list[tuple[str, bytes, int]]]:
  """Returns split -> [(member name, JPEG bytes, label)], every image checked to decode."""
  pattern = re.compile(r"^(train|test)/([^/]+)/[^/]+\.jpg$")
  splits: dict[str, list[tuple[str, bytes, int]]] = {"train": [], "test": []}
  try:
    with tarfile.open(archive, "r:gz") as tar:
      for member in tar:
        if not member.isfile():
          continue
        match = pattern.match(member.name)
        if not match or match.group(2) not in CIFAR10_CLASSES:
          raise _bad(
            archive,
            f"{archive} holds an unexpected member {member.name!r}; expected "
            "(train|test)/<class>/<n>.jpg.",
          )
        data = tar.extractfile(member).read()
        try:
          with PIL.Image.open(io.BytesIO(data)) as image:
            image.load()
            ok = image.format == "JPEG" and image.mode == "RGB" and image.size == (32, 32)
        except (OSError, SyntaxError):
          ok = False
        if not ok:
          raise _bad(archive, f"{archive}: {member.name} is not a 32x32 RGB JPEG.")
        splits[match.group(1)].append((member.name, data, CIFAR10_CLASSES.index(match.group(2))))
  except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
    raise _bad(archive, f"{archive} is not a readable tar.gz archive ({e}).") from e
  for split, examples in splits.items():
    if not examples:
      raise _bad(archive, f"{archive} holds no {split}/ images.")
  return splits


# Published on https://www.cs.toronto.edu/~kriz/cifar.html; tfds registers only the binary ones.
PYTHON_ARCHIVE_MD5 = {
  "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
  "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
}
