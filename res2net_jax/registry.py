"""The model registry: every variant by its timm name, MindCV names as aliases."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from res2net_jax.errors import InvalidInputError
from res2net_jax.models import DLA, Res2Net

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How to build a variant, and what its published ImageNet weights are.

    `params_m` is the published parameter count in millions (BN running statistics excluded; None
    where none is published);
    `top1`/`top5` are timm's ImageNet-1k validation figures for `hf_hub_id`'s weights.
    """

    name: str
    family: type[nn.Module]
    kwargs: dict[str, Any]
    params_m: float | None
    top1: float | None = None
    top5: float | None = None
    hf_hub_id: str | None = None
    input_size: int = 224
    crop_pct: float = 0.875
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


_R50 = (3, 4, 6, 3)
_R101 = (3, 4, 23, 3)
_R152 = (3, 8, 36, 3)
_V1B = {"deep_stem": True, "avg_down": True}

_SPECS = [
    ModelSpec("res2net50_26w_4s", Res2Net, {"layers": _R50, "base_width": 26, "scale": 4}, 25.70, 77.994, 93.860),
    ModelSpec("res2net101_26w_4s", Res2Net, {"layers": _R101, "base_width": 26, "scale": 4}, 45.21, 79.192, 94.466),
    ModelSpec("res2net50_26w_6s", Res2Net, {"layers": _R50, "base_width": 26, "scale": 6}, 37.05, 78.586, 94.120),
    ModelSpec("res2net50_26w_8s", Res2Net, {"layers": _R50, "base_width": 26, "scale": 8}, 48.40, 78.950, 94.280),
    ModelSpec("res2net50_48w_2s", Res2Net, {"layers": _R50, "base_width": 48, "scale": 2}, 25.29, 77.528, 93.562),
    ModelSpec("res2net50_14w_8s", Res2Net, {"layers": _R50, "base_width": 14, "scale": 8}, 25.06, 78.142, 93.852),
    ModelSpec(
        "res2next50",
        Res2Net,
        {"layers": _R50, "base_width": 4, "scale": 4, "cardinality": 8},
        24.67,
        78.238,
        93.904,
    ),
    ModelSpec("res2net50d", Res2Net, {"layers": _R50, "base_width": 26, "scale": 4, **_V1B}, 25.72, 80.280, 95.028),
    ModelSpec("res2net101d", Res2Net, {"layers": _R101, "base_width": 26, "scale": 4, **_V1B}, 45.23, 81.236, 95.346),
    ModelSpec("dla60_res2net", DLA, {"base_width": 28, "scale": 4, "cardinality": 1}, 20.85, 78.480, 94.204),
    ModelSpec("dla60_res2next", DLA, {"base_width": 4, "scale": 4, "cardinality": 8}, 17.03, 78.488, 94.144),
    # MindCV-only depths: no published weights.
    ModelSpec("res2net152", Res2Net, {"layers": _R152, "base_width": 26, "scale": 4}, 61.27),
    ModelSpec("res2net152_v1b", Res2Net, {"layers": _R152, "base_width": 26, "scale": 4, **_V1B}, None),
]
_SPECS = [dataclasses.replace(s, hf_hub_id=f"timm/{s.name}.in1k") if s.top1 is not None else s for s in _SPECS]
MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in _SPECS}

# MindCV's names for the same networks (identical weights up to key naming).
ALIASES: dict[str, str] = {
    "res2net50": "res2net50_26w_4s",
    "res2net101": "res2net101_26w_4s",
    "res2net50_v1b": "res2net50d",
    "res2net101_v1b": "res2net101d",
}

# MindCV's own ImageNet weights for its names (MindSpore checkpoints, MindCV's README; no hub copy),
# with MindCV's published top-1. They differ from timm's weights of the same networks; these names load
# them (`res2net_jax.mindcv_weights`), timm's names load timm's.
MINDCV_WEIGHTS: dict[str, tuple[str, float]] = {
    "res2net50": ("https://download.mindspore.cn/toolkits/mindcv/res2net/res2net50-f42cf71b.ckpt", 79.35),
    "res2net101": ("https://download.mindspore.cn/toolkits/mindcv/res2net/res2net101-8ae60132.ckpt", 79.56),
    "res2net50_v1b": ("https://download.mindspore.cn/toolkits/mindcv/res2net/res2net50_v1b-99304e92.ckpt", 80.32),
    "res2net101_v1b": ("https://download.mindspore.cn/toolkits/mindcv/res2net/res2net101_v1b-7e6db001.ckpt", 81.14),
}


class PublishedWeights(NamedTuple):
    """Published ImageNet-1k weights that a name loads (`from_pretrained(name)`, init_weights, --weights)."""

    name: str  # the name that loads them
    source: str  # "timm" (the Hugging Face hub) or "mindcv" (MindSpore checkpoints on MindCV's server)
    location: str  # the hub repo id, or the checkpoint's URL
    top1: float  # the publisher's ImageNet-1k validation top-1 (%)
    input_size: int


