"""Tests for fmcejax.models and fmcejax.cpu_lowering: the backbone contract (logits, features),
exact parameter counts, dtype policy, BatchNorm state handling, the FMCE-Net head, your own
backbone, and the CPU lowerings giving Flax's values and gradients.

Shape and dtype contracts are checked with `jax.eval_shape` (no FLOPs, no compile); real forward
passes run once per backbone, with the variables cached, so the file stays fast on a 2-core CPU.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import linen as nn

from fmcejax import cpu_lowering, models, parallel

NUM_CLASSES = 10
INPUT_SHAPES = ((2, 32, 32, 3), (2, 28, 28, 1))
# Real forward passes: one input shape per backbone keeps the file fast; both are covered above.
RUN_SHAPE = {
  "cnn": (2, 28, 28, 1),
  "resnet18": (2, 32, 32, 3),
  "resnet50": (2, 28, 28, 1),
  "shufflenet_v2": (2, 32, 32, 3),
}
EXPECTED_PARAMS_CIFAR10 = {
  "resnet18": 11_173_962,  # kuangliu/pytorch-cifar ResNet18
  "resnet50": 23_520_842,  # kuangliu/pytorch-cifar ResNet50
  "shufflenet_v2": 1_263_854,  # torchvision shufflenet_v2_x1_0(num_classes=10)
}
EXPECTED_FEATURE_SHAPES = {
  ("cnn", 32): {"conv1": (16, 16, 16), "conv2": (8, 8, 32), "conv3": (8, 8, 64)},
  ("cnn", 28): {"conv1": (14, 14, 16), "conv2": (7, 7, 32), "conv3": (7, 7, 64)},
  ("resnet18", 32): {
    "stem": (32, 32, 64),
    "stage1": (32, 32, 64),
    "stage2": (16, 16, 128),
    "stage3": (8, 8, 256),
    "stage4": (4, 4, 512),
  },
  ("resnet18", 28): {
    "stem": (28, 28, 64),
    "stage1": (28, 28, 64),
    "stage2": (14, 14, 128),
    "stage3": (7, 7, 256),
    "stage4": (4, 4, 512),
  },
  ("resnet50", 32): {
    "stem": (32, 32, 64),
    "stage1": (32, 32, 256),
    "stage2": (16, 16, 512),
    "stage3": (8, 8, 1024),
    "stage4": (4, 4, 2048),
  },
  ("resnet50", 28): {
    "stem": (28, 28, 64),
    "stage1": (28, 28, 256),
    "stage2": (14, 14, 512),
    "stage3": (7, 7, 1024),
    "stage4": (4, 4, 2048),
  },
  ("shufflenet_v2", 32): {
    "stem": (32, 32, 24),
    "stage2": (16, 16, 116),
    "stage3": (8, 8, 232),
    "stage4": (4, 4, 464),
    "conv5": (4, 4, 1024),
  },
  ("shufflenet_v2", 28): {
    "stem": (28, 28, 24),
    "stage2": (14, 14, 116),
    "stage3": (7, 7, 232),
    "stage4": (4, 4, 464),
    "conv5": (4, 4, 1024),
  },
}


def _abstract(model, shape, dtype=jnp.float32):
  """(variables, (logits, features)) as ShapeDtypeStructs: the contract without running anything."""
  x = jax.ShapeDtypeStruct(shape, dtype)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  outputs = jax.eval_shape(functools.partial(model.apply, train=False), variables, x)
  return variables, outputs


def _numpy_init(abstract_variables):
  """Values like the models' own init (He fan-out convs, LeCun Dense, BN identity), from numpy.

  XLA:CPU takes seconds to compile resnet50's `init` (threefry for ~160 tensors) and these tests
  need realistic values, not Flax's RNG stream; `cnn` still goes through the real `init`.
  """
  rng = np.random.default_rng(0)

  def leaf(path, s):
    name = path[-1].key
    if name == "kernel":
      fan = np.prod(s.shape[:2]) * s.shape[3] if len(s.shape) == 4 else s.shape[0]
      std = np.sqrt(2.0 / fan) if len(s.shape) == 4 else np.sqrt(1.0 / fan)
      return jnp.asarray(rng.normal(0.0, std, s.shape), s.dtype)
    return jnp.full(s.shape, 1.0 if name in ("scale", "var") else 0.0, s.dtype)

  return jax.tree_util.tree_map_with_path(leaf, abstract_variables)


@functools.cache
def _initialised(name: str, shape: tuple[int, ...]):
  """(model, variables, x) for a real forward pass, cached across tests."""
  model = models.create_backbone(name, NUM_CLASSES)
  x = jax.random.normal(jax.random.key(1), shape)
  if name == "cnn":
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x)
  else:
    variables = _numpy_init(_abstract(model, shape)[0])
  return model, variables, x


@pytest.mark.parametrize("shape", INPUT_SHAPES)
@pytest.mark.parametrize("name", models.BACKBONES)
def test_backbone_contract(name, shape):
  _, (logits, features) = _abstract(models.create_backbone(name, NUM_CLASSES), shape)
  chex.assert_shape(logits, (2, NUM_CLASSES))
  chex.assert_type(logits, jnp.float32)
  assert set(features) == set(models.STAGES[name])
  assert models.DEFAULT_MODULE[name] == models.STAGES[name][-1]
  expected = EXPECTED_FEATURE_SHAPES[(name, shape[1])]
  for stage, fmap in features.items():
    chex.assert_shape(fmap, (2, *expected[stage]))
    chex.assert_type(fmap, jnp.float32)


def test_registries_agree():
  assert set(models.STAGES) == set(models.BACKBONES) == set(models.DEFAULT_MODULE)
  for name in models.BACKBONES:
    assert models.DEFAULT_MODULE[name] in models.STAGES[name]
  assert models.DEFAULT_MODULE["cnn"] == "conv3"
  assert models.DEFAULT_MODULE["shufflenet_v2"] == "conv5"


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS_CIFAR10))
def test_param_count_matches_pytorch_reference(name):
  variables, _ = _abstract(models.create_backbone(name, NUM_CLASSES), (1, 32, 32, 3))
  assert models.param_count(variables["params"]) == EXPECTED_PARAMS_CIFAR10[name]


def test_cnn_is_small():
  variables, _ = _abstract(models.create_backbone("cnn", NUM_CLASSES), (1, 28, 28, 1))
  # conv 3x3 (no bias) + BN scale/bias per block, then the classifier: counted by hand.
  expected = (
    (9 * 1 * 16 + 2 * 16) + (9 * 16 * 32 + 2 * 32) + (9 * 32 * 64 + 2 * 64) + (64 * 10 + 10)
  )
  assert models.param_count(variables["params"]) == expected == 24_058


def test_shufflenet_small_input_keeps_param_count_and_resolution():
  shape = (1, 64, 64, 3)
  small_vars, (_, small) = _abstract(models.ShuffleNetV2(NUM_CLASSES, small_input=True), shape)
  big_vars, (_, big) = _abstract(models.ShuffleNetV2(NUM_CLASSES, small_input=False), shape)
  assert models.param_count(small_vars) == models.param_count(big_vars)
  chex.assert_shape(small["stem"], (1, 64, 64, 24))
  chex.assert_shape(big["stem"], (1, 16, 16, 24))  # stride-2 conv + 3x3/2 max-pool
  chex.assert_shape(big["conv5"], (1, 2, 2, 1024))


@pytest.mark.parametrize("name", models.BACKBONES)
def test_bfloat16_computes_in_bf16_with_float32_params_and_logits(name):
  model = models.create_backbone(name, NUM_CLASSES, dtype=jnp.bfloat16)
  variables, (logits, features) = _abstract(model, (2, 32, 32, 3))
  chex.assert_type(jax.tree_util.tree_leaves(variables), jnp.float32)
  chex.assert_type(logits, jnp.float32)
  chex.assert_type(list(features.values()), jnp.bfloat16)


def test_bfloat16_forward_is_finite_and_close_to_float32():
  model32, variables, x = _initialised("cnn", RUN_SHAPE["cnn"])
  model16 = models.create_backbone("cnn", NUM_CLASSES, dtype=jnp.bfloat16)
  logits32, _ = model32.apply(variables, x, train=False)
  logits16, features16 = model16.apply(variables, x, train=False)
  chex.assert_type(logits16, jnp.float32)
  chex.assert_type(list(features16.values()), jnp.bfloat16)
  chex.assert_tree_all_finite((logits16, features16))
  np.testing.assert_allclose(logits16, logits32, atol=0.05, rtol=0.05)


class ForwardTest(chex.TestCase):
  """Real forward passes, eager and jitted, on each backbone's cached variables."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*models.BACKBONES)
  def test_eval_forward_needs_no_mutable_state(self, name):
    model, variables, x = _initialised(name, RUN_SHAPE[name])
    logits, features = self.variant(functools.partial(model.apply, train=False))(variables, x)
    chex.assert_shape(logits, (x.shape[0], NUM_CLASSES))
    chex.assert_type(logits, jnp.float32)
    self.assertEqual(set(features), set(models.STAGES[name]))
    for fmap in features.values():
      chex.assert_rank(fmap, 4)
      self.assertEqual(fmap.shape[0], x.shape[0])
    chex.assert_tree_all_finite((logits, features))

  @chex.variants(with_jit=True, without_jit=True)
  def test_cnn_on_cifar_shape(self):
    model, variables, x = _initialised("cnn", (2, 32, 32, 3))
    logits, features = self.variant(functools.partial(model.apply, train=False))(variables, x)
    chex.assert_shape(logits, (2, NUM_CLASSES))
    chex.assert_shape(features["conv3"], (2, 8, 8, 64))
    chex.assert_tree_all_finite((logits, features))


