"""The study's grid and statistics (CLI.md "Study", METHOD.md "Telling the method's effect from
noise"), without any training: `study.py` runs the arms and hands their metrics here;
`study_report.py` writes what `build_study` returns.

Conventions (as in `report.py`): accuracies are fractions in [0, 1]; gains are percentage points,
arm minus the baseline of the same seed, x100; per-seed lists follow the ascending seed order of
`study.json`'s `seeds`. Pairing is by seed, never by position, so runs collected in any order pair
correctly, and a seed missing on either side is refused rather than silently dropped.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import scipy.stats

from fmcejax import report, workdir
from fmcejax.config_lib import ConfigError

VARIANTS = ("convex", "additive", "regression")
CONTROLS = ("shuffled", "random")
HEADS = ("trained",) + CONTROLS
# The run config fields each RAL variant sets (config_lib.RAL_MODES x RAL_TARGETS).
RAL_FIELDS: dict[str, dict[str, str]] = {
  "convex": {"ral": "convex", "ral_target": "phase"},
  "additive": {"ral": "additive", "ral_target": "phase"},
  "regression": {"ral": "convex", "ral_target": "regression"},
}
CI_METHOD = "student_t_paired"
STUDY_KEYS = ("dataset", "backbone", "seeds", "baseline_accuracy", "arms")
ARM_KEYS = (
  "name",
  "alpha",
  "module",
  "variant",
  "head",
  "accuracy",
  "gains_pp",
  "gain_pp_mean",
  "gain_pp_std",
  "ci95_pp",
  "ci_method",
  "n",
  "fmcs_per_epoch",
)
# Beyond the contract: per-epoch curves of the study and of each arm (`plot_curves.png`).
CURVE_KEYS = ("baseline_accuracy_per_epoch", "baseline_fmcs_per_epoch")
ARM_CURVE_KEYS = ("accuracy_per_epoch",)
# Beside ARM_KEYS, a control arm whose real arm ran: that arm minus the control, seed by seed.
CONTROL_KEY = "trained_minus_control"


@dataclasses.dataclass(frozen=True)
class Arm:
  """One FMCE-Net++ configuration of the grid, run once per seed against that seed's baseline."""

  name: str
  alpha: float
  module: str
  variant: str  # one of VARIANTS
  head: str  # one of HEADS: the FMCE-Net it trains against

  def config_fields(self) -> dict[str, Any]:
    """The run config fields this arm sets; everything else is the baseline's recipe."""
    return {"alpha": self.alpha, "module": self.module, **RAL_FIELDS[self.variant]}

  def run_config(self, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` with this arm's fields set (`config` is left as it is)."""
    config = config.copy_and_resolve_references()
    config.update(self.config_fields())
    return config


def arm_name(head: str, module: str, variant: str, alpha: float) -> str:
  """Readable, filesystem-safe and unique per arm: `repr` is float's shortest round-trip form."""
  return f"{head}_{module}_{variant}_a{float(alpha)!r}"


# ---------------------------------------------------------------------------------------------
# The grid.


def _items(study: Mapping, field: str) -> list[str]:
  """The comma list `study.<field>` (a string, or a sequence when set from Python)."""
  value = study[field]
  parts = value.split(",") if isinstance(value, str) else [str(v) for v in value]
  items = [p.strip() for p in parts if p.strip()]
  duplicates = sorted({i for i in items if items.count(i) > 1})
  if duplicates:
    raise ConfigError(
      f"study.{field}", value, "a comma list without repeats", f"Repeated: {', '.join(duplicates)}."
    )
  return items


def _choices(
  study: Mapping, field: str, accepted: Sequence[str], *, allow_empty: bool
) -> list[str]:
  items = _items(study, field)
  unknown = [i for i in items if i not in accepted]
  if unknown or not (items or allow_empty):
    empty = ', or "" for none' if allow_empty else ""
    why = f"Unknown: {', '.join(unknown)}." if unknown else "The list is empty."
    raise ConfigError(
      f"study.{field}", study[field], f"a comma list of {', '.join(accepted)}{empty}", why
    )
  return items


def _alphas(study: Mapping) -> list[float]:
  accepted = "a non-empty comma list of numbers in [0, 1], e.g. 0.03,0.1,0.3"
  items = _items(study, "alphas")
  try:
    alphas = [float(a) for a in items]
  except ValueError:
    raise ConfigError("study.alphas", study["alphas"], accepted) from None
  if not alphas or not all(0.0 <= a <= 1.0 for a in alphas):  # NaN fails the comparison
    raise ConfigError("study.alphas", study["alphas"], accepted)
  if len(set(alphas)) != len(alphas):
    raise ConfigError("study.alphas", study["alphas"], accepted, "An alpha is repeated.")
  return alphas


def _control_alpha(study: Mapping, alphas: Sequence[float]) -> float:
  value = str(study["control_alpha"]).strip()
  if not value:
    return alphas[0]
  accepted = (
    f'one of the study\'s alphas ({", ".join(map(repr, alphas))}), or "" for the '
    "first: a control copies a real arm"
  )
  try:
    alpha = float(value)
  except ValueError:
    raise ConfigError("study.control_alpha", study["control_alpha"], accepted) from None
  if alpha not in alphas:
    raise ConfigError("study.control_alpha", study["control_alpha"], accepted)
  return alpha


def _control_module(study: Mapping, modules: Sequence[str]) -> str:
  value = str(study["control_module"]).strip()
  if value and value not in modules:
    raise ConfigError(
      "study.control_module",
      study["control_module"],
      f'one of the study\'s modules ({", ".join(modules)}), or "" for the first: '
      "a control copies a real arm",
    )
  return value or modules[0]


def expand_grid(study: Mapping, *, default_module: str, module_names: Sequence[str]) -> list[Arm]:
  """The arms: modules x variants x alphas with trained heads, then one arm per control.

  Each control copies the real arm at (`control_alpha`, `control_module`, first variant), so
  the two differ only in what the frozen head knows. Every field is checked before any arm is
  made; a bad one raises ConfigError naming `study.<field>`.
  """
  alphas = _alphas(study)
  modules = _choices(study, "modules", module_names, allow_empty=True) or [default_module]
  variants = _choices(study, "variants", VARIANTS, allow_empty=False)
  controls = _choices(study, "controls", CONTROLS, allow_empty=True)
  control_alpha = _control_alpha(study, alphas)
  control_module = _control_module(study, modules)
  arms = [
    Arm(arm_name("trained", m, v, a), a, m, v, "trained")
    for m in modules
    for v in variants
    for a in alphas
  ]
  arms += [
    Arm(
      arm_name(c, control_module, variants[0], control_alpha),
      control_alpha,
      control_module,
      variants[0],
      c,
    )
    for c in controls
  ]
  return arms


# ---------------------------------------------------------------------------------------------
# Statistics.


def arm_stats(baseline: Mapping[int, float], arm: Mapping[int, float]) -> dict[str, Any]:
  """Paired gains of one arm over the baseline, seed by seed (both map seed -> accuracy).

  `ci95_pp` is the Student t interval of the mean paired difference (n - 1 degrees of freedom).
  With n = 1 it is None: one difference says nothing about its spread; `gain_pp_std` is then 0.0,
  as in report.json, and `n` says why.
  """
  if set(baseline) != set(arm):
    raise ValueError(
      f"arm and baseline must have the same seeds (pairing is by seed): arm "
      f"{sorted(arm)}, baseline {sorted(baseline)}"
    )
  seeds = sorted(arm)
  if not seeds:
    raise ValueError("no seeds to pair")
  gains = [(float(arm[s]) - float(baseline[s])) * 100.0 for s in seeds]
  mean, std = report.mean_std(gains)
  n = len(gains)
  ci = None
  if n > 1:
    half = float(scipy.stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    ci = [mean - half, mean + half]
  return {
    "accuracy": [float(arm[s]) for s in seeds],
    "gains_pp": gains,
    "gain_pp_mean": mean,
    "gain_pp_std": std,
    "ci95_pp": ci,
    "ci_method": CI_METHOD,
    "n": n,
  }


def per_epoch(histories: Sequence[Sequence[Mapping]], key: str) -> list[float | None]:
  """Mean over seeds of each epoch's `key` (epochs 1, 2, ... of metrics.json `history`); None
  where no seed recorded one."""
  _, mean, _, _ = report.band(histories, key)
  return workdir.plain(mean)


def fmcs_per_epoch(histories: Sequence[Sequence[Mapping]]) -> list[float | None]:
  """The frozen head's mean predicted FMCS per epoch (CLI.md's `fmcs_per_epoch`)."""
  return per_epoch(histories, "fmcs")


def build_study(
  *,
  dataset: str,
  backbone: str,
  baseline: Mapping[int, Mapping],
  arms: Sequence[tuple[Arm, Mapping[int, Mapping]]],
) -> dict[str, Any]:
  """`study.json`'s content from the runs' metrics.json dicts (seed -> metrics), one baseline
  per seed and each arm's runs over the same seeds. Beside the contract's keys, the mean test
  accuracy per epoch of the baseline and of each arm, and the baseline's FMCS per epoch as read
  by the head that monitored it (None without one): the curves of `plot_curves.png`."""
  seeds = sorted(baseline)
  base = {s: baseline[s]["test_accuracy"] for s in seeds}
  base_histories = [baseline[s]["history"] for s in seeds]
  records = []
  for arm, runs in arms:
    stats = arm_stats(base, {s: m["test_accuracy"] for s, m in runs.items()})
    histories = [runs[s]["history"] for s in seeds]
    records.append(
      {
        "name": arm.name,
        "alpha": arm.alpha,
        "module": arm.module,
        "variant": arm.variant,
        "head": arm.head,
        **stats,
        "fmcs_per_epoch": fmcs_per_epoch(histories),
        "accuracy_per_epoch": per_epoch(histories, "test_accuracy"),
      }
    )
  _compare_controls(records, seeds)
  return workdir.plain(
    {
      "dataset": dataset,
      "backbone": backbone,
      "seeds": seeds,
      "baseline_accuracy": [base[s] for s in seeds],
      "baseline_accuracy_per_epoch": per_epoch(base_histories, "test_accuracy"),
      "baseline_fmcs_per_epoch": fmcs_per_epoch(base_histories),
      "arms": records,
    }
  )


def _compare_controls(records: list[dict[str, Any]], seeds: Sequence[int]) -> None:
  """Adds `CONTROL_KEY` to each control arm whose trained arm (same alpha, module and RAL) ran:
  the paired difference that says whether the head's convergence knowledge, not just a frozen
  auxiliary head, moves accuracy."""
  by_name = {r["name"]: r for r in records}
  for record in records:
    twin = by_name.get(arm_name("trained", record["module"], record["variant"], record["alpha"]))
    if record["head"] == "trained" or twin is None:
      continue
    stats = arm_stats(dict(zip(seeds, record["accuracy"])), dict(zip(seeds, twin["accuracy"])))
    record[CONTROL_KEY] = {"arm": twin["name"]} | {
      k: stats[k] for k in ("gains_pp", "gain_pp_mean", "gain_pp_std", "ci95_pp", "ci_method", "n")
    }
