"""Loaders: grain pipelines over prepared tfds datasets, per-host sharding, resumable iterators.

Datasets are prepared by datasets.py (`datasets.prepare`) into tfds's array_record format, read
here with `tfds.data_source` (no TensorFlow); grain does shuffling, augmentation, sharding and
batching.

Order of examples: a train batch index k maps to a fixed set of examples (random access), which is
what makes resuming at a batch index exact (`make_iterator(start=k)`, with or without worker
processes) and what lets every host take only its shard of each global batch.
"""

from __future__ import annotations

import dataclasses
import functools
import signal
from collections.abc import Callable, Iterator

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from jax.sharding import Mesh

from fmcejax import parallel, tfds_any
from fmcejax.datasets import DataError, DatasetInfo

_CROP_PAD = 4


def num_examples(info: DatasetInfo, split: str = "train", limit: int = 0) -> int:
  """Examples of `split` used when only the first `limit` (> 0) are taken."""
  total = {"train": info.num_train, "test": info.num_test}[split]
  return min(limit, total) if limit > 0 else total


def steps_per_epoch(
  info_or_num: DatasetInfo | int, global_batch: int, limit: int = 0, split: str = "train"
) -> int:
  """Full global batches per epoch (the remainder of each epoch is dropped, never straddled)."""
  n = info_or_num if isinstance(info_or_num, int) else num_examples(info_or_num, split)
  if limit > 0:
    n = min(n, limit)
  steps = n // global_batch
  if steps == 0:
    raise ValueError(
      f"global batch {global_batch} is larger than the {n} examples used: no full batch per epoch."
    )
  return steps


def _local_batch(global_batch: int, process_index: int, process_count: int) -> int:
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count}).")
  if global_batch <= 0 or global_batch % process_count:
    raise ValueError(
      f"global batch {global_batch} is not a positive multiple of the "
      f"process count {process_count}."
    )
  return global_batch // process_count


def _stack(info: DatasetInfo, examples: list[dict]) -> dict[str, np.ndarray]:
  """Decoded tfds examples as {"image": uint8 [N, H, W, C], "label": int32 [N]}, each image at
  `info.image_shape` (resized where it differs: datasets of varying image sizes)."""
  shape = info.image_shape
  return {
    "image": (
      np.stack([tfds_any.fit_image(e[info.image_key], shape) for e in examples])
      if examples
      else np.zeros((0, *shape), np.uint8)
    ),
    "label": np.array([e[info.label_key] for e in examples], np.int32),
  }


@dataclasses.dataclass(frozen=True, eq=False)
class ArraySource:
  """Examples held as two arrays, indexable like a tuple of elements. Grain pickles a source into
  each worker process, and one buffer pickles much faster than 50,000 small dicts, so workers
  start sooner (docs/BENCHMARKS.md)."""

  image: np.ndarray
  label: np.ndarray

  def __len__(self) -> int:
    return len(self.label)

  def __getitem__(self, index: int) -> dict:
    return {"image": self.image[index], "label": self.label[index]}


def _source(info: DatasetInfo, split: str, tfds_data_dir: str):
  """The prepared split as a tfds data source (array_record, decoded with PIL, no TensorFlow)."""
  source = tfds.data_source(
    info.tfds_name,
    split={"train": info.train_split, "test": info.test_split}[split],
    data_dir=tfds_data_dir or None,
    download=False,
  )
  if len(source) != num_examples(info, split):
    raise DataError(
      "data_dir",
      tfds_data_dir,
      f"{info.tfds_name}/{split} holds {len(source)} "
      f"examples but the DatasetInfo says {num_examples(info, split)}; call "
      "prepare() again.",
    )
  return source


@functools.lru_cache(maxsize=8)
def _decoded(info: DatasetInfo, split: str, n: int, tfds_data_dir: str) -> ArraySource:
  """The first `n` examples of a split, decoded once per process and kept in memory.

  Every dataset here is small (at most 50,000 x 32x32x3 bytes), and one bulk read plus one
  decode beats reading records one by one, the more so from the second epoch on.
  """
  return ArraySource(**_stack(info, _source(info, split, tfds_data_dir).__getitems__(range(n))))


def split_arrays(
  info: DatasetInfo, split: str = "train", limit: int = 0, tfds_data_dir: str = ""
) -> ArraySource:
  """The first `limit` (all if 0) examples of a prepared split as two arrays (uint8 images, int
  labels), decoded once per process: what `device_input` places on the devices."""
  return _decoded(info, split, num_examples(info, split, limit), tfds_data_dir)


def examples(info: DatasetInfo, split: str, limit: int, tfds_data_dir: str) -> grain.MapDataset:
  """The split (first `limit` examples) as {"image": uint8 [H,W,C], "label": int32}."""
  return grain.MapDataset.source(split_arrays(info, split, limit, tfds_data_dir))


def random_crop_flip(element: dict, rng: np.random.Generator) -> dict:
  """Random crop of the zero-padded image (pad 4) and a random horizontal flip.

  Pastes the shifted image into zeros instead of padding and cropping: same result, less copying.
  """
  image = element["image"]
  h, w, _ = image.shape
  dy, dx, flip = rng.integers((-_CROP_PAD, -_CROP_PAD, 0), (_CROP_PAD + 1, _CROP_PAD + 1, 2))
  out = np.zeros_like(image)
  out[max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)] = image[
    max(0, dy) : h + min(0, dy), max(0, dx) : w + min(0, dx)
  ]
  return {"image": out[:, ::-1].copy() if flip else out, "label": element["label"]}


