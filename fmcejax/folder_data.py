"""A folder of images as a dataset: `folder:PATH`, PATH holding `train/<class>/*` and
`test/<class>/*` (or `val/<class>/*`).

Prepared once, decoded with PIL, into tfds's array_record layout under `tfds_data_dir`
(`folder_<hash of PATH>/1.0.0`), then read like any prepared tfds dataset (`tfds_any`). Class
names are sorted, so labels do not depend on the order the file system lists them in, and kept
in the dataset's ClassLabel. A fingerprint of every file's name and size is stored beside the
data: a folder that changed since is prepared again, never read stale.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import shutil

import PIL.Image
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import registered

from fmcejax import tfds_any
from fmcejax.archives import DataError

PREFIX = "folder:"
SPLIT_DIRS = {"train": ("train",), "test": ("test", "val")}
FINGERPRINT_FILE = "fmcejax_folder.json"
GREY_MODES = ("1", "L", "I", "I;16", "F")
ACCEPTED = (
  "folder:PATH, PATH holding train/<class>/<images> and test/<class>/<images> (or val/), "
  "at least two classes, each with at least one image PIL can read"
)


@dataclasses.dataclass(frozen=True)
class Scan:
  """The folder as listed (no image opened): sorted classes, labelled files per split."""

  root: pathlib.Path
  classes: tuple[str, ...]
  files: dict[str, tuple[tuple[pathlib.Path, int], ...]]
  fingerprint: str


def _error(value: str, why: str) -> DataError:
  return DataError("dataset", value, why, ACCEPTED)


def _images(directory: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))


def scan(dataset: str) -> Scan:
  """Lists `folder:PATH`; DataError naming the folder when a split or class is missing or
  empty, or there is only one class."""
  root = pathlib.Path(dataset[len(PREFIX) :]).expanduser().resolve()
  if not root.is_dir():
    raise _error(dataset, f"{root} is not a directory.")
  dirs = {}
  for split, names in SPLIT_DIRS.items():
    dirs[split] = next((root / n for n in names if (root / n).is_dir()), None)
    if dirs[split] is None:
      raise _error(dataset, f"{root} has no {'/ or '.join(names)}/ folder (the {split} split).")
  classes = tuple(sorted(p.name for p in dirs["train"].iterdir() if p.is_dir()))
  if len(classes) < 2:
    raise _error(
      dataset, f"{dirs['train']} holds {len(classes)} class folder(s) ({', '.join(classes)})."
    )
  files, digest = {}, hashlib.sha256()
  for split, directory in dirs.items():
    found = sorted(p.name for p in directory.iterdir() if p.is_dir())
    extra = sorted(set(found) - set(classes))
    if extra:
      raise _error(dataset, f"{directory / extra[0]} is a class the train split does not have.")
    listed = []
    for label, name in enumerate(classes):
      if split == "test" and name not in found:
        continue
      images = _images(directory / name)
      if not images:
        raise _error(dataset, f"{directory / name} holds no image.")
      for path in images:
        listed.append((path, label))
        digest.update(f"{path.relative_to(root)}\t{path.stat().st_size}\n".encode())
    files[split] = tuple(listed)
  return Scan(root, classes, files, digest.hexdigest())


def tfds_name(dataset: str) -> str:
  """The prepared dataset's tfds name: one per folder path."""
  path = str(pathlib.Path(dataset[len(PREFIX) :]).expanduser().resolve())
  return f"folder_{hashlib.sha256(path.encode()).hexdigest()[:12]}"


def _open(dataset: str, path: pathlib.Path) -> PIL.Image.Image:
  try:
    image = PIL.Image.open(path)
    image.load()
    return image
  except Exception as e:  # noqa: BLE001 - any file PIL cannot decode is this error
    raise _error(dataset, f"{path} is not an image PIL can read ({type(e).__name__}: {e}).") from e


