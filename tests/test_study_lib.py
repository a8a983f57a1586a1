"""The study's grid, paired statistics and outputs, on hand-made metrics (no training)."""

import json
import math

import ml_collections
import numpy as np
import pytest

from fmcejax import config_lib
from fmcejax import study_lib, study_report
from fmcejax.study import study_config
from fmcejax.configs import mnist_cnn

MODULES = ("conv1", "conv2", "conv3")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
T_975_2 = 4.302652729911275  # Student t 0.975 quantile, 2 degrees of freedom (tables)


def _study(**fields):
  study = study_config()
  study.update(fields)
  return study


def _grid(**fields):
  return study_lib.expand_grid(_study(**fields), default_module="conv3", module_names=MODULES)


# ---------------------------------------------------------------------------------------------
# Grid.


def test_study_config_fields_are_strings_with_the_contract_defaults():
  study = study_config()
  assert dict(study) == {
    "alphas": "0.1",
    "modules": "",
    "variants": "convex",
    "controls": "shuffled,random",
    "control_alpha": "",
    "control_module": "",
  }


def test_default_grid_is_one_arm_on_the_default_module_and_both_controls():
  arms = _grid()
  assert [(a.head, a.module, a.variant, a.alpha) for a in arms] == [
    ("trained", "conv3", "convex", 0.1),
    ("shuffled", "conv3", "convex", 0.1),
    ("random", "conv3", "convex", 0.1),
  ]


def test_grid_counts_names_and_controls():
  arms = _grid(
    alphas="0.03,0.1,0.3",
    modules="conv2,conv3",
    variants="convex,additive",
    control_alpha="0.30",
    control_module="conv2",
  )
  trained = [a for a in arms if a.head == "trained"]
  controls = [a for a in arms if a.head != "trained"]
  assert len(trained) == 3 * 2 * 2 and [a.head for a in controls] == ["shuffled", "random"]
  assert {(a.alpha, a.module, a.variant) for a in trained} == {
    (al, m, v)
    for al in (0.03, 0.1, 0.3)
    for m in ("conv2", "conv3")
    for v in ("convex", "additive")
  }
  names = [a.name for a in arms]
  assert len(set(names)) == len(names)
  assert all(set(n) <= set("abcdefghijklmnopqrstuvwxyz0123456789_.-") for n in names)
  assert "trained_conv2_additive_a0.03" in names and "shuffled_conv2_convex_a0.3" in names
  named = [a for a in trained if (a.alpha, a.module, a.variant) == (0.3, "conv2", "convex")]
  assert len(named) == 1  # each control copies exactly one real arm
  for control in controls:
    assert (control.alpha, control.module, control.variant) == (0.3, "conv2", "convex")


def test_controls_can_be_empty():
  assert [a.head for a in _grid(controls="", alphas="0.1,0.3")] == ["trained", "trained"]


@pytest.mark.parametrize(
  "variant, ral, target",
  [
    ("convex", "convex", "phase"),
    ("additive", "additive", "phase"),
    ("regression", "convex", "regression"),
  ],
)
def test_arm_sets_the_run_config_fields(variant, ral, target):
  arm = _grid(variants=variant, controls="", modules="conv2", alphas="0.3")[0]
  config = mnist_cnn.get_config()
  config.lock()
  run = arm.run_config(config)
  assert (run.alpha, run.module, run.ral, run.ral_target) == (0.3, "conv2", ral, target)
  assert (config.alpha, config.module, config.ral) == (0.1, "", "convex")  # untouched
  assert run.ral in config_lib.RAL_MODES and run.ral_target in config_lib.RAL_TARGETS
  config_lib.validate(run, device_count=1, process_count=1, check_data=False)


@pytest.mark.parametrize(
  "field, value, expected",
  [
    ("modules", "conv9", "conv1, conv2, conv3"),
    ("modules", "conv2,conv2", "Repeated"),
    ("alphas", "1.5", r"\[0, 1\]"),
    ("alphas", "-0.1", r"\[0, 1\]"),
    ("alphas", "abc", r"\[0, 1\]"),
    ("alphas", "nan", r"\[0, 1\]"),
    ("alphas", "", r"\[0, 1\]"),
    ("alphas", "0.1,0.10", "repeated"),
    ("variants", "convx", "convex, additive, regression"),
    ("variants", "", "empty"),
    ("controls", "shuffled,noise", "shuffled, random"),
    ("control_alpha", "0.5", "one of the study's alphas"),
    ("control_alpha", "x", "one of the study's alphas"),
    ("control_module", "conv1", "one of the study's modules"),
  ],
)
def test_bad_grid_values_name_the_field(field, value, expected):
  with pytest.raises(config_lib.ConfigError, match=f"'study.{field}'") as error:
    _grid(**{field: value})
  assert error.value.field == f"study.{field}"
  assert error.match(expected)


# ---------------------------------------------------------------------------------------------
# Statistics.