@pytest.mark.parametrize("name", models.BACKBONES)
def test_train_mode_updates_batch_stats(name):
  model, variables, x = _initialised(name, RUN_SHAPE[name])
  apply = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))
  (logits, features), updates = apply(variables, x)
  chex.assert_tree_all_finite((logits, features, updates))
  chex.assert_trees_all_equal_shapes(updates["batch_stats"], variables["batch_stats"])
  changed = jax.tree_util.tree_map(
    lambda new, old: bool(jnp.any(new != old)), updates["batch_stats"], variables["batch_stats"]
  )
  assert all(jax.tree_util.tree_leaves(changed))
  # Train-mode BN normalises with batch statistics, so activations stay O(1) at init.
  assert float(jnp.std(features[models.DEFAULT_MODULE[name]])) < 10.0


def test_train_mode_without_mutable_batch_stats_fails():
  model, variables, x = _initialised("cnn", RUN_SHAPE["cnn"])
  with pytest.raises(Exception, match="batch_stats"):
    model.apply(variables, x, train=True)


def test_zero_init_residual_zeroes_last_bn_scale():
  conv, norm = models._conv_and_norm(jnp.float32, train=False, lowering=None)
  x = jnp.ones((1, 8, 8, 16))
  for block_cls, last_bn in ((models.BasicBlock, "bn2"), (models.Bottleneck, "bn3")):
    block = block_cls(16, conv=conv, norm=norm, strides=2, zero_init_residual=True)
    params = block.init(jax.random.key(0), x)["params"]
    np.testing.assert_array_equal(params[last_bn]["scale"], 0.0)
    np.testing.assert_array_equal(params["bn1"]["scale"], 1.0)
    assert "shortcut_conv" in params  # stride 2 needs the projection shortcut


