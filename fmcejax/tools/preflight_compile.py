"""Preflight's compiling half, run in a child process (`python -m fmcejax.tools.preflight_compile`).

It builds every program of the config's stages through the code `train` runs (the pipeline's
recipe, `trainer.jit_train_step`, `trainer.jit_eval_step`, `fmcs_data.jit_extract`) over a mesh
of the target's devices, lowers each on abstract inputs (`jax.ShapeDtypeStruct`s sharded over
that mesh) and compiles it with the target's own compiler. Its own process, because the TPU and
GPU compilers need `JAX_PLATFORMS=cpu` and print their start-up noise there, not in `train`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.extend
import jax.numpy as jnp
import ml_collections
from jax._src.lib import _jax  # the HLO cost analysis, as Lowered.cost_analysis calls it
from jax.experimental import topologies

from fmcejax import (
  config_lib,
  cpu_lowering,
  datasets,
  device_input,
  fmce_net,
  fmcs_data,
  input_pipeline,
  parallel,
  pipeline,
  steps,
  trainer,
)
from fmcejax.tools import hlo_traffic, preflight_targets

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")


def target_devices(target: preflight_targets.Target) -> list[jax.Device]:
  """The target's devices, ordered by (process, id) as `parallel.make_mesh` orders live ones."""
  if target.kind == "tpu":
    devices = topologies.get_topology_desc(topology_name=target.spec, platform="tpu").devices
  elif target.kind == "cuda":
    devices = topologies.get_topology_desc(
      platform="cuda",
      target_config=preflight_targets.gpu_target_config(target.chip),
      topology=f"1x{target.hosts}x{target.per_host}",
    ).devices
  else:
    devices = jax.devices()
  return sorted(devices, key=lambda d: (d.process_index, d.id))


def _abstract(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _batch(mesh, n: int, shape: tuple[int, ...], dtype: Any, mask: bool = False) -> dict:
  sharding = parallel.batch_sharding(mesh)
  batch = {
    "image": jax.ShapeDtypeStruct((n, *shape), dtype, sharding=sharding),
    "label": jax.ShapeDtypeStruct((n,), jnp.int32, sharding=sharding),
  }
  if mask:
    batch["mask"] = jax.ShapeDtypeStruct((n,), jnp.float32, sharding=sharding)
  return batch


def programs(config: ml_collections.ConfigDict, mesh) -> list[tuple[str, int, int, Callable]]:
  """(name, global images per step, steps per call, lower) of every program the config's stages
  run; `lower()` returns the `jax.stages.Lowered` program, nothing compiled yet. The train steps
  are `lax.scan`s of several when `trainer.fit` would dispatch them so."""
  info = datasets.DATASET_INFO[config.dataset]
  pipe = pipeline.Pipeline(config, ".", mesh=mesh, info=info)
  stages = config_lib.parse_stages(config.stages)
  repl = parallel.replicated(mesh)
  recipe = pipe.recipe(config, 1, config.epochs)
  model, tx = recipe["model"], recipe["tx"]
  state = _abstract(
    jax.eval_shape(
      functools.partial(steps.create_train_state, model, tx, info.image_shape),
      jax.random.PRNGKey(0),
    ),
    repl,
  )
  features = jax.eval_shape(
    lambda s: model.apply(
      {"params": s.params, "batch_stats": s.batch_stats},
      jnp.zeros((1, *info.image_shape)),
      train=False,
    )[1][pipe.module],
    state,
  ).shape[1:]
  head = steps.Head(fmce_net.head_model(config, config.num_phases, pipe.dtype, mesh), pipe.module)
  head_vars = _abstract(
    jax.eval_shape(
      lambda: head.model.init(jax.random.PRNGKey(0), jnp.zeros((1, *features)), train=False)
    ),
    repl,
  )
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=repl)
  copts = parallel.compiler_options(mesh)
  train_batch = _batch(mesh, config.batch_size, info.image_shape, jnp.uint8)
  eval_batch = _batch(mesh, config.eval_batch_size, info.image_shape, jnp.uint8, mask=True)

  scan, loss = _scan_length(config, info), recipe["loss"]

  def train_step(with_head: bool):
    kwargs = {"preprocess": pipe.preprocess(), "head": head if with_head else None, "loss": loss}
    head_args = head_vars if with_head else None
    if scan > 1:
      return _scanned_steps(config, info, mesh, scan, state, head_args, **kwargs)
    fn = trainer.jit_train_step(mesh, compiler_options=copts, **kwargs)
    return lambda: fn.lower(state, train_batch, rng, head_args)

  out = []
  if {"probe", "baseline"} & set(stages):
    out.append(("train_step", config.batch_size, scan, train_step(False)))
  if "fmcenetpp" in stages:
    out.append(("train_step_ral", config.batch_size, scan, train_step(True)))
  if {"probe", "baseline", "fmcenetpp"} & set(stages):
    evaluate = trainer.jit_eval_step(mesh, preprocess=pipe.preprocess(), head=head)
    out.append(
      (
        "eval_step",
        config.eval_batch_size,
        1,
        lambda: evaluate.lower((state, head_vars), eval_batch),
      )
    )
  if "fmcs_data" in stages:
    extract = fmcs_data.jit_extract(
      model.apply, module=pipe.module, preprocess=pipe.preprocess(), mesh=mesh
    )
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    out.append(
      ("fmcs_extraction", config.eval_batch_size, 1, lambda: extract.lower(variables, eval_batch))
    )
  if "fmce_net" in stages:
    out.append(
      (
        "fmce_net_train_step",
        config.fmce_net.batch_size,
        1,
        _fmce_net_step(config, mesh, features, rng),
      )
    )
  return out