def test_ci_matches_a_hand_computation():
  baseline = {0: 0.700, 1: 0.710, 2: 0.690}
  arm = {0: 0.712, 1: 0.716, 2: 0.695}
  gains = [1.2, 0.6, 0.5]
  mean = sum(gains) / 3
  std = math.sqrt(sum((g - mean) ** 2 for g in gains) / 2)
  half = T_975_2 * std / math.sqrt(3)
  stats = study_lib.arm_stats(baseline, arm)
  assert stats["gains_pp"] == pytest.approx(gains)
  assert stats["gain_pp_mean"] == pytest.approx(mean) == pytest.approx(0.766667, abs=1e-6)
  assert stats["gain_pp_std"] == pytest.approx(std) == pytest.approx(0.378594, abs=1e-6)
  assert stats["ci95_pp"] == pytest.approx([mean - half, mean + half])
  assert stats["ci95_pp"] == pytest.approx([-0.173813, 1.707146], abs=1e-6)
  assert (stats["ci_method"], stats["n"]) == ("student_t_paired", 3)
  assert stats["accuracy"] == [0.712, 0.716, 0.695]


def test_pairing_is_by_seed_not_order():
  baseline = {4: 0.5, 1: 0.6, 9: 0.7}
  arm = {9: 0.72, 4: 0.5, 1: 0.59}
  stats = study_lib.arm_stats(baseline, arm)
  assert stats["gains_pp"] == pytest.approx([-1.0, 0.0, 2.0])  # seeds 1, 4, 9
  reordered = study_lib.arm_stats(dict(reversed(baseline.items())), dict(sorted(arm.items())))
  assert reordered == stats


def test_mismatched_seeds_are_refused():
  with pytest.raises(ValueError, match="same seeds"):
    study_lib.arm_stats({0: 0.5, 1: 0.5}, {0: 0.5, 2: 0.5})


def test_one_seed_has_no_ci():
  stats = study_lib.arm_stats({3: 0.5}, {3: 0.52})
  assert stats["n"] == 1 and stats["ci95_pp"] is None and stats["gain_pp_std"] == 0.0
  assert stats["gain_pp_mean"] == pytest.approx(2.0)


def test_fmcs_per_epoch_is_the_mean_over_seeds_by_epoch():
  histories = [
    [{"epoch": 1, "fmcs": 0.2}, {"epoch": 2, "fmcs": 0.6}],
    [{"epoch": 2, "fmcs": 0.8}, {"epoch": 1, "fmcs": None}],
  ]
  assert study_lib.fmcs_per_epoch(histories) == pytest.approx([0.2, 0.7])
  assert study_lib.fmcs_per_epoch([[{"epoch": 1, "fmcs": None}]]) == [None]


# ---------------------------------------------------------------------------------------------
# Outputs.


def _metrics(accuracy, fmcs):
  return {
    "test_accuracy": accuracy,
    "history": [{"epoch": e, "fmcs": fmcs * e, "test_accuracy": accuracy} for e in (1, 2)],
  }


def _fake_study(arms):
  seeds = (2, 0, 1)
  baseline = {s: _metrics(0.70 + 0.01 * s, 0.1) for s in seeds}
  runs = [
    (arm, {s: _metrics(0.70 + 0.01 * s + 0.002 * (i + s), 0.3) for s in seeds})
    for i, arm in enumerate(arms)
  ]
  return study_lib.build_study(dataset="cifar10_jpeg", backbone="cnn", baseline=baseline, arms=runs)


def test_build_study_has_the_contract_keys_in_seed_order():
  arms = _grid(alphas="0.1,0.3", modules="conv2,conv3")
  study = _fake_study(arms)
  assert list(study) == [*study_lib.STUDY_KEYS[:-1], *study_lib.CURVE_KEYS, "arms"]
  assert study["seeds"] == [0, 1, 2]
  assert study["baseline_accuracy"] == pytest.approx([0.70, 0.71, 0.72])
  assert [a["name"] for a in study["arms"]] == [a.name for a in arms]
  for record in study["arms"]:
    extra = [study_lib.CONTROL_KEY] if record["head"] != "trained" else []
    assert list(record) == [*study_lib.ARM_KEYS, *study_lib.ARM_CURVE_KEYS, *extra]
    assert record["fmcs_per_epoch"] == pytest.approx([0.3, 0.6])
  first = study["arms"][0]
  assert first["gains_pp"] == pytest.approx([0.0, 0.2, 0.4])  # 0.002 * (0 + seed) x100


def test_each_control_is_compared_with_its_trained_arm_seed_by_seed():
  arms = _grid(alphas="0.1,0.3", modules="conv2,conv3", control_alpha="0.3", control_module="conv2")
  study = _fake_study(arms)
  records = {r["name"]: r for r in study["arms"]}
  twin = records["trained_conv2_convex_a0.3"]
  for head in ("shuffled", "random"):
    control = records[f"{head}_conv2_convex_a0.3"]
    d = control[study_lib.CONTROL_KEY]
    want = [(t - c) * 100 for t, c in zip(twin["accuracy"], control["accuracy"])]
    assert d["arm"] == twin["name"] and d["n"] == 3
    assert d["gains_pp"] == pytest.approx(want) and d["gain_pp_mean"] == pytest.approx(
      np.mean(want)
    )
  assert all(study_lib.CONTROL_KEY not in r for r in study["arms"] if r["head"] == "trained")
  markdown = study_report._markdown(study)
  assert "| shuffled_conv2_convex_a0.3 | trained_conv2_convex_a0.3 |" in markdown


