r"""FMCE-Net++ from one command: probe -> CQI -> FMCS-Dataset -> FMCE-Net -> baseline/FMCE-Net++ -> report.

    python -m fmcejax.train [--config configs/NAME.py] [--workdir DIR] [--config.FIELD=VALUE ...]

Every stage writes `<workdir>/<stage>/metrics.json` when it finishes; a finished stage is skipped
on a re-run and an interrupted one resumes from its last checkpoint.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import PIL.Image
import orbax.checkpoint as ocp
from absl import flags
from ml_collections import config_flags

from fmcejax import (config_lib, cpu_lowering, cqi, fmce_net, fmcs_data, input_pipeline, models,
                     parallel, report, steps, trainer)

_DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mnist_cnn.py"

EXIT_BAD_INPUT = 2


class Pipeline:
  """The stages of one workdir; each is skipped when its metrics.json exists."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: Path):
    self.config = config
    self.workdir = workdir
    self.mesh = parallel.make_mesh()
    self.lowering = cpu_lowering.for_platform(parallel.platform(self.mesh))
    self.seeds = config_lib.parse_seeds(config.seeds)
    self.module = config.module or models.DEFAULT_MODULE[config.backbone]
    # Process 0 prepares first: on a shared tfds_data_dir the others then find it prepared.
    if jax.process_index() == 0:
      self.info = input_pipeline.prepare(config.dataset, config.data_dir, config.tfds_data_dir)
    parallel.sync("prepare")
    if jax.process_index() != 0:
      self.info = input_pipeline.prepare(config.dataset, config.data_dir, config.tfds_data_dir)
    self.dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
    self.loop = trainer.LoopOptions(
        log_every=config.log_every, checkpoint_every_steps=config.checkpoint_every_steps,
        keep_checkpoints=config.keep_checkpoints, nan_policy=config.nan_policy,
        progress_bar=config.progress_bar, input_workers=config_lib.parse_input_workers(
            config.input_workers, jax.default_backend(), os.cpu_count() or 1))

  # -- helpers -------------------------------------------------------------------------------

  def done(self, *parts: str) -> bool:
    # Process 0 decides: every process must take the same branch.
    return parallel.agree((self.workdir.joinpath(*parts) / "metrics.json").exists())

  def write_metrics(self, metrics: dict[str, Any], *parts: str) -> None:
    if jax.process_index() == 0:
      report.atomic_write_json(self.workdir.joinpath(*parts) / "metrics.json", metrics)
    parallel.sync("metrics:" + "/".join(parts))  # the other processes read it next

  def read_metrics(self, *parts: str) -> dict[str, Any]:
    path = self.workdir.joinpath(*parts) / "metrics.json"
    if not path.exists():
      raise FileNotFoundError(f"{path} is missing: run the stage '{parts[0]}' first.")
    return json.loads(path.read_text())

  def preprocess(self):
    info, dtype = self.info, self.dtype
    return lambda images: steps.normalize(images, info.mean, info.std, dtype)

  def backbone_job(self, *, seed: int, epochs: int, limit: int, eval_each_epoch: bool,
                   head: tuple[steps.Head, Any] | None = None, train_with_head: bool = False,
                   role: str) -> trainer.Job:
    """A backbone training run with the config's recipe; baseline and RAL differ only in head."""
    c = self.config
    model = models.create_backbone(c.backbone, self.info.num_classes, self.dtype,
                                   lowering=self.lowering)
    augment = {"auto": None, "on": True, "off": False}[c.augment]
    train_data = input_pipeline.train_dataset(
        self.info, global_batch=c.batch_size, epochs=epochs, seed=seed, limit=limit,
        augment=augment, process_index=jax.process_index(),
        process_count=jax.process_count(), tfds_data_dir=c.tfds_data_dir)
    spe = input_pipeline.steps_per_epoch(self.info, c.batch_size, limit)
    lr = steps.learning_rate_schedule(c.learning_rate, c.lr_schedule,
                                      int(c.warmup_epochs * spe), spe * epochs)
    tx = steps.create_optimizer(c.optimizer, lr, weight_decay=c.weight_decay,
                                momentum=c.momentum, nesterov=c.nesterov)
    alpha = steps.alpha_schedule(c.alpha, c.alpha_schedule, spe * epochs)
    return trainer.Job(
        model=model, preprocess=self.preprocess(), input_shape=self.info.image_shape,
        train_data=train_data, steps_per_epoch=spe, epochs=epochs, global_batch=c.batch_size,
        tx=tx, learning_rate=lr, seed=seed,
        identity={"role": role, "dataset": c.dataset, "backbone": c.backbone, "seed": seed,
                  "epochs": epochs, "batch_size": c.batch_size, "limit": limit,
                  "alpha": c.alpha if train_with_head else 0.0},
        eval_data=lambda: input_pipeline.eval_batches(
            self.info, global_batch=c.eval_batch_size, limit=c.test_examples_limit,
            process_index=jax.process_index(), process_count=jax.process_count(),
            tfds_data_dir=c.tfds_data_dir),
        eval_each_epoch=eval_each_epoch,
        loss=steps.Loss(alpha=alpha, mode=c.ral, target=c.ral_target),
        head=head[0] if head else None, head_variables=head[1] if head else None,
        train_with_head=train_with_head)

  def fit(self, job: trainer.Job, run_dir: Path, description: str, hook=None) -> dict[str, Any]:
    options = trainer.LoopOptions(**{**vars(self.loop), "description": description})
    result = trainer.fit(job, run_dir, self.mesh, options, on_epoch_end=hook)
    result.pop("state")
    return result

  # -- stages --------------------------------------------------------------------------------

  def probe(self) -> None:
    """METHOD 1: plain CE training that records per-epoch losses and a snapshot per epoch."""
    c = self.config
    job = self.backbone_job(seed=self.seeds[0], epochs=c.probe.epochs,
                            limit=c.probe.train_examples_limit, eval_each_epoch=False,
                            role="probe")
    snapshots = trainer.checkpoint_manager(self.workdir / "probe" / "snapshots", None)

    def on_epoch_end(epoch, state, history) -> bool:
      if epoch in snapshots.all_steps():  # re-trained after a kill: replace the earlier copy
        snapshots.delete(epoch)
      snapshots.save(epoch, args=ocp.args.StandardSave(
          {"params": state.params, "batch_stats": state.batch_stats}), force=True)
      snapshots.wait_until_finished()
      if not c.probe.stop_at_convergence:
        return False
      losses = [h["train_loss"] for h in history]
      t_c = cqi.converged_epoch(cqi.cqi(losses, c.cqi.beta, c.cqi.window),
                                c.cqi.mu_rel * losses[0])
      return t_c is not None and t_c >= c.num_phases

    try:
      result = self.fit(job, self.workdir / "probe", "probe", on_epoch_end)
    finally:
      snapshots.close()
    result["losses"] = [h["train_loss"] for h in result["history"]]
    self.write_metrics(result, "probe")

  def cqi(self) -> None:
    """METHOD 2: CQI, the converged epoch and the K markers; prunes non-marker snapshots."""
    c = self.config
    losses = self.read_metrics("probe")["losses"]
    conv = cqi.analyse(losses, beta=c.cqi.beta, window=c.cqi.window, mu_rel=c.cqi.mu_rel,
                       k=c.num_phases)
    payload = cqi.to_json(conv, losses)
    if jax.process_index() == 0:
      report.atomic_write_json(self.workdir / "probe" / "cqi.json", payload)
    snapshots = trainer.checkpoint_manager(self.workdir / "probe" / "snapshots", None)
    for step in snapshots.all_steps():
      if step not in conv.markers:
        snapshots.delete(step)
    snapshots.close()
    self.write_metrics(payload, "cqi")

  def fmcs_data(self) -> None:
    """METHOD 3: feature maps of a fixed probe subset at every marker, labelled by phase."""
    c = self.config
    markers = json.loads((self.workdir / "probe" / "cqi.json").read_text())["markers"]
    out = self.workdir / "fmcs_data"
    n = min(c.fmcs.subset_size, c.probe.train_examples_limit or self.info.num_train)
    indices = input_pipeline.subset_indices(
        c.probe.train_examples_limit or self.info.num_train, n, seed=self.seeds[0])
    images = input_pipeline.load_arrays(self.info, split="train", indices=indices,
                                        tfds_data_dir=c.tfds_data_dir)["image"]
    model = models.create_backbone(c.backbone, self.info.num_classes, self.dtype,
                                   lowering=self.lowering)
    snapshots = trainer.checkpoint_manager(self.workdir / "probe" / "snapshots", None)
    start = time.perf_counter()
    try:
      for phase, epoch in enumerate(markers):
        if parallel.agree(fmcs_data.phase_done(out, phase)):  # all skip it, or none
          continue
        # fallback: the snapshot may come from other devices (a resumed run elsewhere).
        variables = snapshots.restore(epoch, args=ocp.args.StandardRestore(
            fallback_sharding=parallel.replicated(self.mesh)))
        features = fmcs_data.extract(model.apply, variables, images, module=self.module,
                                     preprocess=self.preprocess(), mesh=self.mesh,
                                     batch_size=c.eval_batch_size)
        if jax.process_index() == 0:
          fmcs_data.write_phase(out, phase, features, c.fmcs.storage_dtype)
    finally:
      snapshots.close()
    train_images, holdout_images = fmcs_data.split_images(n, c.fmcs.holdout_fraction,
                                                          seed=self.seeds[0])
    meta = {"num_phases": len(markers), "markers": markers, "module": self.module,
            "storage_dtype": c.fmcs.storage_dtype, "num_images": n,
            "image_indices": indices.tolist(), "train_images": train_images.tolist(),
            "holdout_images": holdout_images.tolist()}
    if jax.process_index() == 0:
      fmcs_data.write_index(out, meta)
    parallel.sync("fmcs_data:index")  # every process reads the phase files and index below
    source = fmcs_data.Source(out, "train")
    self.write_metrics({"feature_shape": list(source.feature_shape), "module": self.module,
                        "markers": markers, "num_images": n,
                        "train_rows": len(source),
                        "holdout_rows": len(fmcs_data.Source(out, "holdout")),
                        "seconds": time.perf_counter() - start}, "fmcs_data")

  def fmce_net(self) -> None:
    """METHOD 4: trains the FMCE-Net on the FMCS-Dataset; saves it for the frozen head."""
    result = fmce_net.train(self.config, self.workdir, self.mesh, self.loop)
    self.write_metrics(result, "fmce_net")

  def head(self) -> tuple[steps.Head, Any] | None:
    if not self.done("fmce_net"):
      return None
    return fmce_net.load_head(self.config, self.workdir, self.module, self.dtype)

  def paired(self, role: str) -> None:
    """METHOD 5-6: one run per seed; `fmcenetpp` trains with RAL through the frozen head."""
    c = self.config
    head = self.head()
    if role == "fmcenetpp" and head is None:
      raise FileNotFoundError(
          f"{self.workdir / 'fmce_net'} has no trained FMCE-Net: run the stages "
          "probe,cqi,fmcs_data,fmce_net first (or stages=all).")
    runs = {}
    for seed in self.seeds:
      run = f"seed_{seed}"
      if not self.done(role, run):
        job = self.backbone_job(seed=seed, epochs=c.epochs, limit=c.train_examples_limit,
                                eval_each_epoch=True, head=head,
                                train_with_head=role == "fmcenetpp", role=role)
        self.write_metrics(self.fit(job, self.workdir / role / run, f"{role} {run}"), role, run)
      runs[run] = self.read_metrics(role, run)
    accuracies = [runs[f"seed_{s}"]["test_accuracy"] for s in self.seeds]
    first = runs[f"seed_{self.seeds[0]}"]
    self.write_metrics({
        "seeds": self.seeds, "test_accuracy": sum(accuracies) / len(accuracies),
        "test_accuracy_per_seed": accuracies,
        "test_loss": sum(runs[r]["test_loss"] for r in runs) / len(runs),
        "epochs": first["epochs"],
        "images_per_second": sum(runs[r]["images_per_second"] or 0 for r in runs) / len(runs),
        "alpha": c.alpha if role == "fmcenetpp" else 0.0}, role)

  def report(self) -> None:
    c = self.config
    result = {}
    if jax.process_index() == 0:  # one writer of report.json/.md and the plots
      result = report.write_report(self.workdir, {
          "dataset": c.dataset, "backbone": c.backbone, "module": self.module, "alpha": c.alpha,
          "seeds": self.seeds, "note": self.info.note})
      self.log_report(result)
    self.write_metrics({k: result.get(k) for k in ("gain_pp_mean", "gain_pp_std")}, "report")

  def log_report(self, result: dict[str, Any]) -> None:
    """The CQI curve as scalars and the report plots as images, for TensorBoard users."""
    from tensorboardX import SummaryWriter
    cqi_json = json.loads((self.workdir / "probe" / "cqi.json").read_text())
    writer = SummaryWriter(str(self.workdir / "tb_report"))
    for epoch, (loss, value) in enumerate(zip(cqi_json["losses"], cqi_json["cqi"]), start=1):
      writer.add_scalar("probe/train_loss", loss, epoch)
      if value is not None:
        writer.add_scalar("probe/cqi", value, epoch)
    for name in result["plots"]:
      image = np.asarray(PIL.Image.open(self.workdir / name).convert("RGB"))
      writer.add_image(f"report/{Path(name).stem}", image, dataformats="HWC")
    writer.close()

  def run(self, stages: list[str]) -> None:
    for stage in stages:
      if parallel.any_process(trainer.PREEMPTED.is_set()):  # all stop, or none
        raise trainer.Preempted(f"SIGTERM received before stage {stage}; finished stages are "
                                "saved. Re-run the same command to resume.")
      if stage in ("baseline", "fmcenetpp"):
        if not self.done(stage):
          self.paired(stage)
        continue
      if self.done(stage):
        logging.info("stage %s: finished earlier, skipped", stage)
        continue
      logging.info("stage %s: starting", stage)
      start = time.perf_counter()
      getattr(self, stage)()
      logging.info("stage %s: done in %.1f s", stage, time.perf_counter() - start)


