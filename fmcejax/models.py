"""Flax backbones and the FMCE-Net head.

Every backbone returns `(logits, features)` so that the RAL step reads any named stage from the same
forward pass that produces the loss. Layouts follow the PyTorch references (kuangliu/pytorch-cifar
ResNets, torchvision `shufflenet_v2_x1_0`) down to padding and channel order, so a PyTorch model
with copied weights gives the same logits (`torch_ref.py`). Convs use explicit `padding=1` rather
than "SAME": for stride 2 on even inputs "SAME" pads only bottom/right, PyTorch both sides.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

ModuleDef = Any
Dtype = Any

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


def _conv_and_norm(dtype: Dtype, train: bool) -> tuple[ModuleDef, ModuleDef]:
  """Bias-free He-initialised conv and BatchNorm, computing in `dtype` with float32 params.

  No `axis_name`: data parallelism jits over a sharded global batch, so the batch statistics are
  already global. On CPU the conv and BatchNorm take the lowerings XLA:CPU runs faster; out of
  training (eval, or the frozen FMCE-Net in the RAL step) no kernel gradient is ever taken.
  """
  cpu = jax.default_backend() == "cpu"
  conv = functools.partial(
      nn.Conv, use_bias=False, kernel_init=_CONV_INIT, dtype=dtype, param_dtype=jnp.float32,
      conv_general_dilated=functools.partial(cpu_conv, kernel_grad=train) if cpu else None)
  norm = functools.partial(
      BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
      param_dtype=jnp.float32, cpu_lowering=cpu)
  return conv, norm


@jax.custom_vjp
def materialize(x: jax.Array) -> jax.Array:
  """`x`, as the output of an identity matmul over its last axis; the gradient passes unchanged.

  XLA:CPU recomputes elementwise producers inside each consumer. For a conv's kernel gradient,
  which reads its input transposed, that means re-evaluating the whole BN-ReLU-residual chain
  with strided reads: up to 290 ms for one 32 MiB ResNet-18 map, against 17 ms to transpose a
  stored one. A matmul cannot absorb its operand, so the conv and its gradient both read one
  stored buffer. The values are exact: every other term is a product with zero.
  """
  eye = jnp.eye(x.shape[-1], dtype=x.dtype)
  return jax.lax.dot_general(x, eye, (((x.ndim - 1,), (0,)), ((), ())))


materialize.defvjp(lambda x: (materialize(x), None), lambda _, g: (g,))


def cpu_conv(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
             padding: str | Sequence[tuple[int, int]], *, lhs_dilation: Sequence[int],
             rhs_dilation: Sequence[int], dimension_numbers: jax.lax.ConvDimensionNumbers,
             feature_group_count: int, precision: Any, kernel_grad: bool = True) -> jax.Array:
  """`nn.Conv`'s `jax.lax.conv_general_dilated` call (`nn.Conv(conv_general_dilated=...)`),
  lowered for XLA:CPU with the same values. Elsewhere XLA fuses well and the plain conv is best.

  Measured on CPU (docs/BENCHMARKS.md):
  - A 2-D conv over few input channels (a grey or RGB stem) is a matmul over its windows:
    Eigen's conv is slow there (the CNN's 1-channel stem: train step 20.7 -> 18.5 ms).
  - Other dense convs with a window or a stride `materialize` their input (ResNet-18 1.18x),
    for the kernel gradient: not without `kernel_grad` (CNN RAL step 2% faster, its frozen head).
    Not a stride-1 1x1 conv: XLA makes it a matmul, whose kernel gradient needs no transpose;
    nor a depthwise conv, for which the identity matmul would cost more than the conv.
  - Strided dense convs take their input gradient by phases (`_strided_conv`).
  - Stride-1 dense convs with a quarter or more of their taps on zero padding (3x3 on 4x4 maps:
    ResNet stage 4, the FMCE-Net on it) skip those taps (`_tap_conv`: a stage-4 block 1.14x).
  """
  conv = functools.partial(
      jax.lax.conv_general_dilated, window_strides=window_strides, padding=padding,
      lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, precision=precision)
  if feature_group_count != 1 or max(*lhs_dilation, *rhs_dilation) > 1:
    return conv(lhs, rhs)
  if (dimension_numbers == _NHWC and math.prod(rhs.shape[:-1]) <= _MAX_PATCH
      and not isinstance(padding, str)):
    patches = _patches(lhs, rhs.shape[:2], window_strides, padding)
    # As 2-D: XLA:CPU runs the 4-D dot_general slower (CNN train step 19.7 vs 17.8 ms).
    out = jnp.matmul(patches.reshape(-1, patches.shape[-1]), rhs.reshape(-1, rhs.shape[-1]),
                     precision=precision)
    return out.reshape(*patches.shape[:-1], rhs.shape[-1])
  if kernel_grad and (math.prod(rhs.shape[:-2]) > 1 or max(window_strides) > 1):
    lhs = materialize(lhs)
  if dimension_numbers != _NHWC:
    return conv(lhs, rhs)
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  padding = tuple(map(tuple, padding))
  if max(window_strides) > 1:
    return _strided_conv(lhs, rhs, tuple(window_strides), padding, precision)
  if _padding_share(lhs.shape[1:3], rhs.shape[:2], padding) >= _MIN_PADDING_SHARE:
    return _tap_conv(lhs, rhs, padding, precision)
  return conv(lhs, rhs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _strided_conv(lhs: jax.Array, rhs: jax.Array, strides: tuple[int, int],
                  padding: tuple[tuple[int, int], ...], precision: Any) -> jax.Array:
  """An NHWC/HWIO conv whose input gradient is one stride-1 conv per output phase.

  XLA convolves the output gradient dilated with zeros, and XLA:CPU spends (s^2 - 1) / s^2 of that
  conv's work on the zeros: ResNet-18's 32 -> 16 layer took 106 ms, against 51 ms by phases
  (train step: ResNet-18 2.82 -> 2.78 s, ResNet-50 17.2 -> 16.6 s). Input position `s * i + a`
  only meets kernel taps `t` with `(a + pad - t) % s == 0`, so each phase `a` is a small dense
  conv of the gradient with those taps (sub-pixel convolution).
  """
  return _nhwc_conv(lhs, rhs, strides, padding, precision)


def _nhwc_conv(lhs: jax.Array, rhs: jax.Array, strides: Sequence[int],
               padding: Sequence[tuple[int, int]], precision: Any) -> jax.Array:
  return jax.lax.conv_general_dilated(lhs, rhs, strides, padding, dimension_numbers=_NHWC,
                                      precision=precision)


def _strided_conv_fwd(lhs, rhs, strides, padding, precision):
  return _strided_conv(lhs, rhs, strides, padding, precision), (lhs, rhs)


def _strided_conv_bwd(strides, padding, precision, residuals, grad):
  lhs, rhs = residuals
  _, kernel_vjp = jax.vjp(lambda w: _nhwc_conv(lhs, w, strides, padding, precision), rhs)
  # One block per phase (a, b), each ceil(size / stride) long, interleaved, then cropped.
  size = [-(-n // s) for n, s in zip(lhs.shape[1:3], strides)]
  phases = [[_phase(a, k, s, lo, m, out) for a in range(s)] for k, s, (lo, _), m, out in zip(
      rhs.shape[:2], strides, padding, size, grad.shape[1:3])]
  rows = []
  for row in phases[0]:
    blocks = []
    for col in phases[1]:
      if row is None or col is None:
        blocks.append(jnp.zeros((lhs.shape[0], *size, lhs.shape[3]), grad.dtype))
        continue
      kernel = jnp.swapaxes(rhs[row[0]][:, col[0]], 2, 3)
      blocks.append(_nhwc_conv(grad, kernel, (1, 1), (row[1], col[1]), precision))
    rows.append(jnp.stack(blocks, axis=3).reshape(lhs.shape[0], size[0], -1, lhs.shape[3]))
  grad_lhs = jnp.stack(rows, axis=2).reshape(lhs.shape[0], size[0] * strides[0], -1, lhs.shape[3])
  return grad_lhs[:, :lhs.shape[1], :lhs.shape[2]].astype(lhs.dtype), kernel_vjp(grad)[0]


def _phase(a: int, kernel: int, stride: int, pad_lo: int, size: int,
           grad_size: int) -> tuple[slice, tuple[int, int]] | None:
  """Along one axis, the kernel taps meeting input phase `a` (as a slice, in the order of the
  gradient positions they read) and the padding of the stride-1 conv giving `size` outputs."""
  top = next((t for t in range(kernel - 1, -1, -1) if (a + pad_lo - t) % stride == 0), None)
  if top is None:
    return None
  taps = top // stride + 1
  first = (a + pad_lo - top) // stride  # gradient offset of output 0's first tap
  return slice(top, None, -stride), (-first, size + first + taps - 1 - grad_size)


_strided_conv.defvjp(_strided_conv_fwd, _strided_conv_bwd)


def _tap_ranges(size: int, kernel: int, pad_lo: int, out: int) -> list[tuple[int, int, int]]:
  """Along one axis, for each kernel tap `t` meeting the input: `(t, first, end)`, the output
  positions `[first, end)` that read input position `o + t - pad_lo` inside the map."""
  ranges = [(t, max(0, pad_lo - t), min(out, size + pad_lo - t)) for t in range(kernel)]
  return [(t, first, end) for t, first, end in ranges if first < end]


def _padding_share(size: Sequence[int], kernel: Sequence[int],
                   padding: Sequence[tuple[int, int]]) -> float:
  """The share of a stride-1 conv's tap products that fall on zero padding."""
  share = 1.0
  for n, k, (lo, hi) in zip(size, kernel, padding):
    out = n + lo + hi - k + 1
    share *= sum(end - first for _, first, end in _tap_ranges(n, k, lo, out)) / (out * k)
  return 1.0 - share


