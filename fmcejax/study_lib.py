"""The study's grid, statistics and outputs (CLI.md "Study", METHOD.md "Telling the method's effect
from noise"), without any training: `study.py` runs the arms and hands their metrics here.

Conventions (as in `report.py`): accuracies are fractions in [0, 1]; gains are percentage points,
arm minus the baseline of the same seed, x100; per-seed lists follow the ascending seed order of
`study.json`'s `seeds`. Pairing is by seed, never by position, so runs collected in any order pair
correctly, and a seed missing on either side is refused rather than silently dropped.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import scipy.stats
from etils import epath
from matplotlib.figure import Figure

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
# Beside ARM_KEYS, a control arm whose real arm ran: that arm minus the control, seed by seed.
CONTROL_KEY = "trained_minus_control"
OUTPUTS = ("study.json", "study.md", "plot_study.png")


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


def fmcs_per_epoch(histories: Sequence[Sequence[Mapping]]) -> list[float | None]:
  """Mean over seeds of each epoch's FMCS (epochs 1, 2, ... of metrics.json `history`); None
  where no seed recorded one."""
  _, mean, _, _ = report.band(histories, "fmcs")
  return workdir.plain(mean)


def build_study(
  *,
  dataset: str,
  backbone: str,
  baseline: Mapping[int, Mapping],
  arms: Sequence[tuple[Arm, Mapping[int, Mapping]]],
) -> dict[str, Any]:
  """`study.json`'s content from the runs' metrics.json dicts (seed -> metrics), one baseline
  per seed and each arm's runs over the same seeds."""
  seeds = sorted(baseline)
  base = {s: baseline[s]["test_accuracy"] for s in seeds}
  records = []
  for arm, runs in arms:
    stats = arm_stats(base, {s: m["test_accuracy"] for s, m in runs.items()})
    records.append(
      {
        "name": arm.name,
        "alpha": arm.alpha,
        "module": arm.module,
        "variant": arm.variant,
        "head": arm.head,
        **stats,
        "fmcs_per_epoch": fmcs_per_epoch([runs[s]["history"] for s in seeds]),
      }
    )
  _compare_controls(records, seeds)
  return workdir.plain(
    {
      "dataset": dataset,
      "backbone": backbone,
      "seeds": seeds,
      "baseline_accuracy": [base[s] for s in seeds],
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


# ---------------------------------------------------------------------------------------------
# Outputs.


def _pp(x: float | None) -> str:
  return "n/a" if x is None else f"{x:+.2f}"


def _ci_text(ci: Sequence[float] | None) -> str:
  return "n/a" if ci is None else f"[{_pp(ci[0])}, {_pp(ci[1])}]"


def _markdown(study: Mapping) -> str:
  base_mean, base_std = report.mean_std(study["baseline_accuracy"])
  per_seed = ", ".join(f"{100 * a:.2f}" for a in study["baseline_accuracy"])
  lines = [
    f"# FMCE-Net++ study: {study['backbone']} on {study['dataset']}",
    "",
    f"Seeds {study['seeds']}. Baseline test accuracy {100 * base_mean:.2f} ± "
    f"{100 * base_std:.2f} % (per seed: {per_seed}).",
    "",
    "Gains are percentage points, arm minus the baseline of the same seed; ± is the sample std "
    "over seeds; the 95% CI is the Student t interval of the paired mean difference (n - 1 "
    "degrees of freedom; n/a for n = 1). Heads: `trained` is the FMCE-Net; the controls keep "
    "its arm's alpha, module and RAL but not its knowledge: `shuffled` was trained on shuffled "
    "phase labels, `random` is untrained.",
    "",
    "| arm | head | module | alpha | variant | n | gain (pp), mean ± std | 95% CI (pp) "
    "| per-seed gains (pp) |",
    "|---|---|---|---:|---|---:|---:|---|---|",
  ]
  for arm in study["arms"]:
    gains = ", ".join(_pp(g) for g in arm["gains_pp"])
    lines.append(
      f"| {arm['name']} | {arm['head']} | {arm['module']} | {arm['alpha']:g} | "
      f"{arm['variant']} | {arm['n']} | {_pp(arm['gain_pp_mean'])} ± "
      f"{arm['gain_pp_std']:.2f} | {_ci_text(arm['ci95_pp'])} | {gains} |"
    )
  compared = [arm for arm in study["arms"] if CONTROL_KEY in arm]
  if compared:
    lines += [
      "",
      "Is it the convergence knowledge? The trained arm minus each control with the same alpha, "
      "module and RAL, seed by seed (positive: the trained head does better):",
      "",
      "| control | trained arm | trained minus control (pp), mean ± std | 95% CI (pp) |",
      "|---|---|---:|---|",
    ]
    for arm in compared:
      d = arm[CONTROL_KEY]
      lines.append(
        f"| {arm['name']} | {d['arm']} | {_pp(d['gain_pp_mean'])} ± {d['gain_pp_std']:.2f} "
        f"| {_ci_text(d['ci95_pp'])} |"
      )
  lines += ["", "![forest plot of the gains](plot_study.png)"]
  return "\n".join(lines) + "\n"


def forest_layout(
  arms: Sequence[Mapping],
) -> tuple[list[tuple[float, Mapping]], list[tuple[str, float]]]:
  """Rows of the forest plot, top to bottom: arms grouped by module (in order of first
  appearance), trained heads before controls, a blank row between groups.

  Returns (y, arm) per arm and (module, y of its label) per group; y decreases downwards.
  """
  modules = list(dict.fromkeys(a["module"] for a in arms))
  rows, groups, y = [], [], 0.0
  for module in modules:
    members = [a for a in arms if a["module"] == module]
    members.sort(key=lambda a: HEADS.index(a["head"]))  # stable: keeps the grid order within
    groups.append((module, y))
    for arm in members:
      y -= 1.0
      rows.append((y, arm))
    y -= 1.0
  return rows, groups


_STYLE = {
  "trained": dict(color="C0", marker="o", mfc="C0"),
  "shuffled": dict(color="C3", marker="s", mfc="white"),
  "random": dict(color="C7", marker="D", mfc="white"),
}


def _row_label(arm: Mapping) -> str:
  control = "" if arm["head"] == "trained" else f" [{arm['head']}]"
  return f"{arm['variant']}, alpha {arm['alpha']:g}{control}"


def plot_study(study: Mapping, path: str | os.PathLike) -> Figure:
  """Forest plot: each arm's mean gain with its 95% CI, a zero line, arms grouped by module."""
  rows, groups = forest_layout(study["arms"])
  fig = Figure(figsize=(8, 1.2 + 0.35 * (len(rows) + len(groups))), layout="constrained")
  ax = fig.subplots()
  ax.axvline(0.0, color="k", linewidth=0.8)
  for y, arm in rows:
    ci = arm["ci95_pp"]
    mean = arm["gain_pp_mean"]
    xerr = None if ci is None else [[mean - ci[0]], [ci[1] - mean]]
    ax.errorbar(
      mean, y, xerr=xerr, capsize=3, linestyle="none", **_STYLE[arm["head"]], label=arm["head"]
    )
  for i, (module, y) in enumerate(groups):
    bottom = min(r for r, a in rows if a["module"] == module)
    ax.axhspan(bottom - 0.5, y + 0.5, color="0.93" if i % 2 == 0 else "white", zorder=0)
    ax.text(
      0.0, y, f"module {module}", transform=ax.get_yaxis_transform(), fontweight="bold", va="center"
    )
  ax.set_yticks([y for y, _ in rows], [_row_label(a) for _, a in rows])
  ax.set_ylim(min(y for y, _ in rows) - 0.7, 0.7)
  handles, labels = ax.get_legend_handles_labels()
  unique = dict(zip(labels, handles))
  ax.legend(
    unique.values(),
    unique.keys(),
    title="head",
    fontsize="small",
    loc="upper left",
    bbox_to_anchor=(1.01, 1.0),
  )
  ax.set_xlabel("gain over the paired baseline (pp): mean and 95% CI over seeds")
  ax.set_title(
    f"FMCE-Net++ study: {study['backbone']} on {study['dataset']}, seeds {study['seeds']}"
  )
  report.save_figure(fig, path)
  return fig


def write_study(root: str | os.PathLike, study: Mapping) -> None:
  """Write study.json, study.md and plot_study.png into `root` (local or gs://), atomically;
  checks the contract's keys first, so nothing is written for a malformed study."""
  missing = [k for k in STUDY_KEYS if k not in study]
  missing += [
    f"arms[{i}].{k}" for i, a in enumerate(study.get("arms", [])) for k in ARM_KEYS if k not in a
  ]
  if missing:
    raise KeyError(f"study lacks required keys {missing}")
  study = workdir.plain(study)
  root = epath.Path(root)
  plot_study(study, root / "plot_study.png")
  workdir.write_text(root / "study.md", _markdown(study))
  workdir.write_json(root / "study.json", study)
