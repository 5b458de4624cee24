"""Pretrained weights in one line: timm's from the Hugging Face hub, MindCV's, or a directory in timm's format.

`from_pretrained("res2net50d")` reads timm's published weights (hub id `timm/res2net50d.in1k`) through
`huggingface_hub`, which keeps them in its standard cache (HF_HOME, HF_HUB_CACHE) and reads that
cache alone under HF_HUB_OFFLINE=1. MindCV's four names with weights (`from_pretrained("res2net50")`,
the seed's `--pretrained`) read MindCV's own MindSpore checkpoints (`res2net_jax.mindcv_weights`).
`save_pretrained` writes what timm's `save_for_hf` writes (`config.json`, `model.safetensors` in timm's
key names), so `timm.create_model("local-dir:DIR")` and `from_pretrained(DIR)` read each other's
directories.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import huggingface_hub.constants
import jax
import jax.numpy as jnp
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.utils import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError, validate_repo_id

from res2net_jax import convert, mindcv_weights, weight_files
from res2net_jax.cli import one_line
from res2net_jax.errors import InvalidInputError, MissingFileError
from res2net_jax.inference import INTERPOLATIONS, DataConfig
from res2net_jax.models import DLA
from res2net_jax.network import reachable
from res2net_jax.outputs import atomic_output
from res2net_jax.registry import MINDCV_WEIGHTS, create_model, get_spec, list_models

HUB_PREFIX = "hf-hub:"
CONFIG_FILE = "config.json"
WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm reads, in its order


def _from_hub(repo_id: str, filename: str) -> str | None:
    """The local path of `filename` in hub repo `repo_id`, downloaded into the cache if need be; None if
    the repo has no such file. Unreachable hub and file not cached: one line saying how to get it.

    An unreachable hub is found by one connection attempt, and then only the cache is read: asked to
    download, huggingface_hub retries for about 25 s, printing a warning for each try."""
    try:
        return hf_hub_download(repo_id, filename, local_files_only=not reachable(huggingface_hub.constants.ENDPOINT))
    except LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: first
        raise MissingFileError(
            f"{repo_id}/{filename} is not in the Hugging Face cache and the hub cannot be reached (offline?): "
            f"run `hf download {repo_id} {filename}` (huggingface_hub's CLI) where there is network and copy the cache "
            "(HF_HOME), or pass a local directory"
        ) from None
    except EntryNotFoundError:
        return None


def check_published(name: str) -> None:
    """Refuses, in one line, a registered name whose network has no published weights."""
    if name not in MINDCV_WEIGHTS and get_spec(name).hf_hub_id is None:
        raise MissingFileError(
            f"{name} has no published weights (neither timm nor MindCV publishes any for it): train it, or pass a "
            "weights file; res2net_jax.list_pretrained() lists the names that have them"
        )
    if name in MINDCV_WEIGHTS:
        mindcv_weights.url(name)  # a malformed RES2NET_MINDCV_ENDPOINT is refused before any work


def _files(name_or_path: str) -> tuple[str, str | None, str | None]:
    """(weights path, config.json path or None, registry name or None) for a registered name (MindCV's
    checkpoint for MindCV's four names with weights, timm's on the hub for the others), an `hf-hub:` id or
    a directory, downloading into huggingface_hub's or `mindcv_weights`' cache if need be."""
    if os.path.isdir(name_or_path):
        config = os.path.join(name_or_path, CONFIG_FILE)
        for filename in WEIGHTS_FILES:
            if os.path.isfile(os.path.join(name_or_path, filename)):
                return os.path.join(name_or_path, filename), config if os.path.isfile(config) else None, None
        raise MissingFileError(f"{name_or_path} holds no {' or '.join(WEIGHTS_FILES)}")
    if name_or_path.startswith(HUB_PREFIX):
        repo_id, name = name_or_path.removeprefix(HUB_PREFIX), None
        try:
            validate_repo_id(repo_id)
        except HFValidationError:
            raise InvalidInputError(f"{name_or_path!r} does not name a hub repo: write hf-hub:ORG/NAME (letters, "
                                    "digits, '-', '_' and '.')") from None  # fmt: skip
    else:
        check_published(name_or_path)
        name = get_spec(name_or_path).name
        if name_or_path in MINDCV_WEIGHTS:
            return mindcv_weights.fetch(name_or_path), None, name
        repo_id = get_spec(name_or_path).hf_hub_id
    for filename in WEIGHTS_FILES:
        weights = _from_hub(repo_id, filename)
        if weights is not None:
            return weights, _from_hub(repo_id, CONFIG_FILE), name
    raise MissingFileError(f"hub repo {repo_id} has no {' or '.join(WEIGHTS_FILES)}")


class Pretrained(NamedTuple):
    """What a name, hub id or directory resolves to."""

    weights: str  # the local weights file
    model: str | None  # the registered model name, None if the config does not say
    overrides: dict[str, Any]  # architecture fields beyond the registered model's (config.json's model_args)
    class_names: list[str] | None
    data_config: DataConfig | None  # config.json's preprocessing (pretrained_cfg), None if it has none


def resolve(name_or_path: str) -> Pretrained:
    """The weights, model, architecture overrides and class names of a registered name, an `hf-hub:` id
    or a directory in timm's format, as its config.json gives them (a registered name's own model).
    Downloads into huggingface_hub's cache if need be."""
    weights, config_path, name = _files(name_or_path)
    config = _read_config(config_path) if config_path is not None else {}
    where = config_path or name_or_path
    model = name or config.get("architecture")
    if model is not None and not isinstance(model, str):
        raise InvalidInputError(f"{where}: architecture={model!r} is not a model name")
    if not isinstance(config.get("model_args", {}), dict):
        raise InvalidInputError(f"{where}: model_args must be an object of timm's create_model arguments")
    overrides = from_model_args(config.get("model_args", {}))
    data_config = _data_config(config["pretrained_cfg"], where) if config.get("pretrained_cfg") else None
    return Pretrained(weights, model, overrides, _label_names(config, where), data_config)


