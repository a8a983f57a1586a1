"""One-off A/B of each CPU lowering of models.py, run against commit 659f523 (before
fmcejax/cpu_lowering.py existed; the next commit deletes this script with the lowerings).

Each variant is a set of lowerings (flags of `ALL`): `all` (the CPU path of 659f523), `kept`,
`plain` (Flax's modules), or one of those with flags taken out or added ("kept-phases",
"kept+materialize"; "-patches" is all less patches). Every variant builds the baseline and RAL
steps with `bench._jax_contenders` (as `trainer.fit` jits them) while `models` is patched to its
flags; then every variant's steps are timed interleaved, one step of each per round, in wall and
process CPU time, and each is reported as the median and quartiles of its per-round ratio to the
first variant.

  python docs/bench/ab_lowerings.py --steps 300 --json out.json --variants \
      kept,all,plain,kept-phases,kept-bn_sums,kept+pool_vjp,kept+materialize,kept-patches

As a pytest plugin (`-p`, with this directory on PYTHONPATH), AB_LOWERINGS=<variant> runs the
tests on that variant.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import math
import statistics
import sys
import time
from unittest import mock

import jax
import jax.numpy as jnp
from flax import linen as nn

from fmcejax import bench, models, parallel, steps

ALL = frozenset({"patches", "materialize", "strided", "taps", "frozen_plain", "bn_flat", "bn_sums",
                 "phases", "pool_vjp", "pool_reshape", "bottleneck_plain"})
KEPT = frozenset({"patches", "bn_flat", "bn_sums", "phases", "pool_reshape"})


def _cpu_conv(flags, lhs, rhs, window_strides, padding, *, lhs_dilation, rhs_dilation,
              dimension_numbers, feature_group_count, precision, kernel_grad=True):
  """models.cpu_conv with each of its paths behind a flag."""
  conv = functools.partial(
      jax.lax.conv_general_dilated, window_strides=window_strides, padding=padding,
      lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, precision=precision)
  if feature_group_count != 1 or max(*lhs_dilation, *rhs_dilation) > 1:
    return conv(lhs, rhs)
  if ("patches" in flags and dimension_numbers == models._NHWC
      and math.prod(rhs.shape[:-1]) <= models._MAX_PATCH and not isinstance(padding, str)):
    patches = models._patches(lhs, rhs.shape[:2], window_strides, padding)
    out = jnp.matmul(patches.reshape(-1, patches.shape[-1]), rhs.reshape(-1, rhs.shape[-1]),
                     precision=precision)
    return out.reshape(*patches.shape[:-1], rhs.shape[-1])
  if ("materialize" in flags and kernel_grad
      and (math.prod(rhs.shape[:-2]) > 1 or max(window_strides) > 1)):
    lhs = models.materialize(lhs)
  if dimension_numbers != models._NHWC:
    return conv(lhs, rhs)
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  padding = tuple(map(tuple, padding))
  if max(window_strides) > 1 and "strided" in flags:
    return models._strided_conv(lhs, rhs, tuple(window_strides), padding, precision)
  if ("taps" in flags
      and models._padding_share(lhs.shape[1:3], rhs.shape[:2], padding) >= models._MIN_PADDING_SHARE):
    return models._tap_conv(lhs, rhs, padding, precision)
  return conv(lhs, rhs)


@contextlib.contextmanager
def lowered(flags: frozenset[str]):
  """`models` as the CPU path of the measured commit, less the lowerings not in `flags`."""
  conv_flags = flags & {"patches", "materialize", "strided", "taps"}

  def conv_and_norm(dtype, train):
    lowering = None
    if conv_flags:
      kernel_grad = train or "frozen_plain" not in flags
      lowering = functools.partial(_cpu_conv, conv_flags, kernel_grad=kernel_grad)
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=models._CONV_INIT, dtype=dtype,
                             param_dtype=jnp.float32, conv_general_dilated=lowering)
    norm_cls = models.BatchNorm if flags & {"bn_flat", "bn_sums"} else nn.BatchNorm
    extra = {"cpu_lowering": True} if "bn_sums" in flags else {}
    norm = functools.partial(norm_cls, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                             dtype=dtype, param_dtype=jnp.float32, **extra)
    return conv, norm

  def pools_by_phases(x):
    return ("phases" in flags and math.prod(x.shape[3:]) * 9 <= models._MAX_PATCH
            and x.shape[1] % 2 == 0 and x.shape[2] % 2 == 0)

  def max_of(x, axes):
    return models._max_storing_maxima(x, axes) if "pool_vjp" in flags else x.max(axis=axes)

  def max_pool_2x2(x):
    if "pool_reshape" not in flags:
      return nn.max_pool(x, (2, 2), strides=(2, 2))
    b, h, w, c = x.shape
    return max_of(x[:, : h // 2 * 2, : w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c), (2, 4))

  def max_over_phases(x):
    return max_of(x.reshape(-1, 4, *x.shape[1:]), (1,))

  def shortcut(block, x):
    out_features = block.filters * block.expansion
    if block.strides == 1 and x.shape[-1] == out_features:
      return x
    plain = "bottleneck_plain" in flags and not isinstance(block, models.BasicBlock)
    x = block.conv(out_features, (1, 1), block.strides, parent=block, name="shortcut_conv",
                   **({"conv_general_dilated": None} if plain else {}))(x)
    return block.norm(parent=block, name="shortcut_bn")(x)

  with (mock.patch.object(models, "_conv_and_norm", conv_and_norm),
        mock.patch.object(models, "_pools_by_phases", pools_by_phases),
        mock.patch.object(models, "max_pool_2x2", max_pool_2x2),
        mock.patch.object(models, "max_over_phases", max_over_phases),
        mock.patch.object(models, "_shortcut", shortcut)):
    yield


def _flags(name: str) -> frozenset[str]:
  """The flags of a variant name: "all", "kept" or "plain", then -flag or +flag ("kept-phases");
  a name starting with "-" is all less those flags."""
  tokens = re.findall(r"[+-]?[a-z_]+", name if name[0] != "-" else "all" + name)
  out = set({"all": ALL, "kept": KEPT, "plain": frozenset()}[tokens[0]])
  for token in tokens[1:]:
    out = out | {token[1:]} if token[0] == "+" else out - {token[1:]}
  return frozenset(out)


def main(argv):
  parser = argparse.ArgumentParser()
  parser.add_argument("--backbone", default="cnn")
  parser.add_argument("--image_shape", default="28,28,1")
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--variants", default="")
  parser.add_argument("--json", default="")
  own, _ = parser.parse_known_args(argv)
  args = bench.parse_args(["--backbone", own.backbone, "--image_shape", own.image_shape,
                           "--batch_size", str(own.batch_size), "--warmup", "3",
                           "--torch", "none"])
  # "-a-b": all but a and b.
  names = own.variants.split(",") if own.variants else [
      "all", "plain", "-patches", "-materialize", "-frozen_plain", "-bn_sums", "-bn_sums-bn_flat",
      "-phases", "-pool_vjp", "-pool_vjp-pool_reshape"]
  variants = {n: _flags(n) for n in names}
  mesh = parallel.make_mesh()
  image_shape = tuple(args.image_shape)
  mean, std = bench._normalisation(image_shape[-1])
  preprocess = functools.partial(steps.normalize, mean=mean, std=std)
  host_batch = bench._host_batch(args.batch_size, image_shape, args.num_classes)
  contenders = []
  for name, flags in variants.items():
    with lowered(flags):
      built, _ = bench._jax_contenders(args, mesh, host_batch, preprocess, jnp.float32)
    for c in built:
      c.framework = name
      print(name, c.variant, f"compile {c.figures['compile_s']:.2f} s", flush=True)
    contenders += built
  # One step of every contender per round, so a round's load hits them alike; wall and process
  # CPU time (all threads), the latter less sensitive to other processes taking the cores.
  times = {id(c): {"wall": [], "cpu": []} for c in contenders}
  for _ in range(own.steps):
    for c in contenders:
      cpu = time.process_time()
      times[id(c)]["wall"] += c.run(1)
      times[id(c)]["cpu"].append(time.process_time() - cpu)
  result = {}
  for c in contenders:
    result.setdefault(c.framework, {})[c.variant] = {
        "compile_s": c.figures["compile_s"],
        **{f"{k}_ms": [1e3 * t for t in v] for k, v in times[id(c)].items()}}
  ref = result[names[0]]  # the ratios are to the first variant
  for name, by_variant in result.items():
    line = []
    for v, f in by_variant.items():
      for k in ("wall", "cpu"):  # paired per round, then the median and quartiles of the ratios
        ratios = sorted(a / b for a, b in zip(f[f"{k}_ms"], ref[v][f"{k}_ms"]))
        f[f"{k}_median_ms"] = statistics.median(f[f"{k}_ms"])
        f[f"{k}_over_ref"] = [ratios[len(ratios) // 4], statistics.median(ratios),
                              ratios[3 * len(ratios) // 4]]
        line.append(f"{v} {k} {f[f'{k}_median_ms']:6.2f} ms, x ref "
                    f"{f[f'{k}_over_ref'][1]:.3f} ({f[f'{k}_over_ref'][0]:.3f}-"
                    f"{f[f'{k}_over_ref'][2]:.3f})")
    print(f"{name:>22} " + "; ".join(line))
  if own.json:
    with open(own.json, "w") as f:
      json.dump({"environment": bench._environment(), "steps": own.steps,
                 "results": result}, f, indent=1)


if __name__ == "__main__":
  main(sys.argv[1:])


if "pytest" in sys.modules and os.environ.get("AB_LOWERINGS"):  # loaded as a pytest plugin
  _PATCHED = lowered(_flags(os.environ["AB_LOWERINGS"]))  # held: patched while the module lives
  _PATCHED.__enter__()
