"""Benchmark of the train step (JAX baseline and RAL vs the PyTorch reference) and input pipeline.

`python -m fmcejax.bench --backbone resnet18 --batch_size 128` prints a table and writes JSON.

The JAX steps (`bench_jax`) are `trainer.jit_train_step` as `trainer.fit` runs it; the RAL step
trains through a frozen `models.FMCENet` on the backbone's last feature map, alpha 0.1 (convex,
phase target). The PyTorch reference (`bench_torch`, `torch_ref`) runs on the same (first)
device, eager and under `torch.compile`, from the same initial weights, in a child process of its
own, as PyTorch users run it (in one process the two contend for the heap and thread pools:
docs/BENCHMARKS.md). The input pipeline is timed separately. JAX peak memory is the process
high-water mark (`memory_stats`), read after each variant's warm-up.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.metadata
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Sequence
from typing import Any

import flax
import grain
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax

from fmcejax import cli, input_pipeline, models, parallel, steps
from fmcejax.tools import bench_jax, bench_torch

TORCH_MODES = {
  "none": (),
  "eager": ("eager",),
  "compile": ("compile",),
  "both": ("eager", "compile"),
}
# Dense (no sparsity) peak FLOP/s per device for MFU, first `device_kind` substring match wins;
# other devices and dtypes need --peak_tflops.


def input_pipeline_images_per_second(
  image_shape: tuple[int, ...], batch_size: int, num_batches: int, seed: int = 0, workers: int = 0
) -> float:
  """Host images/s of `input_pipeline.epoch_batches` + `make_iterator` with crop+flip.

  Uses `input_pipeline.random_crop_flip`, the function `train_dataset` uses (so the figure
  follows the real augmentation), over random uint8 images in an `input_pipeline.ArraySource`
  (training's in-memory source), with `workers` grain processes as `trainer.fit` would use
  them. The first 10 batches (which start the workers and fill the prefetch buffers) are not
  timed.
  """
  pool = 8
  rng = np.random.default_rng(seed)
  examples = input_pipeline.ArraySource(
    image=rng.integers(0, 256, (pool * batch_size, *image_shape), dtype=np.uint8),
    label=np.arange(pool * batch_size, dtype=np.int32) % 10,
  )
  skip = 10
  ds = input_pipeline.epoch_batches(
    grain.MapDataset.source(examples),
    global_batch=batch_size,
    epochs=math.ceil((num_batches + skip) / pool),
    seed=seed,
    augment=input_pipeline.random_crop_flip,
  )
  iterator = input_pipeline.make_iterator(ds, workers=workers)
  try:
    for _ in range(skip):
      next(iterator)
    start = time.perf_counter()
    for _ in range(num_batches):
      next(iterator)
    return num_batches * batch_size / (time.perf_counter() - start)
  finally:
    iterator.close()


def _ratio(a: float | None, b: float | None) -> float | None:
  return a / b if a is not None and b else None


def environment() -> dict[str, Any]:
  devices = jax.devices()
  env = {
    "platform": jax.default_backend(),
    "device_kind": devices[0].device_kind,
    "device_count": len(devices),
    "cpu": platform.processor() or platform.machine(),
    "cpu_count": os.cpu_count(),
    "python": platform.python_version(),
    "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
    "flax": flax.__version__,
    "optax": optax.__version__,
    "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
    "load_average_start": os.getloadavg(),
  }
  try:
    env["torch"] = importlib.metadata.version("torch")
  except importlib.metadata.PackageNotFoundError:
    env["torch"] = None
  return env


def _figures(
  contenders: list[bench_jax.Contender],
  batch_size: int,
  jax_flops: dict[str, float | None],
  peak: float | None,
  num_devices: int,
) -> dict[str, dict[str, Any]]:
  """framework -> variant -> figures: median step time, images/s and MFU from the timed steps."""
  results: dict[str, dict[str, Any]] = {}
  for c in contenders:
    figures = dict(c.figures)
    if c.times:
      step_s = statistics.median(c.times)
      figures.update(
        step_s=step_s,
        images_per_second=batch_size / step_s,
        timed_steps=len(c.times),
        step_s_min=min(c.times),
        step_s_max=max(c.times),
      )
      flops = jax_flops.get(c.variant)
      devices = num_devices if c.framework.startswith("jax") else 1  # torch: one device
      figures["mfu"] = (
        flops * figures["images_per_second"] / (peak * devices) if flops and peak else None
      )
    results.setdefault(c.framework, {})[c.variant] = figures
  return results


def _ratios(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """RAL over baseline per framework, and JAX over each other framework per variant."""

  def get(framework: str, variant: str, key: str) -> Any:
    return results.get(framework, {}).get(variant, {}).get(key)

  ratios: dict[str, Any] = {
    "ral_over_baseline_step_time": {
      fw: _ratio(get(fw, "ral", "step_s"), get(fw, "baseline", "step_s")) for fw in results
    }
  }
  for variant in bench_jax.VARIANTS:
    for fw in results:
      if fw != "jax":
        ratios[f"jax_over_{fw}_{variant}"] = {
          key: _ratio(get("jax", variant, key), get(fw, variant, key))
          for key in ("images_per_second", "step_s", "first_step_s", "peak_bytes", "mfu")
        }
  return ratios


def _config(args: argparse.Namespace, mesh: Any, head_module: str) -> dict[str, Any]:
  """What was measured: the command line's settings and the benchmark's recipe."""
  image_shape = tuple(args.image_shape)
  return {
    "backbone": args.backbone,
    "batch_size": args.batch_size,
    "dtype": args.dtype,
    "image_shape": list(image_shape),
    "num_classes": args.num_classes,
    "steps": args.steps,
    "warmup": args.warmup,
    "rounds": args.rounds,
    "torch": args.torch,
    "torch_threads": args.torch_threads,
    "alpha": bench_jax.ALPHA,
    "xla_compiler_options": parallel.compiler_options(mesh),
    "head_module": head_module,
    "head": {
      "num_phases": bench_jax.NUM_PHASES,
      "width": bench_jax.HEAD_WIDTH,
      "depth": bench_jax.HEAD_DEPTH,
    },
    "optimizer": {
      "name": "sgd",
      "learning_rate": bench_jax.LEARNING_RATE,
      "momentum": bench_jax.MOMENTUM,
      "nesterov": True,
      "weight_decay": bench_jax.WEIGHT_DECAY,
    },
  }


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Measures everything `args` asks for; returns the JSON-ready result."""
  image_shape = tuple(args.image_shape)
  mesh = parallel.make_mesh()
  if args.batch_size % mesh.size:
    raise ValueError(
      f"--batch_size {args.batch_size} is not a multiple of the {mesh.size} devices."
    )
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  mean, std = bench_jax.normalisation(image_shape[-1])
  preprocess = functools.partial(steps.normalize, mean=mean, std=std, dtype=dtype)
  host_batch = bench_jax.host_batch(args.batch_size, image_shape, args.num_classes)
  env = environment()

  contenders, host = bench_jax.contenders(args, mesh, host_batch, preprocess, dtype)
  modes = TORCH_MODES[args.torch]

  with (
    bench_torch.process(args, host, host_batch, mean, std, modes, parallel.platform(mesh) == "gpu")
    if modes
    else contextlib.nullcontext([])
  ) as torch_contenders:
    contenders += torch_contenders
    bench_jax.timed_rounds(contenders, args.steps, args.rounds)
  env["load_average_end"] = os.getloadavg()

  peak = bench_jax.peak_flops_per_device(env["device_kind"], args.dtype, args.peak_tflops)
  jax_flops = {
    c.variant: c.figures.get("train_flops_per_image") for c in contenders if c.framework == "jax"
  }
  results = _figures(contenders, args.batch_size, jax_flops, peak, mesh.size)

  def get(framework: str, variant: str, key: str) -> Any:
    return results.get(framework, {}).get(variant, {}).get(key)

  by_workers = {
    w: input_pipeline_images_per_second(
      image_shape, args.batch_size, args.pipeline_batches, workers=w
    )
    for w in args.input_workers
  }
  best = max(by_workers, key=by_workers.get)
  pipeline = by_workers[best]
  return {
    "config": _config(args, mesh, host["module"]),
    "environment": env,
    "flops": {
      "forward_per_image": bench_jax.forward_flops_per_image(
        args.backbone, image_shape, args.num_classes
      ),
      "train_per_image": jax_flops,
      "peak_flops_per_device": peak,
      "source": "XLA cost_analysis() of the compiled programs",
    },
    "results": results,
    "ratios": _ratios(results),
    "input_pipeline": {
      "images_per_second": pipeline,
      "over_jax_baseline": _ratio(pipeline, get("jax", "baseline", "images_per_second")),
      "over_jax_ral": _ratio(pipeline, get("jax", "ral", "images_per_second")),
      "workers": best,
      "images_per_second_by_workers": {str(w): v for w, v in by_workers.items()},
      "augment": "input_pipeline.random_crop_flip",
    },
  }


def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
  """`format(value * scale, spec)`, or "-" right-aligned to the spec's width for None."""
  if value is None:
    width = spec.split(".")[0]
    return "-".rjust(int(width) if width.isdigit() else 1)
  return format(value * scale, spec)


def format_table(result: dict[str, Any]) -> str:
  """The human-readable summary of a `run` result."""
  cfg, env = result["config"], result["environment"]
  lines = [
    f"{cfg['backbone']} {'x'.join(map(str, cfg['image_shape']))} batch {cfg['batch_size']} "
    f"{cfg['dtype']} on {env['device_count']} x {env['device_kind']} "
    f"(load {env['load_average_start'][0]:.1f} -> {env['load_average_end'][0]:.1f})",
    f"{'framework':<18}{'step':<9}{'first s':>9}{'step ms':>10}{'img/s':>10}"
    f"{'x eager':>9}{'x compile':>10}{'peak MiB':>10}{'MFU':>7}",
  ]
  ratios = result["ratios"]
  for fw, variants in result["results"].items():
    for variant, f in variants.items():
      if "error" in f:
        lines.append(f"{fw:<18}{variant:<9}  failed: {f['error'][:90]}")
        continue
      vs = {
        m: (
          ratios.get(f"jax_over_torch_{m}_{variant}", {}).get("images_per_second")
          if fw == "jax"
          else None
        )
        for m in ("eager", "compile")
      }
      lines.append(
        f"{fw:<18}{variant:<9}{_fmt(f.get('first_step_s'), '9.2f')}"
        f"{_fmt(f.get('step_s'), '10.1f', 1e3)}{_fmt(f.get('images_per_second'), '10.0f')}"
        f"{_fmt(vs['eager'], '9.2f')}{_fmt(vs['compile'], '10.2f')}"
        f"{_fmt(f.get('peak_bytes'), '10.0f', 2**-20)}{_fmt(f.get('mfu'), '7.1%')}"
      )
  overhead = ", ".join(
    f"{fw} {_fmt(r, '.2f')}" for fw, r in ratios["ral_over_baseline_step_time"].items()
  )
  pipe = result["input_pipeline"]
  lines.append(f"RAL / baseline step time: {overhead}")
  if "jax_xla_defaults" in result["results"]:
    gain = ", ".join(
      f"{v} {_fmt(ratios[f'jax_over_jax_xla_defaults_{v}']['images_per_second'], '.2f')}"
      for v in bench_jax.VARIANTS
    )
    lines.append(
      f"JAX with compiler_options {cfg['xla_compiler_options']} / XLA defaults, img/s: {gain}"
    )
  rates = ", ".join(f"{w} workers {v:.0f}" for w, v in pipe["images_per_second_by_workers"].items())
  lines += [
    (
      f"input pipeline (grain, crop+flip), img/s: {rates}; best = "
      f"{_fmt(pipe['over_jax_baseline'], '.2f')} x the JAX baseline step"
    ),
    (
      "x eager / x compile: JAX img/s over torch img/s (> 1: JAX faster); peak MiB: "
      "device allocator high-water mark (- where the backend reports none, e.g. CPU)"
    ),
  ]
  return "\n".join(lines)


def _counts(text: str) -> list[int]:
  try:
    counts = [int(part) for part in text.split(",")]
  except ValueError:
    counts = [-1]
  if min(counts) < 0:
    raise argparse.ArgumentTypeError(f"expected a comma list of integers >= 0, got {text!r}")
  return counts


EXAMPLES = (
  "python -m fmcejax.bench  # the cnn at batch 128, JAX and torch, float32",
  "python -m fmcejax.bench --backbone resnet18 --rounds 3 --json resnet18.json",
  "python -m fmcejax.bench --backbone resnet50 --dtype bfloat16 --batch_size 512 --input_workers 0,4,8",
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = cli.argument_parser("fmcejax.bench", __doc__, EXAMPLES)
  parser.add_argument("--backbone", default="cnn", choices=models.BACKBONES)
  parser.add_argument("--batch_size", type=int, default=128, help="global batch")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--steps", type=int, default=20, help="timed steps per contender")
  parser.add_argument(
    "--warmup", type=int, default=3, help="untimed steps after the first (compiling) one"
  )
  parser.add_argument(
    "--rounds",
    type=int,
    default=5,
    help="blocks the timed steps are interleaved in across contenders",
  )
  parser.add_argument(
    "--image_shape", default="28,28,1", type=lambda s: tuple(int(v) for v in s.split(","))
  )
  parser.add_argument("--num_classes", type=int, default=10)
  parser.add_argument("--torch", default="both", choices=tuple(TORCH_MODES))
  parser.add_argument(
    "--torch_threads",
    type=int,
    default=0,
    help="torch intra-op CPU threads (0: torch's default, one per core)",
  )
  parser.add_argument(
    "--xla_defaults",
    action="store_true",
    help="also time the JAX steps compiled with XLA's default options instead of "
    "parallel.compiler_options (framework jax_xla_defaults)",
  )
  parser.add_argument(
    "--pipeline_batches",
    type=int,
    default=100,
    help="timed batches of the input-pipeline measurement",
  )
  parser.add_argument(
    "--input_workers",
    default="0",
    type=_counts,
    help="comma list of grain worker-process counts to time the pipeline with "
    "(0 = a thread of this process), e.g. 0,4,8",
  )
  parser.add_argument(
    "--peak_tflops",
    type=float,
    default=0.0,
    help="peak dense TFLOP/s per device for MFU (default: known GPUs only)",
  )
  parser.add_argument("--json", default="", help="where to write the JSON result")
  args = cli.parse_args(parser, argv)
  if len(args.image_shape) != 3:
    parser.error(f"--image_shape must be H,W,C, got {args.image_shape}")
  if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
    parser.error("--steps and --batch_size must be >= 1 and --warmup >= 0")
  return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """CLI entry point; returns the result so tests can call it in-process."""
  args = parse_args(argv)
  if args.torch != "none":
    # Both frameworks share the accelerator: JAX must not grab 75% of it up front. Only takes
    # effect if no JAX backend was initialised yet.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  result = run(args)
  print(format_table(result))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return result
