"""MNIST, small CNN: the default job, the whole pipeline offline on a 2-core CPU in ~15 minutes.

Probe: up to 60 short epochs of 2,000 images, stopped once CQI says converged (with METHOD's
beta=0.9, w=5, mu=1e-3*S_1 that takes ~50 epochs), so the K=5 markers span a real loss curve
cheaply. Baseline and FMCE-Net++: 3 full epochs, SGD + nesterov, lr 0.1, cosine, batch 128.
"""

from fmcejax import config_lib


def get_config():
  c = config_lib.base_config()
  c.dataset = "mnist"
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
