"""FMCE-Net training on the FMCS-Dataset (METHOD 4) and loading it back as a frozen head.

Training reuses the backbone loop (`trainer.fit`, the same train step with no head): an FMCE-Net
is a classifier of feature maps into phases. Its own recipe: AdamW, cosine, `config.fmce_net.*`.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from fmcejax import (config_lib, cpu_lowering, fmcs_data, input_pipeline, models, parallel, steps,
                     trainer)


class _PhaseClassifier(nn.Module):
  """Adapts FMCENet to the backbone interface `(logits, features)` the train step expects."""
  net: models.FMCENet

  def __call__(self, x, train: bool):
    return self.net(x, train=train), {}


def _head_model(config: ml_collections.ConfigDict, num_phases: int, dtype: Any,
                mesh: Mesh) -> models.FMCENet:
  return models.FMCENet(num_phases=num_phases, width=config.fmce_net.width,
                        depth=config.fmce_net.depth, dtype=dtype,
                        lowering=cpu_lowering.for_platform(parallel.platform(mesh)))


def _as_float(x: jax.Array) -> jax.Array:
  return x.astype(jnp.float32)


def train(config: ml_collections.ConfigDict, workdir: Path, mesh: Mesh,
          loop: trainer.LoopOptions) -> dict[str, Any]:
  """Trains the FMCE-Net, evaluates it on held-out images, saves `fmce_net/head`."""
  c = config.fmce_net
  data_dir = workdir / "fmcs_data"
  train_source = fmcs_data.Source(data_dir, "train")
  holdout = fmcs_data.dataset(data_dir, "holdout")
  k = train_source.num_phases
  seed = config_lib.parse_seeds(config.seeds)[0]
  pidx, pcount = jax.process_index(), jax.process_count()
  spe = input_pipeline.steps_per_epoch(len(train_source), c.batch_size)
  lr = steps.learning_rate_schedule(c.learning_rate, "cosine", spe // 2, spe * c.epochs)
  tx = steps.create_optimizer("adamw", lr, weight_decay=c.weight_decay)
  eval_batch = c.batch_size
  job = trainer.Job(
      model=_PhaseClassifier(_head_model(config, k, jnp.float32, mesh)), preprocess=_as_float,
      input_shape=train_source.feature_shape,
      train_data=input_pipeline.epoch_batches(
          fmcs_data.dataset(data_dir, "train"), global_batch=c.batch_size, epochs=c.epochs,
          seed=seed, process_index=pidx, process_count=pcount),
      steps_per_epoch=spe, epochs=c.epochs, global_batch=c.batch_size, tx=tx,
      learning_rate=lr, seed=seed,
      identity={"role": "fmce_net", "num_phases": k, "width": c.width, "depth": c.depth,
                "epochs": c.epochs, "batch_size": c.batch_size},
      eval_data=lambda: input_pipeline.padded_batches(
          holdout, global_batch=eval_batch, process_index=pidx, process_count=pcount),
      eval_each_epoch=True)
  result = trainer.fit(job, workdir / "fmce_net" / "run", mesh,
                       dataclasses.replace(loop, description="fmce_net"))
  state = result.pop("state")
  variables = {"params": state.params["net"], "batch_stats": state.batch_stats["net"]}
  result.update(evaluate(_head_model(config, k, jnp.float32, mesh), variables, holdout, mesh,
                         eval_batch))
  ckpt = ocp.StandardCheckpointer()
  ckpt.save((workdir / "fmce_net" / "head").absolute(), variables, force=True)
  ckpt.wait_until_finished()
  result.update({"num_phases": k, "feature_shape": list(train_source.feature_shape),
                 "train_rows": len(train_source), "holdout_rows": len(holdout)})
  return result


def evaluate(model: models.FMCENet, variables: Any, holdout, mesh: Mesh,
             global_batch: int) -> dict[str, Any]:
  """Phase accuracy, FMCS mean absolute error and the confusion matrix on held-out images."""
  k = model.num_phases
  repl = parallel.replicated(mesh)

  @functools.partial(jax.jit, in_shardings=(repl, parallel.batch_sharding(mesh)),
                     out_shardings=repl, compiler_options=parallel.compiler_options(mesh))
  def sums(v, batch):
    logits = model.apply(v, batch["image"].astype(jnp.float32), train=False)
    mask = batch["mask"]
    pred = jnp.argmax(logits, -1)
    err = jnp.abs(steps.predicted_fmcs(logits) - steps.fmcs_scores(k)[batch["label"]])
    onehot = jax.nn.one_hot(batch["label"], k) * mask[:, None]
    return {"confusion": onehot.T @ jax.nn.one_hot(pred, k), "abs_err": (err * mask).sum(),
            "count": mask.sum()}

  variables = parallel.replicate(variables, mesh)
  total = None
  for local in input_pipeline.padded_batches(holdout, global_batch=global_batch,
                                             process_index=jax.process_index(),
                                             process_count=jax.process_count()):
    out = sums(variables, parallel.global_batch(local, mesh))
    total = out if total is None else jax.tree.map(jnp.add, total, out)
  total = jax.device_get(total)
  confusion = np.rint(total["confusion"]).astype(int)
  return {"phase_accuracy": float(np.trace(confusion) / confusion.sum()),
          "fmcs_mae": float(total["abs_err"] / total["count"]),
          "confusion": confusion.tolist()}


def load_head(config: ml_collections.ConfigDict, workdir: Path, module: str,
              dtype: Any) -> tuple[steps.Head, Any]:
  """The trained FMCE-Net as a frozen head: its module and its variables (never optimised)."""
  meta = fmcs_data.Source(workdir / "fmcs_data", "holdout")
  mesh = parallel.make_mesh()
  model = _head_model(config, meta.num_phases, dtype, mesh)
  # Replicated over this job's devices, whatever devices saved it (another machine, host count).
  sharding = parallel.replicated(mesh)
  abstract = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
      jax.eval_shape(lambda: model.init(
          jax.random.PRNGKey(0), jnp.zeros((1, *meta.feature_shape)), train=False)))
  variables = ocp.StandardCheckpointer().restore(
      (workdir / "fmce_net" / "head").absolute(), abstract)
  return steps.Head(model=model, module=module), variables