def _scan_length(config: ml_collections.ConfigDict, info: datasets.DatasetInfo) -> int:
  """Steps per dispatch as `trainer.fit` runs them: the config's, when the split is held on the
  devices (else one), at most an epoch."""
  limit = config.train_examples_limit
  if config.steps_per_dispatch < 2 or not device_input.use_device_input(
    config.input_on_device, info, limit
  ):
    return 1
  return min(
    config.steps_per_dispatch, input_pipeline.steps_per_epoch(info, config.batch_size, limit)
  )


def _scanned_steps(config, info, mesh, n: int, state, head_variables, **step_kwargs) -> Callable:
  """`DeviceBatches.scan_steps`' program of n steps over the training split held on the
  target's devices (abstract: shapes only)."""
  repl = parallel.replicated(mesh)
  examples = input_pipeline.num_examples(info, "train", config.train_examples_limit)
  spe = input_pipeline.steps_per_epoch(info, config.batch_size, config.train_examples_limit)
  data = device_input.DeviceBatches(
    images=jax.ShapeDtypeStruct((examples, math.prod(info.image_shape)), jnp.uint8, sharding=repl),
    labels=jax.ShapeDtypeStruct((examples,), jnp.int32, sharding=repl),
    global_batch=config.batch_size,
    steps_per_epoch=spe,
    epochs=config.epochs,
    seed=0,
    augment={"auto": info.augment, "on": True, "off": False}[config.augment],
    mesh=mesh,
    image_shape=tuple(info.image_shape),
  )
  step_fn = functools.partial(steps.train_step, **step_kwargs)
  program = data.scan_steps(step_fn, jax.random.PRNGKey(0), parallel.compiler_options(mesh))
  program = program.program(n)
  order = jax.ShapeDtypeStruct((spe * config.batch_size,), jnp.int32, sharding=repl)
  scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=repl)
  return lambda: program.lower(
    state, data.images, data.labels, order, scalar, scalar, head_variables
  )


