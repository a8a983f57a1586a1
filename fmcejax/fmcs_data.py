"""The FMCS-Dataset: a module's feature maps at each phase marker, labelled by phase (METHOD 3).

One file per marker (`phase_<k>.npy`, `[n, h, w, c]`, bfloat16 stored as its uint16 bits) holds
the feature maps of the same fixed probe subset of training images; files are written whole, so an
interrupted extraction resumes at the first missing phase. Local files are memory-mapped (the
dataset never has to fit in host memory); on an object store they are read whole.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax
import ml_dtypes
import numpy as np
from etils import epath
from jax.sharding import Mesh

from fmcejax import evaluation, input_pipeline, parallel, workdir

_STORAGE = {"bfloat16": (ml_dtypes.bfloat16, np.uint16), "float32": (np.float32, np.float32)}
LABELS = ("phase", "shuffled")  # "shuffled": the phase labels permuted over the train rows


def extract(
  apply_fn: Callable[..., Any],
  variables: Any,
  images: np.ndarray,
  *,
  module: str,
  preprocess: Callable[[jax.Array], jax.Array],
  mesh: Mesh,
  batch_size: int,
) -> np.ndarray:
  """Feature maps of `module` for `images` (identical on every host), by a jitted forward pass
  sharded over the mesh; every host returns the full array."""
  fn = jit_extract(apply_fn, module=module, preprocess=preprocess, mesh=mesh)
  source = input_pipeline.ArraySource(image=images, label=np.zeros(len(images), np.int32))
  return evaluation.over_dataset(
    fn,
    parallel.replicate(variables, mesh),
    grain.MapDataset.source(source),
    mesh,
    global_batch=batch_size,
    concat=True,
  )


def jit_extract(
  apply_fn: Callable[..., Any],
  *,
  module: str,
  preprocess: Callable[[jax.Array], jax.Array],
  mesh: Mesh,
) -> evaluation.BatchFn:
  """The extraction's program: `module`'s feature maps of a global batch of images."""
  return evaluation.jit(
    lambda v, batch: apply_fn(v, preprocess(batch["image"]), train=False)[1][module], mesh
  )


def _write_phase(
  directory: epath.Path, phase: int, features: np.ndarray, storage_dtype: str
) -> None:
  dtype, bits = _STORAGE[storage_dtype]
  with workdir.open_atomic(directory / f"phase_{phase}.npy") as f:
    np.save(f, features.astype(dtype).view(bits))


def split_images(n: int, holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Splits probe images (not rows) so held-out images are unseen at every phase."""
  order = np.random.default_rng(seed).permutation(n)
  n_hold = max(1, int(round(n * holdout_fraction)))
  return np.sort(order[n_hold:]), np.sort(order[:n_hold])


def build(
  directory: epath.Path,
  *,
  markers: Sequence[int],
  restore: Callable[[int], Any],
  apply_fn: Callable[..., Any],
  images: np.ndarray,
  image_indices: np.ndarray,
  module: str,
  preprocess: Callable[[jax.Array], jax.Array],
  mesh: Mesh,
  batch_size: int,
  storage_dtype: str,
  holdout_fraction: float,
  seed: int,
) -> dict[str, Any]:
  """Extracts every missing phase (`restore(epoch)` gives a marker's variables), then writes the
  index; returns the stage's metrics."""
  start = time.perf_counter()
  for phase, epoch in enumerate(markers):
    if parallel.agree((directory / f"phase_{phase}.npy").exists()):  # all skip it, or none
      continue
    features = extract(
      apply_fn,
      restore(epoch),
      images,
      module=module,
      preprocess=preprocess,
      mesh=mesh,
      batch_size=batch_size,
    )
    parallel.primary_writes(
      f"fmcs_data:{phase}", lambda: _write_phase(directory, phase, features, storage_dtype)
    )
  n = len(images)
  train_images, holdout_images = split_images(n, holdout_fraction, seed)
  meta = {
    "num_phases": len(markers),
    "markers": list(markers),
    "module": module,
    "storage_dtype": storage_dtype,
    "num_images": n,
    "seed": seed,
    "image_indices": np.asarray(image_indices).tolist(),
    "train_images": train_images.tolist(),
    "holdout_images": holdout_images.tolist(),
  }
  parallel.primary_writes(
    "fmcs_data:index", lambda: workdir.write_json(directory / "index.json", meta)
  )
  source = Source(directory, "train")
  return {
    "feature_shape": list(source.feature_shape),
    "module": module,
    "markers": list(markers),
    "num_images": n,
    "train_rows": len(source),
    "holdout_rows": len(Source(directory, "holdout")),
    "seconds": time.perf_counter() - start,
  }


def _load(p: epath.Path) -> np.ndarray:
  if workdir.is_local(p):
    return np.load(p, mmap_mode="r")
  return np.load(io.BytesIO(p.read_bytes()))


class Source:
  """Random-access rows (phase, image) of the FMCS-Dataset.

  With `labels="shuffled"` the labels carry no phase: the control head of a study, which can
  learn no convergence knowledge (`_balanced_shuffle`).
  """

  def __init__(self, directory: epath.PathLike, split: str, labels: str = "phase"):
    directory = epath.Path(directory)
    meta = workdir.read_json(directory / "index.json")
    dtype, _ = _STORAGE[meta["storage_dtype"]]
    self.num_phases = meta["num_phases"]
    self._phases = [_load(directory / f"phase_{k}.npy").view(dtype) for k in range(self.num_phases)]
    self._images = np.asarray(meta[f"{split}_images"], np.int64)
    self._labels = np.repeat(np.arange(self.num_phases, dtype=np.int32), len(self._images))
    if labels == "shuffled":
      self._labels = _balanced_shuffle(self.num_phases, len(self._images), meta.get("seed", 0))
    self.feature_shape = tuple(self._phases[0].shape[1:])

  def __len__(self) -> int:
    return self.num_phases * len(self._images)

  def __getitem__(self, row: int) -> dict[str, np.ndarray]:
    phase, i = divmod(int(row), len(self._images))
    return {"image": np.asarray(self._phases[phase][self._images[i]]), "label": self._labels[row]}


def _balanced_shuffle(num_phases: int, num_images: int, seed: int) -> np.ndarray:
  """Row labels (phase-major rows) where every phase's rows hold each label equally often, in a
  random order: a plain permutation of all labels leaves chance imbalances per phase, which a
  head learns as a scrambled phase code (convergence knowledge under other names)."""
  rng = np.random.default_rng(seed)
  balanced = np.resize(np.arange(num_phases, dtype=np.int32), num_images)
  return np.concatenate([rng.permutation(balanced) for _ in range(num_phases)])


def dataset(directory: epath.PathLike, split: str, labels: str = "phase") -> grain.MapDataset:
  return grain.MapDataset.source(Source(directory, split, labels))
