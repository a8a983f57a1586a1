"""Compiled for TPU slices and pods and for NVIDIA boxes, on this CPU: `python -m fmcejax.preflight`
with the real compilers of the `aot` extra (libtpu, the CUDA plugin).

Skipped only where the extra is missing and CI is not set; under CI a missing extra fails.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import missing
from fmcejax import preflight as preflight_cli

REPO = Path(__file__).resolve().parents[1]
TRAIN_PROGRAMS = ("train_step", "train_step_ral")


@pytest.fixture(scope="module")
def compilers():
  absent = [d for d in ("libtpu", "jax-cuda12-plugin") if not preflight_cli.installed(d)]
  if absent:
    missing(f"the compilers {absent}", "pip install -e '.[test,aot]'")


needs_compilers = pytest.mark.usefixtures("compilers")


def preflight(tmp_path, target, *overrides, config="mnist_cnn"):
  proc = subprocess.run(
    [sys.executable, "-m", "fmcejax.preflight", f"--target={target}", f"--config={config}"]
    + [f"--out={tmp_path}", *overrides],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=900,
  )
  report = tmp_path / "preflight.json"
  return proc, json.loads(report.read_text()) if report.exists() else None


@needs_compilers
@pytest.mark.parametrize(
  "target,devices,processes,config,scan",
  [
    ("v5e:2x2", 4, 1, "mnist_cnn", 1),
    # a pod slice: 4 hosts (eval batch 1024 over 16 chips), 10 steps per dispatch
    ("v5e:4x4", 16, 4, "mnist_cnn", 10),
    ("h100:8", 8, 1, "mnist_cnn", 1),
    ("h100:2x4", 8, 2, "mnist_cnn", 10),  # two GPU hosts
    # ResNet-18 for a TPU took over 12 minutes on the loaded 2-core machine: GPU only here.
    ("h100:8", 8, 1, "mnist_resnet18", 1),
  ],
)
def test_train_steps_compile_and_fit(tmp_path, target, devices, processes, config, scan):
  proc, report = preflight(
    tmp_path,
    target,
    "--config.stages=baseline,fmcenetpp",
    "--config.seeds=1",
    "--config.eval_batch_size=1024",
    f"--config.steps_per_dispatch={scan}",
    "--kernels=3",
    config=config,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert (report["devices"], report["processes"]) == (devices, processes)
  programs = {p["name"]: p for p in report["programs"]}
  assert set(programs) == {*TRAIN_PROGRAMS, "eval_step"}
  for p in programs.values():
    assert p["compiled"] is True and p["fits"], p
    assert not p["cpu_lowering_in_program"], p["name"]
    assert p["flops_per_step"] > 0 and p["roofline_images_per_second"] > 0
    heaviest = [k["bytes"] for k in p["heaviest_kernels"]]
    assert heaviest == sorted(heaviest, reverse=True) and heaviest[0] > 0
    shares = [
      k["bytes"] / (1 if k["in_loop"] else p["steps_per_call"]) for k in p["heaviest_kernels"]
    ]
    assert p["bytes_per_step"] >= sum(shares) * (1 - 1e-9)  # per step: a scan's rest per call
  for name in TRAIN_PROGRAMS:
    assert programs[name]["steps_per_call"] == scan  # the scan `train` dispatches
    # BatchNorm's batch means in the forward pass, then the gradients: at least two all-reduces.
    assert programs[name]["collectives"]["count"] >= 2, programs[name]
  assert report["pipeline_seconds_roofline"] > 0
  assert "not measurements" in proc.stdout


@needs_compilers
def test_a_batch_that_does_not_divide_over_the_pod_exits_2(tmp_path):
  proc, report = preflight(tmp_path, "v5e:4x4", "--config.eval_batch_size=1000")
  assert proc.returncode == 2, proc.stdout + proc.stderr
  assert "'eval_batch_size' = 1000" in proc.stderr and "992 or 1008" in proc.stderr
  assert report is None  # nothing compiled


@needs_compilers
def test_a_program_that_does_not_fit_exits_1_naming_the_batch_that_would(tmp_path):
  proc, report = preflight(
    tmp_path, "v5e:2x2", "--config.stages=fmcs_data", f"--config.eval_batch_size={2**24}"
  )
  assert proc.returncode == 1, proc.stdout + proc.stderr
  (row,) = report["programs"]
  assert row["name"] == "fmcs_extraction" and not row["fits"]
  assert row["memory_bytes"]["total"] > row["hbm_bytes"]
  assert "program fmcs_extraction needs" in proc.stderr and "would fit" in proc.stderr


def test_local_target_compiles_for_this_machines_devices(tmp_path):
  """`--target local` (on the machine that will run): this CPU's devices, no chip figures."""
  proc, report = preflight(tmp_path, "local", "--config.stages=baseline", "--config.seeds=1")
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert report["chip"] is None and report["devices"] >= 1
  assert [p["name"] for p in report["programs"]] == ["train_step", "eval_step"]
  for p in report["programs"]:
    assert p["compiled"] is True and p["fits"] and p["roofline_seconds_per_step"] is None
  assert "unknown chip" in proc.stdout and "whole pipeline: unknown" in proc.stdout


