"""Res2Net-50 (v1, 26w x 4s) on ImageNet with MindCV's recipes; the argument picks GPU (default) or Ascend.

    python main.py --config=configs/res2net50.py --workdir=runs/res2net50
    python main.py --config=configs/res2net50.py:ascend --workdir=runs/res2net50_ascend

GPU recipe: 300 epochs, cosine, 5 warmup epochs, mixup 0.2. Ascend recipe: 200 epochs, cosine,
4 warmup epochs. Both: batch 256, SGD momentum 0.9, lr 0.1, weight decay 1e-4, label smoothing 0.1.
Expect about MindCV's 79.35% top-1 / 94.64% top-5 (Ascend recipe, 8x Ascend 910); timm's
weights of the same network score 77.99 / 93.86. ImageNet (imagenet2012) must be downloaded by hand.
"""

import ml_collections

from configs import default


def get_config(recipe: str = "gpu") -> ml_collections.ConfigDict:
    return default.imagenet_recipe("res2net50", recipe, ascend={"num_epochs": 200, "warmup_epochs": 4.0})