def _look(dataset: str, s: Scan) -> tuple[int, tuple[int, int] | None]:
  """Channels (1 if every image is greyscale, else 3) and the common (H, W), None if they vary;
  decodes every image once so a bad file stops the preparation before anything is written."""
  grey, sizes = True, set()
  for split in s.files.values():
    for path, _ in split:
      image = _open(dataset, path)
      grey &= image.mode in GREY_MODES
      sizes.add(image.size[::-1])
  return (1 if grey else 3), (sizes.pop() if len(sizes) == 1 else None)


def describe(dataset: str, s: Scan, image_size: int) -> tfds_any.Described:
  """The folder's fields before it is prepared (validation): its classes and counts, the shape
  of its first image (or image_size). The whole splits: a split spec applies once prepared."""
  first = _open(dataset, s.files["train"][0][0])
  height, width = (image_size, image_size) if image_size else first.size[::-1]
  return tfds_any.Described(
    num_classes=len(s.classes),
    image_shape=(height, width, 1 if first.mode in GREY_MODES else 3),
    train_split="train",
    test_split="test",
    image_key="image",
    label_key="label",
    num_train=len(s.files["train"]),
    num_test=len(s.files["test"]),
  )


def _builder_class(name: str) -> type[tfds.core.GeneratorBasedBuilder]:
  folder_name = name

  with registered.skip_registration():

    class Folder(tfds.core.GeneratorBasedBuilder):
      """The folder's images, decoded with PIL and stored as PNG (lossless, any size)."""

      name = folder_name
      VERSION = tfds.core.Version("1.0.0")

      def __init__(self, *, dataset: str, scanned: Scan, channels: int, size, **kwargs):
        self._dataset, self._scan, self._channels, self._size = dataset, scanned, channels, size
        super().__init__(**kwargs)

      def _info(self) -> tfds.core.DatasetInfo:
        height, width = self._size or (None, None)
        return tfds.core.DatasetInfo(
          builder=self,
          description=f"The images of {self._scan.root}, one class per folder.",
          features=tfds.features.FeaturesDict(
            {
              "image": tfds.features.Image(shape=(height, width, self._channels)),
              "label": tfds.features.ClassLabel(names=self._scan.classes),
            }
          ),
          supervised_keys=("image", "label"),
        )

      def _split_generators(self, dl_manager):
        del dl_manager  # local files
        return {split: self._generate_examples(files) for split, files in self._scan.files.items()}

      def _generate_examples(self, files):
        mode = "L" if self._channels == 1 else "RGB"
        for index, (path, label) in enumerate(files):  # PIL images: tfds encodes them with PIL
          yield index, {"image": _open(self._dataset, path).convert(mode), "label": label}

  return Folder


def _data_dir(dataset: str, tfds_data_dir: str) -> epath.Path:
  base = epath.Path(tfds_data_dir or tfds.core.constants.DATA_DIR).expanduser()
  return base / tfds_name(dataset) / "1.0.0"


def is_current(dataset: str, tfds_data_dir: str, s: Scan) -> bool:
  """Whether the folder is prepared with the fingerprint it has now (the fingerprint is
  written only once tfds has renamed a finished preparation into place)."""
  path = _data_dir(dataset, tfds_data_dir) / FINGERPRINT_FILE
  return path.exists() and json.loads(path.read_text())["fingerprint"] == s.fingerprint


def prepare(dataset: str, tfds_data_dir: str) -> str:
  """Prepares `folder:PATH` unless prepared with its current fingerprint; returns the tfds
  name. A stale preparation is deleted first. Call on process 0 first (multi-host)."""
  s = scan(dataset)
  name = tfds_name(dataset)
  if is_current(dataset, tfds_data_dir, s):
    return name
  channels, size = _look(dataset, s)
  builder = _builder_class(name)(
    dataset=dataset,
    scanned=s,
    channels=channels,
    size=size,
    data_dir=tfds_data_dir or None,
    file_format="array_record",
  )
  shutil.rmtree(builder.data_dir, ignore_errors=True)  # stale: another fingerprint
  builder.download_and_prepare()
  stored = {"fingerprint": s.fingerprint, "path": str(s.root), "classes": list(s.classes)}
  (epath.Path(builder.data_dir) / FINGERPRINT_FILE).write_text(json.dumps(stored, indent=1))
  return name
