"""The loop ceiling: how many steps per second `trainer.fit` itself can drive, per input path.

`python -m fmcejax.bench_loop` runs the whole training loop (data, step, metric syncs, the
checkpoint at each epoch end) with a model that costs next to nothing (one Dense layer,
`--backbone linear`) on MNIST-shaped random data without augmentation, progress bar off, for the
grain host pipeline (`host`) and the device-resident batches of `device_input`, one step per
dispatch (`device`) or k (`device xk`, `--steps_per_dispatch`). What it reaches is the loop's
ceiling; `host overhead` is the loop's time per step minus the same jitted step dispatched back to
back on a fixed device batch.

Beside it: the step rate an accelerator needs for real models, `MFU x peak / (XLA's FLOP count
of the compiled train step per image)` (default: ResNet-18 and ResNet-50 on CIFAR at batch 128,
35% of an H200's 989.4 TFLOP/s dense bf16). A loop slower than that rate leaves the accelerator
idle. Runs of the loops are interleaved in `--rounds`; figures are medians over rounds.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from fmcejax import (
  cli,
  cpu_lowering,
  datasets,
  device_input,
  input_pipeline,
  models,
  parallel,
  steps,
  trainer,
)
from fmcejax.tools import bench, bench_jax

INPUTS = ("host", "device")
MNIST = datasets.DATASET_INFO["mnist"]
CIFAR = datasets.DATASET_INFO["cifar10"]


class Linear(nn.Module):
  """One Dense layer: a train step with next to no compute, so the loop's own cost shows."""

  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    del train
    # `steps.train_step` reads back the batch_stats collection every backbone has.
    self.variable("batch_stats", "unused", lambda: jnp.zeros((), jnp.float32))
    logits = nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))
    return logits, {"logits": logits}


def _model(backbone: str, num_classes: int, mesh: Mesh) -> nn.Module:
  """The loop's model, with the lowering the pipeline would pick on `mesh`."""
  if backbone == "linear":
    return Linear(num_classes)
  lowering = cpu_lowering.for_platform(parallel.platform(mesh))
  return models.create_backbone(backbone, num_classes, lowering=lowering)


def _initial_state(job: trainer.Job, mesh: Mesh) -> steps.TrainState:
  init = jax.jit(
    functools.partial(steps.create_train_state, job.model, job.tx, job.input_shape),
    out_shardings=parallel.replicated(mesh),
  )
  return init(jax.random.PRNGKey(0))


def _job(
  args: argparse.Namespace, arrays: dict[str, np.ndarray], batch_size: int, path: str, mesh: Mesh
) -> trainer.Job:
  """The loop's job on `arrays` (MNIST-shaped, no augmentation, no evaluation)."""
  common = dict(global_batch=batch_size, epochs=args.epochs, seed=0)
  if path == "device":
    data = device_input.train_batches(arrays, mesh=mesh, augment=False, **common)
  else:
    data = input_pipeline.HostBatches(
      input_pipeline.epoch_batches(
        grain.MapDataset.source(input_pipeline.ArraySource(**arrays)),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        **common,
      ),
      mesh,
    )
  spe = input_pipeline.steps_per_epoch(len(arrays["label"]), batch_size)
  lr = optax.constant_schedule(0.01)
  return trainer.Job(
    model=_model(args.backbone, MNIST.num_classes, mesh),
    preprocess=functools.partial(steps.normalize, mean=MNIST.mean, std=MNIST.std),
    input_shape=MNIST.image_shape,
    train_data=data,
    steps_per_epoch=spe,
    tx=steps.create_optimizer("sgd", lr, weight_decay=5e-4),
    learning_rate=lr,
    identity={"bench": "loop", "path": path, "batch_size": batch_size},
    **common,
  )


def _fit(job: trainer.Job, mesh: Mesh, loop: str, k: int) -> dict[str, float]:
  """One `trainer.fit` from scratch: its steady-state rate and the wall time of the call."""
  options = trainer.LoopOptions(
    progress_bar=False, description=f"loop {loop}", steps_per_dispatch=k
  )
  with tempfile.TemporaryDirectory() as run_dir:
    start = time.perf_counter()
    result = trainer.fit(job, Path(run_dir), mesh, options)
    wall = time.perf_counter() - start
  return {
    "images_per_second": result["images_per_second"],
    "wall_images_per_second": result["steps"] * job.global_batch / wall,
    "steps": result["steps"],
  }


