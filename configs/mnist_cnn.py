"""MNIST, small CNN: the default job. The whole pipeline offline on a 2-core CPU in minutes.

Probe: 20 short epochs of 6,000 images, stopped at convergence (CQI), so the K=5 markers span a
real loss curve cheaply. Baseline and FMCE-Net++: 2 full epochs, SGD+nesterov 0.05, cosine.
"""

from fmcejax import config_lib


def get_config():
  c = config_lib.base_config()
  c.dataset = "mnist"
  c.backbone = "cnn"
  c.epochs = 2
  c.batch_size = 128
  c.learning_rate = 0.05
  c.weight_decay = 5e-4
  c.probe.epochs = 20
  c.probe.train_examples_limit = 6000
  c.alpha = 0.1
  return c
