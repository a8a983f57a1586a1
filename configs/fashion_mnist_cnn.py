"""Fashion-MNIST, small CNN: the default job's recipe on a harder dataset; CPU-sized.

Offline sources: ../shared/data/fashion_mnist (official bytes) or Debian's dataset-fashion-mnist.
"""

from fmcejax import config_lib


def get_config():
  return config_lib.small_cnn_recipe("fashion_mnist")
