"""Benchmark of the train step (JAX baseline and RAL vs the PyTorch reference) and input pipeline.

`python -m fmcejax.bench --backbone resnet18 --batch_size 128` prints a table and writes JSON.

The JAX step is `trainer.jit_train_step`, as `trainer.fit` runs it (state replicated and donated,
batch sharded over `parallel.make_mesh()`), compiled ahead of time so compilation is timed on its
own, then timed one device-synchronised step at a time (`jax.block_until_ready`) on a fixed device
batch; the input pipeline is timed separately. The RAL step is `train_with_head`: a frozen
`models.FMCENet` on the backbone's `models.DEFAULT_MODULE` map, alpha 0.1 (convex, phase target).
The PyTorch reference (`torch_ref`) runs on the same (first) device, eager and under
`torch.compile`, from the same initial weights, in a child process with its own heap and thread
pools, as PyTorch users run it: in one process the JAX CNN step measured 21-22 ms in four
interleaved runs of five, against 16.5-17 ms alone or with torch in a child process. Timed steps
of all contenders are interleaved in rounds so that load from other processes on a shared machine
hits all of them alike; every figure is the median of the timed steps, warm-up excluded. JAX peak
memory is the process high-water mark (`memory_stats`), read after each variant's warm-up.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.metadata
import itertools
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax
import grain
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax

from fmcejax import cpu_lowering, datasets, input_pipeline, models, parallel, steps, trainer

NUM_PHASES = 5  # config_lib default K
HEAD_WIDTH, HEAD_DEPTH = 64, 2  # config_lib default FMCE-Net
ALPHA = 0.1
LEARNING_RATE, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4
VARIANTS = ("baseline", "ral")
TORCH_MODES = {
  "none": (),
  "eager": ("eager",),
  "compile": ("compile",),
  "both": ("eager", "compile"),
}
# Dense (no sparsity) peak FLOP/s per device for MFU, first `device_kind` substring match wins;
# other devices and dtypes need --peak_tflops.
PEAK_FLOPS = (
  (("H100 PCIe", "bfloat16"), 756e12),
  (("H100 NVL", "bfloat16"), 835e12),
  (("H100", "bfloat16"), 989.4e12),
  (("H200", "bfloat16"), 989.4e12),
)


@dataclasses.dataclass
class _Contender:
  """One framework/variant pair: `run(n)` times n steps, returning seconds per step (None if the
  contender failed), and its figures."""

  framework: str  # jax | torch_eager | torch_compile
  variant: str  # baseline | ral
  run: Callable[[int], list[float]] | None
  figures: dict[str, Any]
  times: list[float] = dataclasses.field(default_factory=list)


def _timer(step: Callable[[], None]) -> Callable[[int], list[float]]:
  """`run(n)` for a synchronised one-step closure."""

  def run(n: int) -> list[float]:
    times = []
    for _ in range(n):
      start = time.perf_counter()
      step()
      times.append(time.perf_counter() - start)
    return times

  return run


def _normalisation(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """MNIST statistics for 1 channel, CIFAR-10 for 3 (any values would time the same)."""
  if channels == 1:
    info = datasets.DATASET_INFO["mnist"]
  elif channels == 3:
    info = datasets.DATASET_INFO["cifar10"]
  else:
    return (0.5,) * channels, (0.25,) * channels
  return info.mean, info.std


def _host_batch(
  batch_size: int, image_shape: tuple[int, ...], num_classes: int, seed: int = 0
) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {
    "image": rng.integers(0, 256, (batch_size, *image_shape), dtype=np.uint8),
    "label": rng.integers(0, num_classes, batch_size).astype(np.int32),
  }


def compiled_flops(compiled: Any) -> float | None:
  """XLA's FLOP count of a compiled program (one device's share when partitioned)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get("flops")
  return float(flops) if flops else None


def peak_flops_per_device(device_kind: str, dtype: str, peak_tflops: float = 0.0) -> float | None:
  """The MFU denominator: `peak_tflops` if given, else the `PEAK_FLOPS` entry, else None."""
  if peak_tflops:
    return peak_tflops * 1e12
  return next((v for (kind, dt), v in PEAK_FLOPS if kind in device_kind and dt == dtype), None)


def _peak_bytes(device: jax.Device) -> int | None:
  """The allocator's high-water mark; None where the backend reports no stats (CPU)."""
  stats = device.memory_stats()
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def forward_flops_per_image(
  backbone: str, image_shape: tuple[int, ...], num_classes: int
) -> float | None:
  """Inference FLOPs of one image, from XLA's cost analysis of the eval-mode forward."""
  model = models.create_backbone(backbone, num_classes)
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  variables = jax.eval_shape(
    lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(x.shape), train=False)
  )
  forward = jax.jit(functools.partial(model.apply, train=False))
  return compiled_flops(forward.lower(variables, x).compile())


