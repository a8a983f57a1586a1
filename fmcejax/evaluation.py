"""One pass of a jitted function over every example of a dataset, on every device of every host.

Serves the trainer's test evaluation, the FMCE-Net's held-out evaluation and FMCS extraction:
padded global batches (`input_pipeline.padded_batches`, mask 0 on padding rows), each host
feeding its shard, the outputs replicated, then summed on device or concatenated in dataset order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from fmcejax import input_pipeline, parallel

BatchFn = Callable[[Any, dict[str, jax.Array]], Any]


def jit(fn: BatchFn, mesh: Mesh) -> BatchFn:
  """`fn(variables, global_batch)` jitted for `over_dataset`: variables replicated, batch sharded,
  output replicated."""
  repl = parallel.replicated(mesh)
  return jax.jit(
    fn,
    in_shardings=(repl, parallel.batch_sharding(mesh)),
    out_shardings=repl,
    compiler_options=parallel.compiler_options(mesh),
  )


# The running sums: one program per batch, not one per leaf.
_add = jax.jit(lambda total, out: jax.tree.map(jnp.add, total, out))


def over_dataset(
  fn: BatchFn,
  variables: Any,
  ds: grain.MapDataset,
  mesh: Mesh,
  *,
  global_batch: int,
  concat: bool = False,
) -> Any:
  """`fn` (from `jit`) over every example of `ds` once, as numpy.

  Without `concat` the outputs of all batches are summed (use the mask for padding rows); with it
  they are concatenated along the batch axis in the order of `ds`, padding rows dropped.
  """
  count = jax.process_count()
  total, outputs, pace = None, [], parallel.Pacer()
  for local in input_pipeline.padded_batches(
    ds, global_batch=global_batch, process_index=jax.process_index(), process_count=count
  ):
    out = fn(variables, parallel.global_batch(local, mesh))
    if concat:
      outputs.append(
        jax.tree.map(lambda x: _dataset_order(np.asarray(x), count), jax.device_get(out))
      )
    else:
      total = out if total is None else _add(total, out)
      pace(total)
  if not concat:
    return jax.device_get(total)
  return jax.tree.map(lambda *xs: np.concatenate(xs)[: len(ds)], *outputs)


def _dataset_order(x: np.ndarray, process_count: int) -> np.ndarray:
  """A global batch's rows in dataset order: host h holds rows h, h + count, ... of each batch
  (`padded_batches`) and fills its own contiguous block of the global batch (`make_mesh`)."""
  if process_count == 1:
    return x
  return x.reshape(process_count, -1, *x.shape[1:]).swapaxes(0, 1).reshape(x.shape)
