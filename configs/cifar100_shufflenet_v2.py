"""CIFAR-100, ShuffleNet v2 1.0x (stride-1 stem, no max-pool): the paper's second headline
setting (+1.08 pp). Recipe `config_lib.cifar_recipe`. CIFAR-100 is not available offline here: it
needs a connected machine (tfds prepares it, with TensorFlow installed, into
--config.tfds_data_dir as array_record).
"""

from fmcejax import config_lib


def get_config():
  return config_lib.cifar_recipe("cifar100", "shufflenet_v2")
