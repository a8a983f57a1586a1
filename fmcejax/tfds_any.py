"""Any tfds image-classification dataset: its fields read from the builder's info, its channel
statistics computed once and stored beside the prepared data, its images brought to one shape.

A dataset is named as tfds names it (`NAME`, `NAME:VERSION`, `NAME/CONFIG`) and read by
`tfds.data_source`, without TensorFlow. tfds's catalogue holds the registered datasets; one it
does not know is read from its prepared files (tfds's read-only builder), so a dataset prepared
elsewhere, or a folder prepared by `folder_data`, reads the same.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds
from etils import epath

from fmcejax.archives import DataError

STATS_FILE = "fmcejax_stats.json"  # beside the prepared data: {"<split>|<image>|<HxW>": stats}
STATS_EXAMPLES = 5000  # a fixed subset of the training split gives the channel statistics
STATS_SEED = 0


@dataclasses.dataclass(frozen=True)
class Fields:
  """The config fields that pick what to read from a tfds dataset or a folder; empty means
  the only Image / ClassLabel feature, the `train` split and `test` (else `validation`)."""

  train_split: str = ""
  test_split: str = ""
  image_key: str = ""
  label_key: str = ""
  image_size: int = 0

  @classmethod
  def from_config(cls, config) -> Fields:
    return cls(**{f.name: config[f.name] for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class Described:
  """What the pipeline needs from a dataset's info, before its statistics."""

  num_classes: int
  image_shape: tuple[int, int, int]
  train_split: str
  test_split: str
  image_key: str
  label_key: str
  num_train: int
  num_test: int


def builder(name: str, tfds_data_dir: str) -> tfds.core.DatasetBuilder:
  """tfds's builder of `name` (catalogue, else its prepared files), or DataError."""
  try:
    return tfds.builder(name, data_dir=tfds_data_dir or None)
  except Exception as e:  # noqa: BLE001 - unknown names, bad versions or configs alike
    raise DataError(
      "dataset",
      name,
      f"tfds finds no dataset {name!r}, in its catalogue or prepared under "
      f"{tfds_data_dir or 'its default data dir'} ({type(e).__name__}: "
      f"{str(e).splitlines()[0]}).",
      "mnist | fashion_mnist | cifar10 | cifar10_jpeg | cifar100 | a tfds image-classification "
      "dataset NAME, NAME:VERSION or NAME/CONFIG | folder:PATH",
    ) from None


def not_prepared(
  name: str, b: tfds.core.DatasetBuilder, tfds_data_dir: str, download: bool
) -> DataError | None:
  """None when `prepare` can go ahead: prepared, or tfds will prepare it (TensorFlow installed,
  downloads allowed); else the error naming the `tfds build` command and where to copy."""
  if b.is_prepared() or (download and importlib.util.find_spec("tensorflow") is not None):
    return None
  root = epath.Path(tfds_data_dir or tfds.core.constants.DATA_DIR).expanduser()
  return DataError(
    "dataset",
    name,
    f"{name} is not prepared at {b.data_dir}, and tfds needs TensorFlow to prepare it"
    + ("" if download else " (and download=False)")
    + ". On a machine with TensorFlow run `tfds build "
    f"{name} --file_format=array_record`, then copy its ~/tensorflow_datasets/{b.name}/ to "
    f"{root}/{b.name}/ (or set tfds_data_dir to where it is).",
    f"a dataset prepared in {root}, or TensorFlow installed (`pip install tensorflow`) and "
    "download=True",
  )


def _key(features, kind: type, field: str, value: str, name: str) -> str:
  found = [k for k, f in features.items() if isinstance(f, kind)]
  if value:
    if value not in found:
      raise DataError(
        field, value, f"{name} has no {kind.__name__} feature {value!r}.", " | ".join(found)
      )
    return value
  if len(found) != 1:
    how = "one of " + ", ".join(found) if found else "a dataset with one"
    raise DataError(
      field,
      value,
      f"{name} has {len(found)} {kind.__name__} features ({', '.join(features.keys())}); "
      f"fmcejax needs one image and one class label.",
      f"{how} {kind.__name__} feature",
    )
  return found[0]