def check_workdir(config: ml_collections.ConfigDict, workdir: Path) -> None:
  """Refuses to mix results of two different configs in one workdir."""
  path = workdir / "config.json"
  current = {k: v for k, v in config.to_dict().items() if k not in config_lib.RUN_ONLY_FIELDS}
  if parallel.agree(path.exists()):
    saved = json.loads(path.read_text())
    diffs = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if diffs:
      raise config_lib.ConfigError(
          diffs[0], current.get(diffs[0]), f"{saved.get(diffs[0])!r}, the value the results in "
          f"{workdir} were made with", f"The workdir was made with another config (fields "
          f"differing: {', '.join(diffs)}); use a new --workdir.")
  else:
    if jax.process_index() == 0:
      workdir.mkdir(parents=True, exist_ok=True)
      report.atomic_write_json(path, current)
    parallel.sync("config.json")


def lock_workdir(workdir: Path):
  """Holds an exclusive lock on the workdir for this process's life (process 0 of a job).

  A second run on the same workdir would interleave checkpoints; it is refused instead. The
  kernel drops the lock when the process dies, so a killed run never leaves a stale lock.
  """
  handle, owner = None, ""
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    handle = open(workdir / ".lock", "a+")
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      handle.seek(0)
      owner = handle.read().strip() or "another process"
      handle.close()
  if parallel.agree(bool(owner)):  # every process fails, or none waits for a dead process 0
    raise config_lib.ConfigError(
        "workdir", str(workdir), "a workdir no other fmcejax run is using",
        f"It is in use by {owner or 'another run'}; wait for that run to finish or use another "
        "--workdir.")
  if handle is None:
    return None
  handle.seek(0)
  handle.truncate()
  handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
  handle.flush()
  return handle


