"""CIFAR-10, ResNet-50 (CIFAR variant): the paper's headline setting (+1.16 pp).

The recipe of `cifar10_resnet18.py`. Offline here: --config.dataset=cifar10_jpeg.
"""

from fmcejax.configs import cifar10_resnet18


def get_config():
  c = cifar10_resnet18.get_config()
  c.backbone = "resnet50"
  return c
