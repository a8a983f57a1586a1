r"""FMCE-Net++ from one command: probe -> CQI -> FMCS-Dataset -> FMCE-Net -> baseline/FMCE-Net++ -> report.

    python -m fmcejax.train [--config NAME_OR_FILE] [--workdir DIR] [--config.FIELD=VALUE ...]

`--config` is a config file or the name of one that ships with the package (`cifar10_resnet50`);
the default is `mnist_cnn`; `--help` lists them and every field. The stages live in
`fmcejax.pipeline`; this module is the command (`cli.Command`), validation, the workdir's lock,
then the stages.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable

import ml_collections
from absl import flags

from fmcejax import cli, config_lib
from fmcejax.cli import CommandLineError, fail

EXIT_INTERRUPTED = 128 + signal.SIGINT  # a shell's status for a command stopped by Ctrl-C


def define_workdir() -> None:
  flags.DEFINE_string(
    "workdir", "./workdir", "where results go: local, or any etils.epath path (gs://bucket/run)"
  )


TRAIN = cli.Command(
  module="fmcejax.train",
  summary=__doc__.splitlines()[0],
  usage="[--config NAME_OR_FILE] [--workdir DIR] [--config.FIELD=VALUE ...]",
  examples=(
    "python -m fmcejax.train  # the default job: MNIST, small CNN, 3 seeds, in ./workdir",
    "python -m fmcejax.train --config=fashion_mnist_cnn --workdir=runs/fashion --config.seeds=5",
    "python -m fmcejax.train --config=cifar10_resnet18 --config.dataset=cifar10_jpeg "
    "--config.stages=probe,cqi",
  ),
  define=define_workdir,
)


def prepare_workdir(config: ml_collections.ConfigDict, path: str):
  """Validates `config`, then makes sure the workdir is writable, locked and holds this config.
  Returns (workdir, lock handle); the lock holds until the process exits."""
  import jax  # here, not at the top: see `execute`

  from fmcejax import workdir

  config_lib.validate(config, device_count=jax.device_count(), process_count=jax.process_count())
  root = workdir.path(path)
  workdir.check_writable(root)
  lock = workdir.lock(root)
  workdir.check_config(config, root)
  return root, lock


def execute(
  config: ml_collections.ConfigDict,
  path: str,
  job: Callable[..., Callable[[], object]],
  results: str = "",
) -> int:
  """A parsed command's body, shared by `train` and `study`: the workdir's guards, then
  `job(stages)()` with `stages` a `pipeline.Pipeline`; bad input exits 2 before anything
  compiles. SIGTERM and Ctrl-C stop at the next step with a checkpoint (exit 0 and 130); a second
  Ctrl-C stops at once. jax and the stages are imported here, so --help and typos answer fast."""
  from fmcejax import datasets, parallel, pipeline, trainer
  from fmcejax.tools import preflight_compile

  signal.signal(signal.SIGTERM, trainer.request_preemption)
  signal.signal(signal.SIGINT, trainer.request_preemption)
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
  try:
    run()
  except trainer.Preempted as e:
    print(f"fmcejax: {e}", file=sys.stderr)
    return EXIT_INTERRUPTED if trainer.preemption_signal() == "SIGINT" else 0
  print(f"fmcejax: done; results in {root / results}")
  return 0


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv if argv is None else argv
  try:
    config = cli.parse(TRAIN, argv)
    stages = config_lib.parse_stages(config.stages)
  except (CommandLineError, config_lib.ConfigError) as e:
    return fail(str(e))
  return execute(config, flags.FLAGS.workdir, lambda pipe: lambda: pipe.run(stages))


if __name__ == "__main__":
  sys.exit(main())
