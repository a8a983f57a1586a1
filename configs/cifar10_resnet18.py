"""CIFAR-10, ResNet-18 (CIFAR variant): the standard recipe, accelerator-sized.

SGD momentum 0.9 + nesterov, lr 0.1 at batch 128, weight decay 5e-4, 1 warm-up epoch, cosine,
random crop (pad 4) + horizontal flip, bfloat16 compute with float32 parameters, 100 epochs.
Offline here only the JPEG copy exists: add --config.dataset=cifar10_jpeg (and say so next to any
figure). Probe: up to 100 epochs on 10,000 images, stopped at CQI convergence.
"""

from fmcejax import config_lib


def get_config():
  c = config_lib.base_config()
  c.dataset = "cifar10"
  c.backbone = "resnet18"
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
