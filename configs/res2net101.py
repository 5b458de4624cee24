"""Res2Net-101 (v1, 26w x 4s) on ImageNet with MindCV's recipes; the argument picks GPU (default) or Ascend.

    python main.py --config=configs/res2net101.py --workdir=runs/res2net101
    python main.py --config=configs/res2net101.py:ascend --workdir=runs/res2net101_ascend

GPU recipe: 300 epochs, cosine, 5 warmup epochs, mixup 0.2. Ascend recipe: 140 epochs, lr divided
by 10 every 30 epochs. Both: batch 256, SGD momentum 0.9, lr 0.1, weight decay 1e-4, label smoothing
0.1. Expect about MindCV's 79.56% top-1 / 94.70% top-5 (Ascend recipe); timm's weights: 79.19 / 94.47.
"""

import ml_collections

from configs import default


def get_config(recipe: str = "gpu") -> ml_collections.ConfigDict:
    return default.imagenet_recipe(
        "res2net101",
        recipe,
        ascend={"num_epochs": 140, "lr_schedule": "step", "lr_decay_epochs": 30.0, "warmup_epochs": 0.0},
    )
