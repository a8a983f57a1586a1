"""MNIST, ResNet-18 (CIFAR-style stem, 28x28x1 input): accelerator-sized.

The CIFAR recipe with 10 epochs and no augmentation (MNIST-type data is not augmented).
"""

from fmcejax import config_lib


def get_config():
  c = config_lib.cifar_recipe("mnist", "resnet18")
  c.epochs = 10
  return c
