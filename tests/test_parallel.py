"""`parallel`: XLA options per platform and what they change in the program; `Pacer`."""

import jax
import jax.numpy as jnp
import pytest

from fmcejax import parallel


def _conv(x, w):
  return jax.lax.conv_general_dilated(
    x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def test_cpu_options_keep_convolutions_out_of_ynnpack():
  options = parallel.compiler_options(parallel.make_mesh())  # conftest: 8 CPU devices
  if jax.__version_info__[:2] == (0, 10):  # the jaxlib these options were measured with
    assert options == parallel.CPU_COMPILER_OPTIONS
  if options is None:
    pytest.skip(f"jaxlib {jax.__version__} does not know {parallel.CPU_COMPILER_OPTIONS}")
  # A convolution XLA's defaults do hand to YNNPACK (small ones, e.g. (2,8,8,4) x (3,3,4,4),
  # never become a `__ynn_fusion`, options or not).
  x, w = jnp.ones((32, 28, 28, 16)), jnp.ones((3, 3, 16, 32)) / 144
  default = jax.jit(_conv).lower(x, w).compile()
  assert "__ynn_fusion" in default.as_text(), "positive control: the default compile uses YNNPACK"
  compiled = jax.jit(_conv, compiler_options=options).lower(x, w).compile()
  assert "__ynn_fusion" not in compiled.as_text()
  assert jnp.allclose(compiled(x, w), default(x, w), rtol=1e-5)


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_accelerators_keep_xla_defaults(platform):
  assert parallel._compiler_options(platform) is None


def _slow_step(x):
  """A few ms of work per dispatch, with an all-reduce, so that an unpaced host runs ahead."""
  return jax.lax.fori_loop(0, 50, lambda _, y: jnp.tanh(y @ y.T) @ y + y.mean(), x)


@pytest.mark.parametrize("depth", [1, 4])
def test_pacer_keeps_a_loop_at_most_depth_dispatches_ahead(depth):
  mesh = parallel.make_mesh()
  sharding = parallel.batch_sharding(mesh)
  step = jax.jit(_slow_step, in_shardings=sharding, out_shardings=sharding)
  x = jax.device_put(jnp.ones((8 * 32, 32)) / 32, sharding)
  jax.block_until_ready(step(x))  # compiled
  pace, outs = parallel.Pacer(depth), []
  for _ in range(3 * depth + 6):
    x = step(x)
    pace(x)
    outs.append(x)
    assert all(o.is_ready() for o in outs[:-depth]), "an older dispatch is still queued"
