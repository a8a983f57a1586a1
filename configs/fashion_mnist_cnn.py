"""Fashion-MNIST, small CNN: the default job's recipe on a harder dataset; CPU-sized (~15 min).

Offline sources: ../shared/data/fashion_mnist (official bytes) or Debian's dataset-fashion-mnist.
"""

from fmcejax import config_lib


def get_config():
  c = config_lib.base_config()
  c.dataset = "fashion_mnist"
  c.backbone = "cnn"
  c.epochs = 3
  c.batch_size = 128
  c.learning_rate = 0.1
  c.weight_decay = 5e-4
  c.probe.epochs = 60
  c.probe.train_examples_limit = 2000
  c.fmce_net.epochs = 5
  c.alpha = 0.1
  return c
