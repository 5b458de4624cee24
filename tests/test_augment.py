"""The on-device augmentation against torchvision's ColorJitter and timm's RandomErasing on the same draws."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from res2net_jax import augment
from res2net_jax.registry import IMAGENET_MEAN, IMAGENET_STD

ORDERS = [(0, 1, 2), (2, 1, 0), (1, 0, 2), (1, 2, 0)]


def _image(seed: int, height: int = 24, width: int = 20) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (height, width, 3)).astype(np.uint8)


@pytest.mark.parametrize("order", ORDERS)
def test_color_jitter_is_torchvision_color_jitter(monkeypatch, order: tuple[int, ...]) -> None:
    """ColorJitter(0.4, 0.4, 0.4), as timm's create_transform builds it, with its draws fixed to ours
    (hue, never drawn, placed anywhere in its permutation): the same image on tensors, and about one
    level of 255 from the PIL path timm takes (PIL rounds to uint8 after each operation and blends
    contrast with the integer mean grey)."""
    from torchvision import transforms

    image = _image(sum(order))
    factors = np.random.RandomState(len(ORDERS) + order[0]).uniform(0.6, 1.4, 3).astype(np.float32)
    with_hue = torch.tensor([*order[:1], 3, *order[1:]])
    drawn = (with_hue, *(float(f) for f in factors), None)
    monkeypatch.setattr(transforms.ColorJitter, "get_params", staticmethod(lambda *args: drawn))
    jitter = transforms.ColorJitter(0.4, 0.4, 0.4)
    ours = np.asarray(augment.color_jitter(jnp.asarray(image / 255.0, jnp.float32), factors, jnp.asarray(order)))
    on_tensor = jitter(torch.from_numpy(image).permute(2, 0, 1).float() / 255).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours, on_tensor, atol=2e-6)
    on_pil = np.asarray(jitter(Image.fromarray(image)), np.float32)
    levels = np.abs(ours * 255 - on_pil)
    assert levels.max() <= 4.0 and levels.mean() <= 1.5  # measured: up to 3.3, 0.9-1.2 on average


def _timm_erasing(monkeypatch, image: np.ndarray, draws: np.ndarray, noise: np.ndarray, probability: float):
    """timm's RandomErasing(mode='pixel') on `image` (H, W, C) with Python's random draws taken from `draws`
    and the erased box's pixels taken from `noise` at the box's place."""
    import timm.data.random_erasing as erasing

    queue = list(draws[:-2])
    offsets = list(draws[-2:])
    box = {}

    class Random:
        @staticmethod
        def random() -> float:
            return float(queue.pop(0))

        @staticmethod
        def uniform(low: float, high: float) -> float:
            return low + float(queue.pop(0)) * (high - low)

        @staticmethod
        def randint(low: int, high: int) -> int:
            value = low + int(np.floor(float(offsets.pop(0)) * (high - low + 1)))
            box["top" if "top" not in box else "left"] = value
            return value

    def pixels(per_pixel, rand_color, patch_size, dtype, device):
        assert per_pixel
        _, h, w = patch_size
        return torch.from_numpy(noise[box["top"] : box["top"] + h, box["left"] : box["left"] + w]).permute(2, 0, 1)

    monkeypatch.setattr(erasing, "random", Random)
    monkeypatch.setattr(erasing, "_get_pixels", pixels)
    tensor = torch.from_numpy(image.copy()).permute(2, 0, 1)
    erasing.RandomErasing(probability, mode="pixel", device="cpu")(tensor)
    return tensor.permute(1, 2, 0).numpy(), bool(box)


@pytest.mark.parametrize(("height", "width"), [(32, 32), (4, 3), (224, 160)])
def test_erase_is_timm_random_erasing(monkeypatch, height: int, width: int) -> None:
    """Over 60 draw sets: the same box, the same noise in it, the same images left alone (the draw
    above the probability, or no box that fits: tiny images fail most tries)."""
    rng = np.random.RandomState(height)
    erased = 0
    for _ in range(60):
        image = rng.randn(height, width, 3).astype(np.float32)
        noise = rng.randn(height, width, 3).astype(np.float32)
        draws = rng.rand(augment.ERASE_DRAWS).astype(np.float32)
        expected, did_erase = _timm_erasing(monkeypatch, image, draws, noise, 0.5)
        np.testing.assert_array_equal(np.asarray(augment.erase(image, draws, noise, 0.5)), expected)
        erased += did_erase
    assert 10 < erased < 50


def test_normalize_is_imagenet_mean_and_std() -> None:
    image = _image(0)
    expected = (image / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(augment.normalize(jnp.asarray(image)), expected, rtol=1e-5, atol=1e-5)


def test_each_example_augments_by_its_seed_epoch_and_index_alone() -> None:
    """An example's augmentation does not depend on its batch or position in it, so any split of a
    batch over devices or hosts, or a resumed run, augments it alike; another epoch draws anew."""
    augmentation = augment.Augmentation(seed=3, hflip=True, color_jitter=0.4, random_erasing=0.5)
    images = jnp.asarray(np.stack([_image(i) for i in range(8)]))
    epochs, indices = jnp.full(8, 2, jnp.int32), jnp.arange(100, 108, dtype=jnp.int32)
    augment_batch = jax.jit(augment.augment_batch, static_argnums=3)
    whole = np.asarray(augment_batch(images, epochs, indices, augmentation))
    order = np.array([5, 0, 7, 2])
    part = np.asarray(augment_batch(images[order], epochs[order], indices[order], augmentation))
    np.testing.assert_array_equal(part, whole[order])
    next_epoch = np.asarray(augment_batch(images, epochs + 1, indices, augmentation))
    assert all(not np.array_equal(a, b) for a, b in zip(whole, next_epoch, strict=True))
    plain = augment.Augmentation(seed=3, hflip=False, color_jitter=0.0, random_erasing=0.0)
    np.testing.assert_allclose(augment_batch(images, epochs, indices, plain), augment.normalize(images), atol=1e-6)
