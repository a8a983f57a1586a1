"""MNIST, small CNN: the default job, the whole pipeline offline on a 2-core CPU.

Probe: up to 60 short epochs of 2,000 images, stopped once CQI says converged, so the K = 5
markers span a real loss curve cheaply. Baseline and FMCE-Net++: 3 full epochs, SGD + nesterov,
lr 0.1, cosine, batch 128, alpha 0.1, 3 seeds.
"""

from fmcejax.configs import default


def get_config():
  c = default.get_config()
  c.dataset, c.backbone = "mnist", "cnn"
  c.epochs, c.batch_size, c.learning_rate, c.weight_decay = 3, 128, 0.1, 5e-4
  c.probe.epochs, c.probe.train_examples_limit = 60, 2000
  c.fmce_net.epochs = 5
  return c
