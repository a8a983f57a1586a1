"""Flax backbones and the FMCE-Net head: plain Flax, one program on every platform.

Every backbone returns `(logits, features)` so that the RAL step reads any named stage from the same
forward pass that produces the loss. Layouts follow the PyTorch references (kuangliu/pytorch-cifar
ResNets, torchvision `shufflenet_v2_x1_0`) down to padding and channel order, so a PyTorch model
with copied weights gives the same logits (`torch_ref.py`). Convs use explicit `padding=1` rather
than "SAME": for stride 2 on even inputs "SAME" pads only bottom/right, PyTorch both sides.

Nothing here asks which host it runs on. Where XLA:CPU runs other lowerings of the convs,
BatchNorm and pooling faster, the caller picks them once from its mesh's platform
(`cpu_lowering.for_platform`) and passes them as the `lowering` field, as Flax's ImageNet example
swaps in another conv module; with `lowering=None` every model is Flax's own modules.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from fmcejax import cpu_lowering

ModuleDef = Any
Dtype = Any
Lowering = cpu_lowering.Lowering

BACKBONES = ("cnn", "resnet18", "resnet50", "shufflenet_v2")
STAGES: dict[str, tuple[str, ...]] = {
  "cnn": ("conv1", "conv2", "conv3"),
  "resnet18": ("stem", "stage1", "stage2", "stage3", "stage4"),
  "resnet50": ("stem", "stage1", "stage2", "stage3", "stage4"),
  "shufflenet_v2": ("stem", "stage2", "stage3", "stage4", "conv5"),
}
DEFAULT_MODULE: dict[str, str] = {name: stages[-1] for name, stages in STAGES.items()}

# torchvision's ResNet init (kaiming_normal_, mode="fan_out"): untruncated normal.
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_PAD1 = ((1, 1), (1, 1))


def _conv_and_norm(
  dtype: Dtype, train: bool, lowering: Lowering | None
) -> tuple[ModuleDef, ModuleDef]:
  """Bias-free He-initialised conv and BatchNorm, computing in `dtype` with float32 params: Flax's
  `nn.Conv` and `nn.BatchNorm`, or `lowering`'s (same variables, same values).

  No `axis_name`: data parallelism jits over a sharded global batch, so the batch statistics are
  already global.
  """
  conv, norm = (nn.Conv, nn.BatchNorm) if lowering is None else (lowering.conv, lowering.norm)
  conv = functools.partial(
    conv, use_bias=False, kernel_init=_CONV_INIT, dtype=dtype, param_dtype=jnp.float32
  )
  norm = functools.partial(
    norm,
    use_running_average=not train,
    momentum=0.9,
    epsilon=1e-5,
    dtype=dtype,
    param_dtype=jnp.float32,
  )
  return conv, norm


def _classifier(x: jax.Array, num_classes: int, dtype: Dtype) -> jax.Array:
  """Global average pool and Dense, returning float32 logits whatever the compute dtype."""
  x = jnp.mean(x, axis=(1, 2))
  x = nn.Dense(num_classes, dtype=dtype, param_dtype=jnp.float32, name="fc")(x)
  return jnp.asarray(x, jnp.float32)


def param_count(params: Any) -> int:
  """Number of scalars in a pytree of arrays or `jax.ShapeDtypeStruct`s (from `jax.eval_shape`)."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))


def max_pool_2x2(x: jax.Array, lowering: Lowering | None = None) -> jax.Array:
  """2x2/2 max-pool, VALID (odd sizes drop the last row or column)."""
  if lowering is not None:
    return lowering.max_pool_2x2(x)
  return nn.max_pool(x, (2, 2), strides=(2, 2))


class SimpleCNN(nn.Module):
  """Three conv-BN-ReLU blocks, 2x2 max-pool after the first two (~24k params): small enough for
  the whole method on a laptop CPU."""

  num_classes: int
  dtype: Dtype = jnp.float32
  widths: tuple[int, int, int] = (16, 32, 64)
  lowering: Lowering | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    conv, norm = _conv_and_norm(self.dtype, train, self.lowering)
    features = {}
    for i, width in enumerate(self.widths):
      pool = i < 2
      if pool and self.lowering is not None and self.lowering.pools_by_phases(x):
        # The same block, its conv evaluated at each 2x2 pooling phase (`cpu_lowering`).
        x = conv(width, (3, 3), 2, padding=((0, 0), (0, 0)), name=f"conv{i + 1}")(
          cpu_lowering.pooling_phases(x)
        )
        x = cpu_lowering.max_over_phases(nn.relu(norm(name=f"bn{i + 1}")(x)))
      else:
        x = conv(width, (3, 3), padding=_PAD1, name=f"conv{i + 1}")(x)
        x = nn.relu(norm(name=f"bn{i + 1}")(x))
        if pool:
          x = max_pool_2x2(x, self.lowering)
      features[f"conv{i + 1}"] = x
    return _classifier(x, self.num_classes, self.dtype), features


