"""Weight conversion between PyTorch (timm / official Res2Net) state dicts and Flax variables.

Flax module paths mirror the PyTorch module paths (see `res2net_jax.models`), so the mapping is
mechanical: `layer1.0.convs.2.weight` (OIHW) <-> `params/layer1_0/convs_2/kernel` (HWIO), BN
`weight/bias/running_mean/running_var` <-> `params/.../scale`, `params/.../bias`,
`batch_stats/.../mean`, `batch_stats/.../var`, Linear `(out, in)` <-> Dense `(in, out)`.
Every conversion is strict: a key that is missing, left over or mis-shaped is an error.

MindCV (MindSpore) names the same tensors differently (`timm_to_mindcv`): `fc` -> `classifier`,
`downsample` -> `down_sample`, BN `gamma/beta/moving_mean/moving_variance`, and its v1b networks put
no pooling layer in layer1's shortcut, so `layer1.0.downsample.1/.2` are `layer1.0.down_sample.0/.1`
there. Layouts are the same as PyTorch's.

This module is the mapping alone, pure functions over state dicts and variables; reading and writing
files is `res2net_jax.weight_files`.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from res2net_jax.errors import InvalidInputError
from res2net_jax.models import DLA, Res2Net
from res2net_jax.registry import MODELS, create_model, describe, frozen, identify

Variables = dict[str, Any]
HEAD_KEYS = ("fc.weight", "fc.bias")
_BN_COUNTER = "num_batches_tracked"


class CheckpointMismatchError(InvalidInputError):
    """A checkpoint whose keys or shapes do not fit the requested model."""


def _torch_module_path(flax_path: tuple[str, ...]) -> str:
    """('layer1_0', 'convs_2') -> 'layer1.0.convs.2'."""
    parts = []
    for name in flax_path:
        match = re.fullmatch(r"(.+)_(\d+)", name)
        parts.extend(match.groups() if match else (name,))
    return ".".join(parts)


def torch_layout(shapes: Variables) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """Maps each PyTorch key to its Flax variable path and its PyTorch-layout shape."""
    layout = {}
    flat = traverse_util.flatten_dict(shapes)
    for path, leaf in flat.items():
        collection, *module, name = path
        shape = tuple(leaf.shape)
        prefix = _torch_module_path(tuple(module))
        if collection == "params":
            torch_name = {"kernel": "weight", "scale": "weight", "bias": "bias"}[name]
            if name == "kernel":
                shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
        else:
            torch_name = {"mean": "running_mean", "var": "running_var"}[name]
        layout[f"{prefix}.{torch_name}"] = (path, shape)
    return layout


Overrides = Mapping[str, Any] | None


def layout(model: nn.Module) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """PyTorch key -> (Flax path, PyTorch shape) for every variable of `model`, computed once per architecture
    (models compare by value, list fields as their tuples: `registry.frozen`)."""
    return _layout(frozen(model))


@functools.lru_cache(maxsize=64)
def _layout(model: nn.Module) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, model.in_chans), jnp.float32))
    return torch_layout(shapes)


def first_conv_key(model: nn.Module) -> str:
    """The PyTorch key of the convolution that reads the image (timm's pretrained_cfg 'first_conv')."""
    if isinstance(model, DLA):
        return "base_layer.0.weight"
    return "conv1.0.weight" if model.deep_stem else "conv1.weight"


def adapt_input_conv(weight: np.ndarray, in_chans: int) -> np.ndarray:
    """An RGB first convolution's weights (O, 3, kh, kw) for `in_chans` input channels, as timm adapts
    pretrained weights: summed over the colours for 1 channel, else repeated and cut to `in_chans`
    and scaled by 3 / in_chans, so that a grey image repeated in every channel gives the same output."""
    if weight.shape[1] != 3:
        raise CheckpointMismatchError(f"the first convolution reads {weight.shape[1]} channels: only RGB (3) "
                                      f"weights can be adapted to in_chans={in_chans}")  # fmt: skip
    if in_chans == 1:
        return weight.sum(axis=1, keepdims=True)
    repeated = np.tile(weight, (1, math.ceil(in_chans / 3), 1, 1))[:, :in_chans]
    return repeated * np.float32(3 / in_chans)


def to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; numpy has no bfloat16, so widen it first
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def num_classes_for(state_dict: Mapping[str, Any], num_classes: int | None = None) -> int:
    """The class count of a model built for `state_dict`: `num_classes`, by default its classifier's (0,
    pooled features, without one; `num_classes_of` for variables)."""
    if num_classes is not None:
        return num_classes
    weight = state_dict.get(HEAD_KEYS[0])
    return 0 if weight is None else int(weight.shape[0])


def _listing(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return f"{len(items)} ({shown}{', ...' if len(items) > limit else ''})"


def guess_model(state_dict: Mapping[str, Any]) -> str | None:
    """The registered variant whose keys and shapes (head aside) a state dict matches best."""
    shapes = {k: tuple(np.shape(v)) for k, v in state_dict.items() if not k.endswith(_BN_COUNTER)}
    classes = num_classes_for(state_dict) or 1000
    best, best_score = None, 0.0
    for name in MODELS:
        expected = {k: s for k, (_, s) in layout(create_model(name, classes)).items()}
        same = sum(shapes.get(k) == s for k, s in expected.items())
        score = same / max(len(expected), len(shapes))
        if score > best_score:
            best, best_score = name, score
    return best if best_score > 0.5 else None


def _check(state_dict: Mapping[str, Any], expected: Mapping[str, tuple], model: nn.Module) -> None:
    keys = {k for k in state_dict if not k.endswith(_BN_COUNTER)}
    missing = sorted(set(expected) - keys)
    unexpected = sorted(keys - set(expected))
    misshaped = sorted(
        f"{k}: file {tuple(np.shape(state_dict[k]))} vs model {expected[k][1]}"
        for k in keys & set(expected)
        if tuple(np.shape(state_dict[k])) != expected[k][1]
    )
    if not (missing or unexpected or misshaped):
        return
    problems = []
    if missing:
        problems.append(f"missing {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {_listing(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped {_listing(misshaped)}")
    guess = guess_model(state_dict)
    looks = f" The checkpoint looks like {guess}." if guess and guess != identify(model)[0] else ""
    if guess is None:
        looks = " It does not look like any registered Res2Net variant."
    raise CheckpointMismatchError(f"checkpoint does not fit {describe(model)}: {'; '.join(problems)}.{looks}")


def torch_to_flax(
    model: nn.Module, state_dict: Mapping[str, Any], *, reset_head: bool = False, rng: jax.Array | None = None
) -> Variables:
    """Flax variables {'params', 'batch_stats'} (float32) of `model` from a timm / official PyTorch state dict.

    A checkpoint whose head has another class count than `model.num_classes` is an error unless
    `reset_head` is set: then its head is dropped and a freshly initialised one (from `rng`) takes its
    place, as for fine-tuning ImageNet weights on a new dataset. A model without a classifier
    (`num_classes=0`, `features_only`) takes a classifier's checkpoint without its head, and a
    `features_only` model whose `out_indices` stop early without the stages it does not run, as timm's
    do. An RGB checkpoint loads into a model of another `in_chans` through `adapt_input_conv`.
    """
    state_dict = {k: to_numpy(v) for k, v in state_dict.items()}
    expected = layout(model)
    first = first_conv_key(model)
    if first in state_dict and state_dict[first].shape[1] != model.in_chans:
        state_dict[first] = adapt_input_conv(state_dict[first], model.in_chans)
    if model.features_only:
        state_dict = {k: v for k, v in state_dict.items() if k in expected or k.endswith(_BN_COUNTER)}
    elif HEAD_KEYS[0] not in expected:
        state_dict = {k: v for k, v in state_dict.items() if k not in HEAD_KEYS}
    file_classes = num_classes_for(state_dict)
    new_head = HEAD_KEYS[0] in state_dict and file_classes != model.num_classes
    if new_head and not reset_head:
        raise CheckpointMismatchError(
            f"the checkpoint's head has {file_classes} classes but {model.num_classes} were asked for: "
            f"pass reset_head=True (--reset_head) to replace it with a new {model.num_classes}-class head"
        )
    if new_head:
        state_dict = {k: v for k, v in state_dict.items() if k not in HEAD_KEYS}
        expected_body = {k: v for k, v in expected.items() if k not in HEAD_KEYS}
        _check(state_dict, expected_body, model)
    else:
        _check(state_dict, expected, model)

    flat = {}
    for key, (path, _) in expected.items():
        if key not in state_dict:
            continue
        value = state_dict[key].astype(np.float32)
        if path[-1] == "kernel":
            value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
        flat[path] = value
    variables = traverse_util.unflatten_dict(flat)
    if new_head:
        variables["params"]["fc"] = _init_head(model, rng)
    return jax.tree.map(jnp.asarray, variables)


def from_torch(
    state_dict: Mapping[str, Any],
    model_name: str,
    num_classes: int | None = None,
    reset_head: bool = False,
    rng: jax.Array | None = None,
    overrides: Overrides = None,
) -> Variables:
    """`torch_to_flax` for the registered `model_name` built with `overrides` (see `create_model`);
    `num_classes` defaults to the checkpoint's head (0, pooled features, for a checkpoint without one)."""
    model = create_model(model_name, num_classes=num_classes_for(state_dict, num_classes), **dict(overrides or {}))
    return torch_to_flax(model, state_dict, reset_head=reset_head, rng=rng)


def _init_head(model: nn.Module, rng: jax.Array | None) -> dict[str, jax.Array]:
    """A new classifier, initialised exactly as the model initialises its own."""
    in_features = layout(model)[HEAD_KEYS[0]][1][1]
    rng = jax.random.key(0) if rng is None else rng
    feature_map = jnp.zeros((1, 1, 1, in_features), jnp.float32)
    return model.init(rng, feature_map, method=model.forward_head)["params"]["fc"]


def num_classes_of(variables: Variables) -> int:
    """The class count of a variables pytree's classifier (0 without one)."""
    fc = variables["params"].get("fc")
    return 0 if fc is None else int(fc["kernel"].shape[-1])


def torch_names(variables: Variables) -> dict[str, np.ndarray]:
    """Flax variables under timm's names and in PyTorch's layouts, unchecked (float32 numpy arrays).

    BN `num_batches_tracked` counters are written as 0: Flax does not track them, and PyTorch uses
    them only when BN momentum is None, which these models never set.
    """
    for collection in ("params", "batch_stats"):
        if collection not in variables:
            raise CheckpointMismatchError(f"variables have no {collection!r} collection")
    flat = traverse_util.flatten_dict(variables)
    state_dict = {}
    for key, (path, _) in torch_layout(variables).items():
        value = np.asarray(flat[path], dtype=np.float32)
        if path[-1] == "kernel":
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        state_dict[key] = np.ascontiguousarray(value)
        if key.endswith(".running_var"):
            state_dict[key.replace("running_var", _BN_COUNTER)] = np.array(0, np.int64)
    return state_dict


def flax_to_torch(model: nn.Module, variables: Variables) -> dict[str, np.ndarray]:
    """A timm-named PyTorch state dict (numpy arrays) from `model`'s Flax variables, which must be
    exactly the variables of `model`."""
    state_dict = torch_names(variables)
    _check(state_dict, layout(model), model)
    return state_dict


def to_torch(variables: Variables, model_name: str, overrides: Overrides = None) -> dict[str, np.ndarray]:
    """`flax_to_torch` for the registered `model_name` built with `overrides` and the variables' head."""
    model = create_model(model_name, num_classes=num_classes_of(variables), **dict(overrides or {}))
    return flax_to_torch(model, variables)


# --- MindCV names ------------------------------------------------------------------------------

_TIMM_TO_MINDCV_BN = {"running_mean": "moving_mean", "running_var": "moving_variance"}
_MINDCV_TO_TIMM = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}


def timm_to_mindcv(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A timm-named Res2Net state dict under MindCV's names (same tensors; BN counters dropped).

    BN affine parameters are the 1-D `weight`/`bias` outside `fc`; a v1b network is recognised by the
    BN at index 2 of its stage-2 shortcut.
    """
    v1b = any(re.match(r"layer[2-9]\.0\.downsample\.2\.", key) for key in state_dict)
    renamed = {}
    for key, value in state_dict.items():
        module, _, name = key.rpartition(".")
        if name == _BN_COUNTER:
            continue
        if module == "fc":
            renamed[f"classifier.{name}"] = value
            continue
        if np.ndim(value) == 1 and name in ("weight", "bias"):
            name = {"weight": "gamma", "bias": "beta"}[name]
        name = _TIMM_TO_MINDCV_BN.get(name, name)
        module = module.replace("downsample", "down_sample")
        if v1b and module.startswith("layer1.0.down_sample."):
            head, _, index = module.rpartition(".")
            module = f"{head}.{int(index) - 1}"
        renamed[f"{module}.{name}"] = value
    return renamed


# The top-level cells of MindCV's Res2Net that hold tensors. A checkpoint saved from MindSpore's training
# cell also holds the optimiser's state (moments.*, learning_rate, global_step, ...), which MindCV's
# load_param_into_net leaves unused, as `mindcv_to_timm` does.
_MINDCV_CELLS = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "classifier")


def mindcv_to_timm(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of `timm_to_mindcv`: a MindCV-named state dict under timm's names (the network's tensors
    only: a training checkpoint's optimiser state is left out)."""
    v1b = any(re.match(r"layer[2-9]\.0\.down_sample\.2\.", key) for key in state_dict)
    renamed = {}
    for key, value in state_dict.items():
        if key.split(".", 1)[0] not in _MINDCV_CELLS:
            continue
        module, _, name = key.rpartition(".")
        name = _MINDCV_TO_TIMM.get(name, name)
        if module == "classifier":
            module = "fc"
        if v1b and module.startswith("layer1.0.down_sample."):
            head, _, index = module.rpartition(".")
            module = f"{head}.{int(index) + 1}"
        renamed[f"{module.replace('down_sample', 'downsample')}.{name}"] = value
    return renamed


def looks_mindcv(state_dict: Mapping[str, Any]) -> bool:
    return any(key.endswith((".moving_mean", ".gamma")) or key.startswith("classifier.") for key in state_dict)


def check_mindcv_can_build(model: nn.Module) -> None:
    """MindCV's Res2Net class has no DLA and no grouped 3x3 convs (Res2NeXt): refused before any writing."""
    if not isinstance(model, Res2Net) or model.cardinality != 1:
        raise InvalidInputError(
            f"MindCV has no network like {describe(model)} (its Res2Net has no DLA and no grouped convs): "
            "MindSpore export takes the Res2Net family with cardinality 1, e.g. res2net50, res2net101, "
            "res2net152, res2net50_v1b, res2net101_v1b, res2net152_v1b"
        )
