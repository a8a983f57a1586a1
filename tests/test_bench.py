"""`python -m fmcejax.bench` runs end to end on CPU and writes the JSON it promises."""

import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TORCH_INSTALL, missing
from fmcejax import models, parallel, trainer
from fmcejax.tools import bench, bench_jax, bench_loop, bench_torch

HAS_TORCH = importlib.util.find_spec("torch") is not None
TORCH = "eager" if HAS_TORCH else "none"


def _positive(value):
  return isinstance(value, (int, float)) and value > 0


def test_bench_writes_the_json_it_prints(tmp_path, capsys):
  path = tmp_path / "bench.json"
  returned = bench.main(
    [
      "--backbone",
      "cnn",
      "--batch_size",
      "16",
      "--steps",
      "3",
      "--warmup",
      "1",
      "--rounds",
      "2",
      "--torch",
      TORCH,
      "--pipeline_batches",
      "5",
      "--input_workers",
      "0,1",
      "--json",
      str(path),
    ]
  )
  result = json.loads(path.read_text())
  assert result == json.loads(json.dumps(returned))
  assert set(result) == {"config", "environment", "flops", "results", "ratios", "input_pipeline"}
  assert result["config"]["head_module"] == "conv3"
  frameworks = ["jax"] + (["torch_eager"] if HAS_TORCH else [])
  assert list(result["results"]) == frameworks
  for framework in frameworks:
    for variant in ("baseline", "ral"):
      figures = result["results"][framework][variant]
      for key in ("first_step_s", "step_s", "images_per_second"):
        assert _positive(figures[key]), (framework, variant, key, figures)
      assert figures["timed_steps"] == 3
      assert figures["peak_bytes"] is None  # CPU: the backend reports no memory stats
    assert _positive(result["ratios"]["ral_over_baseline_step_time"][framework])
  for variant in ("baseline", "ral"):
    assert _positive(result["results"]["jax"][variant]["compile_s"])
  flops = result["flops"]
  assert _positive(flops["forward_per_image"])
  assert flops["train_per_image"]["ral"] > flops["train_per_image"]["baseline"] > 0
  if HAS_TORCH:
    assert _positive(result["ratios"]["jax_over_torch_eager_ral"]["images_per_second"])
  pipeline = result["input_pipeline"]
  assert set(pipeline["images_per_second_by_workers"]) == {"0", "1"}
  assert all(_positive(v) for v in pipeline["images_per_second_by_workers"].values())
  assert pipeline["images_per_second"] == max(pipeline["images_per_second_by_workers"].values())
  assert (
    pipeline["images_per_second"]
    == pipeline["images_per_second_by_workers"][str(pipeline["workers"])]
  )
  assert _positive(pipeline["over_jax_baseline"])
  table = capsys.readouterr().out
  assert "RAL / baseline step time" in table and "torch_compile" not in table


def test_xla_defaults_times_the_same_steps_without_our_compiler_options(capsys, monkeypatch):
  passed = []  # the compiler_options of every train step the benchmark compiles
  jit_train_step = trainer.jit_train_step

  def recording_jit_train_step(mesh, **kwargs):
    passed.append(kwargs["compiler_options"])
    return jit_train_step(mesh, **kwargs)

  monkeypatch.setattr(trainer, "jit_train_step", recording_jit_train_step)
  result = bench.main(
    [
      "--backbone",
      "cnn",
      "--batch_size",
      "8",
      "--steps",
      "2",
      "--warmup",
      "0",
      "--rounds",
      "1",
      "--torch",
      "none",
      "--xla_defaults",
      "--pipeline_batches",
      "2",
    ]
  )
  assert list(result["results"]) == ["jax", "jax_xla_defaults"]
  options = parallel.compiler_options(parallel.make_mesh())
  assert options is not None and result["config"]["xla_compiler_options"] == options
  # Each variant once with XLA's defaults; every other step (the same variants, the loop
  # benchmark's) with our options.
  assert passed.count(None) == len(bench_jax.VARIANTS)
  assert passed.count(options) == len(passed) - len(bench_jax.VARIANTS) >= len(bench_jax.VARIANTS)
  for variant in bench_jax.VARIANTS:
    ratio = result["ratios"][f"jax_over_jax_xla_defaults_{variant}"]["images_per_second"]
    assert _positive(ratio)
  assert "/ XLA defaults, img/s: baseline" in capsys.readouterr().out


def test_a_failing_torch_compile_is_recorded_not_raised(monkeypatch):
  if not HAS_TORCH:
    missing("torch", TORCH_INSTALL)
  import torch

  def broken(*args, **kwargs):
    raise RuntimeError("no C++ compiler found")

  monkeypatch.setattr(torch, "compile", broken)
  args = bench.parse_args(["--batch_size", "8", "--warmup", "0", "--torch", "compile"])

  def ones(module, shape):  # only the shapes matter here; eval_shape avoids compiling
    abstract = jax.eval_shape(
      lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape)), train=False)
    )
    return jax.tree.map(lambda s: np.ones(s.shape, np.float32), abstract)

  head = models.FMCENet(bench_jax.NUM_PHASES, bench_jax.HEAD_WIDTH, bench_jax.HEAD_DEPTH)
  host = {
    "backbone": ones(models.create_backbone("cnn", 10), (28, 28, 1)),
    "module": "conv3",
    "feature_shape": (7, 7, 64),
    "head": ones(head, (7, 7, 64)),
  }
  batch = {"image": np.zeros((8, 28, 28, 1), np.uint8), "label": np.zeros(8, np.int32)}
  contenders = bench_torch.contenders(args, host, batch, (0.5,), (0.25,), ("compile",))
  assert [(c.framework, c.variant) for c in contenders] == [
    ("torch_compile", "baseline"),
    ("torch_compile", "ral"),
  ]
  for c in contenders:
    assert c.run is None
    assert c.figures["error"] == "RuntimeError: no C++ compiler found"


