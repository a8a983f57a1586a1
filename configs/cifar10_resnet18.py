"""CIFAR-10, ResNet-18 (CIFAR variant), accelerator-sized.

The CIFAR recipe of every CIFAR config: SGD 0.1 nesterov at batch 128, weight decay 5e-4, one
warm-up epoch then cosine, random crop + flip, bfloat16 compute with float32 parameters, 100
epochs; the probe runs on 10,000 images. Ten steps per dispatch, so that on an accelerator the
host does not set the step rate (docs/BENCHMARKS.md, "loop ceiling"); ten divides the 390 and 78
steps per epoch of 50,000 and 10,000 images at batch 128, so each run compiles one scan length.
Offline here only the JPEG copy exists: add --config.dataset=cifar10_jpeg (and say so next to any
figure).
"""

from fmcejax.configs import default


def get_config():
  c = default.get_config()
  c.dataset, c.backbone, c.dtype = "cifar10", "resnet18", "bfloat16"
  c.epochs, c.batch_size, c.learning_rate, c.weight_decay = 100, 128, 0.1, 5e-4
  c.warmup_epochs = 1.0
  c.probe.epochs, c.probe.train_examples_limit = 100, 10000
  c.fmce_net.epochs = 10
  c.steps_per_dispatch = 10
  return c