def _taps(lhs: jax.Array, rhs: jax.Array, padding: Sequence[tuple[int, int]],
          precision: Any) -> jax.Array:
  """A stride-1 NHWC/HWIO conv as one matmul per kernel tap over the outputs it reaches, summed in
  float32 as a conv accumulates."""
  n, h, w, c = lhs.shape
  (kh, kw), out_h, out_w = rhs.shape[:2], *(
      size + lo + hi - k + 1 for size, k, (lo, hi) in zip((h, w), rhs.shape[:2], padding))
  out = jnp.zeros((n, out_h, out_w, rhs.shape[-1]), jnp.float32)
  for i, r0, r1 in _tap_ranges(h, kh, padding[0][0], out_h):
    for j, c0, c1 in _tap_ranges(w, kw, padding[1][0], out_w):
      rows, cols = r0 + i - padding[0][0], c0 + j - padding[1][0]
      window = lhs[:, rows:rows + r1 - r0, cols:cols + c1 - c0].reshape(-1, c)
      y = jnp.matmul(window, rhs[i, j], precision=precision, preferred_element_type=jnp.float32)
      # In place: padded to the full map, the sum would be fused into (recomputed by) each reader.
      out = out.at[:, r0:r1, c0:c1].add(y.reshape(n, r1 - r0, c1 - c0, -1))
  return out.astype(jnp.result_type(lhs, rhs))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _tap_conv(lhs: jax.Array, rhs: jax.Array, padding: tuple[tuple[int, int], ...],
              precision: Any) -> jax.Array:
  """A stride-1 NHWC/HWIO conv that skips the taps falling on zero padding, in the forward and
  the input gradient (`_taps`); the kernel gradient stays XLA's conv.

  Eigen multiplies the padding too: on a 4x4 map a 3x3 conv spends 31% of its work there, and
  oneDNN (PyTorch) skips it. Measured on 4x4x512 -> 512 (ResNet stage 4): forward 56 -> 43 ms,
  input gradient 65 -> 49 ms. On 8x8 maps (16% padding) the 9 smaller matmuls lose (62 -> 77).
  """
  return _taps(lhs, rhs, padding, precision)


