"""MNIST, ResNet-18 (CIFAR-style stem, 28x28x1 input): accelerator-sized.

The CIFAR recipe (`cifar10_resnet18.py`) with 10 epochs; MNIST-type data is not augmented.
"""

from fmcejax.configs import cifar10_resnet18


def get_config():
  c = cifar10_resnet18.get_config()
  c.dataset, c.epochs = "mnist", 10
  return c
