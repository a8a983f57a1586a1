"""MNIST, ResNet-18 (CIFAR-style stem, 28x28x1 input): accelerator-sized.

10 epochs, SGD + nesterov 0.1 at batch 128, weight decay 5e-4, cosine, bfloat16 compute.
"""

from fmcejax import config_lib


def get_config():
  c = config_lib.base_config()
  c.dataset = "mnist"
  c.backbone = "resnet18"
  c.dtype = "bfloat16"
  c.epochs = 10
  c.batch_size = 128
  c.learning_rate = 0.1
  c.weight_decay = 5e-4
  c.warmup_epochs = 1.0
  c.probe.epochs = 60
  c.probe.train_examples_limit = 10000
  c.alpha = 0.1
  return c
