"""The train step: learning, RAL semantics, the frozen head, non-finite guards, data parallelism."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fmcejax import models, parallel, steps

SHAPE = (28, 28, 1)
K = 5
PREPROCESS = functools.partial(steps.normalize, mean=(0.13,), std=(0.31,))


def _batch(n=16, seed=0):
  rng = np.random.default_rng(seed)
  return {
    "image": rng.integers(0, 256, (n, *SHAPE), dtype=np.uint8),
    "label": rng.integers(0, 10, n).astype(np.int32),
  }


def _state(lr=0.05, seed=0):
  model = models.create_backbone("cnn", 10)
  tx = steps.create_optimizer("sgd", optax.constant_schedule(lr), weight_decay=5e-4)
  return steps.create_train_state(model, tx, SHAPE, jax.random.PRNGKey(seed))


def _head(module_cls=models.FMCENet):
  head_model = module_cls(num_phases=K, width=8, depth=1)
  fmap = jnp.zeros((1, 7, 7, 64))
  variables = head_model.init(jax.random.PRNGKey(7), fmap, train=False)
  return steps.Head(model=head_model, module="conv3"), variables


class _StoppedHead(nn.Module):
  """The FMCE-Net with its input gradient cut: RAL can then no longer reach the backbone."""

  num_phases: int
  width: int
  depth: int

  @nn.compact
  def __call__(self, x, train):
    return models.FMCENet(self.num_phases, self.width, self.depth, name="net")(
      jax.lax.stop_gradient(x), train=train
    )


def _run(state, batch, n, head=None, head_vars=None, loss=steps.Loss()):
  step = jax.jit(functools.partial(steps.train_step, preprocess=PREPROCESS, head=head, loss=loss))
  metrics = []
  for i in range(n):
    state, m = step(state, batch, jax.random.PRNGKey(i), head_vars)
    metrics.append(m)
  return state, jax.device_get(metrics)


class TrainStepTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_lowers_loss_on_a_fixed_batch(self):
    batch = _batch()
    step = self.variant(functools.partial(steps.train_step, preprocess=PREPROCESS))
    state = _state()
    losses = []
    for i in range(15):
      state, m = step(state, batch, jax.random.PRNGKey(i))
      losses.append(float(m["loss"]))
    chex.assert_tree_all_finite(state.params)
    chex.assert_shape(m["loss"], ())
    chex.assert_type(m["loss"], jnp.float32)
    self.assertLess(losses[-1], 0.5 * losses[0], losses)


def test_alpha_zero_is_exactly_the_baseline_update():
  batch = _batch()
  head, head_vars = _head()
  base, _ = _run(_state(), batch, 3)
  ral, metrics = _run(
    _state(), batch, 3, head, head_vars, steps.Loss(alpha=optax.constant_schedule(0.0))
  )
  chex.assert_trees_all_equal(base.params, ral.params)
  chex.assert_trees_all_equal(base.batch_stats, ral.batch_stats)
  assert all(np.isfinite(m["conv"]) for m in metrics)


def test_frozen_head_is_not_trained_and_not_in_the_optimizer_state(monkeypatch):
  """The head shapes the backbone's update, yet no gradient, optimizer state or BatchNorm
  statistic of the step belongs to it: the step's trees are the backbone's alone."""
  batch = _batch()
  head, head_vars = _head()
  gradient_trees = []
  apply_gradients = steps.TrainState.apply_gradients

  def recording_apply_gradients(self, *, grads, **kwargs):
    gradient_trees.append(jax.tree.structure(grads))
    return apply_gradients(self, grads=grads, **kwargs)

  monkeypatch.setattr(steps.TrainState, "apply_gradients", recording_apply_gradients)
  start = _state()
  # Additive RAL: CE + alpha L_conv, so an alpha-0 step differs only through the head's gradient.
  loss = lambda alpha: steps.Loss(alpha=optax.constant_schedule(alpha), mode="additive")  # noqa: E731
  ral, _ = _run(start, batch, 2, head, head_vars, loss(0.5))
  assert gradient_trees and set(gradient_trees) == {jax.tree.structure(start.params)}
  for tree in ("params", "batch_stats", "opt_state"):
    assert jax.tree.structure(getattr(ral, tree)) == jax.tree.structure(getattr(start, tree)), tree
  # ...while the RAL gradient does reach the backbone through it: not the alpha-0 step's update.
  base, _ = _run(start, batch, 2, head, head_vars, loss(0.0))
  diff = max(
    float(jnp.max(jnp.abs(a - b)))
    for a, b in zip(jax.tree.leaves(ral.params), jax.tree.leaves(base.params))
  )
  assert diff > 1e-4, "the head did not change the backbone's update"


@pytest.mark.parametrize("mode", ["additive", "convex"])
def test_ral_gradient_flows_through_the_head(mode):
  batch = _batch()
  alpha = 0.5
  loss = steps.Loss(alpha=optax.constant_schedule(alpha), mode=mode)
  head, head_vars = _head()
  stopped = steps.Head(model=_StoppedHead(K, 8, 1), module="conv3")
  stopped_vars = {k: {"net": v} for k, v in head_vars.items()}
  # Plain SGD, no decay: the update is -lr * gradient, so updates compare gradients directly.
  tx = optax.sgd(1.0)
  model = models.create_backbone("cnn", 10)
  state = steps.create_train_state(model, tx, SHAPE, jax.random.PRNGKey(0))
  delta = lambda s: jax.tree.map(jnp.subtract, s.params, state.params)  # noqa: E731
  base, _ = _run(state, batch, 1)
  ral, _ = _run(state, batch, 1, head, head_vars, loss)
  cut, _ = _run(state, batch, 1, stopped, stopped_vars, loss)
  scale = 1.0 - alpha if mode == "convex" else 1.0
  ce_only = jax.tree.map(lambda d: scale * d, delta(base))
  chex.assert_trees_all_close(delta(cut), ce_only, rtol=1e-5, atol=1e-7)
  diff = max(
    float(jnp.max(jnp.abs(a - b)))
    for a, b in zip(jax.tree.leaves(delta(ral)), jax.tree.leaves(ce_only))
  )
  assert diff > 1e-4, "RAL did not change the backbone gradient"


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize(
  "mode,target", [("convex", "phase"), ("additive", "phase"), ("convex", "regression")]
)
def test_ral_value_matches_a_hand_computation(mode, target):
  rng = np.random.default_rng(3)
  logits, labels = rng.normal(size=(4, 3)), np.array([0, 2, 1, 1])
  head_logits, alpha = rng.normal(size=(4, K)), 0.3
  ce = -np.mean(_log_softmax(logits)[np.arange(4), labels])
  if target == "phase":
    conv = -np.mean(_log_softmax(head_logits)[:, K - 1])
  else:
    probs = np.exp(_log_softmax(head_logits))
    conv = np.mean((1.0 - probs @ (np.arange(K) / (K - 1))) ** 2)
  expected = (1 - alpha) * ce + alpha * conv if mode == "convex" else ce + alpha * conv
  value, parts = steps.ral_loss(
    jnp.asarray(logits, jnp.float32),
    jnp.asarray(labels),
    jnp.asarray(head_logits, jnp.float32),
    jnp.float32(alpha),
    steps.Loss(mode=mode, target=target),
  )
  np.testing.assert_allclose(float(value), expected, rtol=1e-5)
  np.testing.assert_allclose(float(parts["ce"]), ce, rtol=1e-5)
  np.testing.assert_allclose(float(parts["conv"]), conv, rtol=1e-5)


def test_fmcs_scores_and_prediction():
  chex.assert_trees_all_close(steps.fmcs_scores(5), np.array([0.0, 0.25, 0.5, 0.75, 1.0]))
  probs = np.array([[1.0, 0, 0, 0, 0], [0, 0, 0, 0, 1.0], [0.2] * 5, [0, 0.5, 0, 0.5, 0]])
  with np.errstate(divide="ignore"):
    logits = jnp.asarray(np.log(probs), jnp.float32)  # softmax(log p) = p
  chex.assert_trees_all_close(
    steps.predicted_fmcs(logits), np.array([0.0, 1.0, 0.5, 0.5]), atol=1e-6
  )
  with pytest.raises(ValueError):
    steps.fmcs_scores(1)


def test_nonfinite_batch_is_skipped_and_flagged():
  batch = _batch()
  state = _state()
  nan_pre = lambda x: PREPROCESS(x) * jnp.nan  # noqa: E731  (a poisoned input)
  step = jax.jit(functools.partial(steps.train_step, preprocess=nan_pre))
  new, m = step(state, batch, jax.random.PRNGKey(0))
  assert int(m["nonfinite"]) == 1
  chex.assert_trees_all_equal(new.params, state.params)
  chex.assert_trees_all_equal(new.batch_stats, state.batch_stats)
  assert int(new.step) == int(state.step) + 1


def test_eval_step_ignores_padding_rows():
  state = _state()
  batch = _batch(8)
  padded = {
    "image": np.concatenate([batch["image"], np.zeros((8, *SHAPE), np.uint8)]),
    "label": np.concatenate([batch["label"], np.zeros(8, np.int32)]),
    "mask": np.concatenate([np.ones(8, np.float32), np.zeros(8, np.float32)]),
  }
  full = steps.eval_step(state, {**batch, "mask": np.ones(8, np.float32)}, preprocess=PREPROCESS)
  masked = steps.eval_step(state, padded, preprocess=PREPROCESS)
  chex.assert_trees_all_close(full, masked, rtol=1e-6)
  assert float(masked["count"]) == 8


def test_eight_devices_match_one_device():
  """Data parallel over 8 (fake CPU) devices == 1 device, BatchNorm statistics included.

  Tolerance: rtol 1e-5 / atol 1e-6 after 5 SGD steps (only the reduction order differs)."""
  assert jax.device_count() == 8, "conftest sets --xla_force_host_platform_device_count=8"
  batch = _batch(32)
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = parallel.make_mesh(devices)
    repl, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    step = jax.jit(
      functools.partial(steps.train_step, preprocess=PREPROCESS),
      in_shardings=(repl, data, repl, repl),
      out_shardings=(repl, repl),
      donate_argnums=0,
    )
    state = jax.jit(lambda: _state(), out_shardings=repl)()
    for i in range(5):
      state, _ = step(state, parallel.global_batch(batch, mesh), jax.random.PRNGKey(i), None)
    assert len(state.params["conv1"]["kernel"].sharding.device_set) == len(devices)
    results.append(jax.device_get((state.params, state.batch_stats)))
  chex.assert_trees_all_close(results[0], results[1], rtol=1e-5, atol=1e-6)
