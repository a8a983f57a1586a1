"""Datasets: preparing tfds datasets without TensorFlow, from local archives or tfds's downloads.

tfds is the catalogue and the on-disk format: `<tfds_data_dir>/<name>/<version>` in array_record,
read by `tfds.data_source` without TensorFlow (input_pipeline.py loads it). tfds's own mnist,
fashion_mnist, cifar10 and cifar100 builders need TensorFlow only to read the files they
download, so the builders here subclass them (same name, version, features, official URLs and
registered checksums; not registered, so tfds's stay the catalogue entries) and read the files
with numpy/PIL. The prepared directory is the standard one: data prepared by tfds's own builders
(with TensorFlow) reads the same. `cifar10_jpeg`, a JPEG copy of CIFAR-10, is a dataset of its own
so no result on it is mistaken for the official CIFAR-10. Archive formats: archives.py.

Lookup order of `prepare`: already prepared, then local archives, then a download through tfds's
download manager (official URLs and checksums, its download dir `<tfds_data_dir>/downloads`, its
cache and retries), unless `download=False`.

Any other name is a tfds image-classification dataset prepared in `tfds_data_dir` (tfds_any.py),
and `folder:PATH` a folder of images prepared there once (folder_data.py); their fields come
from the builder's info, their channel statistics from the training split.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from urllib import parse

import tensorflow_datasets as tfds

from fmcejax import builders, folder_data, tfds_any
from fmcejax.archives import CIFAR10_JPEG_ARCHIVE, IDX_FILES, DataError
from fmcejax.tfds_any import Fields

DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar10_jpeg", "cifar100")
DOWNLOADABLE = ("mnist", "fashion_mnist", "cifar10", "cifar100")
DOWNLOAD = "download"  # `check_available`'s answer when `prepare` will download
DATA_DIR_ENV = "FMCEJAX_DATA_DIR"
# Searched after $FMCEJAX_DATA_DIR when `data_dir` is empty (relative to the working directory).
SEARCH_DIRS = ("./data", "../shared/data")
DEBIAN_FASHION_MNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")
# The official CIFAR archives accepted offline: the binary version (tfds's own source, checked
# against tfds's registered checksum) and the python version (checked against the MD5 in
# archives.PYTHON_ARCHIVE_MD5). In each searched root, looked for as <root>/<archive>, then as
# <root>/<dataset>/<archive>, the binary before the python version.
CIFAR_ARCHIVES = {
  "cifar10": ("cifar-10-binary.tar.gz", "cifar-10-python.tar.gz"),
  "cifar100": ("cifar-100-binary.tar.gz", "cifar-100-python.tar.gz"),
}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model, the device-side normalisation and the step counts need about a dataset."""

  name: str
  tfds_name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  mean: tuple[float, ...]  # per channel, [0, 1] pixel units
  std: tuple[float, ...]
  num_train: int
  num_test: int
  augment: bool  # random crop (pad 4) + horizontal flip by default
  note: str = ""  # caveat to print next to any result measured on this data
  train_split: str = "train"  # tfds split syntax
  test_split: str = "test"
  image_key: str = "image"
  label_key: str = "label"


# Canonical values; `prepare` replaces the counts by those of the prepared data.
DATASET_INFO = {
  "mnist": DatasetInfo(
    "mnist", "mnist", 10, (28, 28, 1), (0.1307,), (0.3081,), 60000, 10000, False
  ),
  "fashion_mnist": DatasetInfo(
    "fashion_mnist", "fashion_mnist", 10, (28, 28, 1), (0.2860,), (0.3530,), 60000, 10000, False
  ),
  "cifar10": DatasetInfo(
    "cifar10",
    "cifar10",
    10,
    (32, 32, 3),
    (0.4914, 0.4822, 0.4465),
    (0.2470, 0.2435, 0.2616),
    50000,
    10000,
    True,
  ),
  "cifar100": DatasetInfo(
    "cifar100",
    "cifar100",
    100,
    (32, 32, 3),
    (0.5071, 0.4865, 0.4409),
    (0.2673, 0.2564, 0.2762),
    50000,
    10000,
    True,
  ),
}