def _fail(message: str) -> int:
  print(f"fmcejax: error: {message}", file=sys.stderr)
  return EXIT_BAD_INPUT


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv if argv is None else argv
  try:
    # Defined here, not at import: config_flags reads the overrides while defining the flag,
    # and an unknown field must become our exit status 2, not a traceback.
    config_flag = config_flags.DEFINE_config_file(
        "config", str(_DEFAULT_CONFIG), "Python config file (ml_collections).",
        lock_config=True)
    workdir_flag = flags.DEFINE_string("workdir", "./workdir", "Where results go.")
    flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
    return _fail(f"bad command line: {e}. Usage: python -m fmcejax.train [--config FILE] "
                 "[--workdir DIR] [--config.FIELD=VALUE ...]")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  parallel.initialize_distributed()
  config = config_flag.value
  workdir = Path(workdir_flag.value)
  try:
    config_lib.validate(config, device_count=jax.device_count(),
                        process_count=jax.process_count())
    lock = lock_workdir(workdir)  # noqa: F841 - held until exit
    check_workdir(config, workdir)
    pipeline = Pipeline(config, workdir)
  except (config_lib.ConfigError, input_pipeline.DataError) as e:
    return _fail(str(e))
  signal.signal(signal.SIGTERM, trainer.request_preemption)
  try:
    pipeline.run(config_lib.parse_stages(config.stages))
  except trainer.Preempted as e:
    print(f"fmcejax: {e}", file=sys.stderr)
    return 0
  print(f"fmcejax: done; results in {workdir.resolve()}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
