r"""FMCE-Net++ from one command: probe -> CQI -> FMCS-Dataset -> FMCE-Net -> baseline/FMCE-Net++ -> report.

    python -m fmcejax.train [--config NAME_OR_FILE] [--workdir DIR] [--config.FIELD=VALUE ...]

`--config` is a config file or the name of one that ships with the package (`cifar10_resnet50`);
the default is `mnist_cnn`. The stages live in `fmcejax.pipeline`; this module is the command
line: flags, validation, the workdir's lock, then the stages.
"""

from __future__ import annotations

import importlib.resources
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence

import jax
import ml_collections
from absl import flags
from ml_collections import config_flags

from fmcejax import config_lib, datasets, parallel, pipeline, preflight_compile, trainer, workdir

EXIT_BAD_INPUT = 2
DEFAULT_CONFIG = "mnist_cnn"
USAGE = "python -m fmcejax.train [--config NAME_OR_FILE] [--workdir DIR] [--config.FIELD=VALUE ...]"


class CommandLineError(ValueError):
  """A flag that does not parse (an unknown config field, a value of the wrong type)."""


def shipped_configs() -> dict[str, str]:
  """Name -> path of every config that ships with the package (`configs/` in a checkout)."""
  root = importlib.resources.files("fmcejax.configs")
  return {
    p.name.removesuffix(".py"): os.fspath(p)
    for p in root.iterdir()
    if p.name.endswith(".py") and p.name not in ("__init__.py", "default.py")
  }


def resolve_config_arg(argv: Sequence[str]) -> list[str]:
  """`argv` with `--config` as a file path: a shipped name becomes its file, and a path that does
  not exist is a ConfigError (before ml_collections would raise it as a traceback)."""
  argv, shipped = list(argv), shipped_configs()
  for i, arg in enumerate(argv):
    if arg.startswith("--config=") or (arg == "--config" and i + 1 < len(argv)):
      j, value = (i, arg.split("=", 1)[1]) if "=" in arg else (i + 1, argv[i + 1])
      file, sep, rest = value.partition(":")  # ml_collections' `path:argument` form
      if file.removesuffix(".py") in shipped and not os.path.isfile(file):
        file = shipped[file.removesuffix(".py")]
      if not os.path.isfile(file):
        raise config_lib.ConfigError(
          "config",
          value,
          "a Python config file (ml_collections style) or the name of a "
          f"shipped config: {', '.join(sorted(shipped))}",
          "No such file.",
        )
      argv[j] = f"--config={file}{sep}{rest}" if j == i else f"{file}{sep}{rest}"
  return argv


def parse_flags(
  argv: Sequence[str], define_extra: Callable[[], None] = lambda: None
) -> tuple[ml_collections.ConfigDict, str]:
  """(config, workdir) from the command line; raises CommandLineError or ConfigError."""
  argv = resolve_config_arg(argv)
  try:
    # Defined here, not at import: config_flags reads the overrides while defining the flag, and
    # an unknown field must become our exit status 2, not a traceback.
    config_flag = config_flags.DEFINE_config_file(
      "config",
      shipped_configs()[DEFAULT_CONFIG],
      "Python config file (ml_collections) or the name of a shipped config.",
      lock_config=True,
    )
    workdir_flag = flags.DEFINE_string(
      "workdir",
      "./workdir",
      "Where results go (local or any path etils.epath handles, e.g. gs://bucket/run).",
    )
    define_extra()
    flags.FLAGS(list(argv))
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
    raise CommandLineError(f"bad command line: {e}. Usage: {USAGE}") from None
  return config_flag.value, workdir_flag.value


def prepare_workdir(config: ml_collections.ConfigDict, path: str):
  """Validates `config`, then makes sure the workdir is writable, locked and holds this config.
  Returns (workdir, lock handle); the lock holds until the process exits."""
  config_lib.validate(config, device_count=jax.device_count(), process_count=jax.process_count())
  root = workdir.path(path)
  workdir.check_writable(root)
  lock = workdir.lock(root)
  workdir.check_config(config, root)
  return root, lock


def fail(message: str) -> int:
  print(f"fmcejax: error: {message}", file=sys.stderr)
  return EXIT_BAD_INPUT


def execute(
  config: ml_collections.ConfigDict,
  path: str,
  job: Callable[[pipeline.Pipeline], Callable[[], object]],
  results: str = "",
) -> int:
  """A parsed command's body, shared by `train` and `study`: the workdir's guards, then
  `job(stages)()`; bad input exits 2 before anything compiles, SIGTERM after a checkpoint 0."""
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  parallel.initialize_distributed()
  try:
    root, lock = prepare_workdir(config, path)  # noqa: F841 - the lock is held until exit
    stages = pipeline.Pipeline(config, root)
    if parallel.platform(stages.mesh) != "cpu":  # before an hour of training finds an OOM
      preflight_compile.check_memory(config, stages.mesh)
    run = job(stages)
  except (config_lib.ConfigError, datasets.DataError) as e:
    return fail(str(e))
  signal.signal(signal.SIGTERM, trainer.request_preemption)
  try:
    run()
  except trainer.Preempted as e:
    print(f"fmcejax: {e}", file=sys.stderr)
    return 0
  print(f"fmcejax: done; results in {root / results}")
  return 0


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv if argv is None else argv
  try:
    config, path = parse_flags(argv)
    stages = config_lib.parse_stages(config.stages)
  except (CommandLineError, config_lib.ConfigError) as e:
    return fail(str(e))
  return execute(config, path, lambda pipe: lambda: pipe.run(stages))


if __name__ == "__main__":
  sys.exit(main())
