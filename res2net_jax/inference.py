"""Jitted ImageNet inference: uint8 images in, logits and top-k classes out.

python -m res2net_jax.predict --model=res2net50_26w_4s --weights=model.safetensors cat.jpg dog.png
"""

from __future__ import annotations

import functools
import importlib.resources
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from res2net_jax.errors import InvalidInputError
from res2net_jax.folding import fold_batch_norm
from res2net_jax.registry import IMAGENET_MEAN, IMAGENET_STD


class Prediction(NamedTuple):
    """Output of a predict function: float32 logits and the top-k classes by probability."""

    logits: jax.Array
    top_probs: jax.Array
    top_classes: jax.Array


def _resize_and_crop(height: int, width: int, input_size: int, crop_pct: float) -> tuple[tuple[int, int], int, int]:
    """The evaluation transform's geometry: the resized (height, width) whose shorter side is
    input_size / crop_pct, and the centre crop's top and left (rounded half to even, as torchvision)."""
    short = int(input_size / crop_pct)
    size = (short, int(short * width / height)) if height <= width else (int(short * height / width), short)
    return size, int(round((size[0] - input_size) / 2)), int(round((size[1] - input_size) / 2))


def preprocess(
    images: jax.Array,
    input_size: int = 224,
    crop_pct: float = 0.875,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> jax.Array:
    """The reference evaluation transform on a uint8 NHWC batch.

    Resize the shorter side to input_size / crop_pct (256 for 224) with antialiased bilinear
    interpolation, center-crop input_size, scale to [0, 1] and normalise with mean/std.
    """
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != jnp.uint8:
        raise ValueError(f"expected a uint8 batch of RGB images (N, H, W, 3), got {images.dtype}{images.shape}")
    n, height, width, _ = images.shape
    size, top, left = _resize_and_crop(height, width, input_size, crop_pct)
    x = images.astype(jnp.float32)
    if size != (height, width):  # images cropped beforehand (`center_crop`, crop_pct 1) are not resampled
        x = jax.image.resize(x, (n, *size, 3), "bilinear", antialias=True)
    x = x[:, top : top + input_size, left : left + input_size, :] / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


class DataConfig(NamedTuple):
    """How a model's images are prepared for evaluation (timm's `resolve_data_config`)."""

    input_size: int = 224
    crop_pct: float = 0.875
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"  # one of INTERPOLATIONS: the resampling of `center_crop`


INTERPOLATIONS = ("bilinear", "bicubic")  # PIL's filters of these names, as timm's transforms use them


def center_crop(
    image: np.ndarray, input_size: int = 224, crop_pct: float = 0.875, interpolation: str = "bilinear"
) -> np.ndarray:
    """`preprocess`'s resize and centre crop of one uint8 image (H, W, 3) on the host, with PIL as timm's
    evaluation transform does it: batches of any image sizes then share one shape (and one compiled
    function: pass them with crop_pct=1)."""
    from PIL import Image

    if interpolation not in INTERPOLATIONS:
        raise InvalidInputError(f"interpolation {interpolation!r} is not supported: use {' or '.join(INTERPOLATIONS)}")
    size, top, left = _resize_and_crop(*image.shape[:2], input_size, crop_pct)
    resized = np.asarray(Image.fromarray(image).resize(size[::-1], getattr(Image.Resampling, interpolation.upper())))
    return resized[top : top + input_size, left : left + input_size]


# XLA:CPU's YNNPACK matrix products, each fused with the elementwise work after it: 1.2x on res2net50d's
# eval pass at batch 8 on 2 CPU cores, exact to float32 rounding (experiments/NOTES.md). Not for training
# or evaluation: the fused ReLU drops NaN (IEEE maxNum) where XLA's max keeps it, so a diverged network's
# NaN would not reach its loss. An inference function of finite weights on uint8 images, whose
# normalised pixels are finite, has no NaN to lose unless its activations overflow float32.
_CPU_INFERENCE_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


@functools.cache
def inference_compiler_options() -> dict[str, str]:
    """The XLA options `make_predict_fn` compiles with on the default backend: `_CPU_INFERENCE_OPTIONS` on
    a CPU whose XLA takes them (an experimental option may be renamed or dropped: then none), else none."""
    if jax.default_backend() != "cpu":
        return {}
    try:
        jax.jit(lambda x: jnp.maximum(x @ x, 0.0)).lower(jnp.ones((2, 2))).compile(_CPU_INFERENCE_OPTIONS)
    except RuntimeError:  # JaxRuntimeError: "No such compile option" or "not a valid enum value"
        return {}
    return dict(_CPU_INFERENCE_OPTIONS)


def make_predict_fn(
    model: nn.Module,
    variables: Any,
    top_k: int = 5,
    input_size: int = 224,
    crop_pct: float = 0.875,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Callable[[Any], Prediction]:
    """A jitted function from a uint8 (N, H, W, 3) RGB batch to a `Prediction`.

    Preprocessing runs inside the compiled function; it compiles once per input shape and is reused.
    BatchNorm is folded into the convolutions (`fold_batch_norm`: the same logits to float32 rounding),
    and it compiles with `inference_compiler_options`. The variables are an argument of
    the compiled function, not constants baked into it; weights holding NaN or infinite values are
    refused (InvalidInputError), as a training run refuses to save them.
    """
    from res2net_jax.workdir import all_finite  # the check a run's saves make (imports Orbax: not at start-up)

    model, variables = fold_batch_norm(model, variables)
    if not bool(all_finite(variables)):
        raise InvalidInputError("the weights hold NaN or infinite values: use those of a run before it diverged")

    @functools.partial(jax.jit, compiler_options=inference_compiler_options())
    def predict(variables: Any, images: jax.Array) -> Prediction:
        logits = model.apply(variables, preprocess(images, input_size, crop_pct, mean, std), train=False)
        # Rank by logits: probabilities that underflow to 0 would tie.
        _, classes = jax.lax.top_k(logits, top_k)
        probs = jnp.take_along_axis(jax.nn.softmax(logits), classes, axis=-1)
        return Prediction(logits, probs, classes)

    return functools.partial(predict, variables)


def imagenet_classes() -> list[str]:
    """ImageNet-1k class names by index: 'n01440764 tench, Tinca tinca', ... (TFDS imagenet2012 order)."""
    text = importlib.resources.files("res2net_jax").joinpath("imagenet_classes.tsv").read_text()
    return [line.replace("\t", " ") for line in text.splitlines()]


# The most work one image may cause: its decoded pixels, and its aspect ratio, which sets the size of
# the resized image (the shorter side goes to 256, so a 1x3000 strip would become 256x768,000).
MAX_PIXELS = 8192 * 8192
MAX_ASPECT = 32
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def load_image(path: str) -> np.ndarray:
    """An image file as uint8 RGB (H, W, 3): grayscale, palette, RGBA and CMYK are converted, 16-bit
    grayscale is scaled (not clipped) to 8 bits.

    Refused with InvalidInputError, before decoding, when larger than MAX_PIXELS or more elongated than
    MAX_ASPECT:1; an unreadable file is an InvalidInputError too.
    """
    from PIL import Image

    try:
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # PIL's own check; ours is below
        try:
            image = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = limit
        with image:
            width, height = image.size
            if width * height > MAX_PIXELS or max(width, height) > MAX_ASPECT * min(width, height):
                raise InvalidInputError(
                    f"{path}: refused: {width}x{height} px is beyond the limits of "
                    f"{MAX_PIXELS // 1_000_000} megapixels and aspect ratio {MAX_ASPECT}:1 (crop or resize it first)"
                )
            if image.mode in _SIXTEEN_BIT_MODES:
                gray = np.asarray(image).astype(np.float64)
                gray = np.round(np.clip(gray, 0, 65535) * (255 / 65535)).astype(np.uint8)
                return np.repeat(gray[..., None], 3, axis=-1)
            return np.asarray(image.convert("RGB"))
    except InvalidInputError:
        raise
    except (OSError, SyntaxError, ValueError) as err:
        # PIL raises OSError subclasses, and SyntaxError or ValueError for some broken files
        raise InvalidInputError(f"{path}: cannot read image: {err}") from None