# The JPEG copy: CIFAR-10's shape and statistics under a name of its own.
DATASET_INFO["cifar10_jpeg"] = dataclasses.replace(
  DATASET_INFO["cifar10"],
  name="cifar10_jpeg",
  tfds_name="cifar10_jpeg",
  note="JPEG copy of CIFAR-10, not the official files",
)


# ---------------------------------------------------------------------------------------------
# Finding and preparing data.


def _check_name(dataset: str) -> None:
  if dataset not in DATASETS:
    raise DataError("dataset", dataset, f"Unknown dataset {dataset!r}.", ", ".join(DATASETS))


def search_roots(data_dir: str = "") -> list[pathlib.Path]:
  """Where local archives are looked for: `data_dir`, or with it empty `$FMCEJAX_DATA_DIR`,
  `./data`, `../shared/data` (relative to the working directory)."""
  if data_dir:
    roots = [data_dir]
  else:
    roots = [os.environ[DATA_DIR_ENV]] if os.environ.get(DATA_DIR_ENV) else []
    roots += SEARCH_DIRS
  return [pathlib.Path(root).expanduser().resolve() for root in roots]


def _candidates(dataset: str, data_dir: str) -> list[pathlib.Path]:
  """Where the local source of `dataset` may be: a directory of IDX files or a tar.gz."""
  roots = search_roots(data_dir)
  if dataset == "cifar10_jpeg":
    return [root / CIFAR10_JPEG_ARCHIVE for root in roots]
  if dataset in CIFAR_ARCHIVES:
    return [
      place / name
      for root in roots
      for place in (root, root / dataset)
      for name in CIFAR_ARCHIVES[dataset]
    ]
  places = [root / dataset for root in roots]
  return places + ([DEBIAN_FASHION_MNIST] if dataset == "fashion_mnist" and not data_dir else [])


def find_archives(dataset: str, data_dir: str) -> pathlib.Path | None:
  """The first local source of `dataset` (directory of IDX files, or the tar.gz), else None.

  Only checks that the files exist (cheap, for input validation before compiling); `prepare`
  validates their content. `data_dir` empty searches `$FMCEJAX_DATA_DIR`, `./data`,
  `../shared/data` and, for fashion_mnist, `/usr/share/datasets/fashion-mnist`.
  """
  _check_name(dataset)
  for place in _candidates(dataset, data_dir):
    if dataset in ("mnist", "fashion_mnist"):
      if all((place / name).is_file() for name in sum(IDX_FILES.values(), ())):
        return place
    elif place.is_file():
      return place
  return None


def _builder(dataset: str, tfds_data_dir: str) -> tfds.core.DatasetBuilder:
  """The catalogue builder (reads; tfds chooses the data dir when `tfds_data_dir` is empty)."""
  return tfds.builder(dataset, data_dir=tfds_data_dir or None)


def is_prepared(dataset: str, tfds_data_dir: str = "") -> bool:
  """Whether `dataset` is fully prepared (tfds renames a finished preparation into place)."""
  _check_name(dataset)
  return _builder(dataset, tfds_data_dir).is_prepared()


def _files_wanted(dataset: str) -> str:
  if dataset == "cifar10_jpeg":
    return f"{CIFAR10_JPEG_ARCHIVE} (train/<class>/NNNN.jpg, test/<class>/NNNN.jpg) in <data_dir>/"
  if dataset in CIFAR_ARCHIVES:
    return (
      f"the official {' or '.join(CIFAR_ARCHIVES[dataset])} in <data_dir>/ or <data_dir>/{dataset}/"
    )
  return (
    f"the four official files {', '.join(sum(IDX_FILES.values(), ()))} in <data_dir>/{dataset}/"
  )


