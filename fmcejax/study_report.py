"""What a study writes: `study.json`, `study.md`, the forest plot of the gains
(`plot_study.png`) and the per-epoch curves of the baseline and every arm (`plot_curves.png`)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
from etils import epath
from matplotlib.figure import Figure

from fmcejax import report, workdir
from fmcejax.study_lib import ARM_KEYS, CONTROL_KEY, HEADS, STUDY_KEYS

OUTPUTS = ("study.json", "study.md", "plot_study.png", "plot_curves.png")


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
  lines += [
    "",
    "![forest plot of the gains](plot_study.png)",
    "",
    "![accuracy and FMCS per epoch, baseline and arms](plot_curves.png)",
  ]
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


def _curve(values: Sequence[float | None] | None, scale: float = 1.0) -> tuple[np.ndarray, ...]:
  y = np.array([np.nan if v is None else scale * v for v in values or []], dtype=np.float64)
  return np.arange(1, y.size + 1), y


def plot_curves(study: Mapping, path: str | os.PathLike) -> Figure:
  """Test accuracy and the frozen head's predicted FMCS per epoch, mean over seeds: the
  baseline (black; its FMCS as read by the head that monitored it) and every arm."""
  fig = Figure(figsize=(12, 4.5), layout="constrained")
  ax_acc, ax_fmcs = fig.subplots(1, 2)
  base = ("baseline", "k", study.get("baseline_accuracy_per_epoch"))
  lines = [(*base, study.get("baseline_fmcs_per_epoch"))]
  for i, arm in enumerate(study["arms"]):
    color = f"C{i % 10}"
    lines.append((arm["name"], color, arm.get("accuracy_per_epoch"), arm.get("fmcs_per_epoch")))
  for label, color, accuracy, fmcs in lines:
    style = dict(color=color, marker=".", linewidth=1.2, label=label)
    ax_acc.plot(*_curve(accuracy, 100.0), **style)
    ax_fmcs.plot(*_curve(fmcs), **style)
  ax_acc.set(xlabel="epoch", ylabel="test accuracy (%), mean over seeds", title="accuracy")
  ax_fmcs.set(xlabel="epoch", ylabel="predicted FMCS, mean over seeds", ylim=(-0.02, 1.02))
  ax_fmcs.set_title("the frozen head's FMCS of the backbone")
  ax_fmcs.legend(fontsize="small", loc="lower right")
  fig.suptitle(f"{study['backbone']} on {study['dataset']}, seeds {study['seeds']}")
  report.save_figure(fig, path)
  return fig


def write_study(root: str | os.PathLike, study: Mapping) -> None:
  """Write `OUTPUTS` into `root` (local or gs://), atomically;
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
  plot_curves(study, root / "plot_curves.png")
  workdir.write_text(root / "study.md", _markdown(study))
  workdir.write_json(root / "study.json", study)
