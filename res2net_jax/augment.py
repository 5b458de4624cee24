"""Per-example training augmentation on the accelerator: flip, colour jitter, random erasing, normalisation.

The host decodes, crops and resizes, and hands over uint8 images with each example's (epoch, index);
everything after that runs here, vectorised over the batch inside the jitted train step. Every draw
comes from a key that depends only on (seed, epoch, example index), so a batch augments the same way
on any number of devices or hosts, and a resumed run repeats it exactly. The definitions are timm's
(torchvision's ColorJitter on tensors, timm's RandomErasing in 'pixel' mode), tested on fixed draws.
Pure JAX: no TensorFlow or ml_collections import; the code reads an `Augmentation`, built once from the
config, never the config itself.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from res2net_jax.registry import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    import ml_collections

ERASE_TRIES = 10  # timm's RandomErasing tries 10 boxes before giving up
ERASE_AREA = (0.02, 1 / 3)
ERASE_LOG_RATIO = (math.log(0.3), math.log(1 / 0.3))
GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
BRIGHTNESS, CONTRAST, SATURATION = 0, 1, 2
_AUGMENT_STREAM = 0x61756731  # keeps these keys apart from the train step's own RNG stream


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """A run's on-device augmentation: the seed of every draw, horizontal flips, colour-jitter strength
    (brightness, contrast and saturation factors in [1 - s, 1 + s]) and the random-erasing probability."""

    seed: int
    hflip: bool
    color_jitter: float
    random_erasing: float

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> Augmentation:
        return cls(config.seed, bool(config.hflip), float(config.color_jitter), float(config.random_erasing))


def normalize(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] (or float on that scale) -> float32 with ImageNet's mean and std."""
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32) * 255.0
    std = jnp.asarray(IMAGENET_STD, jnp.float32) * 255.0
    return (images.astype(jnp.float32) - mean) / std


def example_key(seed: int, epoch: jax.Array, index: jax.Array) -> jax.Array:
    """The augmentation key of example `index` in `epoch`: a function of these three numbers alone."""
    key = jax.random.fold_in(jax.random.key(seed), _AUGMENT_STREAM)
    return jax.random.fold_in(jax.random.fold_in(key, epoch), index)


def _grayscale(image: jax.Array) -> jax.Array:
    return image @ jnp.asarray(GRAY, image.dtype)


def adjust(image: jax.Array, op: jax.Array, factor: jax.Array) -> jax.Array:
    """torchvision's adjust_brightness (op 0), adjust_contrast (1) or adjust_saturation (2) of an
    image in [0, 1]: a blend with black, the mean grey level or the grey image, clamped to [0, 1]."""
    gray = _grayscale(image)
    other = jnp.stack([jnp.zeros_like(gray), jnp.broadcast_to(jnp.mean(gray), gray.shape), gray])[op]
    return jnp.clip(factor * image + (1.0 - factor) * other[..., None], 0.0, 1.0)


def color_jitter(image: jax.Array, factors: jax.Array, order: jax.Array) -> jax.Array:
    """torchvision's ColorJitter without hue: brightness, contrast and saturation factors
    (`factors[op]`), applied in the order `order` (a permutation of 0, 1, 2)."""
    for op in order:
        image = adjust(image, op, factors[op])
    return image


ERASE_DRAWS = 2 * ERASE_TRIES + 3  # apply?, area and aspect ratio per try, top and left offsets


def erase(image: jax.Array, draws: jax.Array, noise: jax.Array, probability: float) -> jax.Array:
    """timm's RandomErasing in mode 'pixel' of a normalised image (H, W, C), from uniform `draws`
    [ERASE_DRAWS] and `noise` (H, W, C): a box of `noise` replaces the image's pixels.

    With probability `probability` (draws[0]), try i takes area fraction U(ERASE_AREA) (draws[1 + 2i]) and
    log aspect ratio U(ERASE_LOG_RATIO) (draws[2 + 2i]), sides rounded half to even; the first box
    strictly smaller than the image wins, at integer offsets uniform over every position (Python's
    randint, both ends included: draws[-2], draws[-1]). No box fits: the image is unchanged.
    """
    height, width = image.shape[:2]
    area = ERASE_AREA[0] + draws[1:-2:2] * (ERASE_AREA[1] - ERASE_AREA[0])
    ratio = jnp.exp(ERASE_LOG_RATIO[0] + draws[2:-2:2] * (ERASE_LOG_RATIO[1] - ERASE_LOG_RATIO[0]))
    box_h = jnp.round(jnp.sqrt(area * (height * width) * ratio))
    box_w = jnp.round(jnp.sqrt(area * (height * width) / ratio))
    fits = (box_w < width) & (box_h < height)
    first = jnp.argmax(fits)
    box_h, box_w = box_h[first], box_w[first]
    top = jnp.floor(draws[-2] * (height - box_h + 1))
    left = jnp.floor(draws[-1] * (width - box_w + 1))
    rows = jnp.arange(height)[:, None, None]
    cols = jnp.arange(width)[None, :, None]
    inside = (rows >= top) & (rows < top + box_h) & (cols >= left) & (cols < left + box_w)
    inside &= jnp.any(fits) & (draws[0] < probability)
    return jnp.where(inside, noise, image)


def augment_example(image: jax.Array, key: jax.Array, augmentation: Augmentation) -> jax.Array:
    """One uint8 image (H, W, 3) -> float32 normalised: flip, colour jitter, normalise, random erasing."""
    flip_key, factor_key, order_key, erase_key = jax.random.split(key, 4)
    image = image.astype(jnp.float32) / 255.0
    if augmentation.hflip:
        image = jnp.where(jax.random.uniform(flip_key) < 0.5, image[:, ::-1], image)
    if augmentation.color_jitter > 0:
        strength = augmentation.color_jitter
        factors = jax.random.uniform(factor_key, (3,), minval=1 - strength, maxval=1 + strength)
        image = color_jitter(image, factors, jax.random.permutation(order_key, 3))
    image = normalize(image * 255.0)
    if augmentation.random_erasing > 0:
        draw_key, noise_key = jax.random.split(erase_key)
        draws = jax.random.uniform(draw_key, (ERASE_DRAWS,))
        image = erase(image, draws, jax.random.normal(noise_key, image.shape), augmentation.random_erasing)
    return image


def augment_batch(images: jax.Array, epochs: jax.Array, indices: jax.Array, augmentation: Augmentation) -> jax.Array:
    """A batch of uint8 images (B, H, W, 3) with each example's epoch and index -> augmented float32."""
    keys = jax.vmap(lambda e, i: example_key(augmentation.seed, e, i))(epochs, indices)
    return jax.vmap(lambda image, key: augment_example(image, key, augmentation))(images, keys)
