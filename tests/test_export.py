"""Every backbone's baseline and RAL train steps lower for GPU and TPU on this CPU, and the lowered
programs carry none of the CPU lowerings: the models are the same program on every platform.

The steps are built as the pipeline builds them (the lowering from `cpu_lowering.for_platform` of
the target platform, `steps.train_step` with and without a frozen `models.FMCENet`, as
`trainer.jit_train_step` jits it) and exported with `jax.export` from abstract inputs: traced and
lowered to StableHLO, never compiled. Each CPU lowering runs under a
`jax.named_scope("cpu_lowering/...")`, which the StableHLO keeps in its op locations; the same
export with the CPU lowering shows those names, so the test can fail.
"""

from __future__ import annotations

import functools
from unittest import mock

import jax
import jax.numpy as jnp
import optax
import pytest

from fmcejax import cpu_lowering, models, steps

BATCH = 8
NUM_CLASSES = 10
INPUT_SHAPE = {
  "cnn": (28, 28, 1),
  "resnet18": (32, 32, 3),
  "resnet50": (32, 32, 3),
  "shufflenet_v2": (32, 32, 3),
}
MARKER = f"{cpu_lowering.SCOPE}/"


def _exported_step(backbone: str, ral: bool, platform: str) -> str:
  """The StableHLO text of the step for `platform`, with the lowering the pipeline would pick."""
  lowering = cpu_lowering.for_platform(platform)
  shape = INPUT_SHAPE[backbone]
  model = models.create_backbone(backbone, NUM_CLASSES, lowering=lowering)
  tx = steps.create_optimizer("sgd", optax.constant_schedule(0.1), weight_decay=5e-4)
  state = jax.eval_shape(
    functools.partial(steps.create_train_state, model, tx, shape), jax.random.PRNGKey(0)
  )
  head, head_variables, loss = None, None, steps.Loss()
  if ral:
    module = models.DEFAULT_MODULE[backbone]
    feature = jax.eval_shape(
      functools.partial(model.apply, train=False),
      {"params": state.params, "batch_stats": state.batch_stats},
      jax.ShapeDtypeStruct((BATCH, *shape), jnp.float32),
    )[1][module]
    head = steps.Head(model=models.FMCENet(5, 64, 2, lowering=lowering), module=module)
    head_variables = jax.eval_shape(
      functools.partial(head.model.init, train=False), jax.random.PRNGKey(1), feature
    )
    loss = steps.Loss(alpha=optax.constant_schedule(0.1))
  preprocess = functools.partial(steps.normalize, mean=(0.5,) * shape[-1], std=(0.25,) * shape[-1])
  step = jax.jit(functools.partial(steps.train_step, preprocess=preprocess, head=head, loss=loss))
  batch = {
    "image": jax.ShapeDtypeStruct((BATCH, *shape), jnp.uint8),
    "label": jax.ShapeDtypeStruct((BATCH,), jnp.int32),
  }
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
  platform = {"gpu": "cuda"}.get(platform, platform)
  return jax.export.export(step, platforms=[platform])(
    state, batch, rng, head_variables
  ).mlir_module()


def _scopes(text: str) -> set[str]:
  """The CPU lowerings' scope names in the op locations of a StableHLO text."""
  return {
    line.split(MARKER)[1].split("/")[0].split('"')[0]
    for line in text.splitlines()
    if MARKER in line
  }


def _host_query(*args, **kwargs):
  raise AssertionError("the models asked which host they run on while tracing")


@pytest.mark.parametrize("ral", [False, True], ids=["baseline", "ral"])
@pytest.mark.parametrize("backbone", models.BACKBONES)
def test_accelerator_exports_carry_no_cpu_lowering(backbone, ral):
  for platform in ("cuda", "tpu"):
    with (
      mock.patch.object(jax, "default_backend", _host_query),
      mock.patch.object(jax, "devices", _host_query),
      mock.patch.object(jax, "local_devices", _host_query),
    ):
      text = _exported_step(backbone, ral, platform)
    assert "stablehlo.convolution" in text  # the backbone is in the program
    assert MARKER not in text, (platform, _scopes(text))


@pytest.mark.parametrize("backbone", ["cnn", "resnet18"])
def test_cpu_export_carries_the_cpu_lowerings(backbone):
  """The positive control: what the accelerator test looks for is there when the CPU lowering is
  taken, every lowering's scope on the cnn (which takes them all)."""
  text = _exported_step(backbone, True, "cpu")
  expected = set(cpu_lowering.SCOPES) if backbone == "cnn" else {"conv", "batch_norm"}
  assert expected <= _scopes(text), _scopes(text)


def test_only_cpu_has_a_lowering():
  assert isinstance(cpu_lowering.for_platform("cpu"), cpu_lowering.Lowering)
  for platform in ("gpu", "cuda", "rocm", "tpu", "METAL"):
    assert cpu_lowering.for_platform(platform) is None
  assert cpu_lowering.for_platform("cpu") is cpu_lowering.CPU
