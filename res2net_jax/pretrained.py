"""Pretrained weights in one line, in timm's format: from the Hugging Face hub, its cache or a directory.

`from_pretrained("res2net50d")` reads timm's published weights (hub id `timm/res2net50d.in1k`) through
`huggingface_hub`, which keeps them in its standard cache (HF_HOME, HF_HUB_CACHE) and reads that
cache alone under HF_HUB_OFFLINE=1. `save_pretrained` writes what timm's `save_for_hf` writes
(`config.json`, `model.safetensors` in timm's key names), so `timm.create_model("local-dir:DIR")`
and `from_pretrained(DIR)` read each other's directories.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

from res2net_jax import convert, weight_files
from res2net_jax.errors import InvalidInputError, MissingFileError
from res2net_jax.outputs import atomic_output
from res2net_jax.registry import create_model, get_spec, list_models

HUB_PREFIX = "hf-hub:"
CONFIG_FILE = "config.json"
WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm reads, in its order


def _from_hub(repo_id: str, filename: str) -> str | None:
    """The local path of `filename` in hub repo `repo_id`, downloaded into the cache if need be; None if
    the repo has no such file. Unreachable hub and file not cached: one line saying how to get it."""
    try:
        return hf_hub_download(repo_id, filename)
    except LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: first
        raise MissingFileError(
            f"{repo_id}/{filename} is not in the Hugging Face cache and the hub cannot be reached (offline?): "
            f"run `hf download {repo_id} {filename}` (huggingface_hub's CLI) where there is network and copy the cache "
            "(HF_HOME), or pass a local directory"
        ) from None
    except EntryNotFoundError:
        return None


def _files(name_or_path: str) -> tuple[str, str | None, str | None]:
    """(weights path, config.json path or None, registry name or None) for a registered name, an
    `hf-hub:` id or a directory, downloading into huggingface_hub's cache if need be."""
    if os.path.isdir(name_or_path):
        config = os.path.join(name_or_path, CONFIG_FILE)
        for filename in WEIGHTS_FILES:
            if os.path.isfile(os.path.join(name_or_path, filename)):
                return os.path.join(name_or_path, filename), config if os.path.isfile(config) else None, None
        raise MissingFileError(f"{name_or_path} holds no {' or '.join(WEIGHTS_FILES)}")
    if name_or_path.startswith(HUB_PREFIX):
        repo_id, name = name_or_path.removeprefix(HUB_PREFIX), None
    else:
        spec = get_spec(name_or_path)
        if spec.hf_hub_id is None:
            raise MissingFileError(
                f"{name_or_path} has no published weights on the Hugging Face hub (MindCV publishes none for it "
                "either): train it, or convert a MindCV .ckpt with weight_files.load_variables"
            )
        repo_id, name = spec.hf_hub_id, spec.name
    for filename in WEIGHTS_FILES:
        weights = _from_hub(repo_id, filename)
        if weights is not None:
            return weights, _from_hub(repo_id, CONFIG_FILE), name
    raise MissingFileError(f"hub repo {repo_id} has no {' or '.join(WEIGHTS_FILES)}")


def resolve(name_or_path: str) -> tuple[str, str | None, list[str] | None]:
    """(weights file, model name or None, class names or None) of a registered name, an `hf-hub:` id or
    a directory in timm's format: the model and classes its config.json names (a registered name's
    own). Downloads into huggingface_hub's cache if need be."""
    weights, config_path, name = _files(name_or_path)
    config = {}
    if config_path is not None:
        with open(config_path) as f:
            config = json.load(f)
    return weights, name or config.get("architecture"), config.get("label_names")


def is_pretrained_id(value: str) -> bool:
    """Whether `value` names published weights (a registered name or alias, or `hf-hub:ORG/REPO`) and is
    not an existing path."""
    published = value.startswith(HUB_PREFIX) or value in list_models()
    return published and not os.path.exists(os.path.expanduser(value))


def is_pretrained_dir(path: str) -> bool:
    """Whether `path` is a directory of weights in timm's format (what `save_pretrained` writes)."""
    return any(os.path.isfile(os.path.join(path, name)) for name in WEIGHTS_FILES)


def from_pretrained(
    name_or_path: str, num_classes: int | None = None, dtype: Any = jnp.float32, **model_kwargs: Any
) -> tuple[nn.Module, dict]:
    """The model and its variables from pretrained weights in timm's format.

    `name_or_path`: a registered name or alias (timm's published weights for it), `hf-hub:ORG/REPO`, or
    a directory holding `config.json` and `model.safetensors` (what `save_pretrained` and timm's
    `save_for_hf` write). `num_classes`: None keeps the checkpoint's head, another count gets a new
    head (fine-tuning), 0 none (pooled features). `model_kwargs` go to `create_model` (e.g.
    `features_only=True, out_indices=(2, 3, 4)`, `in_chans=1`).
    """
    weights, name, _ = resolve(name_or_path)
    if name is None:
        raise InvalidInputError(f"{name_or_path} does not say which model it holds: its {CONFIG_FILE} has no "
                                "'architecture'")  # fmt: skip
    state_dict = weight_files.load_state_dict(weights)
    reset = num_classes is not None and num_classes != 0
    variables = convert.from_torch(state_dict, name, num_classes, reset_head=reset, overrides=model_kwargs)
    model = create_model(name, num_classes=convert.num_classes_of(variables), dtype=dtype, **model_kwargs)
    return model, variables


def save_pretrained(
    directory: str | os.PathLike,
    model_name: str,
    variables: dict,
    class_names: Sequence[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> None:
    """Writes `variables` of `model_name` as timm's `save_for_hf` does: `model.safetensors` in timm's key
    names and `config.json` (architecture, num_classes, label names, pretrained_cfg with the
    preprocessing). An existing `directory` is never overwritten; nothing is left under its name if
    writing fails."""
    spec = get_spec(model_name)
    num_classes = convert.num_classes_of(variables)
    if class_names is not None and len(class_names) != num_classes:
        raise InvalidInputError(f"{len(class_names)} class names for a {num_classes}-class head")
    state_dict = convert.to_torch(jax.device_get(variables), spec.name, overrides=overrides)
    model = create_model(spec.name, num_classes=num_classes, **(overrides or {}))
    config = {
        "architecture": spec.name,
        "num_classes": num_classes,
        "num_features": create_model(spec.name).feature_info[-1]["num_chs"],
        "global_pool": "avg",
        **({"label_names": list(class_names)} if class_names is not None else {}),
        "pretrained_cfg": {
            "input_size": [model.in_chans, spec.input_size, spec.input_size],
            "interpolation": "bilinear",
            "crop_pct": spec.crop_pct,
            "crop_mode": "center",
            "mean": list(spec.mean),
            "std": list(spec.std),
            "num_classes": num_classes,
            "first_conv": convert.first_conv_key(spec.name).removesuffix(".weight"),
            "classifier": "fc",
        },
    }
    with atomic_output(directory) as staged:
        os.makedirs(staged)
        weight_files.save_state_dict(state_dict, os.path.join(staged, WEIGHTS_FILES[0]))
        with open(os.path.join(staged, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=2)
