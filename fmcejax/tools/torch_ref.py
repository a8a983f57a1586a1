"""PyTorch reference of the backbones, the FMCE-Net head and the RAL train step.

It exists to check the Flax models (same layers, same parameter counts, same logits from copied
weights) and to give the benchmark an honest baseline. Module attribute names equal the Flax
module names, so `copy_flax_variables` maps a Flax path like `stage1_block0/conv1/kernel` onto
`model.stage1_block0.conv1.weight` without a hand-written table.

`torch` is an optional dependency (the `bench` extra): nothing else in `fmcejax` imports this
module at import time. Differences from the Flax side that do not change any result compared
here: torch's BatchNorm stores the unbiased batch variance in its running variance (Flax the
biased one), and its running-stat momentum is 1 - Flax's (0.1 vs 0.9).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fmcejax.models import BACKBONES


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
  """Bias-free conv with symmetric padding kernel // 2, like the Flax `padding=((1, 1), (1, 1))`."""
  return nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)


def _bn(channels: int) -> nn.BatchNorm2d:
  return nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)


def _classifier(fc: nn.Linear, x: torch.Tensor) -> torch.Tensor:
  """Global average pool and Dense, float32 logits (as `models._classifier`)."""
  return fc(x.mean(dim=(2, 3))).float()


class SimpleCNN(nn.Module):
  """`models.SimpleCNN`: three conv-BN-ReLU blocks, 2x2 max-pool after the first two."""

  def __init__(self, num_classes: int, in_channels: int, widths: Sequence[int] = (16, 32, 64)):
    super().__init__()
    cin = in_channels
    for i, width in enumerate(widths):
      setattr(self, f"conv{i + 1}", _conv(cin, width, 3))
      setattr(self, f"bn{i + 1}", _bn(width))
      cin = width
    self.num_blocks = len(widths)
    self.fc = nn.Linear(cin, num_classes)

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    features = {}
    for i in range(self.num_blocks):
      x = F.relu(getattr(self, f"bn{i + 1}")(getattr(self, f"conv{i + 1}")(x)))
      if i < 2:
        x = F.max_pool2d(x, 2, 2)
      features[f"conv{i + 1}"] = x
    return _classifier(self.fc, x), features


class _Block(nn.Module):
  """Residual block base: the identity or 1x1-projection shortcut (`models._shortcut`)."""

  expansion = 1

  def _add_shortcut(self, cin: int, cout: int, stride: int) -> None:
    """kuangliu's condition: project when the stride or the width changes."""
    self.project = stride != 1 or cin != cout
    if self.project:
      self.shortcut_conv, self.shortcut_bn = _conv(cin, cout, 1, stride), _bn(cout)

  def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
    return self.shortcut_bn(self.shortcut_conv(x)) if self.project else x


class BasicBlock(_Block):
  """`models.BasicBlock`: two 3x3 convs."""

  def __init__(self, cin: int, filters: int, stride: int):
    super().__init__()
    self.conv1, self.bn1 = _conv(cin, filters, 3, stride), _bn(filters)
    self.conv2, self.bn2 = _conv(filters, filters, 3), _bn(filters)
    self._add_shortcut(cin, filters, stride)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + self._shortcut(x))


class Bottleneck(_Block):
  """`models.Bottleneck`: 1x1 reduce, 3x3 carrying the stride, 1x1 expand by 4."""

  expansion = 4

  def __init__(self, cin: int, filters: int, stride: int):
    super().__init__()
    self.conv1, self.bn1 = _conv(cin, filters, 1), _bn(filters)
    self.conv2, self.bn2 = _conv(filters, filters, 3, stride), _bn(filters)
    self.conv3, self.bn3 = _conv(filters, filters * 4, 1), _bn(filters * 4)
    self._add_shortcut(cin, filters * 4, stride)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return F.relu(y + self._shortcut(x))


