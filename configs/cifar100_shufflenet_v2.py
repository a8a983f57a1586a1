"""CIFAR-100, ShuffleNet v2 1.0x (stride-1 stem, no max-pool): the paper's second headline
setting (+1.08 pp), with the recipe of `cifar10_resnet18.py`. On a connected machine CIFAR-100 is
downloaded and prepared on first use; offline, put the official archive in the data_dir.
"""

from fmcejax.configs import cifar10_resnet18


def get_config():
  c = cifar10_resnet18.get_config()
  c.dataset, c.backbone = "cifar100", "shufflenet_v2"
  return c
