"""Config validation: every field, and the checks that span fields, before anything compiles.

The schema with its defaults is `configs/default.py` (installed as `fmcejax.configs.default`).
Each check raises `ConfigError` naming the field, the value and what is accepted; the CLI turns it
into one paragraph on stderr and exit status 2.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

STAGES = ("probe", "cqi", "fmcs_data", "fmce_net", "baseline", "fmcenetpp", "report")
DTYPES = ("float32", "bfloat16")
RAL_MODES = ("convex", "additive")
RAL_TARGETS = ("phase", "regression")
ALPHA_SCHEDULES = ("constant", "linear", "cosine")
LR_SCHEDULES = ("cosine", "constant")
OPTIMIZERS = ("sgd", "adamw")
AUGMENT = ("auto", "on", "off")
INPUT_ON_DEVICE = ("auto", "on", "off")
NAN_POLICIES = ("error", "skip")
# Fields that do not change results: a finished workdir may be re-run with other values.
RUN_ONLY_FIELDS = (
  "stages",
  "seeds",
  "data_dir",
  "tfds_data_dir",
  "download",
  "checkpoint_every_steps",
  "keep_checkpoints",
  "log_every",
  "progress_bar",
  "nan_policy",
  "input_workers",
  "steps_per_dispatch",  # float rounding only, like the device count
)

# Integer fields and their smallest accepted value.
INT_MINIMA = (
  ("epochs", 1),
  ("batch_size", 1),
  ("eval_batch_size", 1),
  ("train_examples_limit", 0),
  ("test_examples_limit", 0),
  ("log_every", 1),
  ("keep_checkpoints", 1),
  ("checkpoint_every_steps", 0),
  ("steps_per_dispatch", 1),
  ("probe.epochs", 1),
  ("probe.train_examples_limit", 0),
  ("num_phases", 2),
  ("fmcs.subset_size", 2),
  ("fmce_net.width", 1),
  ("fmce_net.depth", 1),
  ("fmce_net.epochs", 1),
  ("fmce_net.batch_size", 1),
  ("image_size", 0),
)
# Of a tfds dataset or a folder only: the built-in five keep their defaults.
DATA_FIELDS = ("train_split", "test_split", "image_key", "label_key", "image_size")
# Fields added since workdirs were first made, with the value a saved config without them had.
ADDED_FIELDS = {
  "train_split": "",
  "test_split": "",
  "image_key": "",
  "label_key": "",
  "image_size": 0,
}


class ConfigError(ValueError):
  """A config field holds a value we cannot run with."""

  def __init__(self, field: str, value: Any, accepted: str, why: str = ""):
    self.field, self.value, self.accepted = field, value, accepted
    why = f" {why}" if why else ""
    super().__init__(
      f"config field '{field}' = {value!r} is not accepted.{why} Accepted: {accepted}."
    )


def parse_seeds(value: Any) -> list[int]:
  """`seeds` is a count (3 -> [0, 1, 2]) or an explicit list ("0,4,7", [0, 4, 7])."""
  accepted = "a count >= 1 (e.g. 3) or a comma list of distinct non-negative ints (e.g. 0,4,7)"
  try:
    if isinstance(value, str):
      parts = [p for p in value.replace("[", "").replace("]", "").split(",") if p.strip()]
      if len(parts) == 1:
        value = int(parts[0])
      else:
        value = [int(p) for p in parts]
    if isinstance(value, int) and not isinstance(value, bool):
      if value < 1:
        raise ValueError
      return list(range(value))
    seeds = [int(s) for s in value]
  except (TypeError, ValueError):
    raise ConfigError("seeds", value, accepted) from None
  if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
    raise ConfigError("seeds", value, accepted)
  return seeds


def parse_input_workers(value: Any, backend: str, cpu_count: int) -> int:
  """`input_workers` is "auto" or a count. Auto leaves a CPU backend's cores to XLA; an
  accelerator host with 4 or more cores gets half of them, up to 8, because one core augments
  fewer CIFAR images than a GPU or TPU step consumes; with fewer cores (Colab) one worker mostly
  adds the hand-off (figures: docs/BENCHMARKS.md, "Input pipeline")."""
  if str(value) == "auto":
    return 0 if backend == "cpu" or cpu_count < 4 else min(8, cpu_count // 2)
  try:
    workers = int(str(value))
  except ValueError:
    workers = -1
  if workers < 0:
    raise ConfigError(
      "input_workers",
      value,
      '"auto" (0 on CPU or under 4 cores, else half the cores up to 8) or an integer >= 0',
    )
  return workers


def parse_stages(value: str) -> list[str]:
  """`stages` is "all" or a comma list; returned in pipeline order."""
  names = [s.strip() for s in str(value).split(",") if s.strip()]
  if names == ["all"]:
    return list(STAGES)
  unknown = [n for n in names if n not in STAGES]
  if not names or unknown:
    raise ConfigError(
      "stages",
      value,
      f'"all" or a comma list of {", ".join(STAGES)}',
      f"Unknown stage(s): {', '.join(unknown)}." if unknown else "",
    )
  return [s for s in STAGES if s in names]


def _one_of(config: Mapping, field: str, accepted: Sequence[str]) -> None:
  value = _get(config, field)
  if value not in accepted:
    raise ConfigError(field, value, " | ".join(accepted))


def _get(config: Mapping, field: str) -> Any:
  node = config
  for part in field.split("."):
    node = node[part]
  return node


def _int_at_least(config: Mapping, field: str, low: int) -> None:
  value = _get(config, field)
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise ConfigError(field, value, f"an integer >= {low}")


def _float_in(config: Mapping, field: str, low: float, high: float, *, open_low=False) -> None:
  value = _get(config, field)
  ok = isinstance(value, (int, float)) and math.isfinite(value)
  ok = ok and (value > low if open_low else value >= low) and value <= high
  if not ok:
    bracket = "(" if open_low else "["
    raise ConfigError(field, value, f"a number in {bracket}{low}, {high}]")


def validate(
  config: ml_collections.ConfigDict,
  *,
  device_count: int,
  process_count: int,
  check_data: bool = True,
) -> None:
  """Checks every field the pipeline reads; raises ConfigError on the first bad one.

  `check_data` also checks that the dataset is prepared, in local archives or to be downloaded,
  without preparing or downloading it.
  """
  for field, low in INT_MINIMA:
    _int_at_least(config, field, low)
  info = dataset_info(config)
  names = module_names(config, info)
  if config.module and config.module not in names:
    raise ConfigError(
      "module",
      config.module,
      f'"" (the default, {names[-1]}) or one of ' + ", ".join(names),
      f"The feature maps {config.backbone} returns.",
    )
  parse_stages(config.stages)
  parse_seeds(config.seeds)
  parse_input_workers(config.input_workers, "cpu", 1)
  _one_of(config, "dtype", DTYPES)
  _one_of(config, "augment", AUGMENT)
  _one_of(config, "input_on_device", INPUT_ON_DEVICE)
  _one_of(config, "optimizer", OPTIMIZERS)
  _one_of(config, "lr_schedule", LR_SCHEDULES)
  _one_of(config, "ral", RAL_MODES)
  _one_of(config, "ral_target", RAL_TARGETS)
  _one_of(config, "alpha_schedule", ALPHA_SCHEDULES)
  _one_of(config, "nan_policy", NAN_POLICIES)
  _one_of(config, "fmcs.storage_dtype", DTYPES)
  _float_in(config, "alpha", 0.0, 1.0)
  _float_in(config, "learning_rate", 0.0, math.inf, open_low=True)
  _float_in(config, "weight_decay", 0.0, math.inf)
  _float_in(config, "momentum", 0.0, 1.0)
  _float_in(config, "warmup_epochs", 0.0, math.inf)
  _float_in(config, "cqi.beta", 0.0, 1.0)
  _int_at_least(config, "cqi.window", 1)
  _float_in(config, "cqi.mu_rel", 0.0, 1.0, open_low=True)
  _float_in(config, "fmcs.holdout_fraction", 0.0, 1.0, open_low=True)
  _float_in(config, "fmce_net.learning_rate", 0.0, math.inf, open_low=True)
  for field in ("batch_size", "eval_batch_size", "fmce_net.batch_size"):
    value = _get(config, field)
    if value % device_count:
      raise ConfigError(
        field,
        value,
        f"a multiple of the global device count ({device_count}), e.g. "
        + _nearest_multiples(value, device_count),
        "The global batch is split evenly over every device.",
      )
    if value % process_count:
      raise ConfigError(
        field,
        value,
        f"a multiple of the process count ({process_count}), e.g. "
        + _nearest_multiples(value, process_count),
      )
  if info.num_train:  # 0: a tfds dataset that tfds has yet to prepare
    _check_sizes(config, info.num_train)
  _check_input_on_device(config, info)
  if check_data:
    _check_data(config)


def dataset_info(config: ml_collections.ConfigDict):
  """`config.dataset`'s `datasets.DatasetInfo` as far as known without preparing it or touching
  a device (no channel statistics); a ConfigError naming the field when the dataset, its
  features, splits or image sizes do not do."""
  from fmcejax import datasets  # local: keep `--help` and errors fast

  if datasets.is_builtin(config.dataset):
    for field in DATA_FIELDS:
      if config[field]:
        raise ConfigError(
          field,
          config[field],
          f'{0 if field == "image_size" else ""!r} (the default) for {config.dataset}',
          "It applies to a tfds dataset or a folder, not to the five built-in datasets.",
        )
  try:
    return datasets.describe(
      config.dataset, config.tfds_data_dir, datasets.Fields.from_config(config)
    )
  except datasets.DataError as e:
    raise ConfigError(e.field, e.value, e.accepted, e.why) from None


def _nearest_multiples(value: int, n: int) -> str:
  below = value // n * n
  return f"{below} or {below + n}" if below else str(n)


def module_names(config: ml_collections.ConfigDict, info=None) -> tuple[str, ...]:
  """The feature maps `config.backbone` returns (the last is the default `module`); a backbone
  that is neither built in nor a working `package.module:factory` is a ConfigError."""
  from fmcejax import models

  info = info or dataset_info(config)
  try:
    return models.feature_names(config.backbone, info.num_classes, info.image_shape)
  except ValueError as e:
    raise ConfigError(
      "backbone",
      config.backbone,
      " | ".join(models.BACKBONES) + " | package.module:factory (your own Flax module)",
      str(e),
    ) from None


def _check_sizes(config: ml_collections.ConfigDict, num_train: int) -> None:
  """The checks that span fields, for the stages that run: every training run has a full global
  batch per epoch, and the FMCS-Dataset's train split a full FMCE-Net batch."""
  stages = parse_stages(config.stages)
  pool = min(config.probe.train_examples_limit or num_train, num_train)
  if "probe" in stages and config.batch_size > pool:
    raise ConfigError(
      "batch_size",
      config.batch_size,
      f"at most {pool}, the probe's training "
      "examples (probe.train_examples_limit, or the whole split)",
      "Each epoch needs one full global batch.",
    )
  used = min(config.train_examples_limit or num_train, num_train)
  if {"baseline", "fmcenetpp"} & set(stages) and config.batch_size > used:
    raise ConfigError(
      "batch_size",
      config.batch_size,
      f"at most {used}, the training examples (train_examples_limit, or the whole split)",
      "Each epoch needs one full global batch.",
    )
  if "fmce_net" in stages:
    _check_fmcs_sizes(config, pool)