def _fmce_net_step(config, mesh, features: tuple[int, ...], rng) -> Callable:
  """The FMCE-Net's train step on the stored feature maps (`fmce_net.train`'s recipe)."""
  recipe = fmce_net.recipe(config, config.num_phases, mesh, 1)
  repl = parallel.replicated(mesh)
  state = _abstract(
    jax.eval_shape(
      functools.partial(steps.create_train_state, recipe["model"], recipe["tx"], features),
      jax.random.PRNGKey(0),
    ),
    repl,
  )
  dtype = jnp.bfloat16 if config.fmcs.storage_dtype == "bfloat16" else jnp.float32
  batch = _batch(mesh, config.fmce_net.batch_size, features, dtype)
  fn = trainer.jit_train_step(
    mesh,
    preprocess=recipe["preprocess"],
    head=None,
    loss=steps.Loss(),
    compiler_options=parallel.compiler_options(mesh),
  )
  return lambda: fn.lower(state, batch, rng, None)


def collectives(hlo: str) -> dict[str, int]:
  """Count and result bytes of the cross-device collectives in an optimized HLO module."""
  count = size = 0
  for line in hlo.splitlines():
    m = re.search(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
    if not m:
      continue
    count += 1
    size += int(hlo_traffic.logical_bytes(m.group(1)))
  return {"count": count, "bytes": size}


def unpartitioned_flops(lowered: Any) -> float | None:
  """FLOPs of the whole (global, unpartitioned) program by XLA's HLO cost analysis, run by the
  CPU client: `Lowered.cost_analysis` asks the target's client, which a deviceless GPU has not."""
  module = lowered.compiler_ir("hlo").as_hlo_module()
  return _jax.hlo_module_cost_analysis(jax.extend.backend.get_backend("cpu"), module).get("flops")


def analyse(lowered: Any, devices: int, heaviest: int = 10, steps: int = 1) -> dict[str, Any]:
  """Compiles `lowered`; its memory, FLOPs and HBM bytes per chip (`hlo_traffic`'s count over
  the kernels; the compiler's own `bytes accessed` beside it where it gives one: on TPU it also
  counts on-chip VMEM traffic), the `heaviest` kernels by bytes, collectives, and whether any op
  still carries the CPU lowering's scope. For a `lax.scan` of `steps` train steps the figures
  are per step: the compilers count a loop's body once, and the bytes outside it count 1/steps."""
  compiled = lowered.compile()
  mem = compiled.memory_analysis()
  memory = {
    "arguments": int(mem.argument_size_in_bytes),
    "outputs": int(mem.output_size_in_bytes),
    "aliased": int(mem.alias_size_in_bytes),
    "temporaries": int(mem.temp_size_in_bytes),
  }
  memory["total"] = memory["arguments"] + memory["outputs"] - memory["aliased"]
  memory["total"] += memory["temporaries"]
  cost = compiled.cost_analysis() or {}
  flops = cost.get("flops")
  if not flops:  # the GPU compiler says nothing: count on the unpartitioned program
    flops = unpartitioned_flops(lowered)
    flops = flops / devices if flops else None
  hlo = compiled.as_text()
  kernels = hlo_traffic.kernels(hlo)
  return {
    "compiled": True,
    "memory_bytes": memory,
    "flops_per_step": float(flops) if flops else None,
    "bytes_per_step": hlo_traffic.per_iteration(kernels, steps),
    "compiler_bytes_accessed": float(cost["bytes accessed"])
    if cost.get("bytes accessed")
    else None,
    "kernels": len(kernels),
    "heaviest_kernels": [dataclasses.asdict(k) for k in hlo_traffic.heaviest(kernels, heaviest)],
    "collectives": collectives(hlo),
    "cpu_lowering_in_program": cpu_lowering.SCOPE in hlo,
  }


def out_of_memory(error: str) -> dict[str, Any]:
  """The memory a program needs, from the TPU compiler's refusal to compile what does not fit
  ("... HLO temporaries (395.50G) exceeds available HBM (15.75G)"); {} for other errors."""
  m = re.search(r"temporaries \(([\d.]+)([GMK])\) exceeds available HBM", error)
  if not m:
    return {}
  needed = int(float(m.group(1)) * {"G": 2**30, "M": 2**20, "K": 2**10}[m.group(2)])
  return {
    "memory_bytes": {"arguments": None, "outputs": None, "temporaries": needed, "total": needed}
  }


BATCH_FIELDS = {
  "train_step": "batch_size",
  "train_step_ral": "batch_size",
  "eval_step": "eval_batch_size",
  "fmcs_extraction": "eval_batch_size",
  "fmce_net_train_step": "fmce_net.batch_size",
}


def fitting_batch(memory: dict[str, int], hbm_bytes: int, per_chip: int) -> int:
  """The per-chip batch whose temporaries (which grow with the batch) would fit in the memory
  the arguments and outputs leave: an estimate, linear in the batch."""
  free = hbm_bytes - (memory["total"] - memory["temporaries"])  # all temporaries when unknown
  return max(0, int(per_chip * free / max(memory["temporaries"], 1)))


def check_memory(config: ml_collections.ConfigDict, mesh, hbm_bytes: int | None = None) -> None:
  """`train`'s fit check on accelerators: compiles every program of the config's stages and
  raises ConfigError naming the batch field of the first that does not fit in `hbm_bytes`
  (default: the devices' own limit), and the per-chip batch that would."""
  if hbm_bytes is None:
    hbm_bytes = (mesh.devices.flat[0].memory_stats() or {}).get("bytes_limit")
    if not hbm_bytes:
      return
  for name, images, _, lower in programs(config, mesh):
    try:
      memory = analyse(lower(), mesh.size)["memory_bytes"]
    except jax.errors.JaxRuntimeError as e:  # TPUs refuse to compile what does not fit
      memory = out_of_memory(str(e)).get("memory_bytes")
      if memory is None:
        raise
    if memory["total"] > hbm_bytes:
      per_chip = images // mesh.size
      fit = fitting_batch(memory, hbm_bytes, per_chip)
      field = BATCH_FIELDS[name]
      raise config_lib.ConfigError(
        field,
        images,
        f"a global batch of at most about {fit * mesh.size} ({fit} per device)",
        f"Program {name} needs {memory['total'] / 2**30:.2f} GiB per device, "
        f"{hbm_bytes / 2**30:.2f} GiB are available.",
      )


def run(request: dict[str, Any], log: Callable[[dict[str, Any]], None]) -> None:
  """Validates the config against the target's devices and processes, then compiles every
  program not in `request["skip"]`. Each record goes to `log` as it is known: first the
  target's `devices`, `processes`, `device_kind` (and `config_error` instead of compiling, for a
  config that does not fit the target), then `{"compiling": name}` before each program and its
  row after it, so that a compiler that kills the process is caught naming the program."""
  target = preflight_targets.parse(request["target"])
  config = ml_collections.ConfigDict(request["config"])
  devices = target_devices(target)
  processes = len({d.process_index for d in devices})
  header = {"devices": len(devices), "processes": processes, "device_kind": devices[0].device_kind}
  try:
    config_lib.validate(
      config, device_count=len(devices), process_count=processes, check_data=False
    )
  except config_lib.ConfigError as e:
    log(header | {"config_error": str(e)})
    return
  log(header)
  mesh = parallel.make_mesh(devices)
  for name, images, n, lower in programs(config, mesh):
    if name in request.get("skip", ()):
      continue
    log({"compiling": name})
    row = {"name": name, "images_per_step": images, "steps_per_call": n}
    try:
      row |= analyse(lower(), len(devices), request.get("heaviest", 10), n)
    except Exception as e:  # noqa: BLE001 - the compiler's error is the result
      row |= {"compiled": f"{type(e).__name__}: {e}"[:2000]} | out_of_memory(str(e))
    log({"program": row})


def main(argv: list[str]) -> int:
  """argv: [request.json, records.jsonl]: appends one JSON record per line, flushed."""
  with open(argv[1]) as f:
    request = json.load(f)
  with open(argv[2], "a") as out:

    def log(record: dict[str, Any]) -> None:
      out.write(json.dumps(record) + "\n")
      out.flush()

    run(request, log)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
