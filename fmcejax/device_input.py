"""Training batches made on the devices, for splits that fit there (MNIST-type, CIFAR).

The split (uint8 images, int32 labels) is placed on every device once (`parallel.replicate`), each
image as one flat row: [N, H * W * C] has no small minor dimension for a TPU to pad to 128 lanes,
so no program relays the whole split out per dispatch (docs/BENCHMARKS.md); a batch's rows are
reshaped to [B, H, W, C] after the gather.
Each step's global batch is then one jitted gather, plus random crop (pad 4) and horizontal flip
when augmenting, sharded over the mesh's batch axis: no per-step host work beyond dispatching it,
and no host-to-device copy of pixels, unlike the grain host pipeline (`input_pipeline`), which
spends host CPU time on every example (docs/BENCHMARKS.md, "Loop ceiling").

Batch k is a pure function of (seed, k), as in `input_pipeline.epoch_batches`: epoch e uses the
first `steps_per_epoch * global_batch` entries of `jax.random.permutation(fold_in(perm_key, e),
n)`, and the example at position j of the global stream (j = k * global_batch + row) is
augmented with `fold_in(augment_key, j)`; both keys derive from `PRNGKey(seed)`. So resuming at
step k is exact, and any mesh yields the same global batch. Each device gathers and augments only
its own rows (`shard_map` over the batch axis), so every host computes only its shard. The
streams differ from grain's: switching paths mid-run is refused by the run's identity.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from fmcejax import datasets, input_pipeline, parallel

# Splits under this many bytes of uint8 images are held on the devices ("auto").
MAX_DEVICE_BYTES = 200 * 10**6
SETTINGS = ("auto", "on", "off")
_CROP_PAD = 4
Batch = dict[str, jax.Array]


def fits_on_device(info: datasets.DatasetInfo, limit: int = 0, split: str = "train") -> bool:
  """Whether the used examples of `split` take under `MAX_DEVICE_BYTES` as uint8."""
  n = input_pipeline.num_examples(info, split, limit)
  return n * math.prod(info.image_shape) < MAX_DEVICE_BYTES


def use_device_input(setting: str, info: datasets.DatasetInfo, limit: int) -> bool:
  """Resolves the `input_on_device` setting: "auto" holds every split that fits, on any
  platform (on CPU too the loop ran faster, docs/BENCHMARKS.md "Loop ceiling"); "on" refuses a
  split that does not fit."""
  if setting not in SETTINGS:
    raise ValueError(f"input_on_device must be one of {', '.join(SETTINGS)}, got {setting!r}.")
  fits = fits_on_device(info, limit)
  if setting == "on" and not fits:
    raise ValueError(
      f"{info.name}: the training split takes {MAX_DEVICE_BYTES // 10**6} MB or "
      "more as uint8; use input_on_device=auto or off for it."
    )
  return setting == "on" or (setting == "auto" and fits)


def _crop_flip(key: jax.Array, image: jax.Array) -> jax.Array:
  """`input_pipeline.random_crop_flip` of one [H, W, C] image: shift (dy, dx) in [-4, 4] into
  zeros, i.e. out[y, x] = image[y + dy, x + dx], then a horizontal flip with probability 1/2."""
  dy, dx, flip = jax.random.randint(
    key, (3,), jnp.array([-_CROP_PAD, -_CROP_PAD, 0]), jnp.array([_CROP_PAD + 1, _CROP_PAD + 1, 2])
  )
  h, w, c = image.shape
  padded = jnp.pad(image, ((_CROP_PAD, _CROP_PAD), (_CROP_PAD, _CROP_PAD), (0, 0)))
  out = jax.lax.dynamic_slice(padded, (_CROP_PAD + dy, _CROP_PAD + dx, 0), (h, w, c))
  return jnp.where(flip == 1, out[:, ::-1], out)


def _stream_keys(seed: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(permutation key, augmentation key): two independent streams of one seed."""
  root = jax.random.PRNGKey(seed)
  return jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)


@functools.cache
def _permutation_fn(mesh: Mesh, n: int, used: int):
  """epoch -> the first `used` entries of that epoch's permutation of range(n), replicated."""

  def permutation(seed, epoch):
    return jax.random.permutation(jax.random.fold_in(_stream_keys(seed)[0], epoch), n)[:used]

  return jax.jit(permutation, out_shardings=parallel.replicated(mesh))


