"""The PyTorch side of `fmcejax.bench`: the `torch_ref` baseline and RAL steps, timed in a child
process of their own (its own heap and thread pools, as a PyTorch user has them)."""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from fmcejax.tools import bench_jax


def _models(args: argparse.Namespace, host: dict[str, Any], device: Any, ral: bool) -> tuple:
  """The torch backbone and (for RAL) frozen head, holding the JAX contenders' initial weights."""
  from fmcejax.tools import torch_ref

  model = torch_ref.create_backbone(args.backbone, args.num_classes, args.image_shape[-1])
  torch_ref.copy_flax_variables(model, host["backbone"])
  model.to(device)
  if not ral:
    return model, None
  head = torch_ref.FMCENet(
    bench_jax.NUM_PHASES, host["feature_shape"], bench_jax.HEAD_WIDTH, bench_jax.HEAD_DEPTH
  )
  torch_ref.copy_flax_variables(head, host["head"])
  return model, torch_ref.frozen(head.to(device))


def contenders(
  args: argparse.Namespace,
  host: dict[str, Any],
  host_batch: dict[str, np.ndarray],
  mean: tuple[float, ...],
  std: tuple[float, ...],
  modes: Sequence[str],
  gpu: bool = False,
) -> list[bench_jax.Contender]:
  """The `torch_ref` baseline and RAL steps from the same initial weights as the JAX ones, on
  CUDA if `gpu` (JAX runs on a GPU) and torch has it.

  A mode that fails (e.g. `torch.compile` without a working C++ toolchain) is recorded with its
  error message instead of aborting the run.
  """
  import torch  # optional dependency: the `bench` extra

  from fmcejax.tools import torch_ref

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
    for variant in bench_jax.VARIANTS:
      framework = f"torch_{mode}"
      model, head = _models(args, host, device, ral=variant == "ral")
      optimizer = torch_ref.create_optimizer(
        model,
        bench_jax.LEARNING_RATE,
        weight_decay=bench_jax.WEIGHT_DECAY,
        momentum=bench_jax.MOMENTUM,
        nesterov=True,
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
          alpha=bench_jax.ALPHA,
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
        contenders.append(bench_jax.Contender(framework, variant, None, figures))
        continue
      figures["peak_bytes"] = int(torch.cuda.max_memory_allocated()) if use_cuda else None
      contenders.append(bench_jax.Contender(framework, variant, bench_jax.timer(step), figures))
  return contenders


def _worker(conn: Any, *args: Any) -> None:
  """Child process: builds `contenders(*args)`, then times blocks of steps on request."""
  try:
    built = contenders(*args)
  except Exception as e:  # noqa: BLE001 - sent to the parent, which raises it
    conn.send(("error", f"{type(e).__name__}: {e}"))
    return
  conn.send(("ok", [(c.framework, c.variant, c.run is not None, c.figures) for c in built]))
  while (request := conn.recv()) is not None:
    index, n = request
    conn.send(built[index].run(n))


@contextlib.contextmanager
def process(*args: Any) -> Iterator[list[bench_jax.Contender]]:
  """`contenders(*args)` in a spawned child process, as proxies whose `run` times there.

  Its own process gives torch its own heap and thread pools, as a PyTorch user has them.
  """
  context = multiprocessing.get_context("spawn")
  conn, child_conn = context.Pipe()
  process = context.Process(target=_worker, args=(child_conn, *args), daemon=True)
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
      bench_jax.Contender(framework, variant, proxy(i) if ok else None, figures)
      for i, (framework, variant, ok, figures) in enumerate(payload)
    ]
  finally:
    if process.is_alive():
      conn.send(None)
    process.join(timeout=30)
    if process.is_alive():
      process.kill()