def _jax_contenders(
  args: argparse.Namespace,
  mesh: Any,
  host_batch: dict[str, np.ndarray],
  preprocess: Callable[[jax.Array], jax.Array],
  dtype: Any,
) -> tuple[list[_Contender], dict[str, Any]]:
  """Baseline and RAL steps from `trainer.jit_train_step`, as `trainer.fit` runs them; also
  returns the initial host variables (backbone and head) for the torch reference to copy."""
  repl = parallel.replicated(mesh)
  image_shape = tuple(args.image_shape)
  lowering = cpu_lowering.for_platform(parallel.platform(mesh))
  model = models.create_backbone(args.backbone, args.num_classes, dtype, lowering=lowering)
  tx = steps.create_optimizer(
    "sgd",
    optax.constant_schedule(LEARNING_RATE),
    weight_decay=WEIGHT_DECAY,
    momentum=MOMENTUM,
    nesterov=True,
  )
  init_fn = jax.jit(
    functools.partial(steps.create_train_state, model, tx, image_shape), out_shardings=repl
  )
  module = models.DEFAULT_MODULE[args.backbone]
  head_model = models.FMCENet(NUM_PHASES, HEAD_WIDTH, HEAD_DEPTH, dtype, lowering=lowering)
  initial = jax.device_get(init_fn(jax.random.PRNGKey(0)))
  feature = jax.eval_shape(
    lambda: model.apply(
      {"params": initial.params, "batch_stats": initial.batch_stats},
      jnp.zeros((1, *image_shape)),
      train=False,
    )
  )[1][module]
  head_variables = jax.device_get(
    jax.jit(functools.partial(head_model.init, train=False))(
      jax.random.PRNGKey(1), jnp.zeros(feature.shape, jnp.float32)
    )
  )
  host = {
    "backbone": {"params": initial.params, "batch_stats": initial.batch_stats},
    "head": head_variables,
    "feature_shape": tuple(feature.shape[1:]),
    "module": module,
  }
  batch = parallel.global_batch(host_batch, mesh)
  rng = jax.random.PRNGKey(2)
  device = mesh.devices.flat[0]
  options = [("jax", parallel.compiler_options(mesh))]
  if args.xla_defaults:
    options.append(("jax_xla_defaults", None))
  contenders = []
  for (framework, xla), variant in itertools.product(options, VARIANTS):
    head = steps.Head(model=head_model, module=module) if variant == "ral" else None
    loss = steps.Loss(alpha=optax.constant_schedule(ALPHA)) if head is not None else steps.Loss()
    head_vars = parallel.replicate(head_variables, mesh) if head is not None else None
    train_fn = trainer.jit_train_step(
      mesh, preprocess=preprocess, head=head, loss=loss, compiler_options=xla
    )
    holder = {"state": init_fn(jax.random.PRNGKey(0))}
    start = time.perf_counter()
    compiled = train_fn.lower(holder["state"], batch, rng, head_vars).compile()
    compile_s = time.perf_counter() - start

    def step(compiled=compiled, holder=holder, head_vars=head_vars) -> None:
      holder["state"], metrics = compiled(holder["state"], batch, rng, head_vars)
      jax.block_until_ready((holder["state"], metrics))

    start = time.perf_counter()
    step()
    first_s = compile_s + time.perf_counter() - start
    for _ in range(args.warmup):
      step()
    memory = compiled.memory_analysis()
    flops = compiled_flops(compiled)
    contenders.append(
      _Contender(
        framework,
        variant,
        _timer(step),
        {
          "compile_s": compile_s,
          "first_step_s": first_s,
          "peak_bytes": _peak_bytes(device),
          "xla_temp_bytes": int(memory.temp_size_in_bytes) if memory else None,
          "xla_argument_bytes": int(memory.argument_size_in_bytes) if memory else None,
          "train_flops_per_image": (flops * mesh.size / args.batch_size) if flops else None,
        },
      )
    )
  return contenders, host