def _fmcs_train_images(n: int, holdout_fraction: float) -> int:
  """Images left for FMCE-Net training out of `n` (as `fmcs_data.split_images` splits them)."""
  return n - max(1, int(round(n * holdout_fraction)))


def _check_fmcs_sizes(config: ml_collections.ConfigDict, pool: int) -> None:
  """Names the field to change when the FMCS train split has no full FMCE-Net batch: the batch
  if no subset could fill it, else the held-out share if the subset could, else the subset."""
  k, batch, fmcs = config.num_phases, config.fmce_net.batch_size, config.fmcs
  n = min(fmcs.subset_size, pool)
  rows = k * _fmcs_train_images(n, fmcs.holdout_fraction)
  if rows >= batch:
    return
  why = (
    f"The FMCE-Net trains on {k} phases x {max(rows // k, 0)} images = {rows} rows "
    f"(fmcs.subset_size {fmcs.subset_size} of {pool} probe images, fmcs.holdout_fraction "
    f"{fmcs.holdout_fraction} held out), fewer than one global fmce_net.batch_size of "
    f"{batch}."
  )
  needed = -(-batch // k)  # training images for one full batch
  if needed > pool - 1:
    raise ConfigError(
      "fmce_net.batch_size",
      batch,
      f"at most {k * (pool - 1)} (num_phases x the probe images but one)",
      why,
    )
  smallest = next(
    (
      m
      for m in range(needed + 1, pool + 1)
      if _fmcs_train_images(m, fmcs.holdout_fraction) >= needed
    ),
    None,
  )
  if needed <= n - 1 or smallest is None:
    m = n if needed <= n - 1 else pool
    raise ConfigError(
      "fmcs.holdout_fraction",
      fmcs.holdout_fraction,
      f"at most {(m - needed) / m:.4g}, leaving {needed} of {m} images for training",
      why,
    )
  raise ConfigError(
    "fmcs.subset_size",
    fmcs.subset_size,
    f"at least {smallest} with fmcs.holdout_fraction {fmcs.holdout_fraction} "
    "(or a smaller fmce_net.batch_size)",
    why,
  )


def _check_input_on_device(config: ml_collections.ConfigDict, info) -> None:
  """input_on_device=on needs every backbone run's training split to fit on the devices;
  several steps per dispatch need the batches made on the devices."""
  from fmcejax import device_input

  if config.steps_per_dispatch > 1 and config.input_on_device == "off":
    raise ConfigError(
      "steps_per_dispatch",
      config.steps_per_dispatch,
      '1 with input_on_device="off"',
      "Several steps per dispatch scan over batches held on the devices.",
    )
  for field in ("train_examples_limit", "probe.train_examples_limit"):
    limit = _get(config, field)
    if config.input_on_device == "on" and not device_input.fits_on_device(info, limit):
      raise ConfigError(
        "input_on_device",
        "on",
        '"auto" or "off" for this dataset',
        f"{config.dataset} with {field}={limit} takes "
        f"{device_input.MAX_DEVICE_BYTES // 10**6} MB or more as uint8.",
      )


def _check_data(config: ml_collections.ConfigDict) -> None:
  """Fails early when `dataset` is neither prepared, nor in local archives, nor to download."""
  from fmcejax import datasets

  try:
    datasets.check_available(config.dataset, config.data_dir, config.tfds_data_dir, config.download)
  except datasets.DataError as e:
    raise ConfigError(e.field, e.value, e.accepted, e.why) from None
