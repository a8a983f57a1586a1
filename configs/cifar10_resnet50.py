"""CIFAR-10, ResNet-50 (CIFAR variant): the paper's headline setting (+1.16 pp), accelerator-sized.

Same recipe as cifar10_resnet18 (SGD 0.1 nesterov, wd 5e-4, cosine, crop+flip, bfloat16, 100
epochs). Offline here: --config.dataset=cifar10_jpeg.
"""

from fmcejax import config_lib


def get_config():
  c = config_lib.base_config()
  c.dataset = "cifar10"
  c.backbone = "resnet50"
  c.dtype = "bfloat16"
  c.epochs = 100
  c.batch_size = 128
  c.eval_batch_size = 1000
  c.learning_rate = 0.1
  c.weight_decay = 5e-4
  c.warmup_epochs = 1.0
  c.probe.epochs = 100
  c.probe.train_examples_limit = 10000
  c.fmce_net.epochs = 10
  c.alpha = 0.1
  return c
