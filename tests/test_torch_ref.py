"""The PyTorch reference is the same network and the same RAL step as the Flax code.

Same parameter counts, same eval-mode logits and features from copied weights (random kernels,
BatchNorm scales/biases and running statistics, so a transposed kernel or a swapped scale/bias
cannot pass), the same RAL gradient through the frozen head, and the same SGD update.
Flax runs un-jitted for the forward checks: op-by-op dispatch is faster here than compiling
four backbones on a 2-core CPU.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import TORCH_INSTALL, missing
from fmcejax import models, steps

try:
  import torch
except ImportError:
  missing("torch", TORCH_INSTALL, module=True)
from fmcejax.tools import torch_ref  # noqa: E402  (needs torch)

MNIST, CIFAR = (28, 28, 1), (32, 32, 3)
CASES = [
  ("cnn", MNIST),
  ("cnn", CIFAR),
  ("resnet18", CIFAR),
  ("resnet50", CIFAR),
  ("shufflenet_v2", CIFAR),
]
K = 5
MEAN, STD = (0.13,), (0.31,)


def _random_variables(module, shape, seed=0):
  """Variables of `module` for inputs `shape`, every entry random and of sane magnitude."""
  abstract = jax.eval_shape(
    lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape)), train=False)
  )
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name, s = path[-1].key, leaf.shape
    if name == "kernel":  # variance-preserving, so 50 layers neither explode nor vanish
      return rng.normal(0.0, 1.0 / math.sqrt(math.prod(s[:-1])), s).astype(np.float32)
    if name in ("scale", "var"):
      return rng.uniform(0.5, 1.5, s).astype(np.float32)
    return rng.normal(0.0, 0.1, s).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


@pytest.mark.parametrize("name,shape", CASES)
def test_parameter_counts_match(name, shape):
  model = models.create_backbone(name, 10)
  abstract = jax.eval_shape(
    lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape)), train=False)
  )
  torch_model = torch_ref.create_backbone(name, 10, shape[-1])
  assert torch_ref.param_count(torch_model) == models.param_count(abstract["params"])


@pytest.mark.parametrize("name,shape", CASES)
def test_eval_logits_and_features_match(name, shape):
  """float32, atol = rtol = 1e-4 for every backbone, resnet50 included (measured: <= 2e-6)."""
  model = models.create_backbone(name, 10)
  variables = _random_variables(model, shape)
  x = np.random.default_rng(1).normal(size=(2, *shape)).astype(np.float32)
  logits, features = model.apply(variables, x, train=False)
  torch_model = torch_ref.create_backbone(name, 10, shape[-1])
  torch_ref.copy_flax_variables(torch_model, variables)
  with torch.no_grad():
    torch_logits, torch_features = torch_model.eval()(_nchw(x))
  np.testing.assert_allclose(torch_logits.numpy(), logits, atol=1e-4, rtol=1e-4)
  assert set(torch_features) == set(features) == set(models.STAGES[name])
  for stage, fmap in features.items():
    np.testing.assert_allclose(
      torch_features[stage].permute(0, 2, 3, 1).numpy(), fmap, atol=1e-4, rtol=1e-4, err_msg=stage
    )


def test_imagenet_stem_shufflenet_matches():
  """`small_input=False` (stride-2 stem + max-pool) is not built by create_backbone: check it."""
  model = models.ShuffleNetV2(num_classes=10, small_input=False)
  shape = (64, 64, 3)
  variables = _random_variables(model, shape)
  x = np.random.default_rng(1).normal(size=(2, *shape)).astype(np.float32)
  logits, _ = model.apply(variables, x, train=False)
  torch_model = torch_ref.ShuffleNetV2(10, 3, small_input=False)
  torch_ref.copy_flax_variables(torch_model, variables)
  with torch.no_grad():
    torch_logits, _ = torch_model.eval()(_nchw(x))
  np.testing.assert_allclose(torch_logits.numpy(), logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("feature_shape", [(4, 4, 512), (16, 16, 32)])  # stride 1 and 2
def test_fmce_net_head_matches(feature_shape):
  head = models.FMCENet(num_phases=K)
  variables = _random_variables(head, feature_shape)
  x = np.random.default_rng(2).normal(size=(3, *feature_shape)).astype(np.float32)
  torch_head = torch_ref.FMCENet(K, feature_shape)
  torch_ref.copy_flax_variables(torch_head, variables)
  with torch.no_grad():
    torch_logits = torch_ref.frozen(torch_head)(_nchw(x))
  np.testing.assert_allclose(
    torch_logits.numpy(), head.apply(variables, x, train=False), atol=1e-4, rtol=1e-4
  )


def test_copy_rejects_a_mismatched_model():
  variables = _random_variables(models.create_backbone("cnn", 10), MNIST)
  with pytest.raises(ValueError, match="shape"):
    torch_ref.copy_flax_variables(torch_ref.create_backbone("cnn", 10, 3), variables)


def _cnn_pair(optimizer_kwargs):
  """The same cnn + frozen head in Flax (a TrainState) and torch, and a uint8 batch."""
  model = models.create_backbone("cnn", 10)
  variables = _random_variables(model, MNIST)
  tx = steps.create_optimizer(
    "sgd",
    optax.constant_schedule(optimizer_kwargs["lr"]),
    weight_decay=optimizer_kwargs["weight_decay"],
    momentum=optimizer_kwargs["momentum"],
  )
  state = steps.TrainState.create(
    apply_fn=model.apply, params=variables["params"], tx=tx, batch_stats=variables["batch_stats"]
  )
  head_model = models.FMCENet(num_phases=K, width=16, depth=2)
  head_variables = _random_variables(head_model, (7, 7, 64), seed=3)
  torch_model = torch_ref.create_backbone("cnn", 10, 1)
  torch_ref.copy_flax_variables(torch_model, variables)
  torch_head = torch_ref.FMCENet(K, (7, 7, 64), width=16, depth=2)
  torch_ref.copy_flax_variables(torch_head, head_variables)
  rng = np.random.default_rng(4)
  batch = {
    "image": rng.integers(0, 256, (8, *MNIST), dtype=np.uint8),
    "label": rng.integers(0, 10, 8).astype(np.int32),
  }
  return (
    state,
    steps.Head(model=head_model, module="conv3"),
    head_variables,
    torch_model,
    torch_ref.frozen(torch_head),
    batch,
  )


def _jax_step(state, head, head_variables, batch, alpha):
  step = jax.jit(
    functools.partial(
      steps.train_step,
      preprocess=functools.partial(steps.normalize, mean=MEAN, std=STD),
      head=head,
      loss=steps.Loss(alpha=optax.constant_schedule(alpha)),
    )
  )
  new_state, metrics = step(state, batch, jax.random.PRNGKey(0), head_variables)
  return jax.device_get(new_state), jax.device_get(metrics)


def _torch_step(torch_model, torch_head, batch, alpha, **optimizer_kwargs):
  optimizer = torch_ref.create_optimizer(
    torch_model,
    optimizer_kwargs["lr"],
    weight_decay=optimizer_kwargs["weight_decay"],
    momentum=optimizer_kwargs["momentum"],
  )
  train = torch_ref.TrainStep(
    torch_model, optimizer, mean=MEAN, std=STD, head=torch_head, module="conv3", alpha=alpha
  )
  return train(torch.from_numpy(batch["image"]), torch.from_numpy(batch["label"]).long())


def test_ral_gradient_through_the_frozen_head_matches():
  """With plain SGD at lr 1 the JAX update is -grad, so this checks `steps.train_step` itself."""
  plain = {"lr": 1.0, "weight_decay": 0.0, "momentum": 0.0}
  state, head, head_vars, torch_model, torch_head, batch = _cnn_pair(plain)
  new_state, metrics = _jax_step(state, head, head_vars, batch, alpha=0.1)
  jax_grad = np.asarray(state.params["conv2"]["kernel"]) - new_state.params["conv2"]["kernel"]

  grads = {}
  for alpha in (0.0, 0.1):
    model = torch_ref.create_backbone("cnn", 10, 1)
    model.load_state_dict(torch_model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # zero_grad/step only
    train = torch_ref.TrainStep(
      model, optimizer, mean=MEAN, std=STD, head=torch_head, module="conv3", alpha=alpha
    )
    loss = train(torch.from_numpy(batch["image"]), torch.from_numpy(batch["label"]).long())
    grads[alpha] = model.conv2.weight.grad.permute(2, 3, 1, 0).numpy()
  assert all(p.grad is None for p in torch_head.parameters())
  np.testing.assert_allclose(float(loss), metrics["loss"], rtol=1e-5)
  scale = np.abs(grads[0.1]).max()
  np.testing.assert_allclose(grads[0.1], jax_grad, atol=1e-4 * scale, rtol=1e-3)
  # The head's share of the gradient is far above that tolerance: the check is not vacuous.
  assert np.abs(grads[0.1] - grads[0.0]).max() > 100 * 1e-4 * scale


def test_one_ral_step_with_nesterov_and_weight_decay_matches():
  sgd = {"lr": 0.1, "weight_decay": 5e-4, "momentum": 0.9}
  state, head, head_vars, torch_model, torch_head, batch = _cnn_pair(sgd)
  new_state, metrics = _jax_step(state, head, head_vars, batch, alpha=0.1)
  loss = _torch_step(torch_model, torch_head, batch, 0.1, **sgd)
  np.testing.assert_allclose(float(loss), metrics["loss"], rtol=1e-5)
  expected = torch_ref.create_backbone("cnn", 10, 1)
  torch_ref.copy_flax_variables(
    expected, {"params": new_state.params, "batch_stats": state.batch_stats}
  )
  for (name, p), q in zip(torch_model.named_parameters(), expected.parameters()):
    np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), atol=1e-5, err_msg=name)