class BasicBlock(nn.Module):
  """ResNet-18/34 block: two 3x3 convs, identity or 1x1-projection shortcut."""

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  zero_init_residual: bool = False
  expansion: ClassVar[int] = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    last_scale_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    y = self.conv(self.filters, (3, 3), self.strides, padding=_PAD1, name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = self.conv(self.filters, (3, 3), padding=_PAD1, name="conv2")(y)
    y = self.norm(scale_init=last_scale_init, name="bn2")(y)
    return nn.relu(y + _shortcut(self, x))


class Bottleneck(nn.Module):
  """ResNet-50 block: 1x1 reduce, 3x3 (carrying the stride), 1x1 expand by 4."""

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  zero_init_residual: bool = False
  expansion: ClassVar[int] = 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    last_scale_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    y = self.conv(self.filters, (1, 1), name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = self.conv(self.filters, (3, 3), self.strides, padding=_PAD1, name="conv2")(y)
    y = nn.relu(self.norm(name="bn2")(y))
    y = self.conv(self.filters * self.expansion, (1, 1), name="conv3")(y)
    y = self.norm(scale_init=last_scale_init, name="bn3")(y)
    return nn.relu(y + _shortcut(self, x))


def _shortcut(block: BasicBlock | Bottleneck, x: jax.Array) -> jax.Array:
  """Identity, or 1x1 conv + BN when the block changes stride or width (kuangliu's condition).

  Called from the block's compact `__call__`, so the submodules are registered on `block`.
  """
  out_features = block.filters * block.expansion
  if block.strides == 1 and x.shape[-1] == out_features:
    return x
  x = block.conv(out_features, (1, 1), block.strides, parent=block, name="shortcut_conv")(x)
  return block.norm(parent=block, name="shortcut_bn")(x)


class ResNet(nn.Module):
  """CIFAR ResNet (kuangliu layout): 3x3 stride-1 stem, no max-pool, so 32x32 ends at 4x4."""

  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  num_classes: int
  zero_init_residual: bool = False
  dtype: Dtype = jnp.float32
  lowering: Lowering | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    conv, norm = _conv_and_norm(self.dtype, train, self.lowering)
    x = conv(64, (3, 3), padding=_PAD1, name="conv1")(x)
    x = nn.relu(norm(name="bn1")(x))
    features = {"stem": x}
    for i, (num_blocks, filters) in enumerate(zip(self.stage_sizes, (64, 128, 256, 512))):
      for j in range(num_blocks):
        x = self.block_cls(
          filters,
          conv=conv,
          norm=norm,
          strides=2 if i > 0 and j == 0 else 1,
          zero_init_residual=self.zero_init_residual,
          name=f"stage{i + 1}_block{j}",
        )(x)
      features[f"stage{i + 1}"] = x
    return _classifier(x, self.num_classes, self.dtype), features


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck)


def channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
  """torchvision's channel_shuffle on the last (channel) axis: [g, c/g] -> [c/g, g] -> flat."""
  *lead, channels = x.shape
  x = x.reshape(*lead, groups, channels // groups)
  return jnp.swapaxes(x, -1, -2).reshape(*lead, channels)


class InvertedResidual(nn.Module):
  """ShuffleNetV2 unit. Stride 1 splits the channels in half and transforms only the second half;
  stride 2 feeds the whole input to both branches, doubling the width. Then a 2-group shuffle."""

  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    branch_features = self.features // 2
    if self.strides == 1:
      x1, x2 = jnp.split(x, 2, axis=-1)  # torch.chunk(2, dim=1)
    else:
      x1 = x2 = x
      in_features = x.shape[-1]
      x1 = self.conv(
        in_features,
        (3, 3),
        self.strides,
        padding=_PAD1,
        feature_group_count=in_features,
        name="branch1_dw",
      )(x1)
      x1 = self.norm(name="branch1_dw_bn")(x1)
      x1 = self.conv(branch_features, (1, 1), name="branch1_pw")(x1)
      x1 = nn.relu(self.norm(name="branch1_pw_bn")(x1))
    x2 = self.conv(branch_features, (1, 1), name="branch2_pw1")(x2)
    x2 = nn.relu(self.norm(name="branch2_pw1_bn")(x2))
    x2 = self.conv(
      branch_features,
      (3, 3),
      self.strides,
      padding=_PAD1,
      feature_group_count=branch_features,
      name="branch2_dw",
    )(x2)
    x2 = self.norm(name="branch2_dw_bn")(x2)
    x2 = self.conv(branch_features, (1, 1), name="branch2_pw2")(x2)
    x2 = nn.relu(self.norm(name="branch2_pw2_bn")(x2))
    return channel_shuffle(jnp.concatenate([x1, x2], axis=-1), 2)


class ShuffleNetV2(nn.Module):
  """torchvision shufflenet_v2_x1_0. `small_input` (CIFAR/MNIST) keeps full resolution in the stem
  (stride-1 conv, no max-pool) with the same parameters; False is torchvision's ImageNet stem."""

  num_classes: int
  stages_repeats: Sequence[int] = (4, 8, 4)
  stages_out_channels: Sequence[int] = (24, 116, 232, 464, 1024)
  small_input: bool = True
  dtype: Dtype = jnp.float32
  lowering: Lowering | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    conv, norm = _conv_and_norm(self.dtype, train, self.lowering)
    stem_strides = 1 if self.small_input else 2
    x = conv(self.stages_out_channels[0], (3, 3), stem_strides, padding=_PAD1, name="conv1")(x)
    x = nn.relu(norm(name="bn1")(x))
    if not self.small_input:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_PAD1)
    features = {"stem": x}
    for i, (repeats, width) in enumerate(zip(self.stages_repeats, self.stages_out_channels[1:-1])):
      for j in range(repeats):
        x = InvertedResidual(
          width, 2 if j == 0 else 1, conv=conv, norm=norm, name=f"stage{i + 2}_unit{j}"
        )(x)
      features[f"stage{i + 2}"] = x
    x = conv(self.stages_out_channels[-1], (1, 1), name="conv5")(x)
    x = nn.relu(norm(name="conv5_bn")(x))
    features["conv5"] = x
    return _classifier(x, self.num_classes, self.dtype), features


_CONSTRUCTORS: dict[str, Callable[..., nn.Module]] = {
  "cnn": SimpleCNN,
  "resnet18": ResNet18,
  "resnet50": ResNet50,
  "shufflenet_v2": ShuffleNetV2,
}
_ACCEPTED = (
  f"one of {', '.join(BACKBONES)}, or 'package.module:factory' naming a function "
  "factory(num_classes=..., dtype=...) that returns a Flax Linen module, or "
  "factory(num_classes=..., dtype=..., rngs=...) that returns a Flax NNX module, called as "
  "model(x, train=...) -> (logits, {name: feature map})"
)


def create_backbone(
  name: str, num_classes: int, dtype: Dtype = jnp.float32, *, lowering: Lowering | None = None
) -> nn.Module:
  """The backbone `name`, computing in `dtype` with float32 params.

  `name` is one of `BACKBONES`, or `package.module:factory`: your own Flax backbone, from
  `factory(num_classes=num_classes, dtype=dtype)`. Its module is called as `model(x, train=...)`
  and returns `(logits, features)`, features a dict of [N, H, W, C] maps (see `feature_names`).
  A factory that takes `rngs` builds an NNX module inside `nnx.bridge.to_linen`: weights from
  the run's seed, state as Linen variables (`params`, `batch_stats`) for the same pure step.
  `lowering`: built-in backbones only. ValueError naming `name` when it is neither.
  """
  if name in _CONSTRUCTORS:
    return _CONSTRUCTORS[name](num_classes=num_classes, dtype=dtype, lowering=lowering)
  factory = _factory(name)
  if _takes_rngs(factory):
    return nnx.bridge.to_linen(factory, num_classes=num_classes, dtype=dtype)
  try:
    model = factory(num_classes=num_classes, dtype=dtype)
  except Exception as e:  # noqa: BLE001 - any failure of the user's factory is this error
    raise ValueError(
      f"backbone {name!r}: the factory raised {type(e).__name__}: {e}; accepted: {_ACCEPTED}"
    ) from e
  if not isinstance(model, nn.Module):
    nnx_hint = " (an NNX factory takes rngs, to build the module per seed)"
    raise ValueError(
      f"backbone {name!r} returned {type(model).__name__}, not a Flax module"
      f"{nnx_hint if isinstance(model, nnx.Module) else ''}; accepted: {_ACCEPTED}"
    )
  return model


def _takes_rngs(factory: Callable[..., Any]) -> bool:
  try:
    return "rngs" in inspect.signature(factory).parameters
  except (TypeError, ValueError):  # no signature to inspect (some builtins)
    return False


def _factory(spec: str) -> Callable[..., Any]:
  """The callable `package.module:factory` names, checked to take `num_classes` and `dtype`."""
  module_name, sep, attribute = spec.partition(":")
  if not (sep and module_name and attribute):
    raise ValueError(f"unknown backbone {spec!r}; accepted: {_ACCEPTED}")
  try:
    module = importlib.import_module(module_name)
  except Exception as e:  # noqa: BLE001 - not found, or failing on import: a bad value either way
    raise ValueError(
      f"backbone {spec!r}: cannot import {module_name!r} ({type(e).__name__}: {e}); "
      f"accepted: {_ACCEPTED}"
    ) from e
  factory = getattr(module, attribute, None)
  if factory is None or not callable(factory):
    what = "has no attribute" if factory is None else "has a non-callable"
    raise ValueError(
      f"backbone {spec!r}: module {module_name!r} {what} {attribute!r}; accepted: {_ACCEPTED}"
    )
  try:
    rngs = {"rngs": None} if _takes_rngs(factory) else {}
    inspect.signature(factory).bind(num_classes=1, dtype=jnp.float32, **rngs)
  except TypeError as e:
    raise ValueError(
      f"backbone {spec!r}: {attribute}(num_classes=..., dtype=...) cannot be "
      f"called ({e}); accepted: {_ACCEPTED}"
    ) from e
  except ValueError:  # no signature to inspect (some builtins): the call will tell
    pass
  return factory


def feature_names(
  backbone: str, num_classes: int, input_shape: Sequence[int], dtype: Dtype = jnp.float32
) -> tuple[str, ...]:
  """The names of the [N, H, W, C] feature maps `backbone` returns, in its order (the last is the
  default `module`): `STAGES` for a built-in name, else traced with `jax.eval_shape` on one
  `input_shape` image (nothing is compiled or computed).

  Raises ValueError naming `backbone` when its model does not return `(logits, features)` with
  [1, num_classes] logits and at least one such map.
  """
  if backbone in STAGES:
    return STAGES[backbone]
  model = create_backbone(backbone, num_classes, dtype)
  returned = []

  def forward(rng: jax.Array, x: jax.Array) -> Any:
    variables = model.init({"params": rng, "dropout": rng}, x, train=False)
    out = model.apply(variables, x, train=False)
    returned.append(out)  # the dict as returned, keys in the model's order
    return out

  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  try:
    out = jax.eval_shape(forward, jax.random.key(0), x)
  except Exception as e:  # noqa: BLE001 - any failure of the user's model is this error
    raise ValueError(
      f"backbone {backbone!r} fails on a {tuple(x.shape)} input: {type(e).__name__}: {e}"
    ) from e
  if not (
    isinstance(out, tuple)
    and len(out) == 2
    and isinstance(returned[0][1], dict)
    and getattr(out[0], "shape", None) == (1, num_classes)
  ):
    raise ValueError(
      f"backbone {backbone!r} returned {jax.tree.map(lambda a: a.shape, out)} "
      f"for a {tuple(x.shape)} input; accepted: {_ACCEPTED}, logits of shape "
      f"(1, {num_classes})"
    )
  names = tuple(k for k in returned[0][1] if getattr(out[1][k], "ndim", 0) == 4)
  if not names:
    raise ValueError(
      f"backbone {backbone!r} returns no [N, H, W, C] feature map for the "
      f"FMCE-Net to read; accepted: {_ACCEPTED}"
    )
  return names


class FMCENet(nn.Module):
  """FMCE-Net: classifies a backbone feature map into one of `num_phases` convergence phases.

  Kept small because it is trained on extracted feature maps and, in FMCE-Net++, evaluated inside
  every backbone step, where its gradient w.r.t. the feature map drives the RAL loss. The first
  block halves maps larger than 8x8 so early stages (e.g. 32x32x64) stay cheap.
  """

  num_phases: int
  width: int = 64
  depth: int = 2
  dtype: Dtype = jnp.float32
  lowering: Lowering | None = None

  @nn.compact
  def __call__(self, feature_map: jax.Array, train: bool) -> jax.Array:
    conv, norm = _conv_and_norm(self.dtype, train, self.lowering)
    x = feature_map
    for i in range(self.depth):
      strides = 2 if i == 0 and min(x.shape[1:3]) > 8 else 1
      x = conv(self.width, (3, 3), strides, padding=_PAD1, name=f"conv{i + 1}")(x)
      x = nn.relu(norm(name=f"bn{i + 1}")(x))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.relu(nn.Dense(self.width, dtype=self.dtype, param_dtype=jnp.float32, name="fc1")(x))
    x = nn.Dense(self.num_phases, dtype=self.dtype, param_dtype=jnp.float32, name="fc2")(x)
    return jnp.asarray(x, jnp.float32)