def _step_ms(
  job: trainer.Job, mesh: Mesh, arrays: dict[str, np.ndarray], steps_timed: int
) -> float:
  """ms per step of the job's jitted step alone: back to back on one device batch, no syncs
  beyond `parallel.Pacer`'s."""
  train_fn = trainer.jit_train_step(
    mesh,
    preprocess=job.preprocess,
    head=None,
    loss=job.loss,
    compiler_options=parallel.compiler_options(mesh),
  )
  state = _initial_state(job, mesh)
  batch = parallel.global_batch({k: v[: job.global_batch] for k, v in arrays.items()}, mesh)
  rng = jax.random.PRNGKey(1)
  for _ in range(3):
    state, _ = train_fn(state, batch, rng, None)
  jax.block_until_ready(state)
  start, pace = time.perf_counter(), parallel.Pacer()
  for _ in range(steps_timed):
    state, metrics = train_fn(state, batch, rng, None)
    pace(metrics)
  jax.block_until_ready((state, metrics))
  return (time.perf_counter() - start) / steps_timed * 1e3


def _loops(args: argparse.Namespace) -> list[tuple[str, str, int]]:
  """(name, input path, steps per dispatch) of each loop timed: grain's batches one step per
  dispatch, device batches with each `--steps_per_dispatch`."""
  loops = [("host", "host", 1)] if "host" in args.inputs else []
  if "device" in args.inputs:
    loops += [
      ("device" if k == 1 else f"device x{k}", "device", k) for k in args.steps_per_dispatch
    ]
  return loops


def measure_loop(args: argparse.Namespace, mesh: Mesh) -> dict[str, Any]:
  """Per batch size: each loop's rate, the step alone and the host overhead (medians over
  rounds)."""
  rng = np.random.default_rng(0)
  arrays = {
    "image": rng.integers(0, 256, (args.examples, *MNIST.image_shape), dtype=np.uint8),
    "label": rng.integers(0, MNIST.num_classes, args.examples).astype(np.int32),
  }
  loops = _loops(args)
  runs: dict[tuple[int, str], list[dict[str, float]]] = {}
  step_ms: dict[int, list[float]] = {}
  for _ in range(args.rounds):
    for b in args.batch_sizes:
      for name, path, k in loops:
        job = _job(args, arrays, b, path, mesh)
        runs.setdefault((b, name), []).append(_fit(job, mesh, name, k))
      step_ms.setdefault(b, []).append(_step_ms(job, mesh, arrays, args.step_repeats))
  loop: dict[str, Any] = {}
  for b in args.batch_sizes:
    alone = statistics.median(step_ms[b])
    entry: dict[str, Any] = {"step_ms": alone}
    for name, _, _ in loops:
      rates = [r["images_per_second"] for r in runs[b, name]]
      ips = statistics.median(rates)
      ms = b / ips * 1e3
      entry[name] = {
        "images_per_second": ips,
        "images_per_second_by_round": rates,
        "steps_per_second": ips / b,
        "ms_per_step": ms,
        "host_overhead_ms": ms - alone,
        "wall_images_per_second": statistics.median(
          r["wall_images_per_second"] for r in runs[b, name]
        ),
        "steps": runs[b, name][0]["steps"],
      }
    best = max((name for name, _, _ in loops), key=lambda n: entry[n]["images_per_second"])
    entry["ceiling"] = {
      "loop": best,
      "images_per_second": entry[best]["images_per_second"],
      "steps_per_second": entry[best]["steps_per_second"],
    }
    loop[str(b)] = entry
  return loop


