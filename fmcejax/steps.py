"""The train and eval steps: one pure function serves the baseline and FMCE-Net++.

The baseline step is `train_step` without a head; FMCE-Net++ passes the frozen FMCE-Net as `head`
and its variables as an argument (never in the optimizer state), and the Representation Auxiliary
Loss (RAL) back-propagates *through* the head into the backbone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

Metrics = dict[str, jax.Array]


class TrainState(train_state.TrainState):
  batch_stats: Any


@dataclasses.dataclass(frozen=True)
class Head:
  """A frozen FMCE-Net reading the backbone's `module` feature map (BatchNorm in inference mode)."""

  model: nn.Module
  module: str


@dataclasses.dataclass(frozen=True)
class Loss:
  """RAL = (1 - a) CE + a L_conv (convex) or CE + a L_conv (additive), a = alpha(step)."""

  alpha: Callable[[jax.Array], jax.Array] = optax.constant_schedule(0.0)
  mode: str = "convex"
  target: str = "phase"


def fmcs_scores(num_phases: int) -> np.ndarray:
  """FMCS of phase k (0-based) is k / (K - 1): 0 for the first marker, 1 for the converged one.

  A numpy constant, not `jnp.linspace`: an iota made inside the program and fused with the
  softmax, the dot and a batch mean does not compile for NVIDIA GPUs with jax 0.10.2 (an
  `scf.if` type mismatch in XLA's Triton emitter; docs/BENCHMARKS.md). Same values.
  """
  if num_phases < 2:
    raise ValueError(f"FMCS scores need K >= 2 phases, got {num_phases}")
  return np.linspace(0.0, 1.0, num_phases, dtype=np.float32)


def predicted_fmcs(head_logits: jax.Array) -> jax.Array:
  """Expected FMCS under the head's phase distribution, per example."""
  probs = jax.nn.softmax(head_logits.astype(jnp.float32), axis=-1)
  return probs @ fmcs_scores(head_logits.shape[-1])


def convergence_loss(head_logits: jax.Array, target: str) -> jax.Array:
  """L_conv: pull the feature maps toward the most-converged phase (K - 1)."""
  if target == "phase":
    last = jnp.full(head_logits.shape[:1], head_logits.shape[-1] - 1)
    return optax.softmax_cross_entropy_with_integer_labels(
      head_logits.astype(jnp.float32), last
    ).mean()
  return jnp.mean(jnp.square(1.0 - predicted_fmcs(head_logits)))


