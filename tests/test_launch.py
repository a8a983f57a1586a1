"""The launch scripts: syntax, shellcheck, usage, and what their dry runs would run.

Dry runs execute with a PATH holding only decoys (gcloud, git, tar, python3, pip, ...) that
record any call: a dry run must print every command and run none, with no Cloud SDK installed.
Every printed line must itself be valid shell, and so must each remote `--command=`.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import missing
from fake_data import write_fake_cifar_jpeg

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ("gpu_host.sh", "tpu_vm.sh", "tpu_pod.sh", "gpu_acceptance.sh", "make_gpu_bundle.sh")
BASH = shutil.which("bash") or "/bin/bash"
DECOYS = (
  "gcloud",
  "gsutil",
  "gcsfuse",
  "git",
  "tar",
  "python",
  "python3",
  "pip",
  "uv",
  "cat",
  "mkdir",
  "ssh",
  "scp",
  "nvidia-smi",
)


@pytest.fixture()
def decoy_path(tmp_path):
  """(PATH value, log file): a bin dir of programs that only record that they were called."""
  bin_dir, log = tmp_path / "bin", tmp_path / "called.log"
  bin_dir.mkdir()
  for name in DECOYS:
    decoy = bin_dir / name
    decoy.write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\nexit 97\n')
    decoy.chmod(0o755)
  return str(bin_dir), log


def launch(script, *args, path, dry_env=False, cwd=None):
  env = {"PATH": path, "HOME": os.environ.get("HOME", "/tmp")}
  if dry_env:
    env["DRY_RUN"] = "1"
  return subprocess.run(
    [BASH, str(LAUNCH / script), *args],
    env=env,
    cwd=cwd or REPO,
    capture_output=True,
    text=True,
    timeout=60,
  )


def dry(script, *args, decoys, **kwargs):
  """Runs a dry run, checks it ran nothing and printed parseable shell; returns the commands."""
  path, log = decoys
  result = launch(script, "--dry-run", *args, path=path, **kwargs)
  assert result.returncode == 0, result.stderr
  assert not log.exists(), f"a dry run ran programs:\n{log.read_text()}"
  lines = [line[2:] for line in result.stdout.splitlines() if line.startswith("+ ")]
  assert lines, result.stdout
  for line in lines:
    _assert_valid_shell(line)
    for word in shlex.split(line):
      if word.startswith("--command="):
        _assert_valid_shell(word[len("--command=") :])
  return lines


def _assert_valid_shell(text):
  check = subprocess.run([BASH, "-n"], input=text, capture_output=True, text=True, timeout=30)
  assert check.returncode == 0, f"not valid shell: {text}\n{check.stderr}"


def _first(lines, needle):
  return next(i for i, line in enumerate(lines) if needle in line)


@pytest.mark.parametrize("script", sorted(p.name for p in LAUNCH.glob("*.sh")))
def test_bash_syntax(script):
  result = subprocess.run([BASH, "-n", str(LAUNCH / script)], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr


def test_shellcheck_is_clean():
  if shutil.which("shellcheck") is None:
    missing("shellcheck", "apt-get install shellcheck")
  scripts = sorted(str(p.relative_to(REPO)) for p in LAUNCH.glob("*.sh"))
  result = subprocess.run(
    ["shellcheck", "-x", *scripts], cwd=REPO, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_strict_and_executable(script):
  text = (LAUNCH / script).read_text()
  assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
  assert os.access(LAUNCH / script, os.X_OK)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_usage_and_exits_0(script, decoy_path):
  for flag in ("-h", "--help"):
    result = launch(script, flag, path=decoy_path[0])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: launch/" + script) and "--dry-run" in result.stdout
  assert not decoy_path[1].exists()


@pytest.mark.parametrize(
  "script,args",
  [
    ("gpu_host.sh", ["--bogus"]),
    ("tpu_vm.sh", ["--zone", "z", "--bogus", "run"]),
    ("tpu_vm.sh", ["run"]),  # no zone
    ("tpu_vm.sh", ["--zone", "z"]),  # no command
    ("tpu_vm.sh", ["--zone", "z", "--bucket", "my-bucket", "run"]),  # not gs://
    ("tpu_pod.sh", ["--zone", "z", "all"]),  # a pod needs a shared bucket
    ("gpu_acceptance.sh", []),  # no OUTDIR
    ("gpu_acceptance.sh", ["out", "--bogus"]),
    ("make_gpu_bundle.sh", ["--dest"]),  # no value
  ],
)
def test_bad_arguments_exit_2_with_a_message(script, args, decoy_path):
  result = launch(script, "--dry-run", *args, path=decoy_path[0])
  assert result.returncode == 2
  assert "error:" in result.stderr
  assert not decoy_path[1].exists()


def test_gpu_host_dry_run(decoy_path):
  lines = dry(
    "gpu_host.sh",
    "--config",
    "configs/cifar10_resnet18.py",
    "--workdir",
    "/runs/c10",
    "--",
    "--config.seeds=3",
    decoys=decoy_path,
  )
  text = "\n".join(lines)
  assert f"cd {REPO}" in lines[0]
  assert "python3 -m venv" in text
  assert "pip install -e '.[cuda]'" in text
  train = lines[-1]
  assert train.endswith(
    "-m fmcejax.train --config configs/cifar10_resnet18.py --workdir /runs/c10 --config.seeds=3"
  )
  assert _first(lines, "pip install -e") < _first(lines, "jax.devices()") < len(lines) - 1
  # DRY_RUN=1 is the same as --dry-run; --skip-install drops the virtualenv and pip.
  path, log = decoy_path
  same = launch(
    "gpu_host.sh",
    "--config",
    "configs/cifar10_resnet18.py",
    "--workdir",
    "/runs/c10",
    "--",
    "--config.seeds=3",
    path=path,
    dry_env=True,
  )
  assert same.returncode == 0 and [l[2:] for l in same.stdout.splitlines()] == lines
  skip = dry("gpu_host.sh", "--skip-install", decoys=decoy_path)
  assert not any("pip install" in line or "-m venv" in line for line in skip)
  assert skip[-1].endswith("-m fmcejax.train --config configs/mnist_cnn.py --workdir ./workdir")


def test_tpu_vm_dry_run_all(decoy_path):
  lines = dry(
    "tpu_vm.sh",
    "--zone",
    "us-west4-a",
    "--project",
    "proj",
    "--spot",
    "--name",
    "t1",
    "--data",
    "gs://b/data",
    "all",
    "--",
    "--config.epochs=3",
    decoys=decoy_path,
  )
  text = "\n".join(lines)
  create = lines[_first(lines, "tpu-vm create")]
  for part in (
    "gcloud compute tpus tpu-vm create t1",
    "--zone=us-west4-a",
    "--project=proj",
    "--accelerator-type=v5litepod-8",
    "--version=",
    "--spot",
  ):
    assert part in create
  assert 'pip install --quiet -e ".[tpu,gcs]"' in text and "uv venv" in text
  assert "gcloud storage rsync -r gs://b/data" in text
  run = lines[_first(lines, "-m fmcejax.train")]
  assert "--worker=all" in run
  assert (
    "fmcejax.train --config configs/mnist_cnn.py --workdir ../fmcejax-work/t1 "
    "--config.tfds_data_dir=../fmcejax-tfds --config.data_dir=../fmcejax-data "
    "--config.epochs=3"
  ) in run
  assert "FMCEJAX_COORDINATOR" not in text and "gcsfuse" not in text  # one host, no bucket
  fetch = lines[_first(lines, "--recurse t1:fmcejax-work/t1")]
  assert "tpu-vm scp" in fetch and "--worker=0" in fetch
  assert (
    lines[-1] == "gcloud compute tpus tpu-vm delete t1 --zone=us-west4-a --project=proj --quiet"
  )
  order = [
    _first(lines, s)
    for s in (
      "tpu-vm create",
      "tpu-vm scp /",
      "pip install",
      "fmcejax.train",
      "--recurse t1:",
      "tpu-vm delete",
    )
  ]
  assert order == sorted(order)


def test_tpu_pod_dry_run_all_on_a_bucket(decoy_path):
  lines = dry(
    "tpu_pod.sh",
    "--zone",
    "us-central2-b",
    "--preemptible",
    "--accelerator-type",
    "v4-32",
    "--version",
    "tpu-ubuntu2204-base",
    "--bucket",
    "gs://bkt/exp/",
    "--run-name",
    "r1",
    "--config",
    "configs/cifar10_resnet18.py",
    "all",
    "--",
    "--config.seeds=3",
    "--config.stages=probe,cqi",
    decoys=decoy_path,
  )
  text = "\n".join(lines)
  create = lines[_first(lines, "tpu-vm create")]
  assert "--accelerator-type=v4-32" in create and "--version=tpu-ubuntu2204-base" in create
  assert "--preemptible" in create
  assert all("--worker=all" in line for line in lines if "tpu-vm ssh" in line)
  assert "gcsfuse" not in text and "/mnt" not in text  # the bucket is the workdir, unmounted
  run = lines[_first(lines, "-m fmcejax.train")]
  assert "; FMCEJAX_DISTRIBUTED=auto ../fmcejax-venv/bin/python -m fmcejax.train" in run
  assert "FMCEJAX_COORDINATOR" not in run
  assert (
    "--config configs/cifar10_resnet18.py --workdir gs://bkt/exp/r1 "
    "--config.tfds_data_dir=../fmcejax-tfds --config.seeds=3 "
    "--config.stages=probe,cqi"
  ) in run
  assert "gcloud storage rsync -r gs://bkt/exp/r1 ./results/r1" in text
  assert "tpu-vm delete" in lines[-1]


def test_tpu_detach_starts_in_the_background_and_keeps_the_tpu(decoy_path):
  lines = dry(
    "tpu_pod.sh", "--zone", "z", "--bucket", "gs://b", "--detach", "all", decoys=decoy_path
  )
  run = lines[_first(lines, "-m fmcejax.train")]
  assert "; FMCEJAX_DISTRIBUTED=auto nohup setsid ../fmcejax-venv/bin/python" in run
  assert "> $HOME/fmcejax-run.log" in run
  assert not any("tpu-vm delete" in line or "storage rsync" in line for line in lines)
  for command, needle in (
    ("logs", "tail -n 20 $HOME/fmcejax-run.log"),
    ("status", "tpu-vm describe fmcejax-pod"),
    ("delete", "tpu-vm delete fmcejax-pod --zone=z --quiet"),
    ("fetch", "gcloud storage rsync -r gs://b/fmcejax-pod"),
  ):
    assert any(
      needle in line
      for line in dry("tpu_pod.sh", "--zone", "z", "--bucket", "gs://b", command, decoys=decoy_path)
    ), command


def test_tpu_setup_from_a_git_url_or_a_local_data_folder(decoy_path, tmp_path):
  data = tmp_path / "data"
  (data / "mnist").mkdir(parents=True)
  lines = dry(
    "tpu_vm.sh",
    "--zone",
    "z",
    "--repo-url",
    "https://example.com/me/fmcejax.git",
    "--data",
    str(data),
    "setup",
    decoys=decoy_path,
  )
  text = "\n".join(lines)
  assert "git clone https://example.com/me/fmcejax.git $HOME/fmcejax" in text
  assert "git ls-files" not in text  # no upload of this checkout
  assert f"tpu-vm scp --recurse {data} fmcejax-vm:fmcejax-data" in text


def test_dry_run_quotes_odd_arguments_so_they_survive(decoy_path):
  lines = dry(
    "tpu_vm.sh", "--zone", "z", "run", "--", "--config.note=it's a test", decoys=decoy_path
  )
  command = next(w for w in shlex.split(lines[-1]) if w.startswith("--command="))
  assert "--config.note=it's a test" in shlex.split(command[len("--command=") :])


def test_gpu_acceptance_dry_run_installs_offline_then_measures(decoy_path):
  lines = dry(
    "gpu_acceptance.sh", "/out", "--work", "/scratch", "--wheels", "/w", decoys=decoy_path
  )
  text = "\n".join(lines)
  install = lines[_first(lines, "pip install")]
  for part in ("--no-index", "--no-deps", "--target /scratch/site '/w/*.whl'"):
    assert part in install
  benches = [line for line in lines if "-m fmcejax.bench " in line]
  assert [b.split("--backbone ")[1].split()[0] for b in benches] == ["resnet18", "resnet50"]
  for bench in benches:
    for part in ("--image_shape 32,32,3", "--batch_size 512", "--dtype bfloat16", "--torch both"):
      assert part in bench
  assert "-m fmcejax.bench_loop --json /out/loop.json" in text
  train = lines[_first(lines, "-m fmcejax.train")]
  for part in (
    "--config configs/cifar10_resnet18.py",
    "--config.dataset=cifar10_jpeg",
    "--config.data_dir=/w",
    "--config.seeds=1",
    "--workdir /scratch/train",
  ):
    assert part in train
  caps = [int(line.split()[3]) for line in lines if line.startswith("timeout")]
  assert len(caps) == 6 and sum(caps) < 9 * 60  # every step capped, under 9 minutes together
  order = [
    _first(lines, s)
    for s in (
      "pip install",
      "--backbone resnet18",
      "--backbone resnet50",
      "-m fmcejax.bench_loop",
      "-m fmcejax.train",
    )
  ]
  assert order == sorted(order)


def test_make_gpu_bundle_dry_run_fetches_cp312_wheels_and_the_archive(decoy_path):
  lines = dry(
    "make_gpu_bundle.sh", "--dest", "/b", "--archive", "/d/cifar10-jpeg.tar.gz", decoys=decoy_path
  )
  download = lines[_first(lines, "pip download")]
  for part in (
    "--no-deps",
    "--only-binary=:all:",
    "--python-version 3.12",
    "--platform manylinux2014_x86_64",
    "-d /b",
    "tensorflow-datasets==",
    "grain==",
    "array-record==",
    "ml-collections==",
    "tensorboardx==",
  ):
    assert part in download
  assert lines[_first(lines, "pip wheel")].endswith(f"-w /b promise==2.3 {REPO}")
  assert lines[-1] == "cp -f /d/cifar10-jpeg.tar.gz /b/"


def test_acceptance_summary_records_a_failed_step(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      str(LAUNCH / "acceptance_summary.py"),
      "--out",
      str(tmp_path),
      "--workdir",
      str(tmp_path / "none"),
      "--tiny",
      "1",
      "imports:0:2",
      "train:3:40",
    ],
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert result.returncode == 1, result.stderr
  summary = json.loads((tmp_path / "acceptance.json").read_text())
  assert summary["steps"] == {
    "imports": {"status": 0, "seconds": 2},
    "train": {"status": 3, "seconds": 40},
  }
  assert summary["ok"] is False and summary["seconds"] == 42 and summary["mode"] == "tiny"
  assert json.loads((tmp_path / "train.json").read_text())["baseline"] is None


def test_gpu_acceptance_tiny_mode_runs_everything_and_writes_json(tmp_path):
  """The whole sequence on this CPU with tiny sizes, on a small fake CIFAR-10 JPEG archive."""
  write_fake_cifar_jpeg(tmp_path / "cifar10-jpeg.tar.gz", {"train": 8, "test": 4})
  out, work = tmp_path / "out", tmp_path / "work"
  result = subprocess.run(
    [
      BASH,
      str(LAUNCH / "gpu_acceptance.sh"),
      str(out),
      "--tiny",
      "--data",
      str(tmp_path),
      "--work",
      str(work),
      "--python",
      sys.executable,
    ],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert sorted(p.name for p in out.iterdir()) == [
    "acceptance.json",
    "acceptance.log",
    "bench_cnn.json",
    "loop.json",
    "train.json",
  ]
  summary = json.loads((out / "acceptance.json").read_text())
  assert summary["ok"] and summary["mode"] == "tiny"
  assert list(summary["steps"]) == ["imports", "bench_cnn", "loop", "train"]  # no install
  bench = json.loads((out / "bench_cnn.json").read_text())
  assert bench["results"]["jax"]["ral"]["images_per_second"] > 0
  assert (
    summary["figures"]["cnn"]["ral"]["images_per_second"]
    == (bench["results"]["jax"]["ral"]["images_per_second"])
  )
  loop = json.loads((out / "loop.json").read_text())
  assert loop["loop"]["16"]["device"]["images_per_second"] > 0
  train = json.loads((out / "train.json").read_text())
  assert train["baseline"]["epochs"] == 1 and train["fmcenetpp"]["epochs"] == 1
  assert train["report"]["dataset"] == "cifar10_jpeg" and train["report"]["backbone"] == "cnn"
  progress = list((work / "train" / "baseline" / "seed_0" / "checkpoints").glob("*/progress/*"))
  assert any('"input": "device"' in p.read_text() for p in progress if p.is_file())