def _torch_contenders(
  args: argparse.Namespace,
  host: dict[str, Any],
  host_batch: dict[str, np.ndarray],
  mean: tuple[float, ...],
  std: tuple[float, ...],
  modes: Sequence[str],
  gpu: bool = False,
) -> list[_Contender]:
  """The `torch_ref` baseline and RAL steps from the same initial weights as the JAX ones, on
  CUDA if `gpu` (JAX runs on a GPU) and torch has it.

  A mode that fails (e.g. `torch.compile` without a working C++ toolchain) is recorded with its
  error message instead of aborting the run.
  """
  import torch  # optional dependency: the `bench` extra

  from fmcejax import torch_ref

  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  use_cuda = gpu and torch.cuda.is_available()
  # cuDNN autotuning is torch's counterpart of XLA's conv autotuning, which JAX does by default.
  torch.backends.cudnn.benchmark = use_cuda
  device = torch.device("cuda" if use_cuda else "cpu")
  images = torch.from_numpy(host_batch["image"]).to(device)
  labels = torch.from_numpy(host_batch["label"]).long().to(device)
  sync = torch.cuda.synchronize if use_cuda else (lambda: None)
  autocast = torch.bfloat16 if args.dtype == "bfloat16" else None
  contenders = []
  for mode in modes:
    for variant in VARIANTS:
      framework = f"torch_{mode}"
      model = torch_ref.create_backbone(args.backbone, args.num_classes, args.image_shape[-1])
      torch_ref.copy_flax_variables(model, host["backbone"])
      model.to(device)
      head = None
      if variant == "ral":
        head = torch_ref.FMCENet(NUM_PHASES, host["feature_shape"], HEAD_WIDTH, HEAD_DEPTH)
        torch_ref.copy_flax_variables(head, host["head"])
        head = torch_ref.frozen(head.to(device))
      optimizer = torch_ref.create_optimizer(
        model, LEARNING_RATE, weight_decay=WEIGHT_DECAY, momentum=MOMENTUM, nesterov=True
      )
      if use_cuda:
        torch.cuda.reset_peak_memory_stats()
      figures: dict[str, Any] = {
        "channels_last": use_cuda,
        "device": str(device),
        "threads": torch.get_num_threads(),
      }
      try:
        train = torch_ref.TrainStep(
          model,
          optimizer,
          mean=mean,
          std=std,
          head=head,
          module=host["module"],
          alpha=ALPHA,
          autocast_dtype=autocast,
          channels_last=use_cuda,
          compile=mode == "compile",
        )

        def step(train=train) -> None:
          train(images, labels)
          sync()

        start = time.perf_counter()
        step()
        figures["first_step_s"] = time.perf_counter() - start
        for _ in range(args.warmup):
          step()
      except Exception as e:  # noqa: BLE001 - recorded, reported, and the run goes on
        message = f"{type(e).__name__}: {e}".strip().splitlines()
        figures["error"] = " ".join(message[:3])[:500]
        contenders.append(_Contender(framework, variant, None, figures))
        continue
      figures["peak_bytes"] = int(torch.cuda.max_memory_allocated()) if use_cuda else None
      contenders.append(_Contender(framework, variant, _timer(step), figures))
  return contenders


def _torch_worker(conn: Any, *args: Any) -> None:
  """Child process: builds `_torch_contenders(*args)`, then times blocks of steps on request."""
  try:
    contenders = _torch_contenders(*args)
  except Exception as e:  # noqa: BLE001 - sent to the parent, which raises it
    conn.send(("error", f"{type(e).__name__}: {e}"))
    return
  conn.send(("ok", [(c.framework, c.variant, c.run is not None, c.figures) for c in contenders]))
  while (request := conn.recv()) is not None:
    index, n = request
    conn.send(contenders[index].run(n))


@contextlib.contextmanager
def _torch_process(*args: Any) -> Iterator[list[_Contender]]:
  """`_torch_contenders(*args)` in a spawned child process, as proxies whose `run` times there.

  Its own process gives torch its own heap and thread pools, as a PyTorch user has them.
  """
  context = multiprocessing.get_context("spawn")
  conn, child_conn = context.Pipe()
  process = context.Process(target=_torch_worker, args=(child_conn, *args), daemon=True)
  process.start()
  child_conn.close()  # so that recv() raises EOFError if the child dies

  def receive() -> Any:
    try:
      return conn.recv()
    except EOFError:
      raise RuntimeError(
        f"the PyTorch reference process exited with code {process.exitcode} "
        "(spawned: run the bench from a module or a __main__-guarded script)"
      ) from None

  def proxy(index: int) -> Callable[[int], list[float]]:
    def run(n: int) -> list[float]:
      conn.send((index, n))
      return receive()

    return run

  try:
    status, payload = receive()
    if status == "error":
      raise RuntimeError(f"the PyTorch reference failed: {payload}")
    yield [
      _Contender(framework, variant, proxy(i) if ok else None, figures)
      for i, (framework, variant, ok, figures) in enumerate(payload)
    ]
  finally:
    if process.is_alive():
      conn.send(None)
    process.join(timeout=30)
    if process.is_alive():
      process.kill()


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