def train_dataset(
  info: DatasetInfo,
  *,
  split: str = "train",
  global_batch: int,
  epochs: int,
  seed: int,
  limit: int = 0,
  augment: bool | None = None,
  process_index: int = 0,
  process_count: int = 1,
  tfds_data_dir: str = "",
) -> grain.MapDataset:
  """Host-local training batches of a tfds split, exactly `epochs * steps_per_epoch`."""
  augment = info.augment if augment is None else augment
  return epoch_batches(
    examples(info, split, limit, tfds_data_dir),
    global_batch=global_batch,
    epochs=epochs,
    seed=seed,
    augment=random_crop_flip if augment else None,
    process_index=process_index,
    process_count=process_count,
  )


def epoch_batches(
  ds: grain.MapDataset,
  *,
  global_batch: int,
  epochs: int,
  seed: int,
  augment: Callable[[dict, np.random.Generator], dict] | None = None,
  process_index: int = 0,
  process_count: int = 1,
) -> grain.MapDataset:
  """Host-local batches of any random-access dataset, exactly `epochs * steps_per_epoch`.

  Each epoch is a fresh permutation of which the first `steps_per_epoch * global_batch`
  examples are used. Augmentation draws from (seed, position in the global stream), and this
  host keeps positions j with j % process_count == process_index, so for every global batch
  the host shards are disjoint, their union is the single-host batch, and batch k (`ds[k]`)
  is a pure function of k.
  """
  local = _local_batch(global_batch, process_index, process_count)
  if epochs < 1:
    raise ValueError(f"epochs must be >= 1, got {epochs}.")
  used = steps_per_epoch(len(ds), global_batch) * global_batch
  # Grain indexes past an epoch as the next epoch: the shuffle reseeds per epoch, and the slice
  # takes the first `used` of every epoch's permutation.
  ds = ds.seed(seed).shuffle()[:used].repeat(epochs)
  if augment is not None:
    ds = ds.random_map(augment)
  return ds[process_index::process_count].batch(local, drop_remainder=True)


def _with_mask(element: dict) -> dict:
  return {**element, "mask": np.float32(1)}


def padded_batches(
  ds: grain.MapDataset, *, global_batch: int, process_index: int = 0, process_count: int = 1
) -> Iterator[dict]:
  """Every example of `ds` exactly once across hosts, in order, no augmentation; padding rows
  (mask 0, zero image/label) fill the last global batch so every host yields the same number,
  ceil(N / global_batch), of full local batches."""
  local = _local_batch(global_batch, process_index, process_count)
  pad = -len(ds) % global_batch
  ds = ds.map(_with_mask)
  if pad:
    blank = jax.tree.map(np.zeros_like, {**ds[0], "mask": np.float32(0)})
    ds = grain.MapDataset.concatenate([ds, grain.MapDataset.range(pad).map(lambda _: blank)])
  return make_iterator(ds[process_index::process_count].batch(local, drop_remainder=True))


def load_arrays(
  info: DatasetInfo, *, split: str = "train", indices: np.ndarray, tfds_data_dir: str = ""
) -> dict:
  """The examples at `indices` (e.g. a fixed probe subset), unaugmented, stacked."""
  source = _source(info, split, tfds_data_dir)
  indices = np.asarray(indices, np.int64)
  if indices.size and (indices.min() < 0 or indices.max() >= len(source)):
    raise IndexError(f"indices must lie in [0, {len(source)}) for {info.name}/{split}.")
  return _stack(info, source.__getitems__(indices.tolist()))


def subset_indices(num: int, size: int, seed: int) -> np.ndarray:
  """`size` distinct indices of range(num) (all of them if size >= num), sorted; a pure
  function of its arguments so every run and host probes the same examples."""
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(num, size=min(size, num), replace=False)).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class HostBatches:
  """Training batches made on the host by grain (`epoch_batches`), as global arrays on `mesh`:
  the loader of datasets that do not fit on the devices. `workers` as in `make_iterator`."""

  ds: grain.MapDataset
  mesh: Mesh
  workers: int = 0

  def __len__(self) -> int:
    return len(self.ds)

  def iterator(self, start: int) -> Iterator[dict[str, jax.Array]]:
    host = make_iterator(self.ds, start=start, workers=self.workers)
    try:
      for local in host:
        yield parallel.global_batch(local, self.mesh)
    finally:
      host.close()


def make_iterator(
  ds: grain.MapDataset, *, start: int = 0, workers: int = 0, prefetch: int = 4
) -> grain.DatasetIterator:
  """An iterator over `ds[start:]`: batch `start` first, then the rest in order, prefetched.

  Resuming at a batch index needs no loader state of its own: `ds[k]` is a pure function of k
  (`epoch_batches`), so the same batches come for any `workers`, on any host.
  - `workers=0`: one thread of this process overlaps loading with the device. The per-example
    work holds the GIL, so more threads only contend.
  - `workers=N`: N grain worker processes (`mp_prefetch`) each load every N-th batch, for hosts
    whose accelerators consume more images than one core augments (docs/BENCHMARKS.md).
  """
  if not 0 <= start <= len(ds):
    raise ValueError(f"start must lie in [0, {len(ds)}], got {start}.")
  iter_ds = ds[start:].to_iter_dataset(
    grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch)
  )
  if workers:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags: notebooks, tests, bench
      flags.FLAGS.mark_as_parsed()
    iter_ds = iter_ds.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=workers), worker_init_fn=ignore_ctrl_c
    )
  return iter(iter_ds)


def ignore_ctrl_c(worker_index: int, worker_count: int) -> None:
  """In each grain worker: a terminal's Ctrl-C reaches its whole process group, and is the main
  process's to handle (a checkpoint, then it closes the workers); a worker would die of it."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)
