"""The FMCS-Dataset: a module's feature maps at each phase marker, labelled by phase (METHOD 3).

One file per marker (`phase_<k>.npy`, `[n, h, w, c]`, bfloat16 stored as its uint16 bits) holds
the feature maps of the same fixed probe subset of training images; files are written whole and
renamed, so an interrupted extraction resumes at the first missing phase. Reads are memory-mapped:
the dataset never has to fit in host memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grain
import jax
import ml_dtypes
import numpy as np
from jax.sharding import Mesh

from fmcejax import parallel

_STORAGE = {"bfloat16": (ml_dtypes.bfloat16, np.uint16), "float32": (np.float32, np.float32)}


def extract(apply_fn: Callable[..., Any], variables: Any, images: np.ndarray, *, module: str,
            preprocess: Callable[[jax.Array], jax.Array], mesh: Mesh,
            batch_size: int) -> np.ndarray:
  """Feature maps of `module` for `images`, by a jitted forward pass sharded over the mesh.

  Every host holds the same `images` and feeds its slice of each global batch; the output is
  replicated so every host returns the full array.
  """
  fn = jax.jit(lambda v, x: apply_fn(v, preprocess(x), train=False)[1][module],
               in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
               out_shardings=parallel.replicated(mesh),
               compiler_options=parallel.compiler_options(mesh))
  variables = parallel.replicate(variables, mesh)
  n, p, count = len(images), jax.process_index(), jax.process_count()
  local = batch_size // count
  outputs = []
  for start in range(0, n, batch_size):
    chunk = images[start:start + batch_size]
    valid = len(chunk)
    if valid < batch_size:  # pad the last batch; padded rows are dropped below
      chunk = np.concatenate([chunk, np.zeros((batch_size - valid, *chunk.shape[1:]), chunk.dtype)])
    host = chunk[p * local:(p + 1) * local]
    out = fn(variables, parallel.global_batch({"x": host}, mesh)["x"])
    outputs.append(np.asarray(jax.device_get(out))[:valid])
  return np.concatenate(outputs)


def write_phase(directory: Path, phase: int, features: np.ndarray, storage_dtype: str) -> None:
  """Stores one marker's feature maps atomically (tmp file + rename)."""
  dtype, bits = _STORAGE[storage_dtype]
  directory.mkdir(parents=True, exist_ok=True)
  tmp = directory / f".phase_{phase}.npy.tmp"
  with open(tmp, "wb") as f:
    np.save(f, features.astype(dtype).view(bits))
  os.replace(tmp, directory / f"phase_{phase}.npy")


def phase_done(directory: Path, phase: int) -> bool:
  return (directory / f"phase_{phase}.npy").exists()


def split_images(n: int, holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Splits probe images (not rows) so held-out images are unseen at every phase."""
  order = np.random.default_rng(seed).permutation(n)
  n_hold = max(1, int(round(n * holdout_fraction)))
  return np.sort(order[n_hold:]), np.sort(order[:n_hold])


def write_index(directory: Path, meta: dict[str, Any]) -> None:
  tmp = directory / ".index.json.tmp"
  tmp.write_text(json.dumps(meta, indent=2))
  os.replace(tmp, directory / "index.json")


class Source:
  """Random-access rows (phase, image) of the FMCS-Dataset over memory-mapped phase files."""

  def __init__(self, directory: Path, split: str):
    meta = json.loads((Path(directory) / "index.json").read_text())
    dtype, _ = _STORAGE[meta["storage_dtype"]]
    self.num_phases = meta["num_phases"]
    self._phases = [np.load(Path(directory) / f"phase_{k}.npy", mmap_mode="r").view(dtype)
                    for k in range(self.num_phases)]
    self._images = np.asarray(meta[f"{split}_images"], np.int64)
    self.feature_shape = tuple(self._phases[0].shape[1:])

  def __len__(self) -> int:
    return self.num_phases * len(self._images)

  def __getitem__(self, row: int) -> dict[str, np.ndarray]:
    phase, i = divmod(int(row), len(self._images))
    return {"image": np.asarray(self._phases[phase][self._images[i]]),
            "label": np.int32(phase)}


def dataset(directory: Path, split: str) -> grain.MapDataset:
  return grain.MapDataset.source(Source(directory, split))
