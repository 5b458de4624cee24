"""Res2Net-50 v1b (timm res2net50d: deep stem, average-pool shortcuts) on ImageNet, MindCV's recipe.

    python main.py --config=configs/res2net50_v1b.py --workdir=runs/res2net50_v1b

GPU and Ascend recipes are the same (the argument is accepted for symmetry): 300 epochs, cosine,
5 warmup epochs, mixup 0.2, batch 256, SGD momentum 0.9, lr 0.1, weight decay 1e-4, label smoothing
0.1. Expect about MindCV's 80.32% top-1 / 95.09% top-5; timm's weights: 80.28 / 95.03.
"""

import ml_collections

from configs import default


def get_config(recipe: str = "gpu") -> ml_collections.ConfigDict:
    return default.imagenet_recipe(
        "res2net50_v1b", recipe, ascend={"num_epochs": 300, "warmup_epochs": 5.0, "mixup_alpha": 0.2}
    )