def _tap_conv_fwd(lhs, rhs, padding, precision):
  return _tap_conv(lhs, rhs, padding, precision), (lhs, rhs)


def _tap_conv_bwd(padding, precision, residuals, grad):
  lhs, rhs = residuals
  _, kernel_vjp = jax.vjp(lambda w: _nhwc_conv(lhs, w, (1, 1), padding, precision), rhs)
  flipped = jnp.swapaxes(rhs[::-1, ::-1], 2, 3)
  transposed = tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(rhs.shape[:2], padding))
  grad_lhs = _taps(grad, flipped, transposed, precision)
  return grad_lhs.astype(lhs.dtype), kernel_vjp(grad)[0]


_tap_conv.defvjp(_tap_conv_fwd, _tap_conv_bwd)


_MIN_PADDING_SHARE = 0.25  # from which `cpu_conv` skips padding taps: 4x4 maps, not 8x8 (3x3 convs)
_MAX_PATCH = 27  # kernel taps x input channels up to which `cpu_conv` multiplies patches (3x3 RGB)
_NHWC = jax.lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                     out_spec=(0, 3, 1, 2))


def _patches(x: jax.Array, window: Sequence[int], strides: Sequence[int],
             padding: Sequence[tuple[int, int]]) -> jax.Array:
  """[N, H, W, C] -> [N, H', W', kh * kw * C]: each output pixel's window, in HWIO kernel order."""
  x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  out = [(size - k) // s + 1 for size, k, s in zip(x.shape[1:3], window, strides)]
  return jnp.concatenate([
      x[:, i:i + (out[0] - 1) * strides[0] + 1:strides[0],
        j:j + (out[1] - 1) * strides[1] + 1:strides[1]]
      for i in range(window[0]) for j in range(window[1])], axis=-1)


class BatchNorm(nn.BatchNorm):
  """`nn.BatchNorm` over the last axis, normalising an [N, C] view of the map.

  Same variables, and values equal up to float rounding. The reshape is free on every backend.
  With `cpu_lowering`, training-mode statistics and their gradient are `normalize_batch`, the
  form XLA:CPU runs fast; it implements the fields our models use (no `axis_name`, scale and bias).
  """
  cpu_lowering: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    flat = x.reshape(-1, x.shape[-1])
    frozen = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
    if frozen or not self.cpu_lowering:
      return super().__call__(flat, use_running_average).reshape(x.shape)
    if self.axis_name is not None or not (self.use_scale and self.use_bias):
      raise ValueError("BatchNorm(cpu_lowering=True) needs axis_name=None, use_scale and use_bias")
    features = flat.shape[-1:]
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), features)
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), features)
    scale = self.param("scale", self.scale_init, features, self.param_dtype)
    bias = self.param("bias", self.bias_init, features, self.param_dtype)
    y, mean, var = normalize_batch(flat, scale, bias, self.epsilon)
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    dtype = nn.dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)
    return y.astype(dtype).reshape(x.shape)