def _select_fn(
  mesh: Mesh, global_batch: int, augment: bool, image_shape: tuple[int, ...]
) -> Callable[..., Batch]:
  """(images, labels, order, seed, step) -> the step's global batch, sharded over the mesh;
  traceable, for a jitted step to fuse.

  `images` are flat rows of `image_shape` images; `order` is the epoch's permutation; each
  device takes its `global_batch / devices` rows.
  """
  local = global_batch // mesh.size

  def shard(images, labels, order, seed, step):
    row0 = jax.lax.axis_index(parallel.DATA_AXIS) * local
    used = order.shape[0]
    first = (step * global_batch) % used + row0
    rows = jax.lax.dynamic_slice(order, (first,), (local,))
    image, label = images[rows].reshape(local, *image_shape), labels[rows]
    if augment:
      positions = (step * global_batch + row0 + jnp.arange(local)).astype(jnp.uint32)
      keys = jax.vmap(jax.random.fold_in, (None, 0))(_stream_keys(seed)[1], positions)
      image = jax.vmap(_crop_flip)(keys, image)
    return {"image": image, "label": label}

  return jax.shard_map(
    shard, mesh=mesh, in_specs=(P(), P(), P(), P(), P()), out_specs=P(parallel.DATA_AXIS)
  )


@functools.cache
def _batch_fn(mesh: Mesh, global_batch: int, augment: bool, image_shape: tuple[int, ...]):
  return jax.jit(
    _select_fn(mesh, global_batch, augment, image_shape),
    out_shardings=parallel.batch_sharding(mesh),
  )


@dataclasses.dataclass(frozen=True, eq=False)
class DeviceBatches:
  """`epochs * steps_per_epoch` global batches of a device-resident split.

  `iterator(start)` is the trainer's interface (like `input_pipeline.make_iterator`): batches
  {"image": uint8 [B, H, W, C], "label": int32 [B]}, sharded over `mesh`, from batch `start`.
  """

  images: jax.Array  # [N, prod(image_shape)] uint8: one flat row per image
  labels: jax.Array
  global_batch: int
  steps_per_epoch: int
  epochs: int
  seed: int
  augment: bool
  mesh: Mesh
  image_shape: tuple[int, ...]  # [H, W, C]

  def __len__(self) -> int:
    return self.epochs * self.steps_per_epoch

  def permutation(self, epoch: int) -> jax.Array:
    """The examples epoch `epoch` (0-based) uses, in order: a replicated int32 vector."""
    fn = _permutation_fn(self.mesh, self.labels.shape[0], self.steps_per_epoch * self.global_batch)
    return fn(np.int32(self.seed), np.int32(epoch))

  def iterator(self, start: int = 0) -> Iterator[Batch]:
    """Batches `start`, `start + 1`, ... (dispatched asynchronously, so the gather of the next
    batch overlaps the current step); one permutation per epoch."""
    if not 0 <= start <= len(self):
      raise ValueError(f"start must lie in [0, {len(self)}], got {start}.")
    fn = _batch_fn(self.mesh, self.global_batch, self.augment, self.image_shape)
    seed = np.int32(self.seed)
    order, current = None, -1
    for step in range(start, len(self)):
      epoch = step // self.steps_per_epoch
      if epoch != current:
        order, current = self.permutation(epoch), epoch
      yield fn(self.images, self.labels, order, seed, np.int32(step))

  def scan_steps(
    self,
    train_step: Callable[..., tuple[Any, Any]],
    rng: jax.Array,
    compiler_options: dict[str, str] | None = None,
  ) -> StepScan:
    """Several train steps of this stream per dispatch (`trainer.fit` with `steps_per_dispatch`
    > 1), so that the host's cost per step no longer bounds the step rate."""
    return StepScan(self, train_step, rng, compiler_options)


