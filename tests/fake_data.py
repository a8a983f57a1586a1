"""Small synthetic datasets in the exact official archive formats, made by the tests.

IDX images are filled with 3 * id so a batch row tells which example it is; a bright left stripe
makes flips visible. CIFAR archives hold random images with the official member names, record
layouts (binary) and pickled dicts (python version, protocol 2 with bytes keys as in the
official Python 2 pickles).
"""

import gzip
import hashlib
import io
import pathlib
import pickle
import struct
import tarfile

import numpy as np
import PIL.Image

from fmcejax import archives

N_TRAIN, N_TEST = 64, 32
CIFAR_TRAIN, CIFAR_TEST = 50, 20  # CIFAR-10's train split is 5 batches of 10 here


def write_idx(path: pathlib.Path, array: np.ndarray, magic: int) -> None:
  header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def write_fake_idx(
  directory: pathlib.Path, n_train: int = N_TRAIN, n_test: int = N_TEST
) -> pathlib.Path:
  directory.mkdir(parents=True, exist_ok=True)
  for split, n in (("train", n_train), ("test", n_test)):
    ids = np.arange(n)
    images = np.repeat(3 * ids, 28 * 28).reshape(n, 28, 28)
    images[:, :, :3] = 255
    images_name, labels_name = archives.IDX_FILES[split]
    write_idx(directory / images_name, images, 0x803)
    write_idx(directory / labels_name, ids % 10, 0x801)
  return directory


def ids_of(images: np.ndarray) -> np.ndarray:
  return images[:, 14, 14, 0].astype(np.int64) // 3


def write_fake_cifar_jpeg(path: pathlib.Path, per_class: dict[str, int]) -> dict[bytes, int]:
  """A cifar10-jpeg.tar.gz of noise JPEGs; returns {JPEG bytes: label}."""
  rng = np.random.default_rng(0)
  jpegs = {}
  with tarfile.open(path, "w:gz") as tar:
    for split, count in per_class.items():
      for label, name in enumerate(archives.CIFAR10_CLASSES):
        for i in range(count):
          buffer = io.BytesIO()
          PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(
            buffer, format="JPEG", quality=75
          )
          data = buffer.getvalue()
          member = tarfile.TarInfo(f"{split}/{name}/{i:04d}.jpg")
          member.size = len(data)
          tar.addfile(member, io.BytesIO(data))
          jpegs[data] = label
  return jpegs


def cifar_data(dataset: str, seed: int = 0):
  """({split: (images uint8 [N, 32, 32, 3], {label key: labels})}, {label key: names})."""
  rng = np.random.default_rng(seed)
  counts = {"label": 10} if dataset == "cifar10" else {"coarse_label": 20, "label": 100}
  splits = {
    split: (
      rng.integers(0, 256, (n, 32, 32, 3), np.uint8),
      {key: rng.integers(0, c, n).astype(np.uint8) for key, c in counts.items()},
    )
    for split, n in (("train", CIFAR_TRAIN), ("test", CIFAR_TEST))
  }
  if dataset == "cifar10":
    names = {"label": list(archives.CIFAR10_CLASSES)}
  else:
    names = {
      "coarse_label": [f"super_{i}" for i in range(20)],
      "label": [f"class_{i}" for i in range(100)],
    }
  return splits, names


def _tar_gz(members: dict[str, bytes]) -> bytes:
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return buffer.getvalue()


def _chunks(n: int, parts: int) -> list[slice]:
  return [slice(i * n // parts, (i + 1) * n // parts) for i in range(parts)]


def _pickle(batch: dict) -> bytes:
  """Protocol 2 naming numpy's module as the official pickles do (numpy 1's `numpy.core`)."""
  return pickle.dumps(batch, protocol=2).replace(b"numpy._core.", b"numpy.core.")


def cifar_archive(archive: str, data) -> bytes:
  """The bytes of an official-format CIFAR archive (`archive` is its official file name)."""
  splits, names = data
  top, train_members, test_members, name_files = archives.CIFAR_LAYOUTS[archive]
  keys = list(name_files)
  members = {}
  for split, split_members in (("train", train_members), ("test", test_members)):
    images, labels = splits[split]
    planar = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # channel-major rows
    for member, part in zip(split_members, _chunks(len(images), len(split_members))):
      if "binary" in archive:
        rows = np.concatenate([np.stack([labels[k][part] for k in keys], 1), planar[part]], 1)
        members[f"{top}/{member}"] = rows.astype(np.uint8).tobytes()
      else:
        batch = {
          b"batch_label": f"{split} batch".encode(),
          b"data": planar[part],
          b"filenames": [f"{i}.png".encode() for i in range(part.start, part.stop)],
        }
        if archive.startswith("cifar-10-"):
          batch[b"labels"] = [int(v) for v in labels["label"][part]]
        else:
          batch[b"fine_labels"] = [int(v) for v in labels["label"][part]]
          batch[b"coarse_labels"] = [int(v) for v in labels["coarse_label"][part]]
        members[f"{top}/{member}"] = _pickle(batch)
  if "binary" in archive:
    for key, member in name_files.items():
      members[f"{top}/{member}"] = ("\n".join(names[key]) + "\n\n").encode()
  elif archive.startswith("cifar-10-"):
    members[f"{top}/batches.meta"] = _pickle(
      {
        b"num_cases_per_batch": 10,
        b"label_names": [n.encode() for n in names["label"]],
        b"num_vis": 3072,
      }
    )
  else:
    members[f"{top}/meta"] = _pickle(
      {
        b"fine_label_names": [n.encode() for n in names["label"]],
        b"coarse_label_names": [n.encode() for n in names["coarse_label"]],
      }
    )
  members[f"{top}/readme.html"] = b"<html>synthetic</html>"
  return _tar_gz(members)


def sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def md5(data: bytes) -> str:
  return hashlib.md5(data).hexdigest()


def prepare_fake_mnist(root: pathlib.Path):
  """Small MNIST in the official IDX format under `root`, prepared offline:
  (`DatasetInfo`, tfds_data_dir)."""
  from fmcejax import datasets

  write_fake_idx(root / "archives" / "mnist")
  tfds_dir = str(root / "tfds")
  return datasets.prepare("mnist", str(root / "archives"), tfds_dir, download=False), tfds_dir


def write_fake_tfds(
  tfds_dir: pathlib.Path,
  name: str,
  *,
  sizes=((20, 20), (24, 28)),
  counts=(("train", 48), ("test", 24)),
  class_label: bool = True,
) -> None:
  """A tfds dataset under a name fmcejax does not know, prepared (array_record, no TensorFlow)
  in `tfds_dir`: 3 classes, RGB images of `sizes` in turn, pixels brighter with the label."""
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core import registered

  label = tfds.features.ClassLabel(names=["a", "b", "c"]) if class_label else np.int64

  with registered.skip_registration():

    class Fake(tfds.core.GeneratorBasedBuilder):
      VERSION = tfds.core.Version("1.0.0")

      def _info(self):
        features = {"image": tfds.features.Image(shape=(None, None, 3)), "label": label}
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

      def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split, n) for split, n in counts}

      def _generate_examples(self, split, n):
        rng = np.random.default_rng(len(split))
        for i in range(n):
          h, w = sizes[i % len(sizes)]
          image = rng.integers(0, 100, (h, w, 3)) + 70 * (i % 3)
          yield i, {"image": PIL.Image.fromarray(image.astype(np.uint8)), "label": i % 3}

  Fake.name = name
  Fake(data_dir=str(tfds_dir), file_format="array_record").download_and_prepare()