def test_build_study_refuses_an_arm_missing_a_seed():
  arm = _grid(controls="")[0]
  with pytest.raises(ValueError, match="same seeds"):
    study_lib.build_study(
      dataset="d",
      backbone="b",
      baseline={0: _metrics(0.5, 0.1), 1: _metrics(0.5, 0.1)},
      arms=[(arm, {0: _metrics(0.5, 0.1)})],
    )


def test_write_study_files(tmp_path):
  study = _fake_study(_grid(alphas="0.1,0.3", modules="conv2,conv3", control_module="conv3"))
  study_report.write_study(tmp_path / "out", study)
  out = tmp_path / "out"
  assert sorted(p.name for p in out.iterdir()) == sorted(study_report.OUTPUTS)  # no temp files left
  written = json.loads((out / "study.json").read_text())
  assert written == json.loads(json.dumps(study))
  for record in written["arms"]:
    assert set(record) - {study_lib.CONTROL_KEY} == {*study_lib.ARM_KEYS, *study_lib.ARM_CURVE_KEYS}
  markdown = (out / "study.md").read_text()
  for record in written["arms"]:
    assert f"| {record['name']} | {record['head']} | {record['module']} |" in markdown
  assert "71.00 ± 1.00 %" in markdown and "plot_study.png" in markdown
  for plot in ("plot_study.png", "plot_curves.png"):
    assert (out / plot).read_bytes()[:8] == PNG_MAGIC and plot in markdown


def test_curves_are_the_per_epoch_means_of_the_baseline_and_each_arm(tmp_path):
  study = _fake_study(_grid(controls=""))
  assert study["baseline_accuracy_per_epoch"] == pytest.approx([0.71, 0.71])  # seeds 0, 1, 2
  assert study["baseline_fmcs_per_epoch"] == pytest.approx([0.1, 0.2])
  assert study["arms"][0]["accuracy_per_epoch"] == pytest.approx([0.712, 0.712])
  fig = study_report.plot_curves(study, tmp_path / "plot_curves.png")
  accuracy, fmcs = fig.axes
  for ax, want in ((accuracy, [71.0, 71.0]), (fmcs, [0.1, 0.2])):
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines) == ["baseline", study["arms"][0]["name"]]
    np.testing.assert_allclose(lines["baseline"].get_ydata(), want)
    np.testing.assert_array_equal(lines["baseline"].get_xdata(), [1, 2])


def test_write_study_refuses_missing_keys(tmp_path):
  study = _fake_study(_grid(controls=""))
  del study["arms"][0]["ci95_pp"]
  with pytest.raises(KeyError, match=r"arms\[0\].ci95_pp"):
    study_report.write_study(tmp_path, study)
  assert not list(tmp_path.iterdir())


def test_forest_plot_groups_arms_by_module(tmp_path):
  # Interleave modules in the input: the plot must still show each module's arms together.
  arms = _grid(alphas="0.1,0.3", modules="conv2,conv3", control_module="conv3")
  arms = [arms[4], arms[0], arms[2], arms[1], arms[5], arms[3]]
  study = _fake_study(arms)
  study["arms"][0]["ci95_pp"] = None  # an n = 1 arm: a point without a bar
  rows, groups = study_report.forest_layout(study["arms"])
  assert [m for m, _ in groups] == ["conv3", "conv2"]
  order = [a["module"] for _, a in rows]
  assert order == ["conv3"] * 4 + ["conv2"] * 2
  assert [a["head"] for _, a in rows][:4] == ["trained", "trained", "shuffled", "random"]
  ys = [y for y, _ in rows]
  assert ys == sorted(ys, reverse=True) and len(set(ys)) == len(ys)
  label_y = dict(groups)
  assert label_y["conv3"] > ys[0] and ys[3] > label_y["conv2"] > ys[4]  # label heads its group
  fig = study_report.plot_study(study, tmp_path / "plot_study.png")
  texts = [t.get_text() for t in fig.axes[0].texts]
  assert texts == ["module conv3", "module conv2"]
  ticks = [t.get_text() for t in fig.axes[0].get_yticklabels()]
  assert ticks[2:4] == ["convex, alpha 0.1 [shuffled]", "convex, alpha 0.1 [random]"]
  assert (tmp_path / "plot_study.png").read_bytes()[:8] == PNG_MAGIC


def test_study_config_takes_command_line_overrides():
  from absl import flags
  from ml_collections import config_flags

  argv = ["prog", "--study.alphas=0.03,0.1,0.3", "--study.control_alpha=0.3", "--study.controls="]
  flag_values = flags.FlagValues()
  # config_flags registers the override flags from the argv it is given when defined.
  config_flags.DEFINE_config_dict("study", study_config(), flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  study = flag_values.study
  assert isinstance(study, ml_collections.ConfigDict)
  arms = study_lib.expand_grid(study, default_module="conv3", module_names=MODULES)
  assert [a.alpha for a in arms] == [0.03, 0.1, 0.3]