def required_rates(args: argparse.Namespace) -> dict[str, Any]:
  """The step rate an accelerator at `--mfu` of its peak needs, per `--required` backbone."""
  peak = bench_jax.peak_flops_per_device(args.peak_device, "bfloat16", args.peak_tflops)
  image_shape = tuple(args.required_image_shape)
  rates = {}
  for backbone in args.required:
    flops = bench_jax.train_flops_per_image(
      backbone, image_shape, CIFAR.num_classes, args.required_batch, args.required_dtype
    )
    ips = args.mfu * peak / flops if flops and peak else None
    rates[backbone] = {
      "train_flops_per_image": flops,
      "forward_flops_per_image": bench_jax.forward_flops_per_image(
        backbone, image_shape, CIFAR.num_classes
      ),
      "images_per_second": ips,
      "steps_per_second": ips / args.required_batch if ips else None,
      "step_ms": args.required_batch / ips * 1e3 if ips else None,
    }
  return {
    "device": args.peak_device,
    "peak_flops_per_device": peak,
    "mfu": args.mfu,
    "batch_size": args.required_batch,
    "dtype": args.required_dtype,
    "image_shape": list(image_shape),
    "source": "XLA cost_analysis() of the compiled baseline train step on this host's backend",
    "backbones": rates,
  }


def run(args: argparse.Namespace) -> dict[str, Any]:
  mesh = parallel.make_mesh()
  for b in args.batch_sizes:
    if b % mesh.size:
      raise ValueError(f"--batch_sizes: {b} is not a multiple of the {mesh.size} devices.")
  env = bench.environment()
  loop = measure_loop(args, mesh)
  env["load_average_end"] = os.getloadavg()
  required = required_rates(args)
  goal = None
  target = required["backbones"].get(args.goal_backbone, {}).get("steps_per_second")
  at = loop.get(str(required["batch_size"]))
  if target and at:
    ratio = at["ceiling"]["steps_per_second"] / target
    goal = {
      "backbone": args.goal_backbone,
      "batch_size": required["batch_size"],
      "loop": at["ceiling"]["loop"],
      "ceiling_over_required": ratio,
      "wanted": args.goal_factor,
      "met": ratio >= args.goal_factor,
      "by_loop": {name: at[name]["steps_per_second"] / target for name, _, _ in _loops(args)},
    }
  return {
    "config": {
      "backbone": args.backbone,
      "image_shape": list(MNIST.image_shape),
      "examples": args.examples,
      "epochs": args.epochs,
      "rounds": args.rounds,
      "loops": [name for name, _, _ in _loops(args)],
      "augment": False,
      "progress_bar": False,
      "log_every": trainer.LoopOptions.log_every,
      "checkpoint": "every epoch end",
      "devices": mesh.size,
    },
    "environment": env,
    "loop": loop,
    "required": required,
    "goal": goal,
  }


def format_table(result: dict[str, Any]) -> str:
  cfg, env, req = result["config"], result["environment"], result["required"]
  lines = [
    f"loop ceiling: trainer.fit, {cfg['backbone']} model, {cfg['examples']} MNIST-shaped "
    f"examples x {cfg['epochs']} epochs, on {env['device_count']} x {env['device_kind']} "
    f"(load {env['load_average_start'][0]:.1f} -> {env['load_average_end'][0]:.1f})",
    f"{'batch':>6}{'loop':>11}{'img/s':>10}{'steps/s':>9}{'ms/step':>9}"
    f"{'step alone':>11}{'host ms':>9}{'wall img/s':>11}",
  ]
  for b, entry in result["loop"].items():
    for name in cfg["loops"]:
      f = entry[name]
      lines.append(
        f"{b:>6}{name:>11}{f['images_per_second']:>10.0f}"
        f"{f['steps_per_second']:>9.1f}{f['ms_per_step']:>9.2f}"
        f"{bench._fmt(entry['step_ms'], '11.2f')}"
        f"{bench._fmt(f['host_overhead_ms'], '9.2f')}"
        f"{f['wall_images_per_second']:>11.0f}"
      )
  peak = req["peak_flops_per_device"]
  lines.append(
    f"needed at {req['mfu']:.0%} MFU of {req['device']} "
    f"({_tflops(peak)} TFLOP/s), batch {req['batch_size']} {req['dtype']}:"
  )
  for name, r in req["backbones"].items():
    lines.append(
      f"  {name:<14} {bench._fmt(r['train_flops_per_image'], '.3g', 1e-9)} GFLOP/image "
      f"(train step), {bench._fmt(r['images_per_second'], '.0f')} img/s = "
      f"{bench._fmt(r['steps_per_second'], '.0f')} steps/s"
    )
  goal = result["goal"]
  if goal:
    lines.append(
      f"ceiling / {goal['backbone']} need at batch {goal['batch_size']}: "
      f"{goal['ceiling_over_required']:.2f}x ({goal['loop']}; goal >= {goal['wanted']:g}x: "
      f"{'met' if goal['met'] else 'NOT met'}); by loop: "
      + ", ".join(f"{name} {r:.2f}x" for name, r in goal["by_loop"].items())
    )
  return "\n".join(lines)


