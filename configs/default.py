"""Every config field with its default; the other configs start from here.

Field names follow the Flax ImageNet example where they overlap. Defaults are MindCV's Res2Net
ImageNet recipe on 8 devices (batch 32 x 8, SGD momentum 0.9, lr 0.1, weight decay 1e-4, label
smoothing 0.1, random-resized-crop, flip, color jitter 0.4, random erasing 0.5).
"""

from typing import Any

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # Model: any name of res2net_jax.list_models(); overrides replace architecture fields.
    config.model = "res2net50"
    config.model_overrides = ml_collections.ConfigDict()
    # Fine-tuning regularisation and memory, as timm's: dropout before the classifier, stochastic depth
    # (Res2Net: per-block rates rising linearly to drop_path_rate), gradient checkpointing per block.
    config.drop_rate = 0.0
    config.drop_path_rate = 0.0
    config.remat = False
    config.dtype = "auto"  # 'auto' (bfloat16 on GPU/TPU, float32 on CPU), 'float32' or 'bfloat16'
    config.backend = "auto"  # 'auto', 'cpu', 'gpu' or 'tpu'

    # Data: a TFDS name or folder:/path (one directory per split, one per class inside).
    config.dataset = "imagenet2012"
    config.data_dir = ""  # TFDS data directory; '' is TFDS's default (~/tensorflow_datasets)
    config.train_split = "train"
    config.eval_split = ""  # '' picks 'validation', else 'test'
    config.image_size = 224  # 0: the dataset's own size if its images are small (32 px for CIFAR), else 224
    config.crop_pct = 0.875  # eval: resize the shorter side to image_size / crop_pct, center-crop
    config.crop_scale = (0.08, 1.0)  # random-resized-crop area fraction
    config.crop_ratio = (3 / 4, 4 / 3)  # random-resized-crop aspect ratio
    config.hflip = True
    config.color_jitter = 0.4
    config.random_erasing = 0.5
    config.mixup_alpha = 0.0
    config.cutmix_alpha = 0.0
    config.mix_switch_prob = 0.5  # with both, the chance of cutmix
    config.label_smoothing = 0.1

    # Optimisation. batch_size is global (all devices of all hosts) and per pass; steps count updates.
    config.batch_size = 256
    config.eval_batch_size = 256
    config.num_epochs = 200
    config.num_train_steps = -1  # > 0 overrides num_epochs
    config.optimizer = "momentum"  # sgd, momentum, nesterov, adamw, lamb
    config.momentum = 0.9
    config.learning_rate = 0.1
    config.lr_schedule = "cosine"  # cosine, step, constant
    config.warmup_epochs = 4.0
    config.min_lr = 0.0
    config.lr_decay_epochs = 30.0  # step schedule
    config.lr_decay_rate = 0.1  # step schedule
    config.weight_decay = 1e-4
    config.decay_bn_and_bias = False
    config.grad_clip_norm = 0.0  # 0 disables clipping
    config.grad_accum_steps = 1  # k > 1: each update averages k passes of batch_size (trains like k x batch_size)
    config.ema_decay = 0.0  # > 0 keeps (and evaluates) an exponential moving average of the weights
    # Parameters left untouched by the optimiser: a regular expression searched in each parameter's
    # path, e.g. "^(conv1|bn1|layer1_)" freezes the stem and the first stage ("" trains everything).
    config.freeze = ""
    # True: the BN layers among them run in eval mode, normalising with their running statistics and
    # leaving them as they are (timm's freeze, FrozenBatchNorm2d); False: batch statistics, updated.
    config.freeze_bn = False

    # Weights to start from (fine-tuning) or to validate: a .pth/.bin/.safetensors file or Orbax directory.
    config.init_weights = ""
    config.reset_head = False  # replace init_weights' head when its class count differs
    config.eval_weights = ""

    # Bookkeeping.
    config.seed = 0
    config.log_every_steps = 50
    config.eval_every_epochs = 1.0
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3
    return config


def imagenet_recipe(model: str, recipe: str, ascend: dict[str, Any]) -> ml_collections.ConfigDict:
    """MindCV's ImageNet recipe for `model`: 'gpu' (300 epochs, cosine, 5 warmup epochs, mixup 0.2,
    the same for every model) or 'ascend' (the defaults above changed by `ascend`)."""
    if recipe not in ("gpu", "ascend"):
        raise ValueError(f"unknown recipe {recipe!r}: end the config path with :gpu or :ascend")
    config = get_config()
    config.model = model
    if recipe == "gpu":
        config.update({"num_epochs": 300, "warmup_epochs": 5.0, "mixup_alpha": 0.2})
    else:
        config.update(ascend)
    return config