def _read_config(path: str) -> dict[str, Any]:
    """A config.json as a JSON object; anything else is one line naming the file and the fix."""
    fix = "fix it, or delete it (a hub download is then fetched again)"
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise InvalidInputError(f"{path} is not readable JSON ({one_line(err)}): {fix}") from None
    if not isinstance(config, dict):
        raise InvalidInputError(f"{path} holds a JSON {type(config).__name__}, not an object: {fix}")
    return config


MAX_INPUT_SIZE = 2048  # the largest evaluation size a config.json may ask for (ImageNet models: 224-600)


def _label_names(config: Mapping[str, Any], where: str) -> list[str] | None:
    """config.json's label_names: strings, one per class of its num_classes."""
    names = config.get("label_names")
    if names is None:
        return None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise InvalidInputError(f"{where}: label_names must be a list of strings")
    count = config.get("num_classes", len(names))
    if len(names) != count:
        raise InvalidInputError(f"{where}: {len(names)} label_names for num_classes={count}: give one name per class")
    return names


def _numbers(value: Any, count: int) -> bool:
    """Whether `value` is a list of `count` finite numbers."""
    if not isinstance(value, list | tuple) or len(value) != count:
        return False
    return all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value)


def _data_config(cfg: Any, where: str) -> DataConfig:
    """The evaluation transform a timm `pretrained_cfg` asks for, as timm's resolve_data_config reads it;
    a value that cannot work (wrong length, out of range, not a number) is one line naming it."""
    if not isinstance(cfg, dict):
        raise InvalidInputError(f"{where}: pretrained_cfg must be an object")
    default = DataConfig()
    size = cfg.get("input_size", [3, default.input_size, default.input_size])
    if not (_numbers(size, 3) and all(isinstance(v, int) for v in size)):
        raise InvalidInputError(f"{where}: pretrained_cfg.input_size={size!r} is not [channels, height, width]")
    channels, height, width = size
    if height != width:
        raise InvalidInputError(f"{where}: input_size {height}x{width} is not square, as this package's "
                                "evaluation transform needs")  # fmt: skip
    if not 32 <= height <= MAX_INPUT_SIZE:
        raise InvalidInputError(f"{where}: pretrained_cfg.input_size {height} px is outside 32-{MAX_INPUT_SIZE}")
    crop_pct = cfg.get("crop_pct", default.crop_pct)
    if not (_numbers([crop_pct], 1) and 0 < crop_pct <= 1):
        raise InvalidInputError(f"{where}: pretrained_cfg.crop_pct={crop_pct!r} is not a number in (0, 1]")
    mean, std = cfg.get("mean", list(default.mean)), cfg.get("std", list(default.std))
    for field, value in (("mean", mean), ("std", std)):
        if not _numbers(value, channels):
            raise InvalidInputError(f"{where}: pretrained_cfg.{field}={value!r} is not {channels} numbers, "
                                    "one per input channel")  # fmt: skip
    if min(std) <= 0:
        raise InvalidInputError(f"{where}: pretrained_cfg.std={std!r} must be positive (it divides the pixels)")
    interpolation = cfg.get("interpolation", default.interpolation)
    if interpolation not in INTERPOLATIONS:
        raise InvalidInputError(f"{where}: interpolation {interpolation!r} is not supported "
                                f"(use {' or '.join(INTERPOLATIONS)})")  # fmt: skip
    return DataConfig(height, float(crop_pct), tuple(mean), tuple(std), interpolation)