def list_pretrained() -> list[PublishedWeights]:
    """Every name with published weights, sorted: timm's names load timm's weights from the hub, MindCV's
    res2net50, res2net101, res2net50_v1b and res2net101_v1b load MindCV's (timm's name list_pretrained)."""
    timm = [PublishedWeights(s.name, "timm", s.hf_hub_id, s.top1, s.input_size) for s in _SPECS if s.hf_hub_id]
    mindcv = [
        PublishedWeights(name, "mindcv", url, top1, get_spec(name).input_size)
        for name, (url, top1) in MINDCV_WEIGHTS.items()
    ]
    return sorted(timm + mindcv)


def list_models() -> list[str]:
    """Every name `create_model` accepts, aliases included, sorted."""
    return sorted([*MODELS, *ALIASES])


def get_spec(name: str) -> ModelSpec:
    """The spec of a registered name or alias; an unknown name is an error listing close names."""
    canonical = ALIASES.get(name, name)
    if canonical not in MODELS:
        close = difflib.get_close_matches(name, list_models(), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise InvalidInputError(f"unknown model {name!r}.{hint} Known models: {', '.join(list_models())}")
    return MODELS[canonical]


# Fields that `identify` leaves out: the head's size, the compute settings and the regularisation.
_RUNTIME_FIELDS = frozenset(
    {"parent", "name", "num_classes", "dtype", "axis_name", "remat", "drop_rate", "drop_path_rate", "fold_bn"}
)


def frozen(model: nn.Module) -> nn.Module:
    """`model` with its list fields (as flags and JSON give `layers`) as tuples: hashable, and equal to the
    same network built with tuples."""
    lists = {f.name: tuple(v) for f in dataclasses.fields(model) if isinstance(v := getattr(model, f.name), list)}
    return model.clone(**lists) if lists else model


def identify(model: nn.Module) -> tuple[str, dict[str, Any]]:
    """The registered name whose network `model` is, and the architecture fields it changes, for messages
    about a model built by hand: ('res2net50d', {}), ('res2net50d', {'layers': (1, 1, 1, 1)})."""
    model, found = frozen(model), []
    for spec in _SPECS:
        if spec.family is type(model):
            registered = spec.family(**spec.kwargs)
            changed = {
                f.name: getattr(model, f.name)
                for f in dataclasses.fields(model)
                if f.name not in _RUNTIME_FIELDS and getattr(model, f.name) != getattr(registered, f.name)
            }
            found.append((len(changed), spec.name, changed))
    if not found:
        return type(model).__name__, {}
    _, name, changed = min(found, key=lambda item: item[0])
    return name, changed


def describe(model: nn.Module) -> str:
    """`model` named for a message: 'res2net50d (res2net50_v1b in MindCV)', 'res2net50d (layers=(1, 1, 1, 1))'."""
    name, changed = identify(model)
    notes = [f"{alias} in MindCV" for alias, canonical in ALIASES.items() if canonical == name]
    notes += [f"{field}={value}" for field, value in changed.items()]
    return f"{name} ({', '.join(notes)})" if notes else name


def create_model(
    name: str,
    num_classes: int = 1000,
    dtype: Any = jnp.float32,
    axis_name: str | None = None,
    **overrides: Any,
) -> nn.Module:
    """A Linen module for `name`.

    `dtype` is the compute dtype: float32 or bfloat16 (parameters and BN statistics stay float32),
    or float64 under `jax.enable_x64(True)` for numerical verification.
    `axis_name` synchronises BN batch statistics over a mapped axis in data-parallel training.
    `num_classes=0` builds no classifier: the model returns pooled features.
    `overrides` replace architecture fields, e.g. `layers=(1, 1, 1, 1)` for a reduced-depth Res2Net, or
    the backbone fields `features_only`, `out_indices` and `output_stride` (as timm's).
    """
    if jnp.dtype(dtype).name not in ("float32", "bfloat16", "float64"):
        raise ValueError(f"compute dtype must be float32 or bfloat16 (float64 to verify), got {jnp.dtype(dtype).name}")
    if num_classes < 0:
        raise InvalidInputError(f"num_classes must be positive (0: pooled features, no classifier), got {num_classes}")
    spec = get_spec(name)
    fields = {f.name for f in dataclasses.fields(spec.family)} - {"parent", "name"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise InvalidInputError(f"{name} has no field {', '.join(unknown)}; its fields: {', '.join(sorted(fields))}")
    kwargs = {**spec.kwargs, **overrides}
    model = spec.family(**kwargs, num_classes=num_classes, dtype=dtype, axis_name=axis_name)
    _ = model.feature_info  # checks out_indices and output_stride here, not at the first call
    return model
