"""`parallel.compiler_options`: XLA options per platform, and what they change in the program."""

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
  x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
  compiled = jax.jit(_conv, compiler_options=options).lower(x, w).compile()
  assert "__ynn_fusion" not in compiled.as_text()
  assert jnp.array_equal(compiled(x, w), jax.jit(_conv)(x, w))


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_accelerators_keep_xla_defaults(platform):
  assert parallel._compiler_options(platform) is None
