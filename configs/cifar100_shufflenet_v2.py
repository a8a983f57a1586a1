"""CIFAR-100, ShuffleNet v2 1.0x (stride-1 stem, no max-pool): the paper's second headline
setting (+1.08 pp), accelerator-sized. SGD 0.1 nesterov at batch 128, wd 5e-4, cosine, crop+flip,
bfloat16, 100 epochs. CIFAR-100 is not available offline here: it needs a connected machine
(tfds prepares it, with TensorFlow installed, into --config.tfds_data_dir as array_record).
"""

from fmcejax import config_lib


def get_config():
  c = config_lib.base_config()
  c.dataset = "cifar100"
  c.backbone = "shufflenet_v2"
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
