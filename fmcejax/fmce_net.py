"""FMCE-Net training on the FMCS-Dataset (METHOD 4) and loading it back as a frozen head.

Training reuses the backbone loop (`trainer.fit`, the same train step with no head): an FMCE-Net
is a classifier of feature maps into phases. Its own recipe: AdamW, cosine, `config.fmce_net.*`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh

from fmcejax import (
  cpu_lowering,
  evaluation,
  fmcs_data,
  input_pipeline,
  models,
  parallel,
  steps,
  trainer,
)

HEADS = ("trained", "shuffled", "random")  # a study's head kinds; see `head`


class _PhaseClassifier(nn.Module):
  """Adapts FMCENet to the backbone interface `(logits, features)` the train step expects."""

  net: models.FMCENet

  def __call__(self, x, train: bool):
    return self.net(x, train=train), {}


def head_model(
  config: ml_collections.ConfigDict, num_phases: int, dtype: Any, mesh: Mesh
) -> models.FMCENet:
  return models.FMCENet(
    num_phases=num_phases,
    width=config.fmce_net.width,
    depth=config.fmce_net.depth,
    dtype=dtype,
    lowering=cpu_lowering.for_platform(parallel.platform(mesh)),
  )


def _as_float(x: jax.Array) -> jax.Array:
  return x.astype(jnp.float32)


def recipe(config: ml_collections.ConfigDict, num_phases: int, mesh: Mesh, spe: int) -> dict:
  """The FMCE-Net run's model, preprocessing, optimizer and learning rate (`trainer.Job`'s
  fields besides data), for `spe` steps per epoch: one home for training and preflight."""
  c = config.fmce_net
  lr = steps.learning_rate_schedule(c.learning_rate, "cosine", spe // 2, spe * c.epochs)
  return {
    "model": _PhaseClassifier(head_model(config, num_phases, jnp.float32, mesh)),
    "preprocess": _as_float,
    "tx": steps.create_optimizer("adamw", lr, weight_decay=c.weight_decay),
    "learning_rate": lr,
  }


def train(
  config: ml_collections.ConfigDict,
  data_dir: epath.Path,
  out: epath.Path,
  mesh: Mesh,
  loop: trainer.LoopOptions,
  *,
  seed: int,
  labels: str = "phase",
) -> dict[str, Any]:
  """Trains the FMCE-Net on the FMCS-Dataset in `data_dir` (its phase labels, or shuffled ones),
  evaluates it on held-out images with their true phases, saves `out/head`."""
  c = config.fmce_net
  train_source = fmcs_data.Source(data_dir, "train", labels)
  holdout = fmcs_data.dataset(data_dir, "holdout")
  k = train_source.num_phases
  spe = input_pipeline.steps_per_epoch(len(train_source), c.batch_size)
  batches = input_pipeline.epoch_batches(
    fmcs_data.dataset(data_dir, "train", labels),
    global_batch=c.batch_size,
    epochs=c.epochs,
    seed=seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  job = trainer.Job(
    **recipe(config, k, mesh, spe),
    input_shape=train_source.feature_shape,
    train_data=input_pipeline.HostBatches(batches, mesh),
    steps_per_epoch=spe,
    epochs=c.epochs,
    global_batch=c.batch_size,
    seed=seed,
    identity={
      "role": "fmce_net",
      "num_phases": k,
      "width": c.width,
      "depth": c.depth,
      "epochs": c.epochs,
      "batch_size": c.batch_size,
    },
    eval_data=holdout,
    eval_batch_size=c.batch_size,
  )
  result = trainer.fit(job, out / "run", mesh, dataclasses.replace(loop, description="fmce_net"))
  state = result.pop("state")
  variables = {"params": state.params["net"], "batch_stats": state.batch_stats["net"]}
  result.update(
    evaluate(head_model(config, k, jnp.float32, mesh), variables, holdout, mesh, c.batch_size)
  )
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(out.absolute() / "head", variables, force=True)
  ckpt.wait_until_finished()
  result.update(
    {
      "num_phases": k,
      "labels": labels,
      "feature_shape": list(train_source.feature_shape),
      "train_rows": len(train_source),
      "holdout_rows": len(holdout),
    }
  )
  return result


def evaluate(
  model: models.FMCENet, variables: Any, holdout, mesh: Mesh, global_batch: int
) -> dict[str, Any]:
  """Phase accuracy, FMCS mean absolute error and the confusion matrix on held-out images, and
  the mean probability of the true phase: 1/K for a head that knows nothing, whatever its argmax
  happens to favour."""
  k = model.num_phases

  def sums(v, batch):
    logits = model.apply(v, batch["image"].astype(jnp.float32), train=False)
    mask = batch["mask"]
    pred = jnp.argmax(logits, -1)
    err = jnp.abs(steps.predicted_fmcs(logits) - jnp.asarray(steps.fmcs_scores(k))[batch["label"]])
    onehot = jax.nn.one_hot(batch["label"], k) * mask[:, None]
    return {
      "confusion": onehot.T @ jax.nn.one_hot(pred, k),
      "abs_err": (err * mask).sum(),
      "true_prob": (jax.nn.softmax(logits) * onehot).sum(),
      "count": mask.sum(),
    }

  total = evaluation.over_dataset(
    evaluation.jit(sums, mesh),
    parallel.replicate(variables, mesh),
    holdout,
    mesh,
    global_batch=global_batch,
  )
  confusion = np.rint(total["confusion"]).astype(int)
  return {
    "phase_accuracy": float(np.trace(confusion) / confusion.sum()),
    "fmcs_mae": float(total["abs_err"] / total["count"]),
    "phase_probability": float(total["true_prob"] / total["count"]),
    "confusion": confusion.tolist(),
  }


def head(
  config: ml_collections.ConfigDict,
  data_dir: epath.Path,
  trained: epath.Path | None,
  module: str,
  dtype: Any,
  mesh: Mesh,
  seed: int = 0,
) -> tuple[steps.Head, Any]:
  """A frozen head on `module`: the FMCE-Net saved in `trained/head`, or with `trained=None` an
  untrained one initialised from `seed` (a study's `random` control). Its variables are
  replicated over `mesh`, whatever devices saved them, and never optimised."""
  meta = fmcs_data.Source(data_dir, "holdout")
  model = head_model(config, meta.num_phases, dtype, mesh)
  init = lambda: model.init(
    jax.random.PRNGKey(seed),
    jnp.zeros((1, *meta.feature_shape)),  # noqa: E731
    train=False,
  )
  if trained is None:
    return steps.Head(model=model, module=module), jax.device_get(init())
  sharding = parallel.replicated(mesh)
  abstract = jax.tree.map(
    lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), jax.eval_shape(init)
  )
  variables = ocp.StandardCheckpointer().restore(trained.absolute() / "head", abstract)
  return steps.Head(model=model, module=module), variables