def _missing(
  dataset: str,
  data_dir: str,
  tfds_data_dir: str,
  download: bool,
  failed: builders.DownloadFailed | None = None,
) -> DataError:
  """The one error naming all three ways: prepared, local archives, download."""
  builder = _builder(dataset, tfds_data_dir)
  searched = ", ".join(str(p) for p in _candidates(dataset, data_dir))
  if failed is not None:
    how = (
      f"Downloading {failed.url} into {failed.target} failed "
      f"({type(failed.cause).__name__}: {failed.cause}); nothing of it was kept, so the same "
      "command downloads it again."
    )
  elif dataset not in DOWNLOADABLE:
    how = "It cannot be downloaded (a JPEG copy made for this project)."
  else:
    how = "Downloads are off (download=False); with download=True tfds downloads it."
  if dataset == "cifar10":
    how += " Offline without the official archives, cifar10_jpeg (the JPEG copy) works."
  debian = (
    f" (or run `apt-get install dataset-fashion-mnist`, found at {DEBIAN_FASHION_MNIST})"
    if dataset == "fashion_mnist"
    else ""
  )
  accepted = (
    f"a data_dir with {_files_wanted(dataset)}{debian}; with data_dir empty, "
    f"${DATA_DIR_ENV}, {', '.join(SEARCH_DIRS)} are searched"
  )
  if failed is not None:
    accepted = (
      f"a connection to {parse.urlsplit(failed.url).netloc} (through HTTPS_PROXY / "
      f"HTTP_PROXY if needed), then the same command again; or {accepted}"
    )
  elif dataset in DOWNLOADABLE:
    accepted += "; or download=True on a connected machine"
  return DataError(
    "download" if failed else "data_dir",
    failed.url if failed else data_dir,
    f"{dataset} is not prepared at {builder.data_dir} (or copy a directory prepared by `tfds "
    f"build {builder.name} --file_format=array_record` there), no local files were found "
    f"(searched: {searched}). {how}",
    accepted,
  )


def check_available(
  dataset: str, data_dir: str = "", tfds_data_dir: str = "", download: bool = True
) -> pathlib.Path | str | None:
  """Where `prepare` will take `dataset` from, or DataError naming every way when none is open.

  Cheap (config validation runs it before anything compiles): it looks for files, never reads
  or downloads them. Returns None when the dataset is already prepared, the local archive
  `prepare` will read, or DOWNLOAD when `prepare` will download it. A folder is listed (and
  checked); another tfds dataset must be prepared, or TensorFlow there to prepare it.
  """
  if dataset.startswith(folder_data.PREFIX):
    folder_data.scan(dataset)
    return None
  if not is_builtin(dataset):
    b = tfds_any.builder(dataset, tfds_data_dir)
    error = tfds_any.not_prepared(dataset, b, tfds_data_dir, download)
    if error is not None:
      raise error
    return None if b.is_prepared() else DOWNLOAD
  if is_prepared(dataset, tfds_data_dir):
    return None
  source = find_archives(dataset, data_dir)
  if source is not None:
    return source
  if download and dataset in DOWNLOADABLE:
    return DOWNLOAD
  raise _missing(dataset, data_dir, tfds_data_dir, download)


