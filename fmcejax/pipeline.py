"""The stages of FMCE-Net++ over one workdir: probe -> CQI -> FMCS-Dataset -> FMCE-Net ->
baseline / FMCE-Net++ per seed -> report.

Each stage is a short call into the module that owns its concept, and writes
`<workdir>/<stage>/metrics.json` when it finishes; a finished stage is skipped on a re-run and an
interrupted one resumes from its last checkpoint. The building blocks (`build_fmcs`,
`train_fmce_net`, `frozen_head`, `backbone_run`) take their directories as arguments, so a study
(`fmcejax.study`) runs the same stages for many arms in one workdir.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from fmcejax import (
  checkpointing,
  config_lib,
  cpu_lowering,
  cqi,
  datasets,
  device_input,
  fmce_net,
  fmcs_data,
  input_pipeline,
  models,
  parallel,
  report,
  steps,
  trainer,
  workdir,
)


class Pipeline:
  """The stages of one workdir; each is skipped when its metrics.json exists."""

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    root: epath.PathLike,
    mesh: jax.sharding.Mesh | None = None,
    info: datasets.DatasetInfo | None = None,
  ):
    """`mesh` defaults to every device; `info` to the prepared dataset. Preflight passes a
    target's devices and the catalogue's entry, to build the same programs without data."""
    self.config, self.root = config, epath.Path(root)
    self.mesh = mesh or parallel.make_mesh()
    self.lowering = cpu_lowering.for_platform(parallel.platform(self.mesh))
    self.seeds = config_lib.parse_seeds(config.seeds)
    self.info = info or parallel.primary_first(
      "prepare",
      lambda: datasets.prepare(
        config.dataset,
        config.data_dir,
        config.tfds_data_dir,
        config.download,
        datasets.Fields.from_config(config),
      ),
    )
    self.module = config.module or config_lib.module_names(config, self.info)[-1]
    self.dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
    self.loop = trainer.LoopOptions(
      log_every=config.log_every,
      checkpoint_every_steps=config.checkpoint_every_steps,
      keep_checkpoints=config.keep_checkpoints,
      nan_policy=config.nan_policy,
      progress_bar=config.progress_bar,
      steps_per_dispatch=config.steps_per_dispatch,
    )
    self.input_workers = config_lib.parse_input_workers(
      config.input_workers, parallel.platform(self.mesh), os.cpu_count() or 1
    )

  # -- files of the workdir --------------------------------------------------------------------

  def done(self, *parts: str) -> bool:
    # Process 0 decides: every process must take the same branch.
    return parallel.agree(self.root.joinpath(*parts, "metrics.json").exists())

  def write_metrics(self, metrics: dict[str, Any], *parts: str) -> None:
    parallel.primary_writes(
      "metrics:" + "/".join(parts),
      lambda: workdir.write_json(self.root.joinpath(*parts, "metrics.json"), metrics),
    )

  def read_metrics(self, *parts: str) -> dict[str, Any]:
    p = self.root.joinpath(*parts, "metrics.json")
    if not p.exists():
      raise FileNotFoundError(f"{p} is missing: run the stage '{parts[0]}' first.")
    return workdir.read_json(p)

  # -- building blocks -------------------------------------------------------------------------

  def preprocess(self):
    info, dtype = self.info, self.dtype
    return lambda images: steps.normalize(images, info.mean, info.std, dtype)

  def backbone_job(
    self,
    *,
    seed: int,
    epochs: int,
    limit: int,
    eval_each_epoch: bool,
    role: str,
    head: tuple[steps.Head, Any] | None = None,
    train_with_head: bool = False,
    config: ml_collections.ConfigDict | None = None,
  ) -> trainer.Job:
    """A backbone training run with the config's recipe; baseline and RAL differ only in head
    (and in `config`'s RAL fields, for a study's arms)."""
    c = config or self.config
    on_device = device_input.use_device_input(c.input_on_device, self.info, limit)
    if c.steps_per_dispatch > 1 and not on_device:
      logging.warning(
        "%s: the training split is too large for the devices; one step per dispatch, not %d",
        role,
        c.steps_per_dispatch,
      )
    spe = input_pipeline.steps_per_epoch(self.info, c.batch_size, limit)
    recipe = self.recipe(c, spe, epochs)
    return trainer.Job(
      **recipe,
      preprocess=self.preprocess(),
      input_shape=self.info.image_shape,
      train_data=self.train_batches(
        seed=seed, epochs=epochs, limit=limit, on_device=on_device, config=c
      ),
      steps_per_epoch=spe,
      epochs=epochs,
      global_batch=c.batch_size,
      seed=seed,
      identity={
        "role": role,
        "dataset": c.dataset,
        "backbone": c.backbone,
        "seed": seed,
        "epochs": epochs,
        "batch_size": c.batch_size,
        "limit": limit,
        "alpha": c.alpha if train_with_head else 0.0,
        "input": "device" if on_device else "host",
      },
      eval_data=input_pipeline.examples(self.info, "test", c.test_examples_limit, c.tfds_data_dir),
      eval_batch_size=c.eval_batch_size,
      eval_each_epoch=eval_each_epoch,
      head=head[0] if head else None,
      head_variables=head[1] if head else None,
      train_with_head=train_with_head,
    )

  def recipe(self, c: ml_collections.ConfigDict, spe: int, epochs: int) -> dict[str, Any]:
    """The model, optimizer, learning rate and loss of a backbone run of `epochs` x `spe` steps
    (what `trainer.Job` takes besides data): one home for train and preflight."""
    lr = steps.learning_rate_schedule(
      c.learning_rate, c.lr_schedule, int(c.warmup_epochs * spe), spe * epochs
    )
    return {
      "model": models.create_backbone(
        c.backbone, self.info.num_classes, self.dtype, lowering=self.lowering
      ),
      "tx": steps.create_optimizer(
        c.optimizer, lr, weight_decay=c.weight_decay, momentum=c.momentum, nesterov=c.nesterov
      ),
      "learning_rate": lr,
      "loss": steps.Loss(
        alpha=steps.alpha_schedule(c.alpha, c.alpha_schedule, spe * epochs),
        mode=c.ral,
        target=c.ral_target,
      ),
    }

  def train_batches(
    self, *, seed: int, epochs: int, limit: int, on_device: bool, config: ml_collections.ConfigDict
  ) -> trainer.Batches:
    """The training split's batches: held and augmented on the devices, or made by grain."""
    augment = {"auto": None, "on": True, "off": False}[config.augment]
    if on_device:
      return device_input.train_batches(
        self.info,
        global_batch=config.batch_size,
        epochs=epochs,
        seed=seed,
        mesh=self.mesh,
        limit=limit,
        augment=augment,
        tfds_data_dir=config.tfds_data_dir,
      )
    ds = input_pipeline.train_dataset(
      self.info,
      global_batch=config.batch_size,
      epochs=epochs,
      seed=seed,
      limit=limit,
      augment=augment,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      tfds_data_dir=config.tfds_data_dir,
    )
    return input_pipeline.HostBatches(ds, self.mesh, self.input_workers)

  def fit(
    self,
    job: trainer.Job,
    run_dir: epath.Path,
    description: str,
    hook: trainer.EpochHook | None = None,
  ) -> dict[str, Any]:
    options = trainer.LoopOptions(**{**vars(self.loop), "description": description})
    result = trainer.fit(job, run_dir, self.mesh, options, on_epoch_end=hook)
    result.pop("state")
    return result

  def snapshots(self) -> checkpointing.Snapshots:
    return checkpointing.Snapshots(self.root / "probe" / "snapshots")

  def build_fmcs(self, module: str, out: epath.Path) -> dict[str, Any]:
    """METHOD 3: feature maps of `module` for a fixed probe subset at every marker."""
    c, info = self.config, self.info
    markers = workdir.read_json(self.root / "probe" / "cqi.json")["markers"]
    pool = input_pipeline.num_examples(info, "train", c.probe.train_examples_limit)
    indices = input_pipeline.subset_indices(pool, c.fmcs.subset_size, seed=self.seeds[0])
    images = input_pipeline.load_arrays(
      info, split="train", indices=indices, tfds_data_dir=c.tfds_data_dir
    )["image"]
    model = models.create_backbone(c.backbone, info.num_classes, self.dtype, lowering=self.lowering)
    with self.snapshots() as snapshots:
      return fmcs_data.build(
        out,
        markers=markers,
        restore=lambda epoch: snapshots.restore(epoch, self.mesh),
        apply_fn=model.apply,
        images=images,
        image_indices=indices,
        module=module,
        preprocess=self.preprocess(),
        mesh=self.mesh,
        batch_size=c.eval_batch_size,
        storage_dtype=c.fmcs.storage_dtype,
        holdout_fraction=c.fmcs.holdout_fraction,
        seed=self.seeds[0],
      )

  def train_fmce_net(
    self, data_dir: epath.Path, out: epath.Path, labels: str = "phase"
  ) -> dict[str, Any]:
    """METHOD 4: the FMCE-Net on the FMCS-Dataset in `data_dir`, saved for the frozen head."""
    return fmce_net.train(
      self.config, data_dir, out, self.mesh, self.loop, seed=self.seeds[0], labels=labels
    )

  def frozen_head(
    self, module: str, data_dir: epath.Path, trained: epath.Path | None
  ) -> tuple[steps.Head, Any]:
    return fmce_net.head(
      self.config, data_dir, trained, module, self.dtype, self.mesh, seed=self.seeds[0]
    )

  def backbone_run(
    self,
    run_dir: epath.Path,
    *,
    seed: int,
    role: str,
    head: tuple[steps.Head, Any] | None,
    train_with_head: bool,
    config: ml_collections.ConfigDict | None = None,
  ) -> dict[str, Any]:
    """METHOD 5-6: one seed's run of the backbone (RAL through `head` if `train_with_head`);
    skipped when `run_dir` holds its metrics."""
    run = run_dir.relative_to(self.root).parts
    if not self.done(*run):
      c = config or self.config
      job = self.backbone_job(
        seed=seed,
        epochs=c.epochs,
        limit=c.train_examples_limit,
        eval_each_epoch=True,
        role=role,
        head=head,
        train_with_head=train_with_head,
        config=c,
      )
      self.write_metrics(self.fit(job, run_dir, " ".join(run)), *run)
    return self.read_metrics(*run)

  # -- the stages of `python -m fmcejax.train` -------------------------------------------------

  def probe(self) -> None:
    """METHOD 1: plain CE training that records per-epoch losses and a snapshot per epoch."""
    c = self.config
    job = self.backbone_job(
      seed=self.seeds[0],
      epochs=c.probe.epochs,
      role="probe",
      limit=c.probe.train_examples_limit,
      eval_each_epoch=False,
    )

    def on_epoch_end(epoch, state, history) -> bool:
      snapshots.save(epoch, state)
      losses = [h["train_loss"] for h in history]
      return c.probe.stop_at_convergence and cqi.converged_past(
        losses, beta=c.cqi.beta, window=c.cqi.window, mu_rel=c.cqi.mu_rel, k=c.num_phases
      )

    with self.snapshots() as snapshots:
      result = self.fit(job, self.root / "probe", "probe", on_epoch_end)
    result["losses"] = [h["train_loss"] for h in result["history"]]
    self.write_metrics(result, "probe")

  def cqi(self) -> None:
    """METHOD 2: CQI, the converged epoch and the K markers; prunes non-marker snapshots."""
    c = self.config
    losses = self.read_metrics("probe")["losses"]
    payload = cqi.to_json(
      cqi.analyse(
        losses, beta=c.cqi.beta, window=c.cqi.window, mu_rel=c.cqi.mu_rel, k=c.num_phases
      ),
      losses,
    )
    parallel.primary_writes(
      "cqi.json", lambda: workdir.write_json(self.root / "probe" / "cqi.json", payload)
    )
    with self.snapshots() as snapshots:
      snapshots.keep_only(payload["markers"])
    self.write_metrics(payload, "cqi")

  def fmcs_data(self) -> None:
    self.write_metrics(self.build_fmcs(self.module, self.root / "fmcs_data"), "fmcs_data")

  def fmce_net(self) -> None:
    self.write_metrics(
      self.train_fmce_net(self.root / "fmcs_data", self.root / "fmce_net"), "fmce_net"
    )

  def paired(self, role: str) -> None:
    """One run per seed; `fmcenetpp` trains with RAL through the frozen head, the baseline
    only reports the head's FMCS (when it exists)."""
    head = None
    if self.done("fmce_net"):
      head = self.frozen_head(self.module, self.root / "fmcs_data", self.root / "fmce_net")
    elif role == "fmcenetpp":
      raise FileNotFoundError(
        f"{self.root / 'fmce_net'} has no trained FMCE-Net: run the stages "
        "probe,cqi,fmcs_data,fmce_net first (or stages=all)."
      )
    runs = [
      self.backbone_run(
        self.root / role / f"seed_{seed}",
        seed=seed,
        role=role,
        head=head,
        train_with_head=role == "fmcenetpp",
      )
      for seed in self.seeds
    ]
    self.write_metrics(
      report.summarise_runs(runs, self.seeds, self.config.alpha if role == "fmcenetpp" else 0.0),
      role,
    )

  def report(self) -> None:
    c = self.config
    result = {}

    def write() -> None:
      result.update(
        report.write_report(
          self.root,
          {
            "dataset": c.dataset,
            "backbone": c.backbone,
            "module": self.module,
            "alpha": c.alpha,
            "seeds": self.seeds,
            "note": self.info.note,
            "data": report.data_summary(self.info),
          },
        )
      )
      report.log_tensorboard(self.root, result)

    parallel.primary_writes("report", write)
    self.write_metrics({k: result.get(k) for k in ("gain_pp_mean", "gain_pp_std")}, "report")

  def run(self, stages: list[str]) -> None:
    for stage in stages:
      if parallel.any_process(trainer.PREEMPTED.is_set()):  # all stop, or none
        raise trainer.Preempted(
          f"{trainer.preemption_signal()} received before stage {stage}; finished stages are "
          "saved. Re-run the same command to resume."
        )
      if self.done(stage):
        logging.info("stage %s: finished earlier, skipped", stage)
        continue
      logging.info("stage %s: starting", stage)
      start = time.perf_counter()
      if stage in ("baseline", "fmcenetpp"):
        self.paired(stage)
      else:
        getattr(self, stage)()
      logging.info("stage %s: done in %.1f s", stage, time.perf_counter() - start)
