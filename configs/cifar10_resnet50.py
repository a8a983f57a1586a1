"""CIFAR-10, ResNet-50 (CIFAR variant): the paper's headline setting (+1.16 pp).

Recipe `config_lib.cifar_recipe`; offline here: --config.dataset=cifar10_jpeg.
"""

from fmcejax import config_lib


def get_config():
  return config_lib.cifar_recipe("cifar10", "resnet50")
