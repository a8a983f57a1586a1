"""Lowerings of the models' conv, BatchNorm and 2x2 max-pool that XLA:CPU runs faster.

Same variables and the same values as Flax's modules, gradients included (tests/test_models.py);
only the XLA program differs. A caller picks them once, from its mesh's platform (`for_platform`),
and passes the `Lowering` to the models (`models.create_backbone(..., lowering=...)`); elsewhere
XLA fuses well and Flax's own modules are best. What each one buys on the default job, and which
were measured and deleted: docs/BENCHMARKS.md, "CPU lowerings: kept and deleted".

Each runs under `jax.named_scope(f"{SCOPE}/<name>")`, names in `SCOPES`, so that a lowered
program shows whether it took them (tests/test_export.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

ModuleDef = Any
SCOPE = "cpu_lowering"
SCOPES = ("conv", "batch_norm", "max_pool", "pooling_phases")

_MAX_PATCH = 27  # kernel taps x input channels up to which `conv_general_dilated` multiplies
# patches: the grey and RGB 3x3 stems
_NHWC = jax.lax.ConvDimensionNumbers(
  lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2)
)


@dataclasses.dataclass(frozen=True)
class Lowering:
  """What a model takes in place of Flax's modules: `conv` for `nn.Conv`, `norm` for
  `nn.BatchNorm` (same fields and variables), `max_pool_2x2` for the 2x2/2 `nn.max_pool`; and
  `pooling_phases`, whether the cnn's conv-BatchNorm-ReLU-pool blocks may convolve the pooling
  phases (`pools_by_phases`)."""

  conv: ModuleDef
  norm: ModuleDef
  max_pool_2x2: Callable[[jax.Array], jax.Array]
  pooling_phases: bool = True

  def pools_by_phases(self, x: jax.Array) -> bool:
    """Whether a 3x3 conv-BatchNorm-ReLU block pooling 2x2 convolves `pooling_phases(x)`: where
    `conv` multiplies patches (few input channels), on even sizes (odd ones would drop the last
    row and column from the batch statistics). Wider convs lose: their input gradient by phases
    costs more than the pooling saves."""
    return (
      self.pooling_phases
      and math.prod(x.shape[3:]) * 9 <= _MAX_PATCH
      and x.shape[1] % 2 == 0
      and x.shape[2] % 2 == 0
    )


def conv_general_dilated(
  lhs: jax.Array,
  rhs: jax.Array,
  window_strides: Sequence[int],
  padding: str | Sequence[tuple[int, int]],
  *,
  lhs_dilation: Sequence[int],
  rhs_dilation: Sequence[int],
  dimension_numbers: jax.lax.ConvDimensionNumbers,
  feature_group_count: int,
  precision: Any,
) -> jax.Array:
  """`jax.lax.conv_general_dilated` as `nn.Conv` calls it, a dense NHWC conv over few input
  channels (a grey or RGB stem) as one matmul over its windows: Eigen's conv is slow there.

  As a 2-D matmul: XLA:CPU runs the 4-D `dot_general` of the same product slower.
  """
  if (
    feature_group_count == 1
    and max(*lhs_dilation, *rhs_dilation) == 1
    and dimension_numbers == _NHWC
    and math.prod(rhs.shape[:-1]) <= _MAX_PATCH
    and not isinstance(padding, str)
  ):
    with jax.named_scope(f"{SCOPE}/conv"):
      patches = _patches(lhs, rhs.shape[:2], window_strides, padding)
      out = jnp.matmul(
        patches.reshape(-1, patches.shape[-1]), rhs.reshape(-1, rhs.shape[-1]), precision=precision
      )
      return out.reshape(*patches.shape[:-1], rhs.shape[-1])
  return jax.lax.conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=lhs_dilation,
    rhs_dilation=rhs_dilation,
    dimension_numbers=dimension_numbers,
    feature_group_count=feature_group_count,
    precision=precision,
  )


def _patches(
  x: jax.Array, window: Sequence[int], strides: Sequence[int], padding: Sequence[tuple[int, int]]
) -> jax.Array:
  """[N, H, W, C] -> [N, H', W', kh * kw * C]: each output pixel's window, in HWIO kernel order."""
  x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  out = [(size - k) // s + 1 for size, k, s in zip(x.shape[1:3], window, strides)]
  return jnp.concatenate(
    [
      x[
        :,
        i : i + (out[0] - 1) * strides[0] + 1 : strides[0],
        j : j + (out[1] - 1) * strides[1] + 1 : strides[1],
      ]
      for i in range(window[0])
      for j in range(window[1])
    ],
    axis=-1,
  )


class BatchNorm(nn.BatchNorm):
  """`nn.BatchNorm` over the last axis, on an [N, C] view of the map, with the same variables and
  values up to float rounding. XLA:CPU sums a 4-D map over three axes as a slow reduce-window; the
  view is free on every backend. In training, the statistics and their gradient are
  `normalize_batch`. It implements the fields our models use: no `axis_name`, scale and bias.
  """

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    with jax.named_scope(f"{SCOPE}/batch_norm"):
      flat = x.reshape(-1, x.shape[-1])
      frozen = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
      if frozen:
        return super().__call__(flat, use_running_average).reshape(x.shape)
      if self.axis_name is not None or not (self.use_scale and self.use_bias):
        raise ValueError("cpu_lowering.BatchNorm needs axis_name=None, use_scale and use_bias")
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
  view back into the conv's NHWC map, where that 4-D reduce-window is slow. It leaves variadic
  reduces alone: both sums then take one pass over the inputs, fused with their producers, and
  the tree keeps the error at that of pairwise summation.
  """
  sums = (a, b)
  while (rows := sums[0].shape[0]) > 1:
    group = max(d for d in range(1, 33) if rows % d == 0)
    group = rows if group == 1 else group
    sums = jax.lax.reduce(
      tuple(s.reshape(rows // group, group, -1) for s in sums),
      tuple(jnp.zeros((), s.dtype) for s in sums),
      lambda p, q: (p[0] + q[0], p[1] + q[1]),
      (1,),
    )
  return sums[0][0], sums[1][0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def normalize_batch(
  x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
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
  grad_x = (scale * inv) * (grad_y - (grad_bias + x_hat * grad_scale) / len(x)) + (
    grad_mean + 2.0 * grad_var * centred
  ) / len(x)
  return grad_x.astype(x.dtype), grad_scale, grad_bias


normalize_batch.defvjp(_normalize_batch_fwd, _normalize_batch_bwd)


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2/2 max-pool as reshape + max: nn.max_pool's values (VALID: odd sizes drop the last row or
  column), with a gradient XLA:CPU runs much faster than `nn.max_pool`'s select-and-scatter. Ties
  share the gradient equally, as under `jnp.max`."""
  with jax.named_scope(f"{SCOPE}/max_pool"):
    b, h, w, c = x.shape
    return x[:, : h // 2 * 2, : w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def pooling_phases(x: jax.Array) -> jax.Array:
  """[N, H, W, C] -> [4N, H + 1, W + 1, C], H and W even: the input padded by 1 and shifted by each
  2x2 pooling phase (a, b), an image's four phases next to each other on the batch axis (so a
  sharded batch stays on its devices). An unpadded 3x3 stride-2 conv of phase (a, b) gives the
  padded stride-1 conv's outputs at rows 2i + a, columns 2j + b, so `max_over_phases` of the
  block's output is its 2x2 max-pool.

  XLA:CPU's pool reads each window across rows of the NHWC map, recomputing the BatchNorm-ReLU
  chain in every reader; here a window's four members are four contiguous blocks.
  """
  with jax.named_scope(f"{SCOPE}/pooling_phases"):
    _, h, w, c = x.shape
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return jnp.stack(
      [x[:, a : a + h + 1, b : b + w + 1] for a in (0, 1) for b in (0, 1)], axis=1
    ).reshape(-1, h + 1, w + 1, c)


def max_over_phases(x: jax.Array) -> jax.Array:
  """[4N, ...] -> [N, ...]: the maximum over each image's four phases from `pooling_phases`. Ties
  share the gradient equally, as in `max_pool_2x2`."""
  with jax.named_scope(f"{SCOPE}/pooling_phases"):
    return x.reshape(-1, 4, *x.shape[1:]).max(axis=1)


CPU = Lowering(
  conv=functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated),
  norm=BatchNorm,
  max_pool_2x2=max_pool_2x2,
)


def for_platform(platform: str) -> Lowering | None:
  """The lowering for a mesh of `platform` devices (`parallel.platform`): `CPU` on "cpu", None
  (Flax's own modules) on "gpu", "tpu" and anything else."""
  return CPU if platform == "cpu" else None