def _column_sums(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Column sums of two [M, C] arrays: one variadic reduce per level of a tree of <= 32 rows.

  XLA:CPU rewrites a large one-array sum into reduce-windows (for precision) and folds the [M, C]
  view back into the conv's NHWC map, where that 4-D reduce-window is slow: ~9 ms per sum of a
  32 MiB ResNet-18 map. It leaves variadic reduces alone: both sums then take one pass over the
  inputs, fused with their producers, and the tree keeps the error at that of pairwise summation.
  Train step: CNN 18.8 -> 17.4 ms, ResNet-18 3.06 -> 2.95 s.
  """
  sums = (a, b)
  while (rows := sums[0].shape[0]) > 1:
    group = max(d for d in range(1, 33) if rows % d == 0)
    group = rows if group == 1 else group
    sums = jax.lax.reduce(
        tuple(s.reshape(rows // group, group, -1) for s in sums),
        tuple(jnp.zeros((), s.dtype) for s in sums),
        lambda p, q: (p[0] + q[0], p[1] + q[1]), (1,))
  return sums[0][0], sums[1][0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def normalize_batch(x: jax.Array, scale: jax.Array, bias: jax.Array,
                    epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Training-mode BatchNorm of an [M, C] array, in float32: `(y, mean, biased variance)`.

  Flax's formula (variance as E[x^2] - E[x]^2), with the standard hand-derived gradient so that
  the backward pass needs one pair of column sums too (`_column_sums`).
  """
  return _normalize_batch_fwd(x, scale, bias, epsilon)[0]


def _normalize_batch_fwd(x, scale, bias, epsilon):
  x32 = x.astype(jnp.float32)
  total, total_sq = _column_sums(x32, x32 * x32)
  mean = total / len(x)
  var = jnp.maximum(total_sq / len(x) - mean * mean, 0.0)
  inv = jax.lax.rsqrt(var + epsilon)
  y = (x32 - mean) * (inv * scale) + bias
  return (y, mean, var), (x, mean, inv, scale)


def _normalize_batch_bwd(epsilon, residuals, grads):
  del epsilon
  x, mean, inv, scale = residuals
  grad_y, grad_mean, grad_var = grads
  centred = x.astype(jnp.float32) - mean
  x_hat = centred * inv
  grad_bias, grad_scale = _column_sums(grad_y, grad_y * x_hat)
  grad_x = ((scale * inv) * (grad_y - (grad_bias + x_hat * grad_scale) / len(x))
            + (grad_mean + 2.0 * grad_var * centred) / len(x))
  return grad_x.astype(x.dtype), grad_scale, grad_bias


normalize_batch.defvjp(_normalize_batch_fwd, _normalize_batch_bwd)


def _classifier(x: jax.Array, num_classes: int, dtype: Dtype) -> jax.Array:
  """Global average pool and Dense, returning float32 logits whatever the compute dtype."""
  x = jnp.mean(x, axis=(1, 2))
  x = nn.Dense(num_classes, dtype=dtype, param_dtype=jnp.float32, name="fc")(x)
  return jnp.asarray(x, jnp.float32)


def param_count(params: Any) -> int:
  """Number of scalars in a pytree of arrays or `jax.ShapeDtypeStruct`s (from `jax.eval_shape`)."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2/2 max-pool as reshape + max: same values as nn.max_pool, and its gradient is ~9x faster
  on XLA's CPU backend (measured: the CNN train step 1.65-1.87x faster). Ties share the gradient
  equally, as under `jnp.max`."""
  b, h, w, c = x.shape
  windows = x[:, : h // 2 * 2, : w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c)
  return _max_storing_maxima(windows, (2, 4))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_storing_maxima(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """Max over `axes`, ties sharing the gradient equally. The forward stores which inputs are
  maxima, so the backward need not recompute the input and its maxima from the BatchNorm-ReLU
  chain (CNN step 1-2% faster)."""
  return x.max(axis=axes)


def _max_storing_maxima_fwd(x, axes):
  y = x.max(axis=axes)
  return y, x == jnp.expand_dims(y, axes)


def _max_storing_maxima_bwd(axes, is_max, grad):
  share = is_max / is_max.sum(axis=axes, keepdims=True, dtype=grad.dtype)
  return (share * jnp.expand_dims(grad, axes),)


_max_storing_maxima.defvjp(_max_storing_maxima_fwd, _max_storing_maxima_bwd)


def _pools_by_phases(x: jax.Array) -> bool:
  """Whether a 3x3 conv-BN-ReLU block pooling 2x2 takes `pooling_phases` on input `x`: on CPU, for
  the convs `cpu_conv` multiplies as patches (few input channels), and even sizes (odd ones would
  drop the last row and column from the batch statistics). Measured on the CNN's 28x28x1 -> 16
  stem block, train fwd + bwd: 4.8 -> 2.9 ms. Wider convs lose: their input gradient by phases
  costs more than the pooling saves."""
  return (jax.default_backend() == "cpu" and math.prod(x.shape[3:]) * 9 <= _MAX_PATCH
          and x.shape[1] % 2 == 0 and x.shape[2] % 2 == 0)


def pooling_phases(x: jax.Array) -> jax.Array:
  """[N, H, W, C] -> [4N, H + 1, W + 1, C], H and W even: the input padded by 1 and shifted by each
  2x2 pooling phase (a, b), an image's four phases next to each other on the batch axis (so a
  sharded batch stays on its devices). An unpadded 3x3 stride-2 conv of phase (a, b) gives the
  padded stride-1 conv's outputs at rows 2i + a, columns 2j + b, so `max_over_phases` of the
  block's output is its 2x2 max-pool.

  XLA:CPU's pool reads each window across rows of the NHWC map, recomputing the BatchNorm-ReLU
  chain in every reader; here a window's four members are four contiguous blocks.
  """
  _, h, w, c = x.shape
  x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return jnp.stack([x[:, a:a + h + 1, b:b + w + 1] for a in (0, 1) for b in (0, 1)],
                   axis=1).reshape(-1, h + 1, w + 1, c)


def max_over_phases(x: jax.Array) -> jax.Array:
  """[4N, ...] -> [N, ...]: the maximum over each image's four phases from `pooling_phases`. Ties
  share the gradient equally, as in `max_pool_2x2`."""
  return _max_storing_maxima(x.reshape(-1, 4, *x.shape[1:]), (1,))


class SimpleCNN(nn.Module):
  """Three conv-BN-ReLU blocks (~24k params): ~98.6% on MNIST in 3 epochs, ~7.3k images/s on 2 CPU
  cores."""
  num_classes: int
  dtype: Dtype = jnp.float32
  widths: tuple[int, int, int] = (16, 32, 64)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    conv, norm = _conv_and_norm(self.dtype, train)
    features = {}
    for i, width in enumerate(self.widths):
      pool = i < 2
      if pool and _pools_by_phases(x):
        x = conv(width, (3, 3), 2, padding=((0, 0), (0, 0)), name=f"conv{i + 1}")(
            pooling_phases(x))
        x = max_over_phases(nn.relu(norm(name=f"bn{i + 1}")(x)))
      else:
        x = conv(width, (3, 3), padding=_PAD1, name=f"conv{i + 1}")(x)
        x = nn.relu(norm(name=f"bn{i + 1}")(x))
        if pool:
          x = max_pool_2x2(x)
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
  On CPU a strided shortcut conv stores its input (`cpu_conv`): a BasicBlock's 3x3 conv1 stores
  the same input and XLA merges the two matmuls, but a Bottleneck's 1x1 conv1 does not, so there
  it would be extra work and the shortcut takes the plain conv (ResNet-50 measured 5% slower).
  """
  out_features = block.filters * block.expansion
  if block.strides == 1 and x.shape[-1] == out_features:
    return x
  shared = {} if isinstance(block, BasicBlock) else {"conv_general_dilated": None}
  x = block.conv(out_features, (1, 1), block.strides, parent=block, name="shortcut_conv",
                 **shared)(x)
  return block.norm(parent=block, name="shortcut_bn")(x)


class ResNet(nn.Module):
  """CIFAR ResNet (kuangliu layout): 3x3 stride-1 stem, no max-pool, so 32x32 ends at 4x4."""
  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  num_classes: int
  zero_init_residual: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    conv, norm = _conv_and_norm(self.dtype, train)
    x = conv(64, (3, 3), padding=_PAD1, name="conv1")(x)
    x = nn.relu(norm(name="bn1")(x))
    features = {"stem": x}
    for i, (num_blocks, filters) in enumerate(zip(self.stage_sizes, (64, 128, 256, 512))):
      for j in range(num_blocks):
        x = self.block_cls(
            filters, conv=conv, norm=norm, strides=2 if i > 0 and j == 0 else 1,
            zero_init_residual=self.zero_init_residual, name=f"stage{i + 1}_block{j}")(x)
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
      x1 = self.conv(in_features, (3, 3), self.strides, padding=_PAD1,
                     feature_group_count=in_features, name="branch1_dw")(x1)
      x1 = self.norm(name="branch1_dw_bn")(x1)
      x1 = self.conv(branch_features, (1, 1), name="branch1_pw")(x1)
      x1 = nn.relu(self.norm(name="branch1_pw_bn")(x1))
    x2 = self.conv(branch_features, (1, 1), name="branch2_pw1")(x2)
    x2 = nn.relu(self.norm(name="branch2_pw1_bn")(x2))
    x2 = self.conv(branch_features, (3, 3), self.strides, padding=_PAD1,
                   feature_group_count=branch_features, name="branch2_dw")(x2)
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

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    conv, norm = _conv_and_norm(self.dtype, train)
    stem_strides = 1 if self.small_input else 2
    x = conv(self.stages_out_channels[0], (3, 3), stem_strides, padding=_PAD1, name="conv1")(x)
    x = nn.relu(norm(name="bn1")(x))
    if not self.small_input:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_PAD1)
    features = {"stem": x}
    for i, (repeats, width) in enumerate(zip(self.stages_repeats, self.stages_out_channels[1:-1])):
      for j in range(repeats):
        x = InvertedResidual(width, 2 if j == 0 else 1, conv=conv, norm=norm,
                             name=f"stage{i + 2}_unit{j}")(x)
      features[f"stage{i + 2}"] = x
    x = conv(self.stages_out_channels[-1], (1, 1), name="conv5")(x)
    x = nn.relu(norm(name="conv5_bn")(x))
    features["conv5"] = x
    return _classifier(x, self.num_classes, self.dtype), features


def create_backbone(name: str, num_classes: int, dtype: Dtype = jnp.float32) -> nn.Module:
  """The backbone called `name` (one of `BACKBONES`), computing in `dtype` with float32 params."""
  constructors = {
      "cnn": SimpleCNN,
      "resnet18": ResNet18,
      "resnet50": ResNet50,
      "shufflenet_v2": ShuffleNetV2,
  }
  if name not in constructors:
    raise ValueError(f"unknown backbone {name!r}; accepted: {', '.join(BACKBONES)}")
  return constructors[name](num_classes=num_classes, dtype=dtype)


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

  @nn.compact
  def __call__(self, feature_map: jax.Array, train: bool) -> jax.Array:
    conv, norm = _conv_and_norm(self.dtype, train)
    x = feature_map
    for i in range(self.depth):
      strides = 2 if i == 0 and min(x.shape[1:3]) > 8 else 1
      x = conv(self.width, (3, 3), strides, padding=_PAD1, name=f"conv{i + 1}")(x)
      x = nn.relu(norm(name=f"bn{i + 1}")(x))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.relu(nn.Dense(self.width, dtype=self.dtype, param_dtype=jnp.float32, name="fc1")(x))
    x = nn.Dense(self.num_phases, dtype=self.dtype, param_dtype=jnp.float32, name="fc2")(x)
    return jnp.asarray(x, jnp.float32)