class ResNet(nn.Module):
  """`models.ResNet` (kuangliu CIFAR layout): 3x3 stride-1 stem, no max-pool."""

  def __init__(
    self, block: type[_Block], stage_sizes: Sequence[int], num_classes: int, in_channels: int
  ):
    super().__init__()
    self.conv1, self.bn1 = _conv(in_channels, 64, 3), _bn(64)
    self.stages: list[list[str]] = []
    cin = 64
    for i, (num_blocks, filters) in enumerate(zip(stage_sizes, (64, 128, 256, 512))):
      names = []
      for j in range(num_blocks):
        name = f"stage{i + 1}_block{j}"
        setattr(self, name, block(cin, filters, 2 if i > 0 and j == 0 else 1))
        cin = filters * block.expansion
        names.append(name)
      self.stages.append(names)
    self.fc = nn.Linear(cin, num_classes)

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = F.relu(self.bn1(self.conv1(x)))
    features = {"stem": x}
    for i, names in enumerate(self.stages):
      for name in names:
        x = getattr(self, name)(x)
      features[f"stage{i + 1}"] = x
    return _classifier(self.fc, x), features


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
  """torchvision's channel_shuffle on NCHW."""
  b, c, h, w = x.shape
  return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class InvertedResidual(nn.Module):
  """`models.InvertedResidual` (torchvision's ShuffleNetV2 unit)."""

  def __init__(self, cin: int, features: int, stride: int):
    super().__init__()
    self.stride = stride
    half = features // 2
    if stride > 1:
      self.branch1_dw, self.branch1_dw_bn = _conv(cin, cin, 3, stride, groups=cin), _bn(cin)
      self.branch1_pw, self.branch1_pw_bn = _conv(cin, half, 1), _bn(half)
    self.branch2_pw1 = _conv(cin if stride > 1 else half, half, 1)
    self.branch2_pw1_bn = _bn(half)
    self.branch2_dw, self.branch2_dw_bn = _conv(half, half, 3, stride, groups=half), _bn(half)
    self.branch2_pw2, self.branch2_pw2_bn = _conv(half, half, 1), _bn(half)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if self.stride == 1:
      x1, x2 = x.chunk(2, dim=1)
    else:
      x1 = self.branch1_dw_bn(self.branch1_dw(x))
      x1 = F.relu(self.branch1_pw_bn(self.branch1_pw(x1)))
      x2 = x
    x2 = F.relu(self.branch2_pw1_bn(self.branch2_pw1(x2)))
    x2 = self.branch2_dw_bn(self.branch2_dw(x2))
    x2 = F.relu(self.branch2_pw2_bn(self.branch2_pw2(x2)))
    return channel_shuffle(torch.cat([x1, x2], dim=1), 2)


class ShuffleNetV2(nn.Module):
  """`models.ShuffleNetV2` (torchvision shufflenet_v2_x1_0; `small_input` stem by default)."""

  def __init__(
    self,
    num_classes: int,
    in_channels: int,
    small_input: bool = True,
    stages_repeats: Sequence[int] = (4, 8, 4),
    stages_out_channels: Sequence[int] = (24, 116, 232, 464, 1024),
  ):
    super().__init__()
    self.small_input = small_input
    self.conv1 = _conv(in_channels, stages_out_channels[0], 3, 1 if small_input else 2)
    self.bn1 = _bn(stages_out_channels[0])
    self.stages: list[list[str]] = []
    cin = stages_out_channels[0]
    for i, (repeats, width) in enumerate(zip(stages_repeats, stages_out_channels[1:-1])):
      names = []
      for j in range(repeats):
        name = f"stage{i + 2}_unit{j}"
        setattr(self, name, InvertedResidual(cin, width, 2 if j == 0 else 1))
        cin = width
        names.append(name)
      self.stages.append(names)
    self.conv5, self.conv5_bn = _conv(cin, stages_out_channels[-1], 1), _bn(stages_out_channels[-1])
    self.fc = nn.Linear(stages_out_channels[-1], num_classes)

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = F.relu(self.bn1(self.conv1(x)))
    if not self.small_input:
      x = F.max_pool2d(x, 3, 2, 1)
    features = {"stem": x}
    for i, names in enumerate(self.stages):
      for name in names:
        x = getattr(self, name)(x)
      features[f"stage{i + 2}"] = x
    x = F.relu(self.conv5_bn(self.conv5(x)))
    features["conv5"] = x
    return _classifier(self.fc, x), features


