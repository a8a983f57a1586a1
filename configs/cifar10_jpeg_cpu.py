"""CIFAR-10 (the offline JPEG copy, `cifar10_jpeg`), small CNN, sized for a study on a 2-core CPU.

The default job's recipe (`mnist_cnn.py`: the 24k-parameter `cnn`, SGD + nesterov, lr 0.1,
cosine; a probe of up to 60 short epochs of 2,000 images) with batch 64, 6 epochs and no
augmentation, which reaches >= 70% test accuracy here. Why:
- The `cnn` is the only backbone here fast enough for a study's ~27 runs (a resnet18 step takes
  seconds on this CPU); a wider cnn learned more per epoch but not more per second.
- Batch 64 runs at least as many images/s as 128 on this CPU and takes twice the steps per epoch,
  which a 6-epoch budget is short of.
- Without crop + flip the cnn reaches a given accuracy in fewer epochs: a model this small still
  underfits after a few epochs, where augmentation slows it more than it regularises.
Accuracy per seed and wall times: README, "Study", with their commands.
"""

from fmcejax.configs import mnist_cnn


def get_config():
  c = mnist_cnn.get_config()
  c.dataset = "cifar10_jpeg"
  c.batch_size, c.learning_rate, c.epochs, c.augment = 64, 0.1, 6, "off"
  return c
