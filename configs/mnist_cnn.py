"""MNIST, small CNN: the default job, the whole pipeline offline on a 2-core CPU.

Recipe: `config_lib.small_cnn_recipe` (3 epochs, SGD + nesterov 0.1, cosine, batch 128; probe of
up to 60 short epochs stopped at CQI convergence), alpha 0.1.
"""

from fmcejax import config_lib


def get_config():
  return config_lib.small_cnn_recipe("mnist")
