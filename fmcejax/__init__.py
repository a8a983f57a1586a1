"""fmcejax: FMCE-Net++ in JAX/Flax.

On a machine without TPU or GPU, the TPU and GPU compilers of the `aot` extra (libtpu, the CUDA
plugin) would load at `import jax` and print start-up errors (libtpu's host bounds, cuInit)
before JAX falls back to its CPU. Where no accelerator device exists and JAX is asked for no
other platform, this keeps them unloaded, so `train` prints and does what it does without them.
Preflight's compiling child (`FMCEJAX_COMPILERS=1`) loads them.
"""

import glob
import importlib.util
import os
import sys
import types

_ACCELERATOR_NODES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/kfd")


def _keep_compilers_unloaded() -> None:
  if "jax" in sys.modules or os.environ.get("FMCEJAX_COMPILERS"):
    return
  if os.environ.get("JAX_PLATFORMS", "cpu") != "cpu":
    return
  if any(glob.glob(pattern) for pattern in _ACCELERATOR_NODES):
    return
  if not any(importlib.util.find_spec(m) for m in ("libtpu", "jax_cuda12_plugin")):
    return  # no aot compilers: nothing to keep unloaded (and other plugins, e.g. Metal, load)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu then never starts
  # jaxlib's GPU kernels and JAX's plugin discovery import the CUDA plugin even for CPU.
  sys.modules.setdefault("jax_cuda12_plugin", None)
  stub = types.ModuleType("jax_plugins.xla_cuda12")
  stub.initialize = lambda: None
  sys.modules.setdefault("jax_plugins.xla_cuda12", stub)


_keep_compilers_unloaded()