def prepare(
  dataset: str,
  data_dir: str = "",
  tfds_data_dir: str = "",
  download: bool = True,
  fields: Fields = Fields(),
) -> DatasetInfo:
  """Prepares `dataset` if needed (idempotent) and returns its info.

  A folder (`folder:PATH`) is prepared unless prepared with its current fingerprint; another tfds
  dataset must be prepared, or tfds prepares it where TensorFlow is installed. Their channel
  statistics are computed once from the training split and stored beside the data.

  Already prepared at `<tfds_data_dir>/<name>/<version>`: used as it is. Else the first local
  archive (`find_archives`), else (mnist, fashion_mnist, cifar10, cifar100, unless `download` is
  False) the official files through tfds's download manager, cached in
  `<tfds_data_dir>/downloads` and checked against tfds's registered checksums. tfds writes into a
  temporary sibling directory and renames it into place only on success, and a failed download
  is not kept, so a failure leaves nothing `is_prepared` accepts and a re-run starts over.

  Multi-host: call it on process 0 first, then (after a barrier) on the others. On a shared
  `tfds_data_dir` they find it prepared, so nothing is downloaded twice; on per-host disks each
  host prepares its own copy. Should two processes still prepare the same directory at once,
  the one whose rename loses finds it prepared and carries on.
  """
  if dataset.startswith(folder_data.PREFIX):
    return _info(dataset, folder_data.prepare(dataset, tfds_data_dir), tfds_data_dir, fields)
  source = check_available(dataset, data_dir, tfds_data_dir, download)
  if not is_builtin(dataset):
    if source == DOWNLOAD:  # TensorFlow is installed: tfds prepares it as usual
      tfds.builder(
        dataset, data_dir=tfds_data_dir or None, file_format="array_record"
      ).download_and_prepare()
    return _info(dataset, dataset, tfds_data_dir, fields)
  if source is not None:
    local = source if isinstance(source, pathlib.Path) else None  # else DOWNLOAD
    builder = builders.BUILDERS[dataset](
      source=local, data_dir=tfds_data_dir or None, file_format="array_record"
    )
    try:
      builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(force_checksums_validation=True)
      )
    except builders.DownloadFailed as e:
      raise _missing(dataset, data_dir, tfds_data_dir, download, e) from e.cause
    except OSError:
      if not is_prepared(dataset, tfds_data_dir):  # else another process finished it first
        raise
  splits = _builder(dataset, tfds_data_dir).info.splits
  return dataclasses.replace(
    DATASET_INFO[dataset],
    num_train=splits["train"].num_examples,
    num_test=splits["test"].num_examples,
  )


def is_builtin(dataset: str) -> bool:
  """One of the five datasets with offline archives (else a tfds dataset or a folder)."""
  return dataset in DATASETS


def _info(
  dataset: str, name: str, tfds_data_dir: str, fields: Fields, stats: bool = True
) -> DatasetInfo:
  """The info of a prepared tfds dataset `name`; its channel statistics when `stats`, else
  mean 0, std 1 (validation needs no statistics)."""
  builder = tfds_any.builder(name, tfds_data_dir)
  d = tfds_any.describe(dataset, builder, fields)
  channels = d.image_shape[-1]
  mean, std = (0.0,) * channels, (1.0,) * channels
  if stats:
    mean, std = tfds_any.channel_stats(name, d, builder.data_dir, tfds_data_dir)
  return _from_described(dataset, name, d, mean, std)


def _from_described(dataset, name, d: tfds_any.Described, mean, std) -> DatasetInfo:
  return DatasetInfo(
    name=dataset,
    tfds_name=name,
    num_classes=d.num_classes,
    image_shape=d.image_shape,
    mean=mean,
    std=std,
    num_train=d.num_train,
    num_test=d.num_test,
    augment=False,
    train_split=d.train_split,
    test_split=d.test_split,
    image_key=d.image_key,
    label_key=d.label_key,
  )


def describe(dataset: str, tfds_data_dir: str = "", fields: Fields = Fields()) -> DatasetInfo:
  """What validation needs (classes, image shape, split sizes) without preparing anything or
  touching a device: the canonical info of a built-in dataset, a tfds dataset's from its
  builder, a folder's from its listing unless prepared as it is now. Statistics: `prepare`."""
  if is_builtin(dataset):
    return DATASET_INFO[dataset]
  if dataset.startswith(folder_data.PREFIX):
    scanned = folder_data.scan(dataset)
    name = folder_data.tfds_name(dataset)
    if not folder_data.is_current(dataset, tfds_data_dir, scanned):
      d = folder_data.describe(dataset, scanned, fields.image_size)
      channels = d.image_shape[-1]
      return _from_described(dataset, name, d, (0.0,) * channels, (1.0,) * channels)
    return _info(dataset, name, tfds_data_dir, fields, stats=False)
  check_available(dataset, "", tfds_data_dir, download=True)
  return _info(dataset, dataset, tfds_data_dir, fields, stats=False)
