"""Res2Net-101 v1b (timm res2net101d) on ImageNet with MindCV's recipes; the argument picks GPU or Ascend.

    python main.py --config=configs/res2net101_v1b.py --workdir=runs/res2net101_v1b
    python main.py --config=configs/res2net101_v1b.py:ascend --workdir=runs/res2net101_v1b_ascend

GPU recipe: 300 epochs, cosine, 5 warmup epochs, mixup 0.2. Ascend recipe: 200 epochs, cosine,
4 warmup epochs. Both: batch 256, SGD momentum 0.9, lr 0.1, weight decay 1e-4, label smoothing 0.1.
Expect about MindCV's 81.14% top-1 / 95.41% top-5 (Ascend recipe); timm's weights: 81.24 / 95.35.
"""

import ml_collections

from configs import default


def get_config(recipe: str = "gpu") -> ml_collections.ConfigDict:
    return default.imagenet_recipe("res2net101_v1b", recipe, ascend={"num_epochs": 200, "warmup_epochs": 4.0})
