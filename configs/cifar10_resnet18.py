"""CIFAR-10, ResNet-18 (CIFAR variant), accelerator-sized: `config_lib.cifar_recipe`.

Offline here only the JPEG copy exists: add --config.dataset=cifar10_jpeg (and say so next to any
figure).
"""

from fmcejax import config_lib


def get_config():
  return config_lib.cifar_recipe("cifar10", "resnet18")
