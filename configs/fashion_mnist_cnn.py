"""Fashion-MNIST, small CNN: the default job's recipe (`mnist_cnn.py`) on a harder dataset.

Offline sources: ../shared/data/fashion_mnist (official bytes) or Debian's dataset-fashion-mnist.
"""

from fmcejax.configs import mnist_cnn


def get_config():
  c = mnist_cnn.get_config()
  c.dataset = "fashion_mnist"
  return c
