"""The config schema (`base_config`, every field with its default) and its validation.

Every bad value is caught here, before anything compiles: each check raises `ConfigError` naming
the field, the value and what is accepted; the CLI turns it into one paragraph on stderr and exit
status 2.
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
RUN_ONLY_FIELDS = ("stages", "seeds", "data_dir", "tfds_data_dir", "checkpoint_every_steps",
                   "keep_checkpoints", "log_every", "progress_bar", "nan_policy", "input_workers")


def base_config() -> ml_collections.ConfigDict:
  """Every field a run has, with METHOD.md's defaults; files in configs/ override them.

  Fields marked [choice] are our reconstruction of the method, not the paper's exact recipe.
  """
  c = ml_collections.ConfigDict()
  c.dataset = "mnist"            # mnist | fashion_mnist | cifar10 | cifar10_jpeg | cifar100
  c.backbone = "cnn"             # cnn | resnet18 | resnet50 | shufflenet_v2
  c.module = ""                  # backbone stage the FMCE-Net reads; "" = last before pooling
  c.stages = "all"               # "all" or a comma list of probe,cqi,fmcs_data,fmce_net,...
  c.seeds = "3"                  # a count (3 -> 0,1,2) or a comma list ("0,4,7")
  c.data_dir = ""                # offline archives; "" = search ./data, ../shared/data, ...
  c.tfds_data_dir = ""           # prepared tfds datasets; "" = tfds default
  c.train_examples_limit = 0     # 0 = the whole split
  c.test_examples_limit = 0
  c.augment = "auto"             # auto (crop+flip for CIFAR) | on | off
  c.input_workers = "auto"       # grain worker processes: auto (see parse_input_workers) | N
  c.input_on_device = "auto"     # split held on the devices: auto (if < 200 MB) | on | off
  c.dtype = "float32"            # compute dtype; parameters stay float32

  # Recipe of the backbone runs (probe, baseline, fmcenetpp).
  c.epochs = 2
  c.batch_size = 128             # global, split over every device of every host
  c.eval_batch_size = 1000
  c.optimizer = "sgd"            # sgd (momentum, nesterov) | adamw
  c.learning_rate = 0.1          # peak, for batch_size
  c.lr_schedule = "cosine"       # cosine | constant, after a linear warm-up
  c.warmup_epochs = 0.5
  c.momentum = 0.9
  c.nesterov = True
  c.weight_decay = 5e-4          # on kernels only

  # Representation Auxiliary Loss [choice: convex form, target = the last phase].
  c.alpha = 0.1
  c.alpha_schedule = "constant"  # constant | linear (0 -> alpha) | cosine (alpha -> 0)
  c.ral = "convex"               # convex: (1-a)CE + a*L_conv | additive: CE + a*L_conv
  c.ral_target = "phase"         # phase: CE to phase K-1 | regression: (1 - FMCS)^2

  # Probe run and convergence (METHOD steps 1-3).
  c.probe = ml_collections.ConfigDict()
  c.probe.epochs = 20
  c.probe.train_examples_limit = 0
  c.probe.stop_at_convergence = True
  c.cqi = ml_collections.ConfigDict()
  c.cqi.beta = 0.9
  c.cqi.window = 5
  c.cqi.mu_rel = 1e-3
  c.num_phases = 5               # K
  c.fmcs = ml_collections.ConfigDict()
  c.fmcs.subset_size = 5000
  c.fmcs.holdout_fraction = 0.2
  c.fmcs.storage_dtype = "bfloat16"

  # FMCE-Net (METHOD step 4).
  c.fmce_net = ml_collections.ConfigDict()
  c.fmce_net.width = 64
  c.fmce_net.depth = 2
  c.fmce_net.epochs = 10
  c.fmce_net.batch_size = 256
  c.fmce_net.learning_rate = 1e-3
  c.fmce_net.weight_decay = 1e-4

  # Checkpoints and logging.
  c.checkpoint_every_steps = 0   # 0 = at the end of every epoch only
  c.keep_checkpoints = 2
  c.log_every = 50               # steps between host syncs of the metrics
  c.progress_bar = True
  c.nan_policy = "error"         # error: stop at a non-finite loss/gradient | skip: drop the batch
  return c


def small_cnn_recipe(dataset: str) -> ml_collections.ConfigDict:
  """The CPU-sized recipe of configs/mnist_cnn.py and fashion_mnist_cnn.py.

  Probe: up to 60 short epochs of 2,000 images, stopped once CQI says converged, so the K=5
  markers span a real loss curve cheaply. Baseline and FMCE-Net++: 3 full epochs, SGD + nesterov,
  lr 0.1, cosine, batch 128.
  """
  c = base_config()
  c.dataset, c.backbone = dataset, "cnn"
  c.epochs, c.batch_size, c.learning_rate, c.weight_decay = 3, 128, 0.1, 5e-4
  c.probe.epochs, c.probe.train_examples_limit = 60, 2000
  c.fmce_net.epochs = 5
  return c


def cifar_recipe(dataset: str, backbone: str) -> ml_collections.ConfigDict:
  """The accelerator recipe of the CIFAR configs: SGD 0.1 nesterov at batch 128, wd 5e-4,
  1 warm-up epoch then cosine, crop+flip, bfloat16 compute, 100 epochs; probe on 10,000 images."""
  c = base_config()
  c.dataset, c.backbone, c.dtype = dataset, backbone, "bfloat16"
  c.epochs, c.batch_size, c.learning_rate, c.weight_decay = 100, 128, 0.1, 5e-4
  c.warmup_epochs = 1.0
  c.probe.epochs, c.probe.train_examples_limit = 100, 10000
  c.fmce_net.epochs = 10
  return c


class ConfigError(ValueError):
  """A config field holds a value we cannot run with."""

  def __init__(self, field: str, value: Any, accepted: str, why: str = ""):
    self.field, self.value, self.accepted = field, value, accepted
    why = f" {why}" if why else ""
    super().__init__(
        f"config field '{field}' = {value!r} is not accepted.{why} Accepted: {accepted}.")


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
  accelerator host with 4 or more cores gets half of them, up to 8: one core augments ~15k CIFAR
  images/s, and a GPU or TPU step consumes several times that (docs/BENCHMARKS.md). With fewer
  cores (Colab), one worker mostly adds the hand-off: here it measured slower than in-process."""
  if str(value) == "auto":
    return 0 if backend == "cpu" or cpu_count < 4 else min(8, cpu_count // 2)
  try:
    workers = int(str(value))
  except ValueError:
    workers = -1
  if workers < 0:
    raise ConfigError("input_workers", value,
                      '"auto" (0 on CPU or under 4 cores, else half the cores up to 8) or an '
                      'integer >= 0')
  return workers


def parse_stages(value: str) -> list[str]:
  """`stages` is "all" or a comma list; returned in pipeline order."""
  names = [s.strip() for s in str(value).split(",") if s.strip()]
  if names == ["all"]:
    return list(STAGES)
  unknown = [n for n in names if n not in STAGES]
  if not names or unknown:
    raise ConfigError("stages", value, f'"all" or a comma list of {", ".join(STAGES)}',
                      f"Unknown stage(s): {', '.join(unknown)}." if unknown else "")
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


def validate(config: ml_collections.ConfigDict, *, device_count: int, process_count: int,
             check_data: bool = True) -> None:
  """Checks every field the pipeline reads; raises ConfigError on the first bad one.

  `check_data` also looks for the dataset (prepared, or offline archives) without preparing it.
  """
  from fmcejax import input_pipeline, models  # local: keep `--help` and errors fast

  _one_of(config, "dataset", input_pipeline.DATASETS)
  _one_of(config, "backbone", models.BACKBONES)
  if config.module and config.module not in models.STAGES[config.backbone]:
    raise ConfigError("module", config.module,
                      '"" (the default, ' + models.DEFAULT_MODULE[config.backbone] + ") or one of "
                      + ", ".join(models.STAGES[config.backbone]))
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
  for field, low in (("epochs", 1), ("batch_size", 1), ("eval_batch_size", 1),
                     ("train_examples_limit", 0), ("test_examples_limit", 0),
                     ("log_every", 1), ("keep_checkpoints", 1), ("checkpoint_every_steps", 0),
                     ("probe.epochs", 1), ("probe.train_examples_limit", 0),
                     ("num_phases", 2), ("fmcs.subset_size", 2), ("fmce_net.width", 1),
                     ("fmce_net.depth", 1), ("fmce_net.epochs", 1), ("fmce_net.batch_size", 1)):
    _int_at_least(config, field, low)
  _float_in(config, "cqi.beta", 0.0, 1.0)
  _int_at_least(config, "cqi.window", 1)
  _float_in(config, "cqi.mu_rel", 0.0, 1.0, open_low=True)
  _float_in(config, "fmcs.holdout_fraction", 0.0, 1.0, open_low=True)
  _float_in(config, "fmce_net.learning_rate", 0.0, math.inf, open_low=True)
  for field in ("batch_size", "eval_batch_size", "fmce_net.batch_size"):
    value = _get(config, field)
    if value % device_count:
      raise ConfigError(field, value, f"a multiple of the global device count ({device_count})",
                        "The global batch is split evenly over every device.")
    if value % process_count:
      raise ConfigError(field, value, f"a multiple of the process count ({process_count})")
  _check_input_on_device(config)
  if check_data:
    _check_data(config)


def _check_input_on_device(config: ml_collections.ConfigDict) -> None:
  """input_on_device=on needs every backbone run's training split to fit on the devices."""
  from fmcejax import device_input, input_pipeline

  info = input_pipeline.DATASET_INFO[config.dataset]
  for field in ("train_examples_limit", "probe.train_examples_limit"):
    limit = _get(config, field)
    if config.input_on_device == "on" and not device_input.fits_on_device(info, limit):
      raise ConfigError("input_on_device", "on", '"auto" or "off" for this dataset',
                        f"{config.dataset} with {field}={limit} takes "
                        f"{device_input.MAX_DEVICE_BYTES // 10**6} MB or more as uint8.")


def _check_data(config: ml_collections.ConfigDict) -> None:
  """Fails early when neither prepared data nor offline archives exist for `dataset`."""
  from fmcejax import input_pipeline

  try:
    input_pipeline.check_available(config.dataset, config.data_dir, config.tfds_data_dir)
  except input_pipeline.DataError as e:
    raise ConfigError(e.field, e.value, e.accepted, e.why) from None
