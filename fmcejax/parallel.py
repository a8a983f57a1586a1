"""Data parallelism over every device of every host: one 1-D mesh, batch sharded, state replicated.

jax.jit over `NamedSharding`s gives the program pmap used to, on today's API: XLA inserts the
gradient all-reduce, and BatchNorm means over the sharded batch axis are global (sync BN), so N
devices compute what one device would on the same global batch.
"""

from __future__ import annotations

import collections
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
T = TypeVar("T")
# jaxlib 0.10's XLA:CPU hands convolutions, dots and reductions to YNNPACK fusions, which run
# each op on one core; without them XLA's Eigen and loop kernels use every core
# (docs/BENCHMARKS.md).
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def initialize_distributed() -> None:
  """Joins a multi-host job when there is one; a no-op on a single machine.

  - FMCEJAX_COORDINATOR=<host:port>, FMCEJAX_NUM_PROCESSES, FMCEJAX_PROCESS_ID: an explicit
    job (several GPU or CPU machines; CPU collectives then go over gloo).
  - FMCEJAX_DISTRIBUTED=auto (Cloud TPU pod slices, as launch/tpu_pod.sh sets it; SLURM; Open
    MPI), or a GKE TPU pod (TPU_WORKER_HOSTNAMES lists several hosts):
    `jax.distributed.initialize()` with no arguments, JAX detecting the hosts itself (on a
    Cloud TPU VM from the metadata server).
  Nothing else triggers it, so a single TPU VM or Colab TPU stays a plain single process.
  See launch/README.md and docs/MULTIHOST.md.
  """
  coordinator = os.environ.get("FMCEJAX_COORDINATOR")
  if coordinator:
    # Only affects the CPU backend; without it CPU computations cannot span processes.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
      coordinator_address=coordinator,
      num_processes=int(os.environ["FMCEJAX_NUM_PROCESSES"]),
      process_id=int(os.environ["FMCEJAX_PROCESS_ID"]),
    )
  elif os.environ.get("FMCEJAX_DISTRIBUTED") == "auto" or "," in os.environ.get(
    "TPU_WORKER_HOSTNAMES", ""
  ):
    jax.distributed.initialize()


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D data mesh over `devices` (default: every device of every host, in that order).

  The default orders devices by (process, id), so each process owns one contiguous block of
  the batch axis: process p's local batch is global rows [p * local, (p + 1) * local), which
  `fmcs_data.extract` relies on. (A no-op where ids already group by process, as on CPU and
  GPU; a safeguard for TPU slices.)
  """
  if devices is None:
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def platform(mesh: Mesh) -> str:
  """The platform of `mesh`'s devices ("cpu", "gpu", "tpu"): what a program over it is compiled
  for, whatever `jax.default_backend()` says."""
  return mesh.devices.flat[0].platform


def compiler_options(mesh: Mesh) -> dict[str, str] | None:
  """`compiler_options` for every `jax.jit` over `mesh`: `CPU_COMPILER_OPTIONS` on CPU when this
  XLA knows them, else None (XLA's defaults)."""
  return _compiler_options(platform(mesh))


@functools.cache
def _compiler_options(platform: str) -> dict[str, str] | None:
  if platform != "cpu":
    return None
  try:  # a later XLA may drop an experimental option; its defaults are then the best we know
    jax.jit(lambda x: x + 1, compiler_options=CPU_COMPILER_OPTIONS).lower(1.0).compile()
  except jax.errors.JaxRuntimeError:
    return None
  return CPU_COMPILER_OPTIONS


# Dispatches a loop may have queued beyond those the devices finished (`Pacer`).
MAX_IN_FLIGHT = 8


class Pacer:
  """Keeps a loop at most `depth` dispatches ahead of the devices: `pacer(out)` records a
  dispatch by its output and waits for the one `depth` dispatches back.

  JAX dispatch is asynchronous, so a loop that never syncs runs ahead without bound. XLA's CPU
  client then deadlocks with several devices (e.g. 8 forced host devices on few cores): a
  device's launch waits while that device has 32 programs queued, and it waits on a thread of
  the pool sized to run one collective on every device, so the device left without a thread
  never joins the all-reduce the others wait in. Eight dispatches of one or two programs stay
  clear of that, and on GPU and TPU they hide the host's dispatch time just as well.
  """

  def __init__(self, depth: int = MAX_IN_FLIGHT):
    self.depth = depth
    self._queued: collections.deque[Any] = collections.deque()

  def __call__(self, out: Any) -> None:
    self._queued.append(out)
    if len(self._queued) > self.depth:
      jax.block_until_ready(self._queued.popleft())


def sync(name: str) -> None:
  """A barrier across every process (a no-op with one): call it after process 0 writes a file
  the others will read or test for, so they all see it and take the same branch.

  Every process must call it with the same `name`, in the same order.
  """
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def primary_writes(name: str, write: Callable[[], Any]) -> None:
  """Process 0 runs `write` (a file every process reads next), then all meet at barrier `name`.

  The one way results reach a shared workdir: a single writer, and no reader before it is done.
  """
  if jax.process_index() == 0:
    write()
  sync(name)


def primary_first(name: str, fn: Callable[[], T]) -> T:
  """`fn()` on process 0, a barrier, then on the others: on a shared disk they find its result
  made (a prepared dataset), on disks of their own each makes its own copy. If it fails on
  process 0, the others still pass the barrier and meet the failure themselves, rather than wait
  for a process that has gone."""
  if jax.process_index() == 0:
    try:
      result = fn()
    finally:
      sync(name)
    return result
  sync(name)
  return fn()


def agree(flag: bool) -> bool:
  """Process 0's `flag` on every process (a no-op with one process).

  For decisions read from the shared filesystem (is a stage finished?), which must be taken
  identically by every process even when a file system's caches let them see different things.
  """
  if jax.process_count() == 1:
    return bool(flag)
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag, np.int32)))


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is true on any (a no-op with one process).

  For events each host sees at its own moment, such as SIGTERM before a preemption: hosts must
  act on them at the same step, or one waits forever in a checkpoint the others never start.
  """
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each host's shard into one global array sharded along the batch axis."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a host pytree (identical on every host) on every device."""
  sharding = replicated(mesh)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree
  )