@needs_compilers
def test_unknown_target_exits_2(tmp_path):
  proc, _ = preflight(tmp_path, "v9z:2")
  assert proc.returncode == 2 and "--target" in proc.stderr and "h100:8" in proc.stderr


def test_a_scan_of_steps_is_costed_per_step_like_one_step():
  """Steps per dispatch > 1 compiles `lax.scan` of the step (as `train` runs it); its FLOPs and
  bytes are per step, within the scan's own overhead of the single step's (CPU compiler)."""
  from fmcejax import parallel
  from fmcejax.configs import mnist_cnn
  from fmcejax.tools import preflight_compile

  mesh = parallel.make_mesh()
  rows = {}
  for k in (1, 4):
    config = mnist_cnn.get_config()
    config.stages, config.steps_per_dispatch = "baseline", k
    ((name, _, steps, lower),) = preflight_compile.programs(config, mesh)[:1]
    assert (name, steps) == ("train_step", k)
    rows[k] = preflight_compile.analyse(lower(), mesh.size, steps=k)
  assert rows[4]["flops_per_step"] == pytest.approx(rows[1]["flops_per_step"], rel=0.02)
  assert rows[4]["bytes_per_step"] == pytest.approx(rows[1]["bytes_per_step"], rel=0.1)


def test_train_checks_memory_per_program_before_it_trains():
  """`train`'s check on accelerators, here on the CPU mesh with a made-up memory size."""
  from fmcejax import config_lib, parallel
  from fmcejax.tools import preflight_compile
  from fmcejax.configs import mnist_cnn

  config = mnist_cnn.get_config()
  config.stages = "probe"
  mesh = parallel.make_mesh()
  preflight_compile.check_memory(config, mesh, hbm_bytes=2**40)  # fits
  with pytest.raises(config_lib.ConfigError, match="per device") as e:
    preflight_compile.check_memory(config, mesh, hbm_bytes=2**20)
  assert e.value.field == "batch_size" and "Program train_step needs" in str(e.value)


def test_table_row_reads_per_image_figures_and_the_mfu_bound():
  from fmcejax.tools import preflight_table

  report = {
    "target": "v5e:2x4",
    "devices": 8,
    "chip": {"hbm_bytes": 16 * 2**30, "peak_flops": 1e15},
    "pipeline_seconds_roofline": 5400.0,
    "programs": [
      {"name": "train_step", "compiled": True, "fits": True, "images_per_step": 128,
       "memory_bytes": {"total": 2**30}, "flops_per_step": 2e12, "bytes_per_step": 1.6e8,
       "kernels": 1234, "roofline_seconds_per_step": 4e-3, "roofline_images_per_second": 4000.0},
      {"name": "eval_step", "compiled": False, "fits": False, "images_per_step": 1024},
    ],
  }  # fmt: skip
  line = preflight_table.row("cifar10_resnet50", report)
  cells = [c.strip() for c in line.strip("|").split("|")]
  assert cells[:3] == ["cifar10_resnet50", "v5e:2x4", "16"]
  assert cells[3] == "1.00 GiB of 16 (does not compile or fit: eval_step)"
  # 2e12 FLOP and 160 MB per step of 16 images; 2 ms of math in a 4 ms roofline step
  assert cells[4:] == ["125.00", "10.0", "1,234", "4,000", "50%", "1.5 h"]


def test_a_compiler_that_kills_its_process_fails_only_that_program(monkeypatch):
  """A compiler crash (not an error it reports) marks the program it was compiling, and a new
  child compiles the rest: the report keeps every other program."""
  from fmcejax.tools import preflight_targets
  from fmcejax.configs import mnist_cnn

  monkeypatch.setenv("PYTHONPATH", str(REPO / "tests"))
  monkeypatch.setenv("CRASH_ON", "train_step_ral")
  child = preflight_cli.compile_in_child(
    preflight_targets.parse("v6e:2x4"), mnist_cnn.get_config(), module="crashing_compiler"
  )
  rows = {p["name"]: p["compiled"] for p in child["programs"]}
  assert rows["train_step"] is True and rows["eval_step"] is True
  assert rows["train_step_ral"].startswith("the compiler crashed (signal 11)")
  assert "stack overflow" in rows["train_step_ral"] and "@ 0x7f" not in rows["train_step_ral"]
  assert child["devices"] == 8