def _timed_rounds(contenders: list[_Contender], steps_total: int, rounds: int) -> None:
  """Runs `steps_total` timed steps per contender, interleaved in `rounds` blocks."""
  rounds = max(1, min(rounds, steps_total))
  per_round = [steps_total // rounds + (r < steps_total % rounds) for r in range(rounds)]
  for n in per_round:
    for c in contenders:
      if c.run is not None:
        c.times += c.run(n)


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


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Measures everything `args` asks for; returns the JSON-ready result."""
  image_shape = tuple(args.image_shape)
  mesh = parallel.make_mesh()
  if args.batch_size % mesh.size:
    raise ValueError(
      f"--batch_size {args.batch_size} is not a multiple of the {mesh.size} devices."
    )
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  mean, std = _normalisation(image_shape[-1])
  preprocess = functools.partial(steps.normalize, mean=mean, std=std, dtype=dtype)
  host_batch = _host_batch(args.batch_size, image_shape, args.num_classes)
  env = environment()

  contenders, host = _jax_contenders(args, mesh, host_batch, preprocess, dtype)
  modes = TORCH_MODES[args.torch]
  with (
    _torch_process(args, host, host_batch, mean, std, modes, parallel.platform(mesh) == "gpu")
    if modes
    else contextlib.nullcontext([])
  ) as torch_contenders:
    contenders += torch_contenders
    _timed_rounds(contenders, args.steps, args.rounds)
  env["load_average_end"] = os.getloadavg()

  peak = peak_flops_per_device(env["device_kind"], args.dtype, args.peak_tflops)
  jax_flops = {
    c.variant: c.figures.get("train_flops_per_image") for c in contenders if c.framework == "jax"
  }
  results: dict[str, dict[str, Any]] = {}
  for c in contenders:
    figures = dict(c.figures)
    if c.times:
      step_s = statistics.median(c.times)
      figures.update(
        step_s=step_s,
        images_per_second=args.batch_size / step_s,
        timed_steps=len(c.times),
        step_s_min=min(c.times),
        step_s_max=max(c.times),
      )
      flops = jax_flops.get(c.variant)
      devices = mesh.size if c.framework.startswith("jax") else 1  # torch: one device
      figures["mfu"] = (
        flops * figures["images_per_second"] / (peak * devices) if flops and peak else None
      )
    results.setdefault(c.framework, {})[c.variant] = figures

  def get(framework: str, variant: str, key: str) -> Any:
    return results.get(framework, {}).get(variant, {}).get(key)

  ratios: dict[str, Any] = {
    "ral_over_baseline_step_time": {
      fw: _ratio(get(fw, "ral", "step_s"), get(fw, "baseline", "step_s")) for fw in results
    }
  }
  for variant in VARIANTS:
    for fw in results:
      if fw == "jax":
        continue
      ratios[f"jax_over_{fw}_{variant}"] = {
        key: _ratio(get("jax", variant, key), get(fw, variant, key))
        for key in ("images_per_second", "step_s", "first_step_s", "peak_bytes", "mfu")
      }

  by_workers = {
    w: input_pipeline_images_per_second(
      image_shape, args.batch_size, args.pipeline_batches, workers=w
    )
    for w in args.input_workers
  }
  best = max(by_workers, key=by_workers.get)
  pipeline = by_workers[best]
  return {
    "config": {
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
      "alpha": ALPHA,
      "xla_compiler_options": parallel.compiler_options(mesh),
      "head_module": host["module"],
      "head": {"num_phases": NUM_PHASES, "width": HEAD_WIDTH, "depth": HEAD_DEPTH},
      "optimizer": {
        "name": "sgd",
        "learning_rate": LEARNING_RATE,
        "momentum": MOMENTUM,
        "nesterov": True,
        "weight_decay": WEIGHT_DECAY,
      },
    },
    "environment": env,
    "flops": {
      "forward_per_image": forward_flops_per_image(args.backbone, image_shape, args.num_classes),
      "train_per_image": jax_flops,
      "peak_flops_per_device": peak,
      "source": "XLA cost_analysis() of the compiled programs",
    },
    "results": results,
    "ratios": ratios,
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
      for v in VARIANTS
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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m fmcejax.bench", description=__doc__.split("\n")[0]
  )
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
  args = parser.parse_args(argv)
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


if __name__ == "__main__":
  main(sys.argv[1:])