def test_rejects_a_batch_that_does_not_split_over_the_devices():
  with pytest.raises(ValueError, match="multiple"):
    bench.main(["--batch_size", "12", "--torch", "none"])  # conftest: 8 CPU devices


def test_table_shows_failures_and_missing_figures():
  figures = {
    "first_step_s": 2.0,
    "step_s": 0.01,
    "images_per_second": 1600.0,
    "peak_bytes": None,
    "mfu": None,
  }
  result = {
    "config": {"backbone": "cnn", "image_shape": [28, 28, 1], "batch_size": 16, "dtype": "float32"},
    "environment": {
      "device_count": 1,
      "device_kind": "cpu",
      "load_average_start": [1.0, 1.0, 1.0],
      "load_average_end": [2.0, 1.0, 1.0],
    },
    "results": {
      "jax": {"baseline": figures},
      "torch_compile": {"baseline": {"error": "RuntimeError: boom"}},
    },
    "ratios": {
      "ral_over_baseline_step_time": {"jax": None},
      "jax_over_torch_compile_baseline": {"images_per_second": None},
    },
    "input_pipeline": {
      "images_per_second": 3200.0,
      "over_jax_baseline": 2.0,
      "workers": 2,
      "images_per_second_by_workers": {"0": 1500.0, "2": 3200.0},
    },
  }
  table = bench.format_table(result)
  assert "failed: RuntimeError: boom" in table
  assert "1600" in table and "jax -" in table
  assert "0 workers 1500, 2 workers 3200; best = 2.00 x" in table


def test_peak_flops_lookup():
  assert bench_jax.peak_flops_per_device("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4e12
  assert bench_jax.peak_flops_per_device("NVIDIA H100 PCIe", "bfloat16") == 756e12
  assert bench_jax.peak_flops_per_device("NVIDIA H100 80GB HBM3", "float32") is None
  assert bench_jax.peak_flops_per_device("cpu", "float32") is None
  assert bench_jax.peak_flops_per_device("cpu", "float32", peak_tflops=2.5) == 2.5e12


def test_bench_loop_writes_consistent_figures(tmp_path, capsys):
  path = tmp_path / "loop.json"
  returned = bench_loop.main(
    [
      "--batch_sizes",
      "16,32",
      "--examples",
      "128",
      "--epochs",
      "2",
      "--rounds",
      "1",
      "--step_repeats",
      "3",
      "--steps_per_dispatch",
      "1,2",
      "--required",
      "cnn",
      "--goal_backbone",
      "cnn",
      "--required_batch",
      "16",
      "--mfu",
      "0.4",
      "--json",
      str(path),
    ]
  )
  result = json.loads(path.read_text())
  assert result == json.loads(json.dumps(returned))
  assert set(result) == {"config", "environment", "loop", "required", "goal"}
  assert list(result["loop"]) == ["16", "32"]
  for b, entry in result["loop"].items():
    b = int(b)
    assert _positive(entry["step_ms"])
    loops = ("host", "device", "device x2")
    for path_name in loops:
      f = entry[path_name]
      assert f["steps"] == 2 * (128 // b)
      for key in ("images_per_second", "steps_per_second", "ms_per_step", "wall_images_per_second"):
        assert _positive(f[key]), (b, path_name, key)
      assert f["images_per_second"] == pytest.approx(f["steps_per_second"] * b)
      assert f["ms_per_step"] == pytest.approx(1e3 / f["steps_per_second"])
      assert f["host_overhead_ms"] == pytest.approx(f["ms_per_step"] - entry["step_ms"])
    best = max(loops, key=lambda p: entry[p]["images_per_second"])
    assert entry["ceiling"]["loop"] == best
    assert entry["ceiling"]["steps_per_second"] == entry[best]["steps_per_second"]
  required = result["required"]
  assert required["peak_flops_per_device"] == 989.4e12 and required["mfu"] == 0.4
  cnn = required["backbones"]["cnn"]
  assert cnn["train_flops_per_image"] > 2 * cnn["forward_flops_per_image"] > 0
  assert cnn["images_per_second"] == pytest.approx(0.4 * 989.4e12 / cnn["train_flops_per_image"])
  assert cnn["steps_per_second"] == pytest.approx(cnn["images_per_second"] / 16)
  goal = result["goal"]
  ratio = result["loop"]["16"]["ceiling"]["steps_per_second"] / cnn["steps_per_second"]
  assert goal["ceiling_over_required"] == pytest.approx(ratio)
  assert goal["met"] == (ratio >= 3)
  table = capsys.readouterr().out
  assert "host ms" in table and "cnn" in table and "device x2" in table
