"""tfds's builders of the datasets, without TensorFlow: tfds's own mnist, fashion_mnist, cifar10
and cifar100 builders (same name, version, features, official URLs and registered checksums; not
registered, so tfds's stay the catalogue entries) with the file reading replaced by numpy/PIL
(`archives`), and the builder of `cifar10_jpeg`. `source` is the local archive (a directory of IDX
files, or a CIFAR tar.gz); None downloads through tfds's download manager."""

from __future__ import annotations

import hashlib
import pathlib
import shutil
from urllib import parse

import PIL.Image
import tensorflow_datasets as tfds
from tensorflow_datasets.core import registered
from tensorflow_datasets.core import utils as tfds_utils
from tensorflow_datasets.core.download import checksums as tfds_checksums
from tensorflow_datasets.core.download import download_manager as tfds_download_manager
from tensorflow_datasets.image_classification import cifar as tfds_cifar
from tensorflow_datasets.image_classification import mnist as tfds_mnist

from fmcejax import archives
from fmcejax.archives import CIFAR10_CLASSES, IDX_FILES


class DownloadFailed(Exception):
  """Raised inside tfds's preparation; `prepare` turns it into the DataError naming every way."""

  def __init__(self, url: str, target: pathlib.Path, cause: Exception):
    super().__init__(url)
    self.url, self.target, self.cause = url, target, cause


class _OfficialSource:
  """Mixin: a local source or tfds's download manager, checked against tfds's checksums."""

  def __init__(self, *, source: pathlib.Path | None = None, **kwargs):
    super().__init__(**kwargs)
    self._source = source

  @tfds_utils.classproperty
  @classmethod
  def url_infos(cls) -> dict[str, tfds_checksums.UrlInfo]:
    """tfds's registered checksums of the official URLs. tfds looks them up next to a builder's
    code, which for these subclasses is fmcejax/, so they are taken from tfds's parent class."""
    parent = next(c for c in cls.__mro__ if c.__module__.startswith("tensorflow_datasets."))
    return parent.url_infos

  def _download(self, dl_manager: tfds.download.DownloadManager, url: str) -> pathlib.Path:
    """One official file, cached in tfds's download dir; nothing is kept of a failed one."""
    target = pathlib.Path(dl_manager.download_dir) / self.name
    try:
      return pathlib.Path(dl_manager.download(url))
    except (
      OSError,
      ValueError,
      tfds_download_manager.NonMatchingChecksumError,
      tfds.download.DownloadError,
    ) as e:
      for partial in target.glob("*.tmp.*"):  # tfds leaves a failed download's temporary dir
        shutil.rmtree(partial, ignore_errors=True)
      raise DownloadFailed(url, target, e) from e


class _IdxFiles(_OfficialSource):
  """Mixin for tfds's MNIST builders: the four official IDX .gz files, parsed with numpy and
  yielded as PIL images (so tfds PNG-encodes with PIL rather than with TensorFlow). Local files
  are read without a checksum (validated by parsing), so re-gzipped copies such as Debian's work."""

  def _split_generators(self, dl_manager):
    names = sum(IDX_FILES.values(), ())
    if self._source is not None:
      paths = {name: self._source / name for name in names}
    else:
      paths = {name: self._download(dl_manager, parse.urljoin(self.URL, name)) for name in names}
    num_classes = self.info.features["label"].num_classes
    # Read (and so validate) everything before tfds writes anything.
    arrays = {
      split: archives.read_idx_split(paths[images], paths[labels], num_classes)
      for split, (images, labels) in IDX_FILES.items()
    }
    return {split: self._generate_examples(*arrays[split]) for split in IDX_FILES}

  def _generate_examples(self, images, labels):
    for index, (image, label) in enumerate(zip(images, labels)):
      yield index, {"image": PIL.Image.fromarray(image), "label": int(label)}


class _CifarArchive(_OfficialSource):
  """Mixin for tfds's CIFAR builders: the official binary archive (downloaded or local) or the
  python one (local), checked against its official checksum and read with tarfile/numpy."""

  def _split_generators(self, dl_manager):
    url = self._cifar_info.url
    if self._source is None:
      archive, name = self._download(dl_manager, url), url.rsplit("/", 1)[-1]
    else:
      archive, name = self._source, self._source.name
      registered = {info.filename: info.checksum for info in self.url_infos.values()}
      if name in registered:
        archives.check_checksum(archive, hashlib.sha256, registered[name])
      else:
        archives.check_checksum(archive, hashlib.md5, archives.PYTHON_ARCHIVE_MD5[name])
    num_classes = {key: self.info.features[key].num_classes for key in self._cifar_info.label_keys}
    splits, names = archives.read_cifar(archive, name, num_classes)
    for key, label_names in names.items():  # as tfds's builder does, from the archive
      self.info.features[key].names = label_names
    return {split: self._generate_examples(split, *arrays) for split, arrays in splits.items()}

  def _generate_examples(self, split, images, labels):
    for index, image in enumerate(images):
      yield (
        index,
        {
          "id": f"{split}_{index:05d}",
          "image": PIL.Image.fromarray(image),
          **{key: int(values[index]) for key, values in labels.items()},
        },
      )


with registered.skip_registration():

  class _Mnist(_IdxFiles, tfds_mnist.MNIST):
    name = "mnist"

  class _FashionMnist(_IdxFiles, tfds_mnist.FashionMNIST):
    name = "fashion_mnist"

  class _Cifar10(_CifarArchive, tfds_cifar.Cifar10):
    name = "cifar10"

  class _Cifar100(_CifarArchive, tfds_cifar.Cifar100):
    name = "cifar100"


class Cifar10Jpeg(tfds.core.GeneratorBasedBuilder):
  """CIFAR-10 from the JPEG copy (`cifar10-jpeg.tar.gz`); its own name so it is never mistaken
  for the official `cifar10`. The JPEG bytes are stored unchanged (no second lossy encode)."""

  name = "cifar10_jpeg"
  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *, source: pathlib.Path | None = None, **kwargs):
    super().__init__(**kwargs)
    self._source = source

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="CIFAR-10 re-encoded as 32x32 JPEG (about quality 75); pixels differ "
      "slightly from the official binary.",
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(32, 32, 3), encoding_format="jpeg"),
          "label": tfds.features.ClassLabel(names=CIFAR10_CLASSES),
        }
      ),
      supervised_keys=("image", "label"),
      homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # a copy made for this project: nothing to download
    splits = archives.read_cifar10_jpeg(self._source)
    return {split: self._generate_examples(examples) for split, examples in splits.items()}

  def _generate_examples(self, examples):
    for key, data, label in examples:
      yield key, {"image": data, "label": label}


BUILDERS = {
  "mnist": _Mnist,
  "fashion_mnist": _FashionMnist,
  "cifar10": _Cifar10,
  "cifar100": _Cifar100,
  "cifar10_jpeg": Cifar10Jpeg,
}