def test_channel_shuffle_matches_torch_semantics():
  b, c, h, w, groups = 2, 6, 3, 4, 2
  nchw = np.arange(b * c * h * w, dtype=np.float32).reshape(b, c, h, w)
  # torchvision: x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)
  expected = nchw.reshape(b, groups, c // groups, h, w).transpose(0, 2, 1, 3, 4).reshape(b, c, h, w)
  got = models.channel_shuffle(jnp.asarray(nchw.transpose(0, 2, 3, 1)), groups)
  np.testing.assert_array_equal(np.asarray(got).transpose(0, 3, 1, 2), expected)


@pytest.mark.parametrize("fmap_shape", [(2, 7, 7, 128), (2, 32, 32, 64)])
def test_fmcenet_shape_and_input_gradient(fmap_shape):
  head = models.FMCENet(num_phases=4, width=32, depth=2)
  fmap = jax.random.normal(jax.random.key(2), fmap_shape)
  variables = head.init(jax.random.key(0), fmap, train=False)
  logits = head.apply(variables, fmap, train=False)
  chex.assert_shape(logits, (2, 4))
  chex.assert_type(logits, jnp.float32)

  def loss(f):
    return jnp.sum(head.apply(variables, f, train=False)[:, 0])

  grad = jax.jit(jax.grad(loss))(fmap)
  chex.assert_shape(grad, fmap_shape)
  chex.assert_tree_all_finite(grad)
  assert float(jnp.abs(grad).max()) > 0.0


def test_fmcenet_bfloat16_and_train_mode():
  head = models.FMCENet(num_phases=3, dtype=jnp.bfloat16)
  fmap = jax.random.normal(jax.random.key(2), (2, 4, 4, 512), jnp.bfloat16)
  variables = head.init(jax.random.key(0), fmap, train=False)
  chex.assert_type(jax.tree_util.tree_leaves(variables), jnp.float32)
  logits, updates = head.apply(variables, fmap, train=True, mutable=["batch_stats"])
  chex.assert_shape(logits, (2, 3))
  chex.assert_type(logits, jnp.float32)
  chex.assert_tree_all_finite((logits, updates))


def test_param_count_counts_arrays_and_shape_structs():
  tree = {"a": jnp.zeros((2, 3)), "b": [jnp.zeros(4), jax.ShapeDtypeStruct((5, 1), jnp.float32)]}
  assert models.param_count(tree) == 15


def test_create_backbone_rejects_unknown_name():
  with pytest.raises(ValueError, match="resnet18"):
    models.create_backbone("vgg16", NUM_CLASSES)


class CpuLoweringTest(chex.TestCase):
  """The CPU lowerings change the XLA program, not the numbers: values and gradients match Flax's
  modules."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(
    # (input channels, kernel, strides, padding, groups, bias)
    (1, (3, 3), 1, ((1, 1), (1, 1)), 1, False),  # patches: a grey stem
    (3, (3, 3), 2, ((0, 1), (1, 2)), 1, True),  # patches, strided, uneven padding
    (3, (3, 2), (2, 1), ((0, 1), (1, 1)), 1, False),  # patches, an even kernel
    (6, (3, 3), 2, ((1, 1), (1, 1)), 1, False),  # Eigen: too many channels for patches
    (3, (3, 3), 1, "SAME", 1, True),  # Eigen: string padding
    (6, (3, 3), 1, "SAME", 6, False),  # Eigen: depthwise
  )
  def test_conv_equals_nn_conv(self, channels, kernel, strides, padding, groups, bias):
    x = jax.random.normal(jax.random.key(1), (2, 9, 8, channels))
    plain = nn.Conv(
      4 if groups == 1 else channels,
      kernel,
      strides,
      padding=padding,
      feature_group_count=groups,
      use_bias=bias,
      bias_init=nn.initializers.normal(),
    )
    lowered = plain.clone(conv_general_dilated=cpu_lowering.conv_general_dilated)
    variables = plain.init(jax.random.key(2), x)
    chex.assert_trees_all_equal_structs(variables, lowered.init(jax.random.key(2), x))

    def outputs_and_grads(module):
      loss = lambda v, x: jnp.sum(jnp.tanh(module.apply(v, x)))
      return self.variant(jax.value_and_grad(loss, argnums=(0, 1)))(variables, x)

    chex.assert_trees_all_close(
      outputs_and_grads(lowered), outputs_and_grads(plain), rtol=1e-5, atol=1e-5
    )

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(train=(True, False), shape=((4, 6, 6, 5), (1, 37, 1, 5)))
  def test_batchnorm_matches_flax_batchnorm(self, train, shape):  # 144 rows: 24 x 6; 37: prime
    x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), shape)
    ours = cpu_lowering.BatchNorm(use_running_average=not train, momentum=0.9)
    flax_bn = nn.BatchNorm(use_running_average=not train, momentum=0.9)
    variables = {
      "params": {"scale": jnp.linspace(0.5, 2.0, 5), "bias": jnp.arange(5.0)},
      "batch_stats": {"mean": jnp.arange(5.0), "var": jnp.arange(1.0, 6.0)},
    }
    chex.assert_trees_all_equal_structs(
      variables, ours.init(jax.random.key(1), x), flax_bn.init(jax.random.key(1), x)
    )
    weights = jax.random.normal(jax.random.key(2), x.shape)

    def run(module):
      def loss(params, x):
        y, stats = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
        return jnp.sum(y * weights), (y, stats)

      return self.variant(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        variables["params"], x
      )

    got, want = run(ours), run(flax_bn)
    chex.assert_shape(got[0][1][0], x.shape)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((2, 6, 6, 3), (2, 7, 5, 3))
  def test_max_pool_2x2_equals_nn_max_pool(self, *shape):
    """nn.max_pool's values (odd sizes drop the last row or column, as VALID padding) and, without
    ties, its gradient; ties (here from rounding) share the gradient equally."""
    weights = jax.random.normal(jax.random.key(1), (2, shape[1] // 2, shape[2] // 2, 3))
    pools = (cpu_lowering.max_pool_2x2, functools.partial(models.max_pool_2x2, lowering=None))
    grad = lambda f: self.variant(jax.grad(lambda x: jnp.sum(f(x) * weights)))
    x = jax.random.normal(jax.random.key(0), shape)
    chex.assert_trees_all_equal(*(self.variant(f)(x) for f in pools))
    chex.assert_trees_all_equal(*(grad(f)(x) for f in pools))
    tied = jnp.round(x * 2) / 2
    g = grad(cpu_lowering.max_pool_2x2)(tied)
    np.testing.assert_allclose(jnp.sum(g), jnp.sum(weights), rtol=1e-5)  # all passed on
    assert weights.size < jnp.sum(g != 0)  # some of it shared between tied maxima


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cpu_batchnorm_keeps_flax_dtypes(dtype):
  x = jnp.ones((4, 3, 3, 2), dtype)
  bn = cpu_lowering.BatchNorm(use_running_average=False, dtype=dtype)
  variables = bn.init(jax.random.key(0), x)
  chex.assert_trees_all_equal_dtypes(variables, jax.tree.map(lambda _: jnp.float32, variables))
  grad = jax.grad(lambda x: jnp.sum(bn.apply(variables, x, mutable=["batch_stats"])[0]))(x)
  assert bn.apply(variables, x, mutable=["batch_stats"])[0].dtype == dtype == grad.dtype


def test_cpu_batchnorm_sums_as_accurately_as_a_pairwise_tree():
  """A sequential float32 sum of 2^17 values near 1 is off by ~1e-5 relative (XLA's own
  reduce: ~3e-6); the tree of <= 32-row sums stays at ~1e-7."""
  x = 1.0 + np.random.default_rng(0).standard_normal((2**17, 3)).astype(np.float32)
  got = jax.jit(cpu_lowering._column_sums)(x, x * x)
  x64 = x.astype(np.float64)
  for sums, want in zip(got, (x64.sum(0), (x64 * x64).sum(0))):
    np.testing.assert_allclose(sums, want, rtol=5e-7)


def test_cpu_batchnorm_trains_without_xla_reduce_windows():
  """XLA:CPU rewrites a large one-array sum over the [N, C] view into a reduce-window, slow once
  folded back onto the NHWC map; the lowering keeps every batch statistic a variadic reduce."""
  options = parallel.compiler_options(parallel.make_mesh(jax.devices("cpu")[:1]))
  if options is None:
    pytest.skip("this XLA does not take the CPU compiler options the lowering is measured with")
  x = jnp.ones((32, 8, 8, 16))

  def compiled_gradient(norm, view):
    bn = norm(use_running_average=False)
    variables = bn.init(jax.random.key(0), view(x))
    loss = lambda params, x: jnp.sum(
      bn.apply({**variables, "params": params}, view(x), mutable=["batch_stats"])[0] ** 2
    )
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), compiler_options=options)
    return grad.lower(variables["params"], x).compile().as_text()

  flax_on_the_view = compiled_gradient(nn.BatchNorm, lambda x: x.reshape(-1, x.shape[-1]))
  assert "reduce-window(" in flax_on_the_view
  assert "reduce-window(" not in compiled_gradient(cpu_lowering.BatchNorm, lambda x: x)


@pytest.mark.parametrize(
  "channels, padding, patches",
  [
    (1, ((1, 1), (1, 1)), True),  # a grey stem
    (3, ((1, 1), (1, 1)), True),  # an RGB stem: 27 = 3 x 3 x 3 products per output
    (4, ((1, 1), (1, 1)), False),  # Eigen is faster from here on
    (3, "SAME", False),  # only explicit padding (the models' convs) is taken
  ],
)
def test_cpu_conv_multiplies_patches_of_few_channel_convs(channels, padding, patches):
  x = jax.ShapeDtypeStruct((2, 8, 8, channels), jnp.float32)
  conv = cpu_lowering.CPU.conv(8, (3, 3), padding=padding)
  variables = jax.eval_shape(conv.init, jax.random.key(0), x)
  jaxpr = str(jax.make_jaxpr(conv.apply)(variables, x))
  assert ("conv_general_dilated" not in jaxpr) == ("dot_general" in jaxpr) == patches


class PoolingPhasesTest(chex.TestCase):
  """The CNN's stem on CPU convolves the four pooling phases at stride 2 (`pooling_phases`,
  `max_over_phases`): the same numbers as the padded conv and the 2x2 max-pool."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((1, 6, 8), (3, 4, 4))
  def test_conv_over_phases_then_max_equals_conv_then_max_pool(self, channels, h, w):
    x = jnp.round(jax.random.normal(jax.random.key(0), (2, h, w, channels)) * 2) / 2
    kernel = jnp.round(jax.random.normal(jax.random.key(1), (3, 3, channels, 5)) * 2) / 2
    weights = jax.random.normal(jax.random.key(2), (2, h // 2, w // 2, 5))
    conv = lambda x, k, s, p: jax.lax.conv_general_dilated(
      x, k, (s, s), p, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )

    def by_phases(x, k):
      return cpu_lowering.max_over_phases(
        jax.nn.relu(conv(cpu_lowering.pooling_phases(x), k, 2, "VALID"))
      )

    def reference(x, k):
      return cpu_lowering.max_pool_2x2(jax.nn.relu(conv(x, k, 1, ((1, 1), (1, 1)))))

    got, want = (
      self.variant(
        jax.value_and_grad(lambda x, k, f=f: jnp.sum(f(x, k) * weights), argnums=(0, 1))
      )(x, kernel)
      for f in (by_phases, reference)
    )
    chex.assert_shape(by_phases(x, kernel), (2, h // 2, w // 2, 5))
    # Halves and small integers: exact products, so ties (shared equally) are ties in both.
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)

  def test_phases_keep_a_sharded_batch_on_its_devices(self):
    """An image's four phases sit next to it on the batch axis, so data parallelism needs no
    collective for them (phase-major blocks needed all-to-alls)."""
    mesh = parallel.make_mesh()
    x = jax.device_put(jnp.ones((2 * mesh.size, 6, 6, 1)), parallel.batch_sharding(mesh))
    f = jax.jit(
      lambda x: jax.grad(
        lambda x: jnp.sum(
          cpu_lowering.max_over_phases(cpu_lowering.pooling_phases(x)[:, 1:, 1:]) ** 2
        )
      )(x),
      out_shardings=parallel.batch_sharding(mesh),
    )
    hlo = f.lower(x).compile().as_text()
    for op in ("all-to-all", "all-gather", "collective-permute", "all-reduce"):
      assert f" {op}(" not in hlo and f" {op}-start(" not in hlo, op

  def test_cnn_takes_phases_where_they_pay(self):
    pools_by_phases = cpu_lowering.CPU.pools_by_phases
    assert pools_by_phases(jnp.zeros((2, 28, 28, 1)))
    assert pools_by_phases(jnp.zeros((2, 32, 32, 3)))
    assert not pools_by_phases(jnp.zeros((2, 14, 14, 16)))  # input gradient by phases
    assert not pools_by_phases(jnp.zeros((2, 27, 28, 1)))  # odd: statistics would differ
    assert not dataclasses.replace(cpu_lowering.CPU, pooling_phases=False).pools_by_phases(
      jnp.zeros((2, 28, 28, 1))
    )


def _cnn_train_outputs(lowering, variables, x):
  """Logits, features, batch statistics and parameter gradients of one training-mode pass."""
  model = models.create_backbone("cnn", NUM_CLASSES, lowering=lowering)

  def train_apply(params):
    (logits, features), state = model.apply(
      {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
    )
    return jnp.sum(jnp.tanh(logits)), (logits, features, state)

  return jax.jit(jax.value_and_grad(train_apply, has_aux=True))(variables["params"])


@pytest.mark.parametrize("pooling_phases", [True, False])
def test_cnn_with_the_cpu_lowering_equals_the_plain_cnn(pooling_phases):
  """Only the summation order of the batch statistics differs, so values agree to rounding."""
  _, variables, _ = _initialised("cnn", RUN_SHAPE["cnn"])
  x = jax.random.normal(jax.random.key(3), (4, *RUN_SHAPE["cnn"][1:]))
  lowering = dataclasses.replace(cpu_lowering.CPU, pooling_phases=pooling_phases)
  lowered, plain = (_cnn_train_outputs(lw, variables, x) for lw in (lowering, None))
  chex.assert_trees_all_equal_structs(lowered, plain)
  chex.assert_trees_all_close(lowered, plain, rtol=1e-5, atol=1e-5)


def test_fmcenet_with_the_cpu_lowering_equals_the_plain_fmcenet():
  fmap = jax.random.normal(jax.random.key(2), (4, 7, 7, 64))
  heads = [models.FMCENet(num_phases=5, lowering=lw) for lw in (cpu_lowering.CPU, None)]
  variables = heads[1].init(jax.random.key(0), fmap, train=False)

  def train_loss(head, fmap):
    logits, _ = head.apply(variables, fmap, train=True, mutable=["batch_stats"])
    return jnp.sum(jnp.tanh(logits))

  lowered, plain = (
    jax.jit(jax.value_and_grad(functools.partial(train_loss, h)))(fmap) for h in heads
  )
  chex.assert_trees_all_close(lowered, plain, rtol=1e-5, atol=1e-5)


def test_jitted_cnn_gradient_equals_op_by_op():
  """Jit must not change the gradient beyond rounding. The max-pool's gradient finds each maximum
  by comparing its input with its output, which XLA may evaluate in different fusions. With a
  BatchNorm that summed by blocked matmuls (tried for speed), the jitted CNN gradient lost most
  of its value while op by op, where nothing is fused, it was right."""
  model = models.create_backbone("cnn", NUM_CLASSES, lowering=cpu_lowering.CPU)
  x = jax.random.normal(jax.random.key(0), (32, *RUN_SHAPE["cnn"][1:]))
  variables = model.init(jax.random.key(1), x, train=False)

  def loss(params):
    (logits, _), _ = model.apply(
      {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
    )
    return jnp.sum(jax.nn.log_softmax(logits)[:, 0])

  grads = jax.grad(loss)
  chex.assert_trees_all_close(
    jax.jit(grads)(variables["params"]), grads(variables["params"]), rtol=1e-3, atol=1e-4
  )


class TinyBackbone(nn.Module):
  """Your own backbone, as a user would write it: `(logits, {name: map})` from `(x, train)`."""

  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    block = nn.relu(nn.Conv(4, (3, 3), dtype=self.dtype, name="block")(x))
    pooled = jnp.mean(block, axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=self.dtype)(pooled)
    return logits, {"pooled": pooled, "block": block}


def tiny_factory(num_classes: int, dtype: Any) -> nn.Module:
  return TinyBackbone(num_classes=num_classes, dtype=dtype)


def wrong_call_factory(num_classes: int, dtype: Any) -> nn.Module:
  return nn.Dense(num_classes, dtype=dtype)  # called as model(x, train=...): fails


def ten_classes_factory(num_classes: int, dtype: Any) -> nn.Module:
  del num_classes  # ignored: always 10 logits
  return TinyBackbone(num_classes=10, dtype=dtype)


not_callable = 3


def no_dtype_factory(num_classes: int) -> nn.Module:
  return TinyBackbone(num_classes=num_classes)


def raising_factory(num_classes: int, dtype: Any) -> nn.Module:
  raise RuntimeError(f"no model for {num_classes} classes in {dtype}")


def not_a_module_factory(num_classes: int, dtype: Any) -> Any:
  return lambda x, train: (x, {})


def test_your_own_backbone_resolves_and_lists_its_feature_maps():
  spec = f"{__name__}:tiny_factory"
  model = models.create_backbone(spec, NUM_CLASSES, jnp.bfloat16)
  assert isinstance(model, TinyBackbone) and model.dtype == jnp.bfloat16
  _, (logits, features) = _abstract(model, (2, 28, 28, 1))
  chex.assert_shape(logits, (2, NUM_CLASSES))
  assert set(features) == {"pooled", "block"}
  # Only the [N, H, W, C] maps an FMCE-Net can read, in the model's own order.
  assert models.feature_names(spec, NUM_CLASSES, (28, 28, 1)) == ("block",)
  assert models.feature_names("resnet18", NUM_CLASSES, (32, 32, 3)) == models.STAGES["resnet18"]


@pytest.mark.parametrize(
  "spec, message",
  [
    ("vgg16", "unknown backbone 'vgg16'"),
    ("no_such_package_xyz.models:factory", "cannot import 'no_such_package_xyz.models'"),
    (f"{__name__}:no_such_factory", "has no attribute 'no_such_factory'"),
    (f"{__name__}:not_callable", "non-callable 'not_callable'"),
    (f"{__name__}:no_dtype_factory", r"no_dtype_factory\(num_classes=..., dtype=...\) cannot"),
    (f"{__name__}:", "unknown backbone"),
    (f"{__name__}:raising_factory", "the factory raised RuntimeError: no model for 10 classes"),
    (f"{__name__}:not_a_module_factory", "returned function, not a Flax module"),
  ],
)
def test_bad_backbones_name_the_value_and_what_is_accepted(spec, message):
  with pytest.raises(ValueError, match=message) as error:
    models.create_backbone(spec, NUM_CLASSES)
  assert "resnet18" in str(error.value) and "package.module:factory" in str(error.value)


@pytest.mark.parametrize(
  "factory, message",
  [
    ("wrong_call_factory", "fails on a"),
    ("ten_classes_factory", r"logits of shape \(1, 7\)"),
  ],
)
def test_feature_names_rejects_models_breaking_the_contract(factory, message):
  spec = f"{__name__}:{factory}"
  with pytest.raises(ValueError, match=message) as error:
    models.feature_names(spec, 7, (8, 8, 1))
  assert repr(spec) in str(error.value)
