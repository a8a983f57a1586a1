"""The config schema: every field a run has, with METHOD.md's defaults.

The files beside this one start from `get_config()` and set their recipe. Fields marked [choice]
are our reconstruction of the method, not the paper's exact recipe. `fmcejax.config_lib`
validates every field before anything compiles.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # What to train, and where the data comes from.
  # mnist | fashion_mnist | cifar10 | cifar10_jpeg | cifar100 (built in, found offline or
  # downloaded) | any tfds image-classification dataset prepared in tfds_data_dir: NAME,
  # NAME:VERSION, NAME/CONFIG | folder:PATH (PATH/train/<class>/*, PATH/test/<class>/* or val/).
  # The next five fields are for a tfds dataset or a folder only (not the built-in five).
  c.dataset = "mnist"
  c.train_split = ""  # tfds split syntax (e.g. train[:90%]); "" = train
  c.test_split = ""  # "" = test, else validation
  c.image_key = ""  # the Image feature; "" = the only one
  c.label_key = ""  # the ClassLabel feature; "" = the only one
  c.image_size = 0  # images resized to N x N; 0 = as stored (needed when their sizes vary)
  c.backbone = "cnn"  # cnn | resnet18 | resnet50 | shufflenet_v2 | package.module:factory
  c.module = ""  # backbone stage the FMCE-Net reads; "" = the last one before pooling
  c.stages = "all"  # "all" or a comma list of probe,cqi,fmcs_data,fmce_net,baseline,...
  c.seeds = "3"  # a count (3 -> 0,1,2) or a comma list ("0,4,7")
  c.data_dir = ""  # offline archives; "" = search $FMCEJAX_DATA_DIR, ./data, ../shared/data
  c.tfds_data_dir = ""  # prepared tfds datasets; "" = tfds's default
  c.download = True  # False: never download (air-gapped clusters); prepared or local data only
  c.train_examples_limit = 0  # 0 = the whole split; for quick runs
  c.test_examples_limit = 0  # 0 = the whole split
  c.augment = "auto"  # auto (crop + flip for CIFAR) | on | off
  c.input_workers = "auto"  # grain worker processes: auto (half the cores on accelerators) | N
  c.input_on_device = "auto"  # training split held on the devices: auto (if < 200 MB) | on | off
  # Train steps per dispatch (one lax.scan over device-resident batches): > 1 takes the host
  # out of the step rate on GPU/TPU; it changes only float rounding, not batches or RNG.
  c.steps_per_dispatch = 1
  c.dtype = "float32"  # compute dtype; parameters stay float32

  # Recipe of the backbone runs (probe, baseline, fmcenetpp).
  c.epochs = 2  # of each baseline and FMCE-Net++ run
  c.batch_size = 128  # global, split over every device of every host
  c.eval_batch_size = 1000  # global
  c.optimizer = "sgd"  # sgd (momentum, nesterov) | adamw
  c.learning_rate = 0.1  # peak, for batch_size
  c.lr_schedule = "cosine"  # cosine | constant, after a linear warm-up
  c.warmup_epochs = 0.5  # linear warm-up from 0, in epochs
  c.momentum = 0.9  # sgd only
  c.nesterov = True  # sgd only
  c.weight_decay = 5e-4  # on kernels only

  # Representation Auxiliary Loss [choice: convex form, target = the last phase].
  c.alpha = 0.1  # the Representation Abstraction Factor, in [0, 1]
  c.alpha_schedule = "constant"  # constant | linear (0 -> alpha) | cosine (alpha -> 0)
  c.ral = "convex"  # convex: (1 - a) CE + a L_conv | additive: CE + a L_conv
  c.ral_target = "phase"  # phase: CE to phase K-1 | regression: (1 - FMCS)^2

  # Probe run (METHOD step 1).
  c.probe = ml_collections.ConfigDict()
  c.probe.epochs = 20  # at most; see stop_at_convergence
  c.probe.train_examples_limit = 0  # [choice] probe on a subset; 0 = the whole split
  c.probe.stop_at_convergence = True  # [choice] stop once CQI converges past K epochs

  # CQI and phases (METHOD steps 2-3).
  c.cqi = ml_collections.ConfigDict()
  c.cqi.beta = 0.9  # EMA factor of the smoothed loss
  c.cqi.window = 5  # epochs averaged in the difference of the smoothed loss
  c.cqi.mu_rel = 1e-3  # threshold, relative to the first loss
  c.num_phases = 5  # K

  # FMCS-Dataset (METHOD step 3).
  c.fmcs = ml_collections.ConfigDict()
  c.fmcs.subset_size = 5000  # probe-training images whose feature maps are stored per phase
  c.fmcs.holdout_fraction = 0.2  # share of those images held out (unseen at every phase)
  c.fmcs.storage_dtype = "bfloat16"  # bfloat16 | float32 on disk

  # FMCE-Net (METHOD step 4).
  c.fmce_net = ml_collections.ConfigDict()
  c.fmce_net.width = 64  # channels of its conv blocks and hidden units of its MLP
  c.fmce_net.depth = 2  # conv3x3-BN-ReLU blocks
  c.fmce_net.epochs = 10  # over the FMCS-Dataset's train split
  c.fmce_net.batch_size = 256  # global
  c.fmce_net.learning_rate = 1e-3  # AdamW, cosine
  c.fmce_net.weight_decay = 1e-4  # AdamW, on kernels only

  # Checkpoints and logging (these do not change results).
  c.checkpoint_every_steps = 0  # 0 = at epoch ends only; with steps_per_dispatch, the next boundary
  c.keep_checkpoints = 2  # newest checkpoints kept per run
  c.log_every = 50  # steps between host syncs of the metrics
  c.progress_bar = True  # tqdm per run, on process 0
  c.nan_policy = "error"  # error: stop at a non-finite loss/gradient | skip: drop the batch
  return c
