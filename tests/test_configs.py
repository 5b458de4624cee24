"""The ImageNet configs reproduce MindCV's recipes (reference.md section 4), each model registered."""

from __future__ import annotations

import importlib

import pytest

from res2net_jax import get_spec

COMMON = {"batch_size": 256, "image_size": 224, "optimizer": "momentum", "momentum": 0.9, "learning_rate": 0.1,
          "weight_decay": 1e-4, "label_smoothing": 0.1, "color_jitter": 0.4, "random_erasing": 0.5,
          "crop_scale": (0.08, 1.0), "crop_pct": 0.875}  # fmt: skip
GPU = {"num_epochs": 300, "lr_schedule": "cosine", "warmup_epochs": 5, "mixup_alpha": 0.2}
ASCEND = {
    "res2net50": {"num_epochs": 200, "lr_schedule": "cosine", "warmup_epochs": 4, "mixup_alpha": 0.0},
    "res2net101": {"num_epochs": 140, "lr_schedule": "step", "lr_decay_epochs": 30, "lr_decay_rate": 0.1,
                   "mixup_alpha": 0.0},
    "res2net50_v1b": GPU,
    "res2net101_v1b": {"num_epochs": 200, "lr_schedule": "cosine", "warmup_epochs": 4, "mixup_alpha": 0.0},
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(ASCEND))
@pytest.mark.parametrize("recipe", ["gpu", "ascend"])
def test_imagenet_configs_follow_mindcv(name: str, recipe: str) -> None:
    config = importlib.import_module(f"configs.{name}").get_config(recipe)
    assert config.model == name and get_spec(name)
    expected = {**COMMON, **(GPU if recipe == "gpu" else ASCEND[name])}
    assert {k: config[k] for k in expected} == expected


def test_unknown_recipe_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown recipe 'tpu': end the config path with :gpu or :ascend"):
        importlib.import_module("configs.res2net50").get_config("tpu")


@pytest.mark.parametrize("name", ["default", "quickstart", "finetune_cifar10"])
def test_other_configs_name_registered_models(name: str) -> None:
    assert get_spec(importlib.import_module(f"configs.{name}").get_config().model)