def ral_loss(
  logits: jax.Array, labels: jax.Array, head_logits: jax.Array | None, alpha: jax.Array, loss: Loss
) -> tuple[jax.Array, Metrics]:
  """The RAL value and its parts; plain cross-entropy when there is no head."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  if head_logits is None:
    return ce, {"ce": ce}
  conv = convergence_loss(head_logits, loss.target)
  total = ((1.0 - alpha) * ce if loss.mode == "convex" else ce) + alpha * conv
  return total, {"ce": ce, "conv": conv, "fmcs": predicted_fmcs(head_logits).mean()}


def normalize(
  images: jax.Array, mean: tuple[float, ...], std: tuple[float, ...], dtype: Any = jnp.float32
) -> jax.Array:
  """uint8 pixels -> per-channel standardised floats, on device (keeps host->device bytes low)."""
  x = images.astype(jnp.float32) / 255.0
  return ((x - jnp.asarray(mean)) / jnp.asarray(std)).astype(dtype)


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  rng: jax.Array,
  head_variables: Any = None,
  *,
  preprocess: Callable[[jax.Array], jax.Array],
  head: Head | None = None,
  loss: Loss = Loss(),
) -> tuple[TrainState, Metrics]:
  """One optimizer step on a global batch. Non-finite updates are skipped and counted.

  `rng` is the run's key; the step draws from `fold_in(rng, state.step)`, inside the program (an
  eager fold_in per step would cost the host a dispatch).
  """
  rng = jax.random.fold_in(rng, state.step)
  x = preprocess(batch["image"])
  alpha = loss.alpha(state.step) if head is not None else jnp.zeros(())

  def loss_fn(params):
    (logits, features), updates = state.apply_fn(
      {"params": params, "batch_stats": state.batch_stats},
      x,
      train=True,
      mutable=["batch_stats"],
      rngs={"dropout": rng},
    )
    head_logits = None
    if head is not None:
      head_logits = head.model.apply(head_variables, features[head.module], train=False)
    value, parts = ral_loss(logits, batch["label"], head_logits, alpha, loss)
    return value, (parts, logits, updates["batch_stats"])

  (value, (parts, logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
    state.params
  )
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  finite = jnp.isfinite(value) & jnp.all(
    jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
  )
  keep_old = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
  new_state = new_state.replace(
    params=jax.tree.map(keep_old, new_state.params, state.params),
    opt_state=jax.tree.map(keep_old, new_state.opt_state, state.opt_state),
    batch_stats=jax.tree.map(keep_old, new_state.batch_stats, state.batch_stats),
  )
  metrics = {
    "loss": value,
    "alpha": alpha,
    "nonfinite": 1 - finite.astype(jnp.int32),
    "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
    **parts,
  }
  return new_state, metrics


def eval_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  head_variables: Any = None,
  *,
  preprocess: Callable[[jax.Array], jax.Array],
  head: Head | None = None,
) -> Metrics:
  """Masked sums over a global eval batch (padding rows have mask 0)."""
  logits, features = state.apply_fn(
    {"params": state.params, "batch_stats": state.batch_stats},
    preprocess(batch["image"]),
    train=False,
  )
  mask = batch["mask"]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  sums = {
    "count": mask.sum(),
    "loss": (ce * mask).sum(),
    "correct": ((jnp.argmax(logits, -1) == batch["label"]) * mask).sum(),
  }
  if head is not None:
    head_logits = head.model.apply(head_variables, features[head.module], train=False)
    sums["fmcs"] = (predicted_fmcs(head_logits) * mask).sum()
  return sums


def _kernels(params: Any) -> Any:
  """Weight decay applies to conv/dense kernels only, not to biases or BatchNorm scales."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def learning_rate_schedule(
  lr: float, kind: str, warmup_steps: int, total_steps: int
) -> optax.Schedule:
  """Linear warm-up from 0, then cosine decay to 0 or constant."""
  warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
  if kind == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, max(total_steps, 1))
  return optax.join_schedules(
    [optax.linear_schedule(0.0, lr, warmup_steps), optax.constant_schedule(lr)], [warmup_steps]
  )


def create_optimizer(
  name: str,
  schedule: optax.Schedule,
  *,
  weight_decay: float,
  momentum: float = 0.9,
  nesterov: bool = True,
) -> optax.GradientTransformation:
  """SGD (momentum, nesterov) or AdamW, weight decay on kernels only."""
  if name == "adamw":
    return optax.adamw(schedule, weight_decay=weight_decay, mask=_kernels)
  return optax.chain(
    optax.add_decayed_weights(weight_decay, mask=_kernels),
    optax.sgd(schedule, momentum=momentum or None, nesterov=nesterov),
  )


def alpha_schedule(alpha: float, kind: str, total_steps: int) -> optax.Schedule:
  """alpha as a function of the step: constant, ramped up linearly, or cosine-decayed."""
  if kind == "linear":
    return optax.linear_schedule(0.0, alpha, max(total_steps, 1))
  if kind == "cosine":
    return optax.cosine_decay_schedule(alpha, max(total_steps, 1))
  return optax.constant_schedule(alpha)


def create_train_state(
  model: nn.Module, tx: optax.GradientTransformation, input_shape: tuple[int, ...], rng: jax.Array
) -> TrainState:
  """Initialises parameters (float32) and optimizer state; jit this with replicated outputs.

  The `params` stream is `rng` itself; a `dropout` stream is there too, since an NNX module
  (`nnx.Dropout(rate, rngs=rngs)`) takes its stream when it is built, and Linen draws each
  stream apart, so it changes no parameter.
  """
  rngs = {"params": rng, "dropout": jax.random.fold_in(rng, 1)}
  variables = model.init(rngs, jnp.zeros((1, *input_shape), jnp.float32), train=False)
  return TrainState.create(
    apply_fn=model.apply,
    params=variables["params"],
    tx=tx,
    batch_stats=variables.get("batch_stats", {}),
  )
