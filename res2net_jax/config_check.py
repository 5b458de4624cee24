"""Checks every field of a training config before anything compiles or is written.

Each bad value is refused in one line naming the field, the value and what is allowed, so that a
typo costs a second, not an epoch, and never leaves a workdir or checkpoint behind.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax

from res2net_jax import pretrained, steps
from res2net_jax.errors import InvalidInputError, MissingFileError, UserError
from res2net_jax.models import Res2Net
from res2net_jax.registry import create_model, get_spec

if TYPE_CHECKING:
    import ml_collections

BACKENDS = ("auto", "cpu", "gpu", "tpu")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _integer(low: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low), f"a whole number >= {low}"


def _at_least(low: float, strict: bool = False) -> tuple[Callable[[Any], bool], str]:
    if strict:
        return (lambda v: _number(v) and v > low), f"a number > {low:g}"
    return (lambda v: _number(v) and v >= low), f"a number >= {low:g}"


def _fraction(upper_open: bool = False) -> tuple[Callable[[Any], bool], str]:
    if upper_open:
        return (lambda v: _number(v) and 0 <= v < 1), "a number in [0, 1)"
    return (lambda v: _number(v) and 0 <= v <= 1), "a number in [0, 1]"


def _one_of(choices: tuple[str, ...]) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in choices), f"one of {', '.join(choices)}"


def _range_pair(low: float, high: float) -> tuple[Callable[[Any], bool], str]:
    def ok(v: Any) -> bool:
        return len(v) == 2 and all(_number(x) for x in v) and low < v[0] <= v[1] <= high

    return ok, f"a pair (lo, hi) with {low:g} < lo <= hi <= {high:g}"


_BOOL = ((lambda v: isinstance(v, bool)), "True or False")


def _is_regex(value: Any) -> bool:
    try:
        re.compile(value)
    except (re.error, TypeError):
        return False
    return True


_REGEX = (_is_regex, "a regular expression ('' for none)")
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "dtype": _one_of(tuple(steps.DTYPES)),
    "backend": _one_of(BACKENDS),
    "dataset": ((lambda v: isinstance(v, str) and bool(v.strip())), "a TFDS name or folder:/path"),
    "image_size": ((lambda v: isinstance(v, int) and not isinstance(v, bool) and (v == 0 or v >= 32)),
                   "0 (the dataset's own size) or a whole number >= 32"),
    "crop_pct": ((lambda v: _number(v) and 0 < v <= 1), "a number in (0, 1]"),
    "crop_scale": _range_pair(0, 1),
    "crop_ratio": _range_pair(0, math.inf),
    "hflip": _BOOL,
    "color_jitter": _fraction(),
    "random_erasing": _fraction(),
    "mixup_alpha": _at_least(0),
    "cutmix_alpha": _at_least(0),
    "mix_switch_prob": _fraction(),
    "label_smoothing": _fraction(upper_open=True),
    "drop_rate": _fraction(upper_open=True),
    "drop_path_rate": _fraction(upper_open=True),
    "remat": _BOOL,
    "batch_size": _integer(1),
    "eval_batch_size": _integer(1),
    "num_epochs": _integer(1),
    "num_train_steps": ((lambda v: isinstance(v, int) and (v == -1 or v >= 1)), "-1 (use num_epochs) or >= 1"),
    "optimizer": _one_of(tuple(steps.OPTIMIZERS)),
    "momentum": _fraction(upper_open=True),
    "learning_rate": _at_least(0),
    "lr_schedule": _one_of(tuple(steps.LR_SCHEDULES)),
    "warmup_epochs": _at_least(0),
    "min_lr": _at_least(0),
    "lr_decay_epochs": _at_least(0, strict=True),
    "lr_decay_rate": _at_least(0, strict=True),
    "weight_decay": _at_least(0),
    "decay_bn_and_bias": _BOOL,
    "freeze": _REGEX,
    "freeze_bn": _BOOL,
    "grad_clip_norm": _at_least(0),
    "grad_accum_steps": _integer(1),
    "ema_decay": _fraction(upper_open=True),
    "reset_head": _BOOL,
    "seed": _integer(0),
    "log_every_steps": _integer(1),
    "eval_every_epochs": _at_least(0, strict=True),
    "checkpoint_every_steps": _integer(1),
    "keep_checkpoints": _integer(1),
}  # fmt: skip


def check(config: ml_collections.ConfigDict, mode: str = "train") -> None:
    """Raises InvalidInputError (or MissingFileError) naming the first field that cannot work."""
    model = create_model(config.model, num_classes=2, **dict(config.model_overrides))  # first: unknown name
    backbone = sorted(set(config.model_overrides) & {"features_only", "out_indices", "output_stride", "in_chans"})
    if backbone:  # main.py trains classifiers on RGB images
        raise InvalidInputError(f"config.model_overrides.{backbone[0]} is not allowed in main.py: it trains "
                                "classifiers on RGB images; use those fields through create_model")  # fmt: skip
    training = sorted(set(config.model_overrides) & {"drop_rate", "drop_path_rate", "remat"})
    if training:  # training settings, not architecture: a run's recorded overrides rebuild it for inference
        raise InvalidInputError(f"config.model_overrides.{training[0]} is a training setting: set "
                                f"--config.{training[0]} instead")  # fmt: skip
    for field, (ok, allowed) in RULES.items():
        value = config[field]
        if not ok(tuple(value) if isinstance(value, list) else value):
            raise InvalidInputError(f"config.{field}={value!r} is not allowed: use {allowed}")
    if config.drop_path_rate and get_spec(config.model).family is not Res2Net:
        raise InvalidInputError(f"config.drop_path_rate={config.drop_path_rate!r}: {config.model} has no stochastic "
                                "depth (timm's DLA has none either); use config.drop_rate")  # fmt: skip
    if config.num_train_steps == -1 and config.num_epochs < 1:
        raise InvalidInputError(f"config.num_epochs={config.num_epochs!r} is not allowed: use a whole number >= 1")
    if config.freeze_bn and not config.freeze:
        raise InvalidInputError("config.freeze_bn is set but nothing is frozen: name the parameters in config.freeze")
    if config.freeze:  # freezes some but not all of this model's parameters
        shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 64, 64, 3), "float32"))
        steps.frozen_labels(shapes["params"], config.freeze)
    if config.reset_head and not config.init_weights:
        raise InvalidInputError("config.reset_head is set but no weights to fine-tune: pass --config.init_weights=PATH")
    fields = ("init_weights", "eval_weights") if mode == "eval" else ("init_weights",)
    for field in fields:
        _check_weights(field, config[field], config.model)


def _check_weights(field: str, value: str, model: str) -> None:
    """config.init_weights / eval_weights: '' (none), published weights of config.model's network by name
    or hf-hub id, or an existing path."""
    if not value:
        return
    if pretrained.is_pretrained_id(value):
        if value.startswith(pretrained.HUB_PREFIX):
            return
        named = get_spec(value)
        if named.name != get_spec(model).name:
            raise InvalidInputError(f"config.{field}={value!r} are {named.name}'s weights but config.model={model!r}: "
                                    f"set --config.model={named.name}")  # fmt: skip
        try:
            pretrained.check_published(value)
        except UserError as err:
            raise type(err)(f"config.{field}={value!r}: {err}") from None
    elif not os.path.exists(os.path.expanduser(value)):
        raise MissingFileError(f"config.{field}={value!r} does not exist (nor a model name with published weights, "
                               "or hf-hub:ORG/REPO)")  # fmt: skip