def _split(b: tfds.core.DatasetBuilder, field: str, value: str, defaults: tuple[str, ...]) -> str:
  names = list(b.info.splits.keys())
  value = value or next((d for d in defaults if d in names), defaults[0])
  try:
    b.info.splits[value].num_examples
  except Exception as e:  # noqa: BLE001 - tfds raises several types for a bad split spec
    raise DataError(
      field,
      value,
      f"{b.name} has no split {value!r} ({e}).",
      f"one of {', '.join(names) or '(none prepared)'}, in tfds split syntax (e.g. train[:90%])",
    ) from None
  return value


def describe(name: str, b: tfds.core.DatasetBuilder, fields: Fields) -> Described:
  """The label count, image shape, splits and features of `b`; DataError naming the field."""
  features = b.info.features
  image = _key(features, tfds.features.Image, "image_key", fields.image_key, name)
  label = _key(features, tfds.features.ClassLabel, "label_key", fields.label_key, name)
  height, width, channels = features[image].shape
  if fields.image_size:
    height = width = fields.image_size
  elif height is None or width is None:
    raise DataError(
      "image_size",
      0,
      f"The images of {name} vary in size ({features[image].shape}).",
      "an integer > 0: every image is resized to image_size x image_size",
    )
  train = _split(b, "train_split", fields.train_split, ("train",))
  test = _split(b, "test_split", fields.test_split, ("test", "validation"))
  return Described(
    num_classes=features[label].num_classes,
    image_shape=(height, width, channels),
    train_split=train,
    test_split=test,
    image_key=image,
    label_key=label,
    num_train=b.info.splits[train].num_examples,
    num_test=b.info.splits[test].num_examples,
  )


def fit_image(image: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """`image` at `shape` (H, W, C): as it is when it has it, else resized (PIL, bilinear)."""
  if image.shape == tuple(shape):
    return image
  resized = PIL.Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).resize(
    (shape[1], shape[0]), PIL.Image.BILINEAR
  )
  return np.asarray(resized).reshape(shape)


def channel_stats(
  name: str, d: Described, data_dir: epath.PathLike, tfds_data_dir: str
) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and std ([0, 1] units) of a fixed subset of the training split, as the
  model sees it; computed once and stored in `data_dir`/STATS_FILE (the prepared data's
  directory), so every run and host normalises alike. Call on process 0 first."""
  path = epath.Path(data_dir) / STATS_FILE
  key = f"{d.train_split}|{d.image_key}|{d.image_shape[0]}x{d.image_shape[1]}"
  stored = json.loads(path.read_text()) if path.exists() else {}
  if key not in stored:
    source = tfds.data_source(name, split=d.train_split, data_dir=tfds_data_dir or None)
    rng = np.random.default_rng(STATS_SEED)
    n = min(STATS_EXAMPLES, len(source))
    indices = np.sort(rng.choice(len(source), n, replace=False)).tolist()
    images = np.stack(
      [fit_image(e[d.image_key], d.image_shape) for e in source.__getitems__(indices)]
    )
    pixels = images.reshape(-1, d.image_shape[-1]).astype(np.float64) / 255.0
    stored[key] = {"mean": pixels.mean(0).tolist(), "std": pixels.std(0).tolist(), "examples": n}
    try:
      path.write_text(json.dumps(stored, indent=1))
    except OSError as e:  # a read-only copy of prepared data: recomputed by each run
      logging.warning("cannot store the channel statistics in %s: %s", path, e)
  std = tuple(max(s, 1e-3) for s in stored[key]["std"])  # a constant channel divides by 1e-3
  return tuple(stored[key]["mean"]), std
