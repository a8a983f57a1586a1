"""The workdir on a local disk and on an object store (an in-memory fake of gs:// through fsspec,
which etils.epath uses for gs:// paths): atomic writes, the lock, the config guard."""

import json
import logging
import stat

import fsspec
import ml_collections
import numpy as np
import pytest
from etils import epath
from fsspec.implementations.memory import MemoryFileSystem

from fmcejax import config_lib, fmcs_data, workdir


class FakeGCS(MemoryFileSystem):
  """gs:// kept in memory: no rename, no locks, objects appear when written whole."""

  protocol = ("gs", "gcs")
  store: dict = {}
  pseudo_dirs = [""]


@pytest.fixture
def bucket():
  FakeGCS.store.clear()
  for protocol in FakeGCS.protocol:
    fsspec.register_implementation(protocol, FakeGCS, clobber=True)
  yield epath.Path("gs://bucket/run")
  FakeGCS.store.clear()


def test_atomic_write_json_replaces_nan(tmp_path):
  path = tmp_path / "sub" / "x.json"
  workdir.write_json(
    path, {"a": float("nan"), "b": [np.float32(1.5), np.inf], "c": np.arange(2), "d": (1, True)}
  )
  text = path.read_text()
  assert "NaN" not in text and "Infinity" not in text and text.endswith("\n")
  assert json.loads(text) == {"a": None, "b": [1.5, None], "c": [0, 1], "d": [1, True]}
  workdir.write_json(path, {"a": 1})
  assert json.loads(path.read_text()) == {"a": 1}
  assert [p.name for p in path.parent.iterdir()] == ["x.json"]


def test_result_files_get_the_umask_mode_not_the_temp_files_0600(tmp_path):
  """Reports in a shared workdir are readable as any file the user makes (0644 under 022)."""
  path = tmp_path / "report.json"
  workdir.write_json(path, {"a": 1})
  (tmp_path / "plain").write_text("")
  assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode)


def test_a_failed_write_leaves_the_old_file(tmp_path):
  path = tmp_path / "x.json"
  workdir.write_json(path, {"a": 1})
  with pytest.raises(RuntimeError):
    with workdir.open_atomic(path, "w") as f:
      f.write("{half")
      raise RuntimeError("killed mid-write")
  assert json.loads(path.read_text()) == {"a": 1}
  assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_is_local():
  assert workdir.is_local("/tmp/x") and workdir.is_local("relative/dir")
  assert not workdir.is_local("gs://bucket/x") and not workdir.is_local("s3://b/x")


def test_results_go_through_epath_to_an_object_store(bucket):
  workdir.check_writable(bucket)
  workdir.write_json(bucket / "stage" / "metrics.json", {"test_accuracy": 0.5})
  assert workdir.read_json(bucket / "stage" / "metrics.json") == {"test_accuracy": 0.5}
  assert "gs://bucket/run/stage/metrics.json" in FakeGCS.store  # in the fake bucket, not on disk
  assert not list((bucket / "stage").glob(".*.tmp")), "no temp files on an object store"


def test_fmcs_files_on_an_object_store_read_back(bucket):
  features = np.random.default_rng(0).normal(size=(3, 4, 4, 2)).astype(np.float32)
  for phase in range(2):
    fmcs_data._write_phase(bucket / "fmcs", phase, features + phase, "float32")
  workdir.write_json(
    bucket / "fmcs" / "index.json",
    {"num_phases": 2, "storage_dtype": "float32", "train_images": [0, 2], "holdout_images": [1]},
  )
  source = fmcs_data.Source(bucket / "fmcs", "train")
  assert len(source) == 4 and source.feature_shape == (4, 4, 2)
  np.testing.assert_array_equal(source[3]["image"], features[2] + 1)
  assert source[3]["label"] == 1


def test_lock_is_refused_while_held_and_absent_on_an_object_store(tmp_path, bucket, caplog):
  handle = workdir.lock(tmp_path)
  assert "pid" in (tmp_path / ".lock").read_text()
  with pytest.raises(config_lib.ConfigError, match="'workdir'.*in use by pid"):
    workdir.lock(tmp_path)
  handle.close()
  with caplog.at_level(logging.WARNING):
    assert workdir.lock(bucket) is None
  assert "no file locks" in caplog.text


def test_unwritable_workdir_is_a_config_error():
  with pytest.raises(config_lib.ConfigError, match="'workdir' = '/proc/x'.*cannot be written"):
    workdir.check_writable(epath.Path("/proc/x"))


def test_a_workdir_holds_one_config(tmp_path, bucket):
  for root in (epath.Path(tmp_path), bucket):
    config = ml_collections.ConfigDict({"alpha": 0.1, "seeds": "3", "probe": {"epochs": 2}})
    workdir.check_config(config, root)
    config.seeds = "5"  # a run-only field: the same results may be extended
    workdir.check_config(config, root)
    config.probe.epochs = 3
    with pytest.raises(config_lib.ConfigError, match="'probe' .*fields differing: probe"):
      workdir.check_config(config, root)
