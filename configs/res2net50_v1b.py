"""Res2Net-50 v1b (timm res2net50d: deep stem, average-pool shortcuts) on ImageNet, MindCV's recipe.

    python main.py --config=configs/res2net50_v1b.py --workdir=runs/res2net50_v1b

GPU and Ascend recipes are the same (the argument is accepted for symmetry): 300 epochs, cosine,
5 warmup epochs, mixup 0.2, batch 256, SGD momentum 0.9, lr 0.1, weight decay 1e-4, label smoothing
0.1. Expect about MindCV's 80.32% top-1 / 95.09% top-5; timm's weights: 80.28 / 95.03.
"""

from configs import default


def get_config(recipe: str = "gpu"):
    if recipe not in ("gpu", "ascend"):
        raise ValueError(f"unknown recipe {recipe!r}: use configs/res2net50_v1b.py:gpu or :ascend")
    config = default.get_config()
    config.model = "res2net50_v1b"
    config.num_epochs = 300
    config.warmup_epochs = 5.0
    config.mixup_alpha = 0.2
    return config