def _tflops(peak: float | None) -> str:
  return "unknown" if peak is None else f"{peak / 1e12:.1f}"


def _ints(text: str) -> list[int]:
  return [int(v) for v in text.split(",") if v]


EXAMPLES = (
  "python -m fmcejax.bench_loop  # every input path, batch 128 and 512",
  "python -m fmcejax.bench_loop --rounds 3 --json loop.json",
  "python -m fmcejax.bench_loop --inputs device --steps_per_dispatch 1,8,32 --peak_device H100",
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = cli.argument_parser("fmcejax.bench_loop", __doc__, EXAMPLES)
  parser.add_argument(
    "--backbone",
    default="linear",
    choices=("linear", *models.BACKBONES),
    help="the model the loop trains (linear: one Dense layer)",
  )
  parser.add_argument("--batch_sizes", default=[128, 512], type=_ints)
  parser.add_argument("--inputs", default=list(INPUTS), type=lambda s: s.split(","))
  parser.add_argument("--examples", type=int, default=60000, help="MNIST-shaped examples")
  parser.add_argument("--epochs", type=int, default=2)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument(
    "--steps_per_dispatch",
    default=[1, 8],
    type=_ints,
    help="the device loops timed: trainer.fit with these steps per dispatch",
  )
  parser.add_argument(
    "--step_repeats", type=int, default=200, help="steps of the step-alone timing"
  )
  parser.add_argument(
    "--required",
    default=["resnet18", "resnet50"],
    type=lambda s: [v for v in s.split(",") if v],
    help="backbones whose needed step rate is reported ('' for none)",
  )
  parser.add_argument("--required_image_shape", default=CIFAR.image_shape, type=_ints)
  parser.add_argument("--required_batch", type=int, default=128)
  parser.add_argument("--required_dtype", default="bfloat16", choices=("float32", "bfloat16"))
  parser.add_argument("--mfu", type=float, default=0.35)
  parser.add_argument("--peak_device", default="H200")
  parser.add_argument(
    "--peak_tflops",
    type=float,
    default=0.0,
    help="peak dense TFLOP/s (default: bench_jax.PEAK_FLOPS of --peak_device)",
  )
  parser.add_argument("--goal_backbone", default="resnet18")
  parser.add_argument("--goal_factor", type=float, default=3.0)
  parser.add_argument("--json", default="")
  args = cli.parse_args(parser, argv)
  if set(args.inputs) - set(INPUTS) or not args.inputs:
    parser.error(f"--inputs takes a comma list of {', '.join(INPUTS)}")
  if not args.batch_sizes or min(args.batch_sizes) < 1 or args.rounds < 1 or args.epochs < 1:
    parser.error("--batch_sizes, --rounds and --epochs must be >= 1")
  if "device" in args.inputs and (not args.steps_per_dispatch or min(args.steps_per_dispatch) < 1):
    parser.error("--steps_per_dispatch takes a comma list of integers >= 1")
  if not 0 < args.mfu <= 1:
    parser.error(f"--mfu must lie in (0, 1], got {args.mfu}")
  return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """CLI entry point; returns the result so tests can call it in-process."""
  args = parse_args(argv)
  result = run(args)
  print(format_table(result))
  if args.json:
    Path(args.json).write_text(json.dumps(result, indent=2))
  return result
