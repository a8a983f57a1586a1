"""CIFAR-10 (the offline JPEG copy, `cifar10_jpeg`), small CNN, sized for the study on a 2-core CPU.

Recipe: `config_lib.small_cnn_recipe` (the 24k-parameter `cnn`, SGD + nesterov, lr 0.1, cosine;
probe of up to 60 short epochs of 2,000 images) with batch 64, 6 epochs and no augmentation. Why:
- The `cnn` is the only backbone here fast enough for a study's ~27 runs (a resnet18 step takes
  seconds on this CPU); a wider cnn learned more per epoch but not more per second.
- Batch 64 runs at least as many images/s as 128 on this CPU (activations stay in cache) and
  takes twice the steps per epoch, which a 6-epoch budget is short of.
- Without crop + flip the cnn reaches a given accuracy in fewer epochs: a model this small is
  still underfitting after a few epochs, where augmentation slows it more than it regularises.
Test accuracy per seed (>= 70%) and the wall times are in the README, measured with
`python -m fmcejax.train --config=configs/cifar10_jpeg_cpu.py --config.stages=baseline`.
"""

from fmcejax import config_lib


def get_config():
  c = config_lib.small_cnn_recipe("cifar10_jpeg")
  c.batch_size, c.learning_rate, c.epochs, c.augment = 64, 0.1, 6, "off"
  return c
