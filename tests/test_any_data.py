"""Your data: any tfds image-classification dataset prepared in tfds_data_dir, and a folder of
images (`folder:PATH`), through validation, preparation, the loaders and the whole pipeline."""

import json
import pathlib
import shutil
import subprocess
import sys

import chex
import numpy as np
import PIL.Image
import pytest
from etils import epath

import fake_data
from fmcejax import config_lib, datasets, folder_data, tfds_any, train, workdir
from fmcejax import input_pipeline as ip
from fmcejax.configs import default
from test_cli import run_cli

TINY = [
  "--config.seeds=1",
  "--config.epochs=1",
  "--config.batch_size=16",
  "--config.eval_batch_size=16",
  "--config.probe.epochs=5",
  "--config.fmcs.subset_size=40",
  "--config.fmce_net.epochs=1",
  "--config.fmce_net.batch_size=16",
  "--config.progress_bar=False",
]


@pytest.fixture(scope="module")
def toy_tfds(tmp_path_factory) -> str:
  """`toy_shapes` (3 classes, RGB images of 20x20 and 24x28) prepared in a tfds_data_dir."""
  tfds_dir = tmp_path_factory.mktemp("tfds")
  fake_data.write_fake_tfds(tfds_dir, "toy_shapes", counts=(("train", 64), ("test", 32)))
  fake_data.write_fake_tfds(tfds_dir, "toy_unlabelled", class_label=False)
  return str(tfds_dir)


def write_folder(root: pathlib.Path, per_class=(("train", 16), ("val", 8)), size=(20, 20)):
  """train/<class>/ and val/<class>/ of 3 classes, PNG and JPEG in turn, sizes varying when
  `size` is None."""
  rng = np.random.default_rng(0)
  for split, n in per_class:
    for label, name in enumerate(("cat", "dog", "eel")):
      (root / split / name).mkdir(parents=True, exist_ok=True)
      for i in range(n):
        shape = size or (16 + 4 * (i % 2), 18)
        image = (rng.integers(0, 80, (*shape, 3)) + 80 * label).astype(np.uint8)
        suffix = "png" if i % 2 else "jpg"
        PIL.Image.fromarray(image).save(root / split / name / f"{i:03d}.{suffix}")
  return root


def config(**fields):
  c = default.get_config()
  c.update(fields)
  return c


def test_a_tfds_dataset_fmcejax_does_not_know_is_read_with_its_info(toy_tfds):
  fields = datasets.Fields(image_size=16)
  info = datasets.prepare("toy_shapes", tfds_data_dir=toy_tfds, fields=fields)
  assert (info.num_classes, info.image_shape) == (3, (16, 16, 3))
  assert (info.num_train, info.num_test) == (64, 32)
  arrays = ip.split_arrays(info, "train", 0, toy_tfds)
  chex.assert_shape(arrays.image, (64, 16, 16, 3))
  chex.assert_type(arrays.image, np.uint8)
  # The stored statistics are those of the training images as the model sees them.
  stored = json.loads(
    (pathlib.Path(toy_tfds) / "toy_shapes/1.0.0" / tfds_any.STATS_FILE).read_text()
  )
  pixels = arrays.image.reshape(-1, 3) / 255.0
  np.testing.assert_allclose(info.mean, pixels.mean(0), rtol=1e-6)
  np.testing.assert_allclose(info.std, pixels.std(0), rtol=1e-6)
  assert list(stored.values())[0]["mean"] == list(info.mean)
  # Labels follow the pixels (brighter with the label), whatever the images' sizes were.
  by_label = [arrays.image[arrays.label == k].mean() for k in range(3)]
  assert by_label == sorted(by_label)
  half = datasets.prepare(
    "toy_shapes",
    tfds_data_dir=toy_tfds,
    fields=datasets.Fields(image_size=16, train_split="train[:50%]"),
  )
  assert half.num_train == 32 and half.train_split == "train[:50%]"


def test_varying_image_sizes_without_image_size_exit_2(toy_tfds, tmp_path):
  result = run_cli(
    f"--workdir={tmp_path / 'w'}",
    "--config.dataset=toy_shapes",
    f"--config.tfds_data_dir={toy_tfds}",
    timeout=300,
  )
  assert result.returncode == 2, result.stderr[-2000:]
  message = result.stderr.strip().splitlines()[-1]
  assert "'image_size'" in message and "vary in size" in message, message


def test_a_tfds_dataset_without_a_class_label_exits_2_before_compiling(toy_tfds, tmp_path):
  c = config(dataset="toy_unlabelled", tfds_data_dir=toy_tfds, image_size=16)
  with pytest.raises(config_lib.ConfigError, match="'label_key'.*0 ClassLabel features"):
    config_lib.validate(c, device_count=8, process_count=1)
  code = train.main(
    [
      "train",
      f"--workdir={tmp_path / 'w'}",
      "--config.dataset=toy_unlabelled",
      f"--config.tfds_data_dir={toy_tfds}",
      "--config.image_size=16",
    ]
  )
  assert code == 2 and not (tmp_path / "w").exists()


def test_a_registered_dataset_not_prepared_names_the_tfds_build_command(tmp_path):
  with pytest.raises(
    datasets.DataError, match="tfds build svhn_cropped --file_format=array_record"
  ):
    datasets.check_available("svhn_cropped", tfds_data_dir=str(tmp_path), download=True)


def test_data_fields_are_refused_for_the_built_in_datasets():
  with pytest.raises(config_lib.ConfigError, match="'image_size' = 32"):
    config_lib.validate(config(image_size=32), device_count=8, process_count=1, check_data=False)


