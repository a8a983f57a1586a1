"""CIFAR-10, ResNet-18 (CIFAR variant), accelerator-sized.

The CIFAR recipe of every CIFAR config: SGD 0.1 nesterov at batch 128, weight decay 5e-4, one
warm-up epoch then cosine, random crop + flip, bfloat16 compute with float32 parameters, 100
epochs; the probe runs on 10,000 images. Offline here only the JPEG copy exists: add
--config.dataset=cifar10_jpeg (and say so next to any figure).
"""

from fmcejax.configs import default


def get_config():
  c = default.get_config()
  c.dataset, c.backbone, c.dtype = "cifar10", "resnet18", "bfloat16"
  c.epochs, c.batch_size, c.learning_rate, c.weight_decay = 100, 128, 0.1, 5e-4
  c.warmup_epochs = 1.0
  c.probe.epochs, c.probe.train_examples_limit = 100, 10000
  c.fmce_net.epochs = 10
  return c
