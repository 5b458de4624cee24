"""Fine-tunes ImageNet-pretrained Res2Net-50 on CIFAR-10 (the seed's example: momentum, lr 0.001).

    python main.py --config=configs/finetune_cifar10.py --workdir=runs/r50_cifar10
    python main.py --config=configs/finetune_cifar10.py --workdir=runs/r50_cifar10_timm \
        --config.init_weights=res2net50_26w_4s     # timm's weights of the same network instead

It starts, as the seed's `train.py --model=res2net50 --pretrained` does, from MindCV's own res2net50
weights (79.35% ImageNet top-1; MindCV's MindSpore checkpoint, downloaded once into
~/.cache/res2net_jax/mindcv, or read from MindCV's ~/.mindspore/models: `res2net_jax.mindcv_weights`).
`res2net50_26w_4s` names timm's weights of the network (77.99%, from the Hugging Face hub); a weights
file, an official .pth, an Orbax directory or a run work too. The 1000-class head is replaced by a new
10-class one. CIFAR-10 is downloaded by TFDS on first use. Images are resized from 32 to 224 px as the
pretrained network expects. Fine-tuned ImageNet ResNets of this size reach 95-97% top-1 here.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model = "res2net50"
    config.init_weights = "res2net50"  # MindCV's weights
    config.reset_head = True
    config.dataset = "cifar10"
    config.image_size = 224
    config.crop_pct = 1.0
    config.crop_scale = (0.35, 1.0)
    config.color_jitter = 0.0
    config.random_erasing = 0.0
    config.batch_size = 128
    config.eval_batch_size = 256
    config.num_epochs = 10
    config.optimizer = "momentum"
    config.learning_rate = 0.001
    config.warmup_epochs = 0.0
    config.log_every_steps = 100
    return config