@pytest.mark.slow
def test_the_whole_pipeline_runs_on_a_tfds_dataset_it_does_not_know(toy_tfds, tmp_path):
  workdir = tmp_path / "w"
  result = run_cli(
    f"--workdir={workdir}",
    "--config.dataset=toy_shapes",
    f"--config.tfds_data_dir={toy_tfds}",
    "--config.image_size=16",
    *TINY,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((workdir / "report.json").read_text())
  info = datasets.prepare(
    "toy_shapes", tfds_data_dir=toy_tfds, fields=datasets.Fields(image_size=16)
  )
  assert report["data"]["mean"] == list(info.mean) and report["data"]["std"] == list(info.std)
  assert report["data"]["num_classes"] == 3 and report["data"]["image_shape"] == [16, 16, 3]
  assert 0.0 <= report["fmcenetpp_accuracy"][0] <= 1.0


# ---------------------------------------------------------------------------------------------
# A folder of images


def test_a_folder_is_prepared_with_sorted_classes_and_again_when_it_changes(tmp_path):
  root = write_folder(tmp_path / "images")
  tfds_dir = str(tmp_path / "tfds")
  dataset = f"folder:{root}"
  info = datasets.prepare(dataset, tfds_data_dir=tfds_dir)
  assert (info.num_classes, info.image_shape, info.num_train, info.num_test) == (
    3,
    (20, 20, 3),
    48,
    24,
  )
  builder = tfds_any.builder(info.tfds_name, tfds_dir)
  assert builder.info.features["label"].names == ["cat", "dog", "eel"]
  arrays = ip.split_arrays(info, "train", 0, tfds_dir)
  by_label = [arrays.image[arrays.label == k].mean() for k in range(3)]
  assert by_label == sorted(by_label), "label k is the k-th class folder in sorted order"
  # Prepared once: the same folder is read as it is, not prepared again.
  marker = pathlib.Path(builder.data_dir) / "kept"
  marker.write_text("")
  datasets.prepare(dataset, tfds_data_dir=tfds_dir)
  assert marker.exists()
  # A file more changes the fingerprint: prepared again, with the new image.
  shutil.copy(root / "train" / "cat" / "000.jpg", root / "train" / "cat" / "999.jpg")
  again = datasets.prepare(dataset, tfds_data_dir=tfds_dir)
  assert again.num_train == 49 and not marker.exists()


def _bad_unreadable(root):
  (root / "train" / "dog" / "notes.jpg").write_text("not an image")
  return "notes.jpg"


def _bad_empty_class(root):
  for p in (root / "val" / "eel").iterdir():
    p.unlink()
  return str(root / "val" / "eel")


def _bad_one_class(root):
  for name in ("dog", "eel"):
    shutil.rmtree(root / "train" / name)
    shutil.rmtree(root / "val" / name)
  return "1 class folder(s)"


def _bad_missing_split(root):
  shutil.rmtree(root / "val")
  return "has no test/ or val/ folder"


@pytest.mark.parametrize(
  "spoil", [_bad_unreadable, _bad_empty_class, _bad_one_class, _bad_missing_split]
)
def test_a_bad_folder_exits_2_naming_the_file_or_folder(tmp_path, spoil):
  root = write_folder(tmp_path / "images", per_class=(("train", 2), ("val", 1)))
  named = spoil(root)
  workdir = tmp_path / "w"
  argv = [
    f"--workdir={workdir}",
    f"--config.dataset=folder:{root}",
    f"--config.tfds_data_dir={tmp_path / 'tfds'}",
    "--config.stages=probe",
  ]
  with pytest.raises(datasets.DataError) as error:
    datasets.prepare(f"folder:{root}", tfds_data_dir=str(tmp_path / "tfds"))
  assert named in str(error.value)
  assert train.main(["train", *argv]) == 2


@pytest.mark.slow
def test_the_whole_pipeline_runs_on_a_folder_of_png_and_jpeg(tmp_path):
  root = write_folder(tmp_path / "images", size=None)
  workdir = tmp_path / "w"
  result = run_cli(
    f"--workdir={workdir}",
    f"--config.dataset=folder:{root}",
    f"--config.tfds_data_dir={tmp_path / 'tfds'}",
    "--config.image_size=16",
    *TINY,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((workdir / "report.json").read_text())
  assert report["dataset"] == f"folder:{root}" and report["data"]["num_classes"] == 3
  assert report["data"]["tfds_name"] == folder_data.tfds_name(f"folder:{root}")


def test_a_workdir_made_before_the_data_fields_existed_still_resumes(tmp_path):
  c = default.get_config()
  old = {k: v for k, v in c.to_dict().items() if k not in config_lib.ADDED_FIELDS}
  old = {k: v for k, v in old.items() if k not in config_lib.RUN_ONLY_FIELDS}
  (tmp_path / "config.json").write_text(json.dumps(old))
  workdir.check_config(c, epath.Path(tmp_path))  # the new fields at their defaults: the same
  c.image_size = 32
  with pytest.raises(config_lib.ConfigError, match="'image_size'"):
    workdir.check_config(c, epath.Path(tmp_path))


@pytest.mark.slow
def test_a_study_runs_on_a_folder(tmp_path):
  root = write_folder(tmp_path / "images")
  workdir = tmp_path / "w"
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "fmcejax.study",
      f"--workdir={workdir}",
      f"--config.dataset=folder:{root}",
      f"--config.tfds_data_dir={tmp_path / 'tfds'}",
      "--study.alphas=0.1",
      "--study.controls=",
      *TINY,
    ],
    cwd=pathlib.Path(__file__).resolve().parents[1],
    capture_output=True,
    text=True,
    timeout=1200,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  study = json.loads((workdir / "study.json").read_text())
  assert study["dataset"] == f"folder:{root}" and len(study["arms"]) == 1