def model_data_config(model_name: str) -> DataConfig:
    """A registered model's own evaluation transform: its input size, crop, mean and std."""
    spec = get_spec(model_name)
    return DataConfig(spec.input_size, spec.crop_pct, spec.mean, spec.std)


# Model fields that timm's Res2Net (ResNet) and DLA constructors take under the same name: architecture,
# and the fine-tuning rates (dropout before the classifier, stochastic depth), which timm's config.json
# records in model_args when a model was built with them.
_SAME_NAME = ("layers", "base_width", "cardinality", "in_chans", "output_stride", "levels", "channels", "drop_rate",
              "drop_path_rate")  # fmt: skip


def to_model_args(model_name: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """timm's `create_model` arguments (config.json's `model_args`) for model field `overrides`."""
    args: dict[str, Any] = {}
    dla = get_spec(model_name).family is DLA
    for key, value in overrides.items():
        value = list(value) if isinstance(value, (tuple, list)) else value
        if key in _SAME_NAME:
            args[key] = value
        elif key == "scale" and not dla:  # timm's Res2Net takes it through its blocks' arguments
            args["block_args"] = {"scale": value}
        else:
            raise InvalidInputError(
                f"timm's {get_spec(model_name).name} has no argument for the override {key}={value!r}"
            )
    return args


def from_model_args(model_args: Mapping[str, Any]) -> dict[str, Any]:
    """Model fields for timm's `create_model` arguments (the inverse of `to_model_args`); the class count
    is read from the weights."""
    args = {key: value for key, value in model_args.items() if key != "num_classes"}
    if args.pop("global_pool", "avg") != "avg":
        raise InvalidInputError(f"config.json's model_args asks for global_pool={model_args['global_pool']!r}; "
                                "res2net_jax's models average-pool")  # fmt: skip
    block_args = dict(args.pop("block_args", {}))
    overrides = {key: tuple(v) if isinstance(v, list) else v for key, v in args.items()}
    if "scale" in block_args:
        overrides["scale"] = block_args.pop("scale")
    unknown = sorted(set(args) - set(_SAME_NAME)) + sorted(f"block_args.{key}" for key in block_args)
    if unknown:
        raise InvalidInputError(f"config.json's model_args has {unknown[0]}, which res2net_jax's models do not take")
    return overrides


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

    `name_or_path`: a registered name (timm's published weights for it; for res2net50, res2net101,
    res2net50_v1b and res2net101_v1b, MindCV's), `hf-hub:ORG/REPO`, or
    a directory holding `config.json` and `model.safetensors` (what `save_pretrained` and timm's
    `save_for_hf` write). `num_classes`: None keeps the checkpoint's head, another count gets a new
    head (fine-tuning), 0 none (pooled features). `model_kwargs` go to `create_model` (e.g.
    `features_only=True, out_indices=(2, 3, 4)`, `in_chans=1`).
    """
    found = resolve(name_or_path)
    if found.model is None:
        raise InvalidInputError(f"{name_or_path} does not say which model it holds: its {CONFIG_FILE} has no "
                                "'architecture'")  # fmt: skip
    overrides = {**found.overrides, **model_kwargs}
    state_dict = weight_files.load_state_dict(found.weights)
    model = create_model(
        found.model, num_classes=convert.num_classes_for(state_dict, num_classes), dtype=dtype, **overrides
    )
    return model, convert.torch_to_flax(model, state_dict, reset_head=num_classes is not None)


def save_pretrained(
    directory: str | os.PathLike,
    model_name: str,
    variables: dict,
    class_names: Sequence[str] | None = None,
    overrides: dict[str, Any] | None = None,
    data_config: DataConfig | None = None,
) -> None:
    """Writes `variables` of `model_name` as timm's `save_for_hf` does: `model.safetensors` in timm's key
    names and `config.json` (architecture, num_classes, label names, pretrained_cfg with the
    preprocessing: `data_config`, by default the model's; `model_args` with architecture `overrides`,
    in timm's names). An existing `directory` is never overwritten; nothing is left under its name if
    writing fails."""
    spec = get_spec(model_name)
    data = data_config or model_data_config(model_name)
    model_args = to_model_args(spec.name, overrides or {})
    num_classes = convert.num_classes_of(variables)
    if class_names is not None and len(class_names) != num_classes:
        raise InvalidInputError(f"{len(class_names)} class names for a {num_classes}-class head")
    model = create_model(spec.name, num_classes=num_classes, **(overrides or {}))
    state_dict = convert.flax_to_torch(model, jax.device_get(variables))
    config = {
        "architecture": spec.name,
        "num_classes": num_classes,
        "num_features": model.feature_info[-1]["num_chs"],
        "global_pool": "avg",
        **({"model_args": model_args} if model_args else {}),
        **({"label_names": list(class_names)} if class_names is not None else {}),
        "pretrained_cfg": {
            "input_size": [model.in_chans, data.input_size, data.input_size],
            "interpolation": data.interpolation,
            "crop_pct": data.crop_pct,
            "crop_mode": "center",
            "mean": list(data.mean),
            "std": list(data.std),
            "num_classes": num_classes,
            "first_conv": convert.first_conv_key(model).removesuffix(".weight"),
            "classifier": "fc",
        },
    }
    with atomic_output(directory) as staged:
        os.makedirs(staged)
        weight_files.save_state_dict(state_dict, os.path.join(staged, WEIGHTS_FILES[0]))
        with open(os.path.join(staged, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=2)


def push_to_hub(
    repo_id: str,
    model_name: str,
    variables: dict,
    class_names: Sequence[str] | None = None,
    overrides: dict[str, Any] | None = None,
    data_config: DataConfig | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload res2net_jax weights",
) -> str:
    """Uploads what `save_pretrained` writes to hub repo `repo_id` (created if it does not exist, private if
    asked), where `timm.create_model("hf-hub:ORG/REPO", pretrained=True)` and `from_pretrained` read it.
    `token`: None uses huggingface_hub's login (`hf auth login`, HF_TOKEN). Returns the commit's URL."""
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as scratch:
        directory = os.path.join(scratch, "model")
        save_pretrained(directory, model_name, variables, class_names, overrides, data_config)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            return api.upload_folder(repo_id=repo_id, folder_path=directory, commit_message=commit_message).commit_url
        except HFValidationError:
            raise InvalidInputError(f"{repo_id!r} is not a hub repo id: write ORG/NAME") from None
        except Exception as err:  # huggingface_hub's HTTP errors and its HTTP client's network errors
            raise MissingFileError(
                f"the upload to hub repo {repo_id} failed ({type(err).__name__}: {one_line(err)}): check the network "
                "(offline?) and that `hf auth login` (or the token) may write there; save_pretrained(DIR, ...) "
                "then `hf upload` uploads the same files"
            ) from None
