"""Every command as a new user meets it: --help, typos, a flag without a value, overrides before
--config, each command's own usage. Nothing here trains or compiles."""

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

from fmcejax import cli
from fmcejax.study import study_config

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ("train", "study", "preflight", "bench", "bench_loop")
# Runs a command in this process, then says whether jax was imported: --help and typos must not.
IN_PROCESS = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
  runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
except SystemExit as e:
  print(f"exit {e.code}; jax imported: {'jax' in sys.modules}")
"""


def run(command, *args, timeout=120):
  return subprocess.run(
    [sys.executable, "-m", f"fmcejax.{command}", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=timeout,
    env={**os.environ, "PYTHONUNBUFFERED": "1"},
  )


def leaves(config, prefix=""):
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def source_comments(path):
  """Each `x.a.b = value  # comment` line of a file: {"a.b": comment}."""
  comments = {}
  for line in Path(path).read_text().splitlines():
    code, _, comment = line.partition("  # ")
    if " = " in code and code.strip().split(" = ")[0].count(".") and comment:
      comments[code.strip().split(" = ")[0].split(".", 1)[1]] = comment.strip()
  return comments


def examples(text):
  return [line for line in text.split("examples:\n", 1)[1].splitlines() if line.strip()]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_on_every_command_exits_0_with_usage_and_three_examples(command, flag):
  result = run(command, flag)
  assert result.returncode == 0, result.stderr[-2000:]
  assert f"usage: python -m fmcejax.{command}" in result.stdout
  assert len(examples(result.stdout)) == 3, result.stdout[-1000:]
  assert all(
    line.strip().startswith(f"python -m fmcejax.{command}") for line in examples(result.stdout)
  )


@pytest.mark.parametrize("command", ["train", "study"])
def test_help_lists_every_shipped_config_and_every_field_with_its_value_and_comment(command):
  result = run(command, "--help")
  assert result.returncode == 0, result.stderr[-2000:]
  text = " ".join(result.stdout.split())  # comments may wrap
  for name, path in cli.shipped_configs().items():
    first_line = ast.get_docstring(ast.parse(Path(path).read_text())).splitlines()[0]
    assert f"{name} " in text and " ".join(first_line.split()[:6]) in text, name
  default = ConfigFileFlagParser("config").parse(cli.shipped_configs()["mnist_cnn"])
  comments = source_comments(REPO / "configs" / "default.py")
  assert len(comments) > 40
  for path, value in leaves(default):
    assert f"{path} = {value!r}" in text, path
    if path in comments:
      assert f"{path} = {value!r} {comments[path]}" in text, path
  assert "Probe run (METHOD step 1). probe.epochs =" in text  # groups as the file groups them
  if command == "study":
    study_comments = source_comments(importlib.util.find_spec("fmcejax.study").origin)
    for path, value in leaves(study_config()):
      assert f"{path} = {value!r} {study_comments[path]}" in text, path


def test_help_on_a_named_config_shows_its_values_with_the_overrides_given():
  result = run("train", "--config.epochs=7", "--config=cifar10_resnet50", "--help")
  assert result.returncode == 0, result.stderr[-2000:]
  named = ConfigFileFlagParser("config").parse(cli.shipped_configs()["cifar10_resnet50"])
  assert "the values of cifar10_resnet50" in result.stdout
  assert f"backbone = {named.backbone!r}" in result.stdout
  assert f"probe.epochs = {named.probe.epochs!r}" in result.stdout
  assert "    epochs = 7 " in result.stdout and named.epochs != 7


@pytest.mark.parametrize(
  "command,args,message",
  [
    ("train", ["--config.alpah=0.1"], "no config field 'alpah'; did you mean --config.alpha?"),
    (
      "train",
      ["--config.fmcs.subsetsize=10"],
      "no config field 'fmcs.subsetsize'; did you mean --config.fmcs.subset_size?",
    ),
    ("train", ["--workdr=w"], "unknown flag --workdr; did you mean --workdir?"),
    ("train", ["fashion_mnist_cnn"], "did you mean --config=fashion_mnist_cnn?"),
    ("train", ["--config.alpha"], "--config.alpha needs a value, e.g. --config.alpha=0.1"),
    ("study", ["--study.alphs=0.3"], "no study field 'alphs'; did you mean --study.alphas?"),
    ("study", ["--config.sedes=2"], "no config field 'sedes'; did you mean --config.seeds?"),
    ("study", ["--study.alphas"], "--study.alphas needs a value, e.g. --study.alphas=0.1"),
    ("bench", ["--stepz=3"], "unknown flag --stepz; did you mean --steps"),
    ("bench_loop", ["--input=device"], "unknown flag --input; did you mean --inputs"),
  ],
)
def test_a_typo_names_the_nearest_flag_and_exits_2_before_importing_jax(command, args, message):
  result = subprocess.run(
    [sys.executable, "-c", IN_PROCESS, f"fmcejax.{command}", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert message in result.stderr, result.stderr[-2000:]
  if command in ("train", "study"):
    assert f"Usage: python -m fmcejax.{command} [" in result.stderr  # its own usage
    assert result.stdout.strip() == "exit 2; jax imported: False", result.stdout
  else:  # argparse; the benchmarks import jax at the top
    assert result.stdout.strip().startswith("exit 2;"), result.stdout


@pytest.mark.parametrize("command", ["train", "study"])
def test_help_imports_no_jax(command):
  result = subprocess.run(
    [sys.executable, "-c", IN_PROCESS, f"fmcejax.{command}", "--help"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.stdout.strip().endswith("exit 0; jax imported: False"), result.stderr[-2000:]


def test_overrides_before_config_apply_after_the_named_config(tmp_path):
  """`--config.epochs=0` before `--config=fashion_mnist_cnn` is applied to that config (which
  sets epochs itself), so validation refuses it; nothing is written."""
  result = run(
    "train", f"--workdir={tmp_path / 'w'}", "--config.epochs=0", "--config", "fashion_mnist_cnn"
  )
  assert result.returncode == 2, result.stderr[-2000:]
  assert "'epochs'" in result.stderr and "integer >= 1" in result.stderr, result.stderr[-2000:]
  assert "before a value for --config" not in result.stderr
  assert not (tmp_path / "w").exists()


def test_config_first_moves_the_config_flag_and_its_value_to_the_front():
  argv = ["prog", "--config.stages=baseline", "--workdir", "w", "--config", "x.py", "--config.a=1"]
  assert cli.config_first(argv) == [
    "prog",
    "--config",
    "x.py",
    "--config.stages=baseline",
    "--workdir",
    "w",
    "--config.a=1",
  ]
  assert cli.config_first(["prog", "--config.a=1", "--config=x.py"]) == [
    "prog",
    "--config=x.py",
    "--config.a=1",
  ]


def test_documented_fields_reads_groups_and_comments_from_the_source():
  groups = dict(cli.documented_fields("fmcejax.configs.default:get_config"))
  fields = {path: comment for group in groups.values() for path, comment in group}
  schema = ConfigFileFlagParser("config").parse(str(REPO / "configs" / "default.py"))
  assert set(fields) == {path for path, _ in leaves(schema)}
  assert [p for p, _ in groups["CQI and phases (METHOD steps 2-3)."]] == [
    "cqi.beta",
    "cqi.window",
    "cqi.mu_rel",
    "num_phases",
  ]
  # A comment block right under a field describes the next field, not a new group.
  assert fields["steps_per_dispatch"].startswith("Train steps per dispatch (one lax.scan")
  assert "steps_per_dispatch" in [
    p for p, _ in groups["What to train, and where the data comes from."]
  ]
  # A paragraph's first comment line is its title; the lines after it describe its first field.
  assert fields["dataset"].startswith("mnist | fashion_mnist | cifar10")
