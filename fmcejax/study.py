r"""Does FMCE-Net++ help, where and why: a grid of arms against paired baselines, in one workdir.

    python -m fmcejax.study [--config NAME_OR_FILE] [--workdir DIR] [--study.FIELD=VALUE ...]
                            [--config.FIELD=VALUE ...]

Arms are alphas x modules x RAL variants with the trained FMCE-Net, plus control arms whose frozen
head knows nothing of convergence (`shuffled`: trained on shuffled phase labels; `random`:
untrained). Each arm runs once per seed, paired with the baseline of the same seed (same data
order and schedule). Work that does not depend on an arm runs once, through the train pipeline's
own building blocks: the probe and CQI; one FMCS-Dataset and FMCE-Net per module; one baseline
per seed. Re-running the same command resumes; a finished run is never redone. Writes
`study.json`, `study.md`, `plot_study.png` and `plot_curves.png` (`study_report`).
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

import ml_collections
from absl import flags

from fmcejax import cli, config_lib, train

if TYPE_CHECKING:  # imported when the study runs, not for --help and typos (`train.execute`)
  from etils import epath

  from fmcejax import pipeline, study_lib


class Study:
  """The arms of a study over one `pipeline.Pipeline` (its workdir, data and recipe)."""

  def __init__(self, stages: pipeline.Pipeline, arms: list[study_lib.Arm]):
    self.stages, self.arms = stages, arms
    self.root = stages.root

  def _once(self, name: str, done: tuple[str, ...], run) -> None:
    """Runs a shared piece of work unless its metrics exist."""
    if self.stages.done(*done):
      return
    logging.info("study: %s: starting", name)
    self.stages.write_metrics(run(), *done)

  def module_dir(self, module: str) -> epath.Path:
    return self.root / "modules" / module

  def head(self, arm: study_lib.Arm) -> tuple[Any, Any]:
    """The arm's frozen head; trains what it needs (once per module and head kind)."""
    data = self.module_dir(arm.module) / "fmcs_data"
    self._once(
      f"fmcs_data {arm.module}",
      ("modules", arm.module, "fmcs_data"),
      lambda: self.stages.build_fmcs(arm.module, data),
    )
    if arm.head == "random":
      return self.stages.frozen_head(arm.module, data, None)
    name = "fmce_net" if arm.head == "trained" else f"fmce_net_{arm.head}"
    trained = self.module_dir(arm.module) / name
    labels = "phase" if arm.head == "trained" else arm.head
    self._once(
      f"{name} {arm.module}",
      ("modules", arm.module, name),
      lambda: self.stages.train_fmce_net(data, trained, labels=labels),
    )
    return self.stages.frozen_head(arm.module, data, trained)

  def monitor_head(self) -> tuple[Any, Any] | None:
    """The first trained arm's head: the baselines report its FMCS per epoch (it is evaluated,
    never trained through), so their curve sits beside the arms'. None without a trained arm."""
    trained = [arm for arm in self.arms if arm.head == "trained"]
    return self.head(trained[0]) if trained else None

  def run(self) -> dict[str, Any]:
    import jax

    from fmcejax import study_lib, study_report

    s = self.stages
    s.run(["probe", "cqi"])
    monitor = self.monitor_head()
    baselines = {
      seed: s.backbone_run(
        self.root / "baseline" / f"seed_{seed}",
        seed=seed,
        role="baseline",
        head=monitor,
        train_with_head=False,
      )
      for seed in s.seeds
    }
    results = []
    for arm in self.arms:
      head, config = self.head(arm), arm.run_config(s.config)
      runs = {
        seed: s.backbone_run(
          self.root / "arms" / arm.name / f"seed_{seed}",
          seed=seed,
          role=arm.name,
          head=head,
          train_with_head=True,
          config=config,
        )
        for seed in s.seeds
      }
      results.append((arm, runs))
    summary = study_lib.build_study(
      dataset=s.config.dataset, backbone=s.config.backbone, baseline=baselines, arms=results
    )
    if jax.process_index() == 0:
      study_report.write_study(self.root, summary)
    return summary


def study_config() -> ml_collections.ConfigDict:
  """The grid, set with `--study.FIELD=VALUE`. Every field is a string (comma lists), so the
  command line spells them all the same way and "" can mean "the default"."""
  s = ml_collections.ConfigDict()
  s.alphas = "0.1"  # comma list of RAL weights, each in [0, 1]
  s.modules = ""  # comma list of backbone stages; "" = the config's module
  s.variants = "convex"  # comma list of convex | additive | regression (study_lib.RAL_FIELDS)
  s.controls = "shuffled,random"  # comma list of shuffled | random, or "" for none
  s.control_alpha = ""  # the controls' alpha, one of `alphas`; "" = the first alpha
  s.control_module = ""  # the controls' module, one of `modules`; "" = the first one
  return s


STUDY = cli.Command(
  module="fmcejax.study",
  summary=__doc__.splitlines()[0],
  usage="[--config NAME_OR_FILE] [--workdir DIR] [--study.FIELD=VALUE ...] "
  "[--config.FIELD=VALUE ...]",
  examples=(
    "python -m fmcejax.study --workdir=studies/mnist  # alpha 0.1 and both controls, 3 seeds",
    "python -m fmcejax.study --config=fashion_mnist_cnn --workdir=studies/fashion "
    "--config.seeds=5 --study.alphas=0.03,0.1,0.3 --study.modules=conv2,conv3 --study.controls=",
    "python -m fmcejax.study --config=fashion_mnist_cnn --workdir=studies/fashion "
    "--config.seeds=5 --study.alphas=0.03,0.1,0.3 --study.modules=conv2,conv3 "
    "--study.control_alpha=0.03 --study.control_module=conv2",
  ),
  define=train.define_workdir,
  dicts=(
    cli.ConfigDictFlag(
      "study", study_config, "fmcejax.study:study_config", "the study's grid (below)"
    ),
  ),
)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv if argv is None else argv
  try:
    config = cli.parse(STUDY, argv)
    from fmcejax import study_lib  # jax: only once the command line parsed

    names = config_lib.module_names(config)
    arms = study_lib.expand_grid(
      flags.FLAGS.study, default_module=config.module or names[-1], module_names=names
    )
  except (cli.CommandLineError, config_lib.ConfigError) as e:
    return cli.fail(str(e))
  return train.execute(
    config, flags.FLAGS.workdir, lambda stages: Study(stages, arms).run, "study.md"
  )


if __name__ == "__main__":
  sys.exit(main())
