"""Res2Net image classification in JAX/Flax, exact against timm's weights."""

from res2net_jax import convert, weight_files
from res2net_jax.folding import fold_batch_norm
from res2net_jax.inference import Prediction, make_predict_fn, preprocess
from res2net_jax.models import DLA, Bottle2neck, Res2Net
from res2net_jax.pretrained import from_pretrained, push_to_hub, save_pretrained
from res2net_jax.registry import ModelSpec, PublishedWeights, create_model, get_spec, list_models, list_pretrained

__all__ = [
    "DLA",
    "Bottle2neck",
    "ModelSpec",
    "Prediction",
    "PublishedWeights",
    "Res2Net",
    "convert",
    "create_model",
    "fold_batch_norm",
    "from_pretrained",
    "get_spec",
    "list_models",
    "list_pretrained",
    "make_predict_fn",
    "preprocess",
    "push_to_hub",
    "save_pretrained",
    "weight_files",
]
__version__ = "0.1.0"
