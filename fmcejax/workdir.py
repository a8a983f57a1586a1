"""The workdir: a local path or any path etils.epath handles (`gs://bucket/run`), as in big_vision.

Every result file goes through here: written whole (a temp file renamed into place locally; an
object store publishes an upload only once it is complete), so a killed run never leaves a
half-written file for a resumed run to trust. Also the workdir's guards: it must be writable, it
holds one config, and one run at a time (a lock, where the filesystem has locks).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import re
import socket
import tempfile
from collections.abc import Iterator, Mapping
from typing import IO, Any

import jax
import ml_collections
import numpy as np
from etils import epath

from fmcejax import config_lib, parallel

PathLike = str | os.PathLike


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


# Read once, at import, before any writer thread exists: a temp file is created 0600, and a
# result file gets the mode any other file the user creates would (0644 under umask 022).
FILE_MODE = 0o666 & ~_umask()


def path(value: PathLike) -> epath.Path:
  return epath.Path(value)


def is_local(p: PathLike) -> bool:
  """Whether `p` is on a local filesystem (no `scheme://` prefix)."""
  return re.match(r"^[a-zA-Z][\w+.-]*://", os.fspath(p)) is None


@contextlib.contextmanager
def open_atomic(p: PathLike, mode: str = "wb") -> Iterator[IO]:
  """A file that appears at `p` only once it is complete."""
  p = path(p)
  p.parent.mkdir(parents=True, exist_ok=True)
  if not is_local(p):  # an object becomes visible only when its upload completes
    with p.open(mode) as f:
      yield f
    return
  fd, tmp = tempfile.mkstemp(dir=os.fspath(p.parent), prefix=f".{p.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, mode) as f:
      yield f
      f.flush()
      os.fchmod(f.fileno(), FILE_MODE)
      os.fsync(f.fileno())
    os.replace(tmp, os.fspath(p))
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def plain(obj: Any) -> Any:
  """JSON-ready copy: non-finite floats -> None, numpy/ConfigDict/tuples -> Python builtins."""
  if isinstance(obj, (bool, np.bool_)):
    return bool(obj)
  if isinstance(obj, (int, np.integer)):
    return int(obj)
  if isinstance(obj, (float, np.floating)):
    return float(obj) if math.isfinite(obj) else None
  if isinstance(obj, np.ndarray):
    return plain(obj.tolist())
  if isinstance(obj, Mapping) or hasattr(obj, "items"):  # ConfigDict is not a Mapping
    return {str(k): plain(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [plain(v) for v in obj]
  return obj


def write_text(p: PathLike, text: str) -> None:
  with open_atomic(p, "w") as f:
    f.write(text)


def write_json(p: PathLike, obj: Any) -> None:
  """Indented strict JSON (NaN/inf become null), written atomically."""
  write_text(p, json.dumps(plain(obj), indent=2, allow_nan=False) + "\n")


def read_json(p: PathLike) -> Any:
  return json.loads(path(p).read_text())


def check_writable(workdir: epath.Path) -> None:
  """Fails (ConfigError) before anything compiles when `workdir` cannot be created or written."""
  probe = workdir / f".write_test.{jax.process_index()}"
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe.write_text("ok")
    probe.unlink()
  except (OSError, PermissionError, NotImplementedError) as e:
    raise config_lib.ConfigError(
      "workdir",
      os.fspath(workdir),
      "a directory this process can create and write (a local "
      "path or a path etils.epath handles, such as gs://bucket/run)",
      f"It cannot be written: {type(e).__name__}: {e}.",
    ) from None


def check_config(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """Refuses to mix results of two different configs in one workdir."""
  p = workdir / "config.json"
  current = {k: v for k, v in config.to_dict().items() if k not in config_lib.RUN_ONLY_FIELDS}
  if parallel.agree(p.exists()):
    added = {k: v for k, v in config_lib.ADDED_FIELDS.items() if k in current}
    saved = {**added, **read_json(p)}  # made before those fields existed: their defaults
    diffs = sorted(k for k in set(saved) | set(current) if saved.get(k) != plain(current.get(k)))
    if diffs:
      raise config_lib.ConfigError(
        diffs[0],
        current.get(diffs[0]),
        f"{saved.get(diffs[0])!r}, the value the results in {workdir} were made with",
        f"The workdir was made with another config (fields "
        f"differing: {', '.join(diffs)}); use a new --workdir.",
      )
  else:
    parallel.primary_writes("config.json", lambda: write_json(p, current))


def lock(workdir: epath.Path) -> IO | None:
  """Holds an exclusive lock on a local workdir for this process's life (process 0 of a job).

  A second run on the same workdir would interleave checkpoints; it is refused instead. The
  kernel drops the lock when the process dies, so a killed run never leaves a stale lock. Object
  stores have no locks: there a warning says that nothing guards the workdir.
  """
  handle, owner = None, ""
  if jax.process_index() == 0:
    if is_local(workdir):
      handle, owner = _flock(workdir / ".lock")
    else:
      logging.warning(
        "%s is on an object store, which has no file locks: nothing stops a second "
        "run on this workdir, so start one run per workdir.",
        workdir,
      )
  if parallel.agree(bool(owner)):  # every process fails, or none waits for a dead process 0
    raise config_lib.ConfigError(
      "workdir",
      os.fspath(workdir),
      "a workdir no other fmcejax run is using",
      f"It is in use by {owner or 'another run'}; wait for that run to finish or use another "
      "--workdir.",
    )
  if handle is None:
    return None
  handle.seek(0)
  handle.truncate()
  handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
  handle.flush()
  return handle


def _flock(p: epath.Path) -> tuple[IO | None, str]:
  """(the locked handle, "") or (None, who holds the lock)."""
  handle = open(os.fspath(p), "a+")
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    handle.seek(0)
    owner = handle.read().strip() or "another process"
    handle.close()
    return None, owner
  return handle, ""
