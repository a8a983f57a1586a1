"""Every shipped config loads, validates, and keeps the CLI contract's field names."""

import importlib.util
from pathlib import Path

import pytest

from fmcejax import config_lib
from fmcejax.configs import default

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(p for p in CONFIG_DIR.glob("*.py") if p.stem not in ("__init__", "default"))
REQUIRED = (
  "dataset",
  "backbone",
  "stages",
  "epochs",
  "batch_size",
  "seeds",
  "alpha",
  "data_dir",
  "train_examples_limit",
  "dtype",
)


def _load(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_the_issue_configs_exist():
  names = {p.stem for p in CONFIGS}
  assert {
    "mnist_cnn",
    "fashion_mnist_cnn",
    "mnist_resnet18",
    "cifar10_resnet18",
    "cifar10_resnet50",
    "cifar100_shufflenet_v2",
  } <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_is_valid(path):
  config = _load(path)
  for field in REQUIRED:
    assert field in config, field
  config_lib.validate(config, device_count=8, process_count=2, check_data=False)
  assert config_lib.parse_stages(config.stages) == list(config_lib.STAGES)


def test_input_workers_are_auto_or_a_count():
  assert config_lib.parse_input_workers("auto", "cpu", 64) == 0
  assert config_lib.parse_input_workers("auto", "gpu", 16) == 8
  assert config_lib.parse_input_workers("auto", "tpu", 240) == 8
  assert config_lib.parse_input_workers("auto", "gpu", 4) == 2
  assert (
    config_lib.parse_input_workers("auto", "gpu", 2) == 0
  )  # Colab-sized: 1 worker would not pay
  assert config_lib.parse_input_workers("3", "cpu", 2) == 3
  assert config_lib.parse_input_workers(0, "gpu", 16) == 0
  for bad in ("-1", "x", 2.5, ""):
    with pytest.raises(config_lib.ConfigError, match="'input_workers'"):
      config_lib.parse_input_workers(bad, "gpu", 16)


def test_seeds_accept_a_count_or_a_list():
  assert config_lib.parse_seeds(3) == [0, 1, 2]
  assert config_lib.parse_seeds("3") == [0, 1, 2]
  assert config_lib.parse_seeds("0,4,7") == [0, 4, 7]
  assert config_lib.parse_seeds((5, 1)) == [5, 1]
  for bad in (0, "1,1", "a", [-1]):
    with pytest.raises(config_lib.ConfigError, match="'seeds'"):
      config_lib.parse_seeds(bad)


def test_the_shipped_configs_are_the_files_in_configs():
  from fmcejax import cli

  shipped = cli.shipped_configs()
  assert set(shipped) == {p.stem for p in CONFIGS}
  assert _load(Path(shipped["cifar10_resnet50"])).backbone == "resnet50"


def test_every_schema_field_is_commented_or_documented():
  """configs/default.py is the schema: each field says what it is, on its line or just above."""
  lines = (CONFIG_DIR / "default.py").read_text().splitlines()
  fields = [
    i
    for i, line in enumerate(lines)
    if line.strip().startswith("c.") and " = " in line and "ConfigDict()" not in line
  ]
  assert len(fields) > 40
  for i in fields:
    assert "#" in lines[i] or lines[i - 1].strip().startswith("#"), lines[i]


def test_input_on_device_is_validated_before_anything_runs():
  config = default.get_config()
  config.input_on_device = "maybe"
  with pytest.raises(config_lib.ConfigError, match="'input_on_device' = 'maybe'.*auto | on | off"):
    config_lib.validate(config, device_count=8, process_count=1, check_data=False)
  config.input_on_device = "on"
  config_lib.validate(config, device_count=8, process_count=1, check_data=False)  # MNIST fits


@pytest.mark.parametrize(
  "fields, message",
  [
    ({"steps_per_dispatch": 0}, r"'steps_per_dispatch' = 0.*an integer >= 1"),
    (
      {"steps_per_dispatch": 8, "input_on_device": "off"},
      r"'steps_per_dispatch' = 8.*held on the devices.*Accepted: 1 with input_on_device=\"off\"",
    ),
  ],
)
def test_steps_per_dispatch_is_validated_before_anything_runs(fields, message):
  config = default.get_config()
  config.update(fields)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config, device_count=8, process_count=1, check_data=False)
  config.update({"steps_per_dispatch": 8, "input_on_device": "auto"})
  config_lib.validate(config, device_count=8, process_count=1, check_data=False)
