"""Deployment artefacts of the inference function: serialised StableHLO (`jax.export`) and a
TensorFlow SavedModel (`jax2tf`).

Both take normalised float32 NHWC images of one fixed size and any batch size (a symbolic batch
dimension), return float32 logits, and embed the weights. They are lowered for CPU, CUDA and TPU
at once, so one artefact serves all three. ONNX, the third format, is in `res2net_jax.onnx_export`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from res2net_jax import cli
from res2net_jax.errors import MissingDependencyError
from res2net_jax.folding import fold_batch_norm
from res2net_jax.outputs import atomic_output, new_output_path

PLATFORMS = ("cpu", "cuda", "tpu")


def logits_fn(model: nn.Module, variables: Any) -> Callable[[jax.Array], jax.Array]:
    """Normalised NHWC images -> float32 logits, eval mode, BatchNorm folded into the convolutions
    (`fold_batch_norm`), with the variables closed over."""
    model, variables = fold_batch_norm(model, variables)

    def logits(images: jax.Array) -> jax.Array:
        return model.apply(variables, images, train=False).astype(jnp.float32)

    return logits


def export_stablehlo(
    model: nn.Module,
    variables: Any,
    image_size: int,
    path: str | os.PathLike,
    platforms: Sequence[str] = PLATFORMS,
) -> None:
    """Writes the inference function as serialised `jax.export` StableHLO; `load_stablehlo` runs it."""
    new_output_path(path)  # refused before the export, which takes a while
    (batch,) = jax.export.symbolic_shape("batch")
    images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
    exported = jax.export.export(jax.jit(logits_fn(model, variables)), platforms=tuple(platforms))(images)
    with atomic_output(path) as staged, open(staged, "wb") as f:
        f.write(exported.serialize())


def load_stablehlo(path: str | os.PathLike) -> Callable[[Any], jax.Array]:
    """The function `export_stablehlo` wrote, callable on any batch of the exported image size."""
    with open(os.fspath(path), "rb") as f:
        return jax.export.deserialize(bytearray(f.read())).call


def export_savedmodel(
    model: nn.Module,
    variables: Any,
    image_size: int,
    directory: str | os.PathLike,
    platforms: Sequence[str] = PLATFORMS,
) -> None:
    """Writes the inference function as a TF SavedModel whose `serving_default` signature maps
    `images` (batch, image_size, image_size, 3) float32 to `logits`."""
    try:
        import tensorflow as tf
    except ImportError as err:
        raise MissingDependencyError(
            "SavedModel export needs TensorFlow, which is not installed: pip install tensorflow-cpu "
            "(tensorflow on macOS or ARM)"
        ) from err
    from jax.experimental import jax2tf

    cli.hide_tf_from_accelerators()
    new_output_path(directory)
    converted = jax2tf.convert(
        logits_fn(model, variables),
        polymorphic_shapes=[f"(batch, {image_size}, {image_size}, 3)"],
        native_serialization_platforms=tuple(platforms),
    )
    module = tf.Module()
    module.serve = tf.function(
        lambda images: {"logits": converted(images)},
        input_signature=[tf.TensorSpec((None, image_size, image_size, 3), tf.float32, name="images")],
        autograph=False,
    )
    with atomic_output(directory) as staged:
        tf.saved_model.save(module, staged, signatures={"serving_default": module.serve})
