"""The report stage on a fake workdir: JSON consistency, plots, markdown, missing inputs."""

import json
import math
import statistics

import ml_collections
import pytest

from fmcejax import cqi as cqi_lib
from fmcejax import report as report_lib

SEEDS = [2, 0, 1]  # deliberately unsorted: the report orders by seed
BASELINE = {0: 0.9812, 1: 0.9790, 2: 0.9835}
FMCENETPP = {0: 0.9841, 1: 0.9822, 2: 0.9838}
EPOCHS = 6
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _history(final_accuracy, fmcs_offset, with_fmcs=True):
  rows = []
  for e in range(1, EPOCHS + 1):
    rows.append(
      {
        "epoch": e,
        "train_loss": 2.0 / e,
        "test_accuracy": final_accuracy * (1 - 0.3 / e) / (1 - 0.3 / EPOCHS),
        "test_loss": 1.5 / e,
        "fmcs": (fmcs_offset + 0.1 * e) if with_fmcs and e > 1 else None,
        "alpha": 0.1,
      }
    )
  return rows


def _write(path, obj):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(obj))


def _fake_workdir(root):
  losses = [2.0 * math.exp(-t / 3) + 0.1 for t in range(1, 81)]
  conv = cqi_lib.analyse(losses)
  _write(root / "probe" / "cqi.json", cqi_lib.to_json(conv, losses))
  _write(
    root / "fmce_net" / "metrics.json",
    {"phase_accuracy": 0.87, "fmcs_mae": 0.061, "confusion": [[1, 0], [0, 1]]},
  )
  for seed in SEEDS:
    for run, acc, offset in (("baseline", BASELINE, 0.0), ("fmcenetpp", FMCENETPP, 0.2)):
      _write(
        root / run / f"seed_{seed}" / "metrics.json",
        {
          "test_accuracy": acc[seed],
          "test_loss": 0.05,
          "epochs": EPOCHS,
          "images_per_second": 12345.0,
          "history": _history(acc[seed], offset, with_fmcs=seed != 1),
        },
      )
  return conv


def _config(**overrides):
  fields = {"dataset": "mnist", "backbone": "cnn", "module": "stage3", "alpha": 0.1, "seeds": SEEDS}
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def test_write_report(tmp_path):
  conv = _fake_workdir(tmp_path)
  returned = report_lib.write_report(tmp_path, _config())
  report = json.loads((tmp_path / "report.json").read_text())
  assert report == returned

  required = {
    "dataset",
    "backbone",
    "module",
    "alpha",
    "seeds",
    "baseline_accuracy",
    "fmcenetpp_accuracy",
    "gain_pp_mean",
    "gain_pp_std",
    "converged_epoch",
    "fmce_net_phase_accuracy",
  }
  assert required <= set(report)
  assert (report["dataset"], report["backbone"], report["module"], report["alpha"]) == (
    "mnist",
    "cnn",
    "stage3",
    0.1,
  )
  assert report["seeds"] == [0, 1, 2]
  assert report["baseline_accuracy"] == [BASELINE[s] for s in (0, 1, 2)]
  assert report["fmcenetpp_accuracy"] == [FMCENETPP[s] for s in (0, 1, 2)]

  gains = [(FMCENETPP[s] - BASELINE[s]) * 100 for s in (0, 1, 2)]
  assert report["gain_pp_mean"] == pytest.approx(sum(gains) / 3)
  assert report["gain_pp_std"] == pytest.approx(statistics.stdev(gains))
  assert report["baseline_accuracy_mean"] == pytest.approx(statistics.mean(BASELINE.values()))
  assert report["fmcenetpp_accuracy_std"] == pytest.approx(statistics.stdev(FMCENETPP.values()))
  assert [p["seed"] for p in report["pairs"]] == [0, 1, 2]
  assert [p["gain_pp"] for p in report["pairs"]] == pytest.approx(gains)

  assert report["converged_epoch"] == conv.converged_epoch
  assert report["markers"] == list(conv.markers)
  assert report["converged"] is True
  assert report["fmce_net_phase_accuracy"] == 0.87 and report["fmcs_mae"] == 0.061

  assert report["plots"] == ["plot_cqi.png", "plot_accuracy.png", "plot_fmcs.png"]
  for name in report["plots"]:
    data = (tmp_path / name).read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5_000, name

  md = (tmp_path / "report.md").read_text()
  assert "| seed | baseline (%) | FMCE-Net++ (%) | gain (pp) |" in md
  assert "| 0 | 98.12 | 98.41 | +0.29 |" in md
  assert f"**{statistics.mean(gains):+.2f} ± {statistics.stdev(gains):.2f}**" in md
  assert f"T_c = {conv.converged_epoch}" in md
  for name in report["plots"]:
    assert f"]({name})" in md
  assert not list(tmp_path.glob(".*.tmp")), "temp files left behind"


def test_single_seed_has_zero_std(tmp_path):
  _fake_workdir(tmp_path)
  report = report_lib.write_report(
    tmp_path,
    {"dataset": "mnist", "backbone": "cnn", "module": "stage3", "alpha": 0.1, "seeds": [1]},
  )
  assert report["gain_pp_std"] == 0.0 and report["baseline_accuracy_std"] == 0.0
  assert report["gain_pp_mean"] == pytest.approx((FMCENETPP[1] - BASELINE[1]) * 100)


@pytest.mark.parametrize(
  "relative, stage",
  [
    ("probe/cqi.json", "cqi"),
    ("fmce_net/metrics.json", "fmce_net"),
    ("baseline/seed_1/metrics.json", "baseline"),
    ("fmcenetpp/seed_2/metrics.json", "fmcenetpp"),
  ],
)
def test_missing_input_names_file_and_stage(tmp_path, relative, stage):
  _fake_workdir(tmp_path)
  (tmp_path / relative).unlink()
  with pytest.raises(FileNotFoundError) as info:
    report_lib.write_report(tmp_path, _config())
  assert str(tmp_path / relative) in str(info.value)
  assert f"stage '{stage}'" in str(info.value)
  assert not (tmp_path / "report.json").exists(), "nothing is written when an input is missing"


def test_rejects_percent_accuracy_and_unresolved_seeds(tmp_path):
  _fake_workdir(tmp_path)
  with pytest.raises(ValueError, match="list of ints"):
    report_lib.write_report(tmp_path, _config(seeds=3))
  path = tmp_path / "baseline" / "seed_0" / "metrics.json"
  metrics = json.loads(path.read_text())
  metrics["test_accuracy"] = 98.1
  path.write_text(json.dumps(metrics))
  with pytest.raises(ValueError, match="not a fraction"):
    report_lib.write_report(tmp_path, _config())


def test_never_converged_probe_is_stated(tmp_path):
  _fake_workdir(tmp_path)
  losses = [2.0 - 0.01 * t for t in range(1, 31)]
  with pytest.warns(cqi_lib.NotConvergedWarning):
    conv = cqi_lib.analyse(losses)
  _write(tmp_path / "probe" / "cqi.json", cqi_lib.to_json(conv, losses))
  report = report_lib.write_report(tmp_path, _config())
  assert report["converged"] is False and report["converged_epoch"] == 30
  assert "never converged" in (tmp_path / "report.md").read_text()