@dataclasses.dataclass(eq=False)
class StepScan:
  """`scan(state, step, n, head_variables)`: train steps `step .. step + n - 1` of `data`, each
  `train_step(state, batch, rng, head_variables)` on batch s of the stream (`steps.train_step`
  with its keywords bound), fused with the gather in one `lax.scan`. Returns the state and the
  metrics stacked over the n steps. The steps must lie in one epoch; the state is replicated and
  donated. One program per length n, compiled ahead of time by `compile` or at first use."""

  data: DeviceBatches
  train_step: Callable[..., tuple[Any, Any]]
  rng: jax.Array
  compiler_options: dict[str, str] | None = None
  _programs: dict[int, Any] = dataclasses.field(default_factory=dict)
  _order: tuple[int, jax.Array] = (-1, None)

  def _args(self, state: Any, step: int, head_variables: Any) -> tuple[Any, ...]:
    epoch = step // self.data.steps_per_epoch
    if self._order[0] != epoch:
      self._order = (epoch, self.data.permutation(epoch))
    d = self.data
    return (
      state,
      d.images,
      d.labels,
      self._order[1],
      np.int32(d.seed),
      np.int32(step),
      head_variables,
    )

  def compile(self, n: int, state: Any, head_variables: Any = None) -> None:
    """Compiles the program of n steps (from `state`'s shapes; nothing runs)."""
    if not 1 <= n <= self.data.steps_per_epoch:
      raise ValueError(
        f"n must lie in [1, {self.data.steps_per_epoch}] (steps per epoch), got {n}."
      )
    if n not in self._programs:
      self._programs[n] = self.program(n).lower(*self._args(state, 0, head_variables)).compile()

  def program(self, n: int) -> Any:
    """The jitted program of n steps, nothing lowered: `compile` lowers it on the live split,
    preflight on abstract arrays of the target's devices. Its arguments: (state, images, labels,
    order, seed, step, head_variables)."""
    d = self.data
    select = _select_fn(d.mesh, d.global_batch, d.augment, d.image_shape)

    def steps_from(state, images, labels, order, seed, step, head_variables):
      def body(state, i):
        batch = select(images, labels, order, seed, step + i)
        return self.train_step(state, batch, self.rng, head_variables)

      return jax.lax.scan(body, state, jnp.arange(n))

    repl = parallel.replicated(self.data.mesh)
    return jax.jit(
      steps_from,
      out_shardings=(repl, repl),
      donate_argnums=0,
      compiler_options=self.compiler_options,
    )

  def __call__(self, state: Any, step: int, n: int, head_variables: Any = None) -> tuple[Any, Any]:
    index = step % self.data.steps_per_epoch
    if index + n > self.data.steps_per_epoch:
      raise ValueError(f"steps {step}..{step + n - 1} cross an epoch end.")
    self.compile(n, state, head_variables)
    return self._programs[n](*self._args(state, step, head_variables))


def train_batches(
  data: datasets.DatasetInfo | Mapping[str, np.ndarray],
  *,
  global_batch: int,
  epochs: int,
  seed: int,
  mesh: Mesh,
  limit: int = 0,
  augment: bool | None = None,
  split: str = "train",
  tfds_data_dir: str = "",
) -> DeviceBatches:
  """The split of `data` (a prepared dataset's info, or {"image", "label"} arrays) on `mesh`.

  `limit` > 0 keeps the first `limit` examples; `augment` None follows the dataset's default
  (arrays: no augmentation). Every process passes the whole split; each device keeps a copy.
  """
  if isinstance(data, datasets.DatasetInfo):
    augment = data.augment if augment is None else augment
    arrays = input_pipeline.split_arrays(data, split, limit, tfds_data_dir)
    image, label = arrays.image, arrays.label
  else:
    image, label = np.asarray(data["image"]), np.asarray(data["label"])
    if limit > 0:
      image, label = image[:limit], label[:limit]
  if image.dtype != np.uint8 or image.ndim != 4 or len(image) != len(label):
    raise ValueError(
      f"expected uint8 images [N, H, W, C] and N labels, got {image.dtype} "
      f"{image.shape} and {label.shape}."
    )
  if epochs < 1:
    raise ValueError(f"epochs must be >= 1, got {epochs}.")
  if global_batch % mesh.size:
    raise ValueError(f"global batch {global_batch} is not a multiple of the {mesh.size} devices.")
  spe = input_pipeline.steps_per_epoch(len(label), global_batch)
  rows = image.reshape(len(image), -1)
  on_device = parallel.replicate({"image": rows, "label": label.astype(np.int32)}, mesh)
  return DeviceBatches(
    images=on_device["image"],
    labels=on_device["label"],
    global_batch=global_batch,
    steps_per_epoch=spe,
    epochs=epochs,
    seed=seed,
    augment=bool(augment),
    mesh=mesh,
    image_shape=tuple(image.shape[1:]),
  )
