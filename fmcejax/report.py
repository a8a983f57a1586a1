"""The `report` stage: compare baseline and FMCE-Net++ runs (METHOD.md step 6).

Reads the other stages' outputs from the workdir and writes ``report.json``, ``report.md`` and
``plot_cqi.png`` / ``plot_accuracy.png`` / ``plot_fmcs.png`` in the workdir root.

Conventions:

* Accuracies are fractions in [0, 1], as in every ``metrics.json``; only gains are in percentage
  points: gain_pp = (fmcenetpp - baseline) * 100 for the same seed.
* ``*_std`` are sample standard deviations over seeds (ddof=1) and 0.0 with a single seed, where the
  spread is not estimable (reported as 0 rather than NaN so the JSON stays plain numbers).
* Seeds are reported in ascending order; every per-seed list follows that order.
* Plots use matplotlib's ``Figure`` directly (Agg canvas), never pyplot, so nothing global (the
  backend of a notebook, pyplot's figure registry) is touched.
* Every file is written atomically (temp file in the same directory, then ``os.replace``), so a
  killed run never leaves a half-written report for a resumed run to trust.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np
import PIL.Image
from etils import epath
from matplotlib.figure import Figure

from fmcejax import workdir

PLOTS = ("plot_cqi.png", "plot_accuracy.png", "plot_fmcs.png")
RUNS = ("baseline", "fmcenetpp")
_LABELS = {"baseline": "baseline (alpha = 0)", "fmcenetpp": "FMCE-Net++"}


def save_figure(fig: Figure, path: epath.Path) -> None:
  with workdir.open_atomic(path, "wb") as f:
    fig.savefig(f, format="png", dpi=120)


# ---------------------------------------------------------------------------------------------
# Reading the stage outputs.


def _read_json(path: epath.Path, stage: str, required: Sequence[str]) -> dict:
  """Load one stage output; a missing file or key names the file and the stage that writes it."""
  if not path.is_file():
    raise FileNotFoundError(
      f"report needs {path}, which is written by stage '{stage}'; run that stage first "
      f"(e.g. --config.stages={stage},report) or use the workdir it wrote to."
    )
  with path.open() as f:
    data = json.load(f)
  missing = [key for key in required if key not in data]
  if missing:
    raise KeyError(f"{path} (written by stage '{stage}') lacks required keys {missing}")
  return data


def _seeds(config: Mapping) -> list[int]:
  seeds = config["seeds"]
  if isinstance(seeds, int) or not all(isinstance(s, (int, np.integer)) for s in seeds):
    raise ValueError(f"report needs config.seeds resolved to a list of ints, got {seeds!r}")
  seeds = sorted(int(s) for s in seeds)
  if not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f"config.seeds must be a non-empty list of distinct ints, got {seeds}")
  return seeds


def _read_run(root: epath.Path, run: str, seed: int) -> dict:
  metrics = _read_json(
    root / run / f"seed_{seed}" / "metrics.json", run, ("test_accuracy", "history")
  )
  accuracy = metrics["test_accuracy"]
  if not 0.0 <= accuracy <= 1.0:
    raise ValueError(
      f"{root / run / f'seed_{seed}' / 'metrics.json'}: test_accuracy={accuracy} "
      "is not a fraction in [0, 1]"
    )
  return metrics


# ---------------------------------------------------------------------------------------------
# Statistics.


def summarise_runs(runs: Sequence[Mapping], seeds: Sequence[int], alpha: float) -> dict:
  """A paired stage's ``metrics.json``: its runs (one per seed, in ``seeds`` order) summarised."""
  accuracies = [r["test_accuracy"] for r in runs]
  return {
    "seeds": list(seeds),
    "test_accuracy": sum(accuracies) / len(accuracies),
    "test_accuracy_per_seed": accuracies,
    "test_loss": sum(r["test_loss"] for r in runs) / len(runs),
    "epochs": runs[0]["epochs"],
    "images_per_second": sum(r["images_per_second"] or 0 for r in runs) / len(runs),
    "alpha": alpha,
  }


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample std (ddof=1); std is 0.0 for a single value."""
  values = np.asarray(values, dtype=np.float64)
  std = float(np.std(values, ddof=1)) if values.size > 1 else 0.0
  return float(np.mean(values)), std


def band(histories: Sequence[Sequence[Mapping]], key: str) -> tuple[np.ndarray, ...]:
  """Per-epoch mean, min and max of ``key`` over seeds, aligned by epoch; None/absent -> NaN."""
  epochs = np.array(sorted({int(row["epoch"]) for h in histories for row in h}))
  column = {int(e): i for i, e in enumerate(epochs)}
  values = np.full((len(histories), epochs.size), np.nan)
  for i, history in enumerate(histories):
    for row in history:
      if row.get(key) is not None:
        values[i, column[int(row["epoch"])]] = float(row[key])
  count = np.sum(~np.isnan(values), axis=0)
  mean = np.where(count > 0, np.nansum(values, axis=0) / np.maximum(count, 1), np.nan)
  # fmin/fmax skip NaN without the all-NaN warnings of nanmin/nanmax.
  return epochs, mean, np.fmin.reduce(values, axis=0), np.fmax.reduce(values, axis=0)


# ---------------------------------------------------------------------------------------------
# Plots.


def _nan_list(values: Sequence[float | None]) -> np.ndarray:
  return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _plot_cqi(cqi_json: Mapping, path: epath.Path) -> None:
  losses = _nan_list(cqi_json["losses"])
  cqi_values = _nan_list(cqi_json["cqi"])
  epochs = np.arange(1, losses.size + 1)
  t_c = cqi_json["converged_epoch"]

  fig = Figure(figsize=(7, 6), layout="constrained")
  ax_loss, ax_cqi = fig.subplots(2, 1, sharex=True)
  ax_loss.plot(epochs, losses, marker=".", color="C0")
  ax_loss.set_ylabel("probe train loss")
  ax_cqi.plot(epochs, cqi_values, marker=".", color="C1", label="CQI")
  ax_cqi.set_yscale("log", nonpositive="mask")
  ax_cqi.axhline(cqi_json["threshold"], color="k", linestyle=":", label="threshold mu")
  for ax in (ax_loss, ax_cqi):
    for i, marker in enumerate(cqi_json["markers"]):
      label = "phase markers" if i == 0 else None
      ax.axvline(marker, color="grey", linestyle="--", linewidth=0.8, label=label)
    label = "T_c" if cqi_json["converged"] else "T_c (fallback: never converged)"
    ax.axvline(t_c, color="C3", linewidth=1.2, label=label)
  ax_cqi.set_xlabel("epoch")
  ax_cqi.set_ylabel("CQI (log)")
  ax_cqi.legend(fontsize="small")
  fig.suptitle("Probe run: loss, CQI and convergence phases")
  save_figure(fig, path)


def _plot_runs(
  runs: Mapping[str, Sequence[Mapping]],
  key: str,
  scale: float,
  ylabel: str,
  title: str,
  path: epath.Path,
) -> None:
  """Mean over seeds with a min/max band, one curve per run."""
  fig = Figure(figsize=(7, 4), layout="constrained")
  ax = fig.subplots()
  for i, (run, histories) in enumerate(runs.items()):
    epochs, mean, lo, hi = band([m["history"] for m in histories], key)
    label = f"{_LABELS[run]} (mean of {len(histories)} seeds)"
    ax.plot(epochs, mean * scale, marker=".", color=f"C{i}", label=label)
    ax.fill_between(epochs, lo * scale, hi * scale, color=f"C{i}", alpha=0.2, linewidth=0)
  ax.set_xlabel("epoch")
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.legend(fontsize="small")
  save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# The report.


def _markdown(report: Mapping) -> str:
  def pct(x: float) -> str:
    return f"{100 * x:.2f}"

  lines = [
    f"# FMCE-Net++ report: {report['backbone']} on {report['dataset']}",
    "",
    f"Module `{report['module']}`, alpha = {report['alpha']}, seeds {report['seeds']}. "
    "Test accuracy in percent; gain in percentage points (FMCE-Net++ minus baseline, same seed); "
    "± is the sample std over seeds.",
    "",
    "| seed | baseline (%) | FMCE-Net++ (%) | gain (pp) |",
    "|---:|---:|---:|---:|",
  ]
  for pair in report["pairs"]:
    lines.append(
      f"| {pair['seed']} | {pct(pair['baseline'])} | {pct(pair['fmcenetpp'])} | {pair['gain_pp']:+.2f} |"
    )
  lines.append(
    f"| **mean ± std** | {pct(report['baseline_accuracy_mean'])} ± {pct(report['baseline_accuracy_std'])} "
    f"| {pct(report['fmcenetpp_accuracy_mean'])} ± {pct(report['fmcenetpp_accuracy_std'])} "
    f"| **{report['gain_pp_mean']:+.2f} ± {report['gain_pp_std']:.2f}** |"
  )
  if report["converged"]:
    convergence = (
      f"The probe run converged (CQI below threshold) at epoch T_c = {report['converged_epoch']}."
    )
  else:
    convergence = (
      f"The probe run **never converged** (CQI never fell below its threshold); "
      f"T_c fell back to the last epoch, {report['converged_epoch']}."
    )
  lines += [
    "",
    "## Convergence and FMCE-Net",
    "",
    f"{convergence} Phase markers: {', '.join(str(m) for m in report['markers'])}.",
    f"FMCE-Net phase accuracy on held-out feature maps: {pct(report['fmce_net_phase_accuracy'])} %; "
    f"FMCS mean absolute error: {report['fmcs_mae']:.4f}.",
    "",
    "## Plots",
    "",
  ]
  lines += [f"![{name.removesuffix('.png')}]({name})" for name in report["plots"]]
  return "\n".join(lines) + "\n"


def data_summary(info) -> dict:
  """What report.json says of the data (a `datasets.DatasetInfo`): where the numbers come from
  and how the images were normalised."""
  return {
    "tfds_name": info.tfds_name,
    "train_split": info.train_split,
    "test_split": info.test_split,
    "num_train": info.num_train,
    "num_test": info.num_test,
    "num_classes": info.num_classes,
    "image_shape": list(info.image_shape),
    "mean": list(info.mean),
    "std": list(info.std),
  }


def write_report(root: epath.PathLike, config: Mapping) -> dict:
  """Build ``report.json``, ``report.md`` and the plots from the stage outputs in ``workdir``.

  ``config`` (ConfigDict or dict) supplies ``dataset``, ``backbone``, ``module`` (resolved name),
  ``alpha`` and ``seeds`` (resolved list of ints). All inputs are read and checked before anything
  is written. Returns the report dict as written to ``report.json``.
  """
  root = epath.Path(root)
  seeds = _seeds(config)
  cqi_json = _read_json(
    root / "probe" / "cqi.json",
    "cqi",
    ("losses", "cqi", "converged_epoch", "markers", "converged", "threshold"),
  )
  fmce_net = _read_json(
    root / "fmce_net" / "metrics.json", "fmce_net", ("phase_accuracy", "fmcs_mae")
  )
  runs = {run: [_read_run(root, run, seed) for seed in seeds] for run in RUNS}

  baseline = [m["test_accuracy"] for m in runs["baseline"]]
  fmcenetpp = [m["test_accuracy"] for m in runs["fmcenetpp"]]
  gains = [(f - b) * 100.0 for b, f in zip(baseline, fmcenetpp)]
  gain_mean, gain_std = mean_std(gains)
  base_mean, base_std = mean_std(baseline)
  fpp_mean, fpp_std = mean_std(fmcenetpp)

  report = {
    "dataset": config["dataset"],
    "backbone": config["backbone"],
    "module": config["module"],
    "alpha": config["alpha"],
    "seeds": seeds,
    "baseline_accuracy": baseline,
    "fmcenetpp_accuracy": fmcenetpp,
    "gain_pp_mean": gain_mean,
    "gain_pp_std": gain_std,
    "converged_epoch": cqi_json["converged_epoch"],
    "fmce_net_phase_accuracy": fmce_net["phase_accuracy"],
    "pairs": [
      {"seed": s, "baseline": b, "fmcenetpp": f, "gain_pp": g}
      for s, b, f, g in zip(seeds, baseline, fmcenetpp, gains)
    ],
    "baseline_accuracy_mean": base_mean,
    "baseline_accuracy_std": base_std,
    "fmcenetpp_accuracy_mean": fpp_mean,
    "fmcenetpp_accuracy_std": fpp_std,
    "converged": cqi_json["converged"],
    "markers": cqi_json["markers"],
    "fmcs_mae": fmce_net["fmcs_mae"],
    "plots": list(PLOTS),
  }
  if "data" in config:
    report["data"] = config["data"]
  report = workdir.plain(report)  # ConfigDict alpha, numpy scalars -> plain JSON values

  _plot_cqi(cqi_json, root / "plot_cqi.png")
  _plot_runs(
    runs,
    "test_accuracy",
    100.0,
    "test accuracy (%)",
    "Test accuracy per epoch (band: min/max over seeds)",
    root / "plot_accuracy.png",
  )
  _plot_runs(
    runs,
    "fmcs",
    1.0,
    "mean predicted FMCS",
    "FMCS trajectory (frozen FMCE-Net, held-out batch)",
    root / "plot_fmcs.png",
  )
  workdir.write_text(root / "report.md", _markdown(report))
  workdir.write_json(root / "report.json", report)
  return report


def log_tensorboard(root: epath.PathLike, report: Mapping) -> None:
  """The probe's loss and CQI curves as scalars and the report plots as images, for TensorBoard."""
  from tensorboardX import SummaryWriter

  root = epath.Path(root)
  cqi_json = workdir.read_json(root / "probe" / "cqi.json")
  writer = SummaryWriter(os.fspath(root / "tb_report"))
  for epoch, (loss, value) in enumerate(zip(cqi_json["losses"], cqi_json["cqi"]), start=1):
    writer.add_scalar("probe/train_loss", loss, epoch)
    if value is not None:
      writer.add_scalar("probe/cqi", value, epoch)
  for name in report["plots"]:
    image = PIL.Image.open(io.BytesIO((root / name).read_bytes())).convert("RGB")
    writer.add_image(f"report/{name.removesuffix('.png')}", np.asarray(image), dataformats="HWC")
  writer.close()
