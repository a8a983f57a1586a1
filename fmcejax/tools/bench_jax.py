"""The JAX side of `fmcejax.bench`: the benchmark's recipe, its contenders (the baseline and RAL
train steps as `trainer.fit` jits them) and the interleaved timing of every contender.

Each step is compiled ahead of time, so compilation is timed on its own, then timed one
device-synchronised step at a time on a fixed device batch. Timed steps of all contenders are
interleaved in rounds, so that load from other processes hits all of them alike; every figure is
the median of the timed steps, warm-up excluded.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fmcejax import cpu_lowering, datasets, models, parallel, steps, trainer

NUM_PHASES = 5  # config_lib default K
HEAD_WIDTH, HEAD_DEPTH = 64, 2  # config_lib default FMCE-Net
ALPHA = 0.1
LEARNING_RATE, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4
VARIANTS = ("baseline", "ral")
PEAK_FLOPS = (
  (("H100 PCIe", "bfloat16"), 756e12),
  (("H100 NVL", "bfloat16"), 835e12),
  (("H100", "bfloat16"), 989.4e12),
  (("H200", "bfloat16"), 989.4e12),
)


@dataclasses.dataclass
class Contender:
  """One framework/variant pair: `run(n)` times n steps, returning seconds per step (None if the
  contender failed), and its figures."""

  framework: str  # jax | torch_eager | torch_compile
  variant: str  # baseline | ral
  run: Callable[[int], list[float]] | None
  figures: dict[str, Any]
  times: list[float] = dataclasses.field(default_factory=list)


def timer(step: Callable[[], None]) -> Callable[[int], list[float]]:
  """`run(n)` for a synchronised one-step closure."""

  def run(n: int) -> list[float]:
    times = []
    for _ in range(n):
      start = time.perf_counter()
      step()
      times.append(time.perf_counter() - start)
    return times

  return run


def normalisation(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """MNIST statistics for 1 channel, CIFAR-10 for 3 (any values would time the same)."""
  if channels == 1:
    info = datasets.DATASET_INFO["mnist"]
  elif channels == 3:
    info = datasets.DATASET_INFO["cifar10"]
  else:
    return (0.5,) * channels, (0.25,) * channels
  return info.mean, info.std


def host_batch(
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


def _host_variables(
  model: Any, head_model: Any, init_fn: Callable[..., Any], backbone: str, image_shape: tuple
) -> dict[str, Any]:
  """The initial backbone and head variables on the host, for the torch reference to copy."""
  module = models.DEFAULT_MODULE[backbone]
  initial = jax.device_get(init_fn(jax.random.PRNGKey(0)))
  variables = {"params": initial.params, "batch_stats": initial.batch_stats}
  feature = jax.eval_shape(
    lambda: model.apply(variables, jnp.zeros((1, *image_shape)), train=False)
  )[1][module]
  head_variables = jax.device_get(
    jax.jit(functools.partial(head_model.init, train=False))(
      jax.random.PRNGKey(1), jnp.zeros(feature.shape, jnp.float32)
    )
  )
  return {
    "backbone": variables,
    "head": head_variables,
    "feature_shape": tuple(feature.shape[1:]),
    "module": module,
  }


def contenders(
  args: argparse.Namespace,
  mesh: Any,
  host_batch: dict[str, np.ndarray],
  preprocess: Callable[[jax.Array], jax.Array],
  dtype: Any,
) -> tuple[list[Contender], dict[str, Any]]:
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
  head_model = models.FMCENet(NUM_PHASES, HEAD_WIDTH, HEAD_DEPTH, dtype, lowering=lowering)
  host = _host_variables(model, head_model, init_fn, args.backbone, image_shape)
  module, head_variables = host["module"], host["head"]
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
      Contender(
        framework,
        variant,
        timer(step),
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


def timed_rounds(contenders: list[Contender], steps_total: int, rounds: int) -> None:
  """Runs `steps_total` timed steps per contender, interleaved in `rounds` blocks."""
  rounds = max(1, min(rounds, steps_total))
  per_round = [steps_total // rounds + (r < steps_total % rounds) for r in range(rounds)]
  for n in per_round:
    for c in contenders:
      if c.run is not None:
        c.times += c.run(n)


def train_flops_per_image(
  backbone: str, image_shape: tuple[int, ...], num_classes: int, batch_size: int, dtype: str
) -> float | None:
  """XLA's FLOP count of the compiled baseline train step (as `trainer.fit` jits it, on one
  device), per image; the optimizer update is spread over the batch."""
  mesh = parallel.make_mesh(jax.devices()[:1])
  model = models.create_backbone(
    backbone, num_classes, jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
  )
  tx = steps.create_optimizer("sgd", optax.constant_schedule(0.1), weight_decay=5e-4)
  state = jax.eval_shape(
    functools.partial(steps.create_train_state, model, tx, image_shape), jax.random.PRNGKey(0)
  )
  batch = {
    "image": jax.ShapeDtypeStruct((batch_size, *image_shape), jnp.uint8),
    "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
  }
  mean, std = normalisation(image_shape[-1])
  train_fn = trainer.jit_train_step(
    mesh,
    preprocess=functools.partial(steps.normalize, mean=mean, std=std, dtype=model.dtype),
    head=None,
    loss=steps.Loss(),
    compiler_options=parallel.compiler_options(mesh),
  )
  flops = compiled_flops(train_fn.lower(state, batch, jax.random.PRNGKey(0), None).compile())
  return flops / batch_size if flops else None