class FMCENet(nn.Module):
  """`models.FMCENet`. The first block's stride depends on the map size (2 above 8x8), so the
  torch module is built for one feature-map shape `(h, w, c)`."""

  def __init__(
    self, num_phases: int, feature_shape: Sequence[int], width: int = 64, depth: int = 2
  ):
    super().__init__()
    h, w, cin = feature_shape
    self.depth = depth
    for i in range(depth):
      stride = 2 if i == 0 and min(h, w) > 8 else 1
      setattr(self, f"conv{i + 1}", _conv(cin, width, 3, stride))
      setattr(self, f"bn{i + 1}", _bn(width))
      cin = width
    self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, num_phases)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    for i in range(self.depth):
      x = F.relu(getattr(self, f"bn{i + 1}")(getattr(self, f"conv{i + 1}")(x)))
    return self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3))))).float()


def create_backbone(name: str, num_classes: int, in_channels: int) -> nn.Module:
  """The torch twin of `models.create_backbone(name, num_classes)` for `in_channels` inputs."""
  if name == "cnn":
    return SimpleCNN(num_classes, in_channels)
  if name == "resnet18":
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, in_channels)
  if name == "resnet50":
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, in_channels)
  if name == "shufflenet_v2":
    return ShuffleNetV2(num_classes, in_channels)
  raise ValueError(f"unknown backbone {name!r}; accepted: {', '.join(BACKBONES)}")


def param_count(module: nn.Module) -> int:
  """Trainable-parameter scalars (BatchNorm running stats are buffers, not counted)."""
  return sum(p.numel() for p in module.parameters())


def _tensor(value: Any, like: torch.Tensor) -> torch.Tensor:
  return torch.from_numpy(np.asarray(value, np.float32).copy()).to(like.device, like.dtype)


def copy_flax_variables(module: nn.Module, variables: Mapping[str, Any]) -> None:
  """Copies Flax `{"params", "batch_stats"}` into `module` in place.

  Kernels go from Flax HWIO `[kh, kw, in / groups, out]` to torch OIHW `[out, in / groups, kh,
  kw]` (depthwise convs included) and Dense `[in, out]` to `[out, in]`. Raises if a shape
  differs or a torch parameter or running stat is left uncopied, so a layout mismatch cannot
  pass silently.
  """
  params = variables["params"]
  stats = variables.get("batch_stats", {})
  done: set[str] = set()

  def assign(path: str, name: str, value: Any, transpose: tuple[int, ...] | None = None) -> None:
    target = module.get_submodule(path) if path else module
    tensor = getattr(target, name)
    array = np.asarray(value)
    if transpose is not None:
      array = array.transpose(transpose)
    if tuple(array.shape) != tuple(tensor.shape):
      raise ValueError(f"{path}.{name}: Flax shape {array.shape} vs torch {tuple(tensor.shape)}")
    with torch.no_grad():
      tensor.copy_(_tensor(array, tensor))
    done.add(f"{path}.{name}")

  def walk(tree: Mapping[str, Any], stat_tree: Mapping[str, Any], path: tuple[str, ...]) -> None:
    dotted = ".".join(path)
    if "kernel" in tree:
      kernel = np.asarray(tree["kernel"])
      assign(dotted, "weight", kernel, (3, 2, 0, 1) if kernel.ndim == 4 else (1, 0))
      if "bias" in tree:
        assign(dotted, "bias", tree["bias"])
      return
    if "scale" in tree:
      assign(dotted, "weight", tree["scale"])
      assign(dotted, "bias", tree["bias"])
      assign(dotted, "running_mean", stat_tree["mean"])
      assign(dotted, "running_var", stat_tree["var"])
      return
    for key, sub in tree.items():
      walk(sub, stat_tree.get(key, {}), (*path, key))

  walk(params, stats, ())
  expected = {name for name, _ in module.named_parameters()}
  expected |= {
    name for name, _ in module.named_buffers() if not name.endswith("num_batches_tracked")
  }
  missing = expected - done
  if missing:
    raise ValueError(f"torch tensors not found in the Flax variables: {sorted(missing)}")


