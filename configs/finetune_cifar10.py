"""Fine-tunes ImageNet-pretrained Res2Net-50 on CIFAR-10 (the seed's example: momentum, lr 0.001).

    python main.py --config=configs/finetune_cifar10.py --workdir=runs/r50_cifar10

--config.init_weights names the pretrained weights: by default "res2net50_26w_4s" (the network MindCV
calls res2net50), timm's published `timm/res2net50_26w_4s.in1k` (downloaded once into
huggingface_hub's cache), or a weights file (MindCV's own .ckpt too), an official .pth, an Orbax
directory or a run; their 1000-class head is replaced by a new 10-class one.
CIFAR-10 is downloaded by TFDS on first use. Images are resized from 32 to 224 px as the pretrained
network expects. Fine-tuned ImageNet ResNets of this size reach 95-97% top-1 here.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model = "res2net50"
    config.init_weights = "res2net50_26w_4s"
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