def frozen(head: nn.Module) -> nn.Module:
  """The FMCE-Net as RAL uses it: no trainable parameters, BatchNorm on running statistics.

  Gradients still flow through it into the backbone's feature map.
  """
  head.eval()
  for p in head.parameters():
    p.requires_grad_(False)
  return head


def create_optimizer(
  model: nn.Module,
  learning_rate: float,
  *,
  weight_decay: float,
  momentum: float = 0.9,
  nesterov: bool = True,
) -> torch.optim.SGD:
  """`steps.create_optimizer("sgd", ...)`: decay on conv/dense kernels only (ndim > 1).

  torch's SGD adds `weight_decay * p` to the gradient before momentum and its first momentum
  buffer is the gradient, which is optax's `add_decayed_weights` + `sgd(nesterov=True)`.
  """
  decay = [p for p in model.parameters() if p.ndim > 1]
  no_decay = [p for p in model.parameters() if p.ndim <= 1]
  return torch.optim.SGD(
    [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
    lr=learning_rate,
    momentum=momentum,
    nesterov=nesterov and momentum > 0,
  )


def ral_loss(
  logits: torch.Tensor,
  labels: torch.Tensor,
  head_logits: torch.Tensor | None,
  alpha: float,
  mode: str = "convex",
  target: str = "phase",
) -> torch.Tensor:
  """`steps.ral_loss`: cross-entropy, plus alpha * L_conv toward the last phase with a head."""
  ce = F.cross_entropy(logits, labels)
  if head_logits is None:
    return ce
  head_logits = head_logits.float()
  num_phases = head_logits.shape[-1]
  if target == "phase":
    last = torch.full(head_logits.shape[:1], num_phases - 1, device=head_logits.device)
    conv = F.cross_entropy(head_logits, last)
  else:
    scores = torch.linspace(0.0, 1.0, num_phases, device=head_logits.device)
    conv = torch.mean(torch.square(1.0 - head_logits.softmax(-1) @ scores))
  return ((1.0 - alpha) * ce if mode == "convex" else ce) + alpha * conv


class TrainStep:
  """One optimizer step of the baseline (no head) or RAL (frozen head) on a uint8 NHWC batch.

  Mirrors `steps.train_step` without its non-finite guard and metrics: normalisation on the
  device, forward in train mode, the head on `features[module]`, backward, SGD. `compile`
  wraps the forward and loss in `torch.compile` (AOTAutograd compiles the backward too; the
  optimizer stays eager). `channels_last` is worth it on GPU tensor cores, not on CPU.
  """

  def __init__(
    self,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    head: nn.Module | None = None,
    module: str = "",
    alpha: float = 0.0,
    mode: str = "convex",
    target: str = "phase",
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    compile: bool = False,
  ):
    self.model, self.head, self.optimizer = model.train(), head, optimizer
    self.module, self.alpha, self.mode, self.target = module, alpha, mode, target
    device = next(model.parameters()).device
    self.device_type = device.type
    self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    self.autocast_dtype = autocast_dtype
    self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
      model.to(memory_format=torch.channels_last)
      if head is not None:
        head.to(memory_format=torch.channels_last)
    self.loss_fn = torch.compile(self._loss) if compile else self._loss

  def _loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    x = images.permute(0, 3, 1, 2).float().div(255.0)
    x = ((x - self.mean) / self.std).contiguous(memory_format=self.memory_format)
    with torch.autocast(
      self.device_type,
      dtype=self.autocast_dtype or torch.float32,
      enabled=self.autocast_dtype is not None,
    ):
      logits, features = self.model(x)
      head_logits = None if self.head is None else self.head(features[self.module])
      return ral_loss(logits.float(), labels, head_logits, self.alpha, self.mode, self.target)

  def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Returns the loss tensor without synchronising the device."""
    self.optimizer.zero_grad(set_to_none=True)
    loss = self.loss_fn(images, labels)
    loss.backward()
    self.optimizer.step()
    return loss.detach()
