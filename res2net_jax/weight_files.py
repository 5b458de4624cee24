"""Weight files: every format a model's weights are read from or written to.

PyTorch pickles (.pth/.pt/.bin, read with `weights_only=True`), safetensors, MindSpore .ckpt
(`res2net_jax.ms_checkpoint`), Orbax directories of Flax variables, and training runs
(`res2net_jax.workdir`). Formats are told apart by content, not by name. Writers never overwrite and
never leave a partial file under the final name (`res2net_jax.outputs`). The name mapping itself is
`res2net_jax.convert`.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from res2net_jax import ms_checkpoint
from res2net_jax.convert import (
    Overrides,
    Variables,
    check_mindcv_can_build,
    flax_to_torch,
    from_torch,
    looks_mindcv,
    mindcv_to_timm,
    num_classes_of,
    timm_to_mindcv,
    to_numpy,
    torch_names,
    torch_to_flax,
)
from res2net_jax.errors import InvalidInputError, MissingDependencyError, MissingFileError, UserError
from res2net_jax.outputs import atomic_output
from res2net_jax.registry import create_model


def to_mindspore(variables: Variables, model_name: str, path: str | os.PathLike, overrides: Overrides = None) -> None:
    """Writes Flax variables as a MindSpore `.ckpt` that MindCV's network of the same name loads.

    An existing `path` is never overwritten.
    """
    model = create_model(model_name, num_classes=num_classes_of(variables), **dict(overrides or {}))
    check_mindcv_can_build(model)
    state_dict = timm_to_mindcv(flax_to_torch(model, variables))
    with atomic_output(path) as staged:
        ms_checkpoint.write(state_dict, staged)


def from_mindspore(
    path: str | os.PathLike,
    model_name: str,
    num_classes: int | None = None,
    reset_head: bool = False,
    rng: jax.Array | None = None,
    overrides: Overrides = None,
) -> Variables:
    """Flax variables from a MindSpore `.ckpt` of a MindCV Res2Net; arguments as in `from_torch`."""
    if not os.path.isfile(path):
        raise MissingFileError(f"MindSpore checkpoint not found: {path}")
    state_dict = mindcv_to_timm(ms_checkpoint.read(path))
    return from_torch(state_dict, model_name, num_classes, reset_head, rng, overrides)


# --- Files -------------------------------------------------------------------------------------

_TORCH_SUFFIXES = (".pth", ".pt", ".bin")


def _is_safetensors(head: bytes) -> bool:
    return len(head) >= 9 and struct.unpack("<Q", head[:8])[0] > 0 and head[8:9] == b"{"


def _unwrap(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The state dict inside a training checkpoint, without DataParallel's 'module.' prefix."""
    for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    if checkpoint and all(k.startswith("module.") for k in checkpoint):
        checkpoint = {k.removeprefix("module."): v for k, v in checkpoint.items()}
    return dict(checkpoint)


def _import_torch(path: str) -> Any:
    try:
        import torch
    except ImportError as err:
        raise MissingDependencyError(
            f"reading or writing the PyTorch pickle {path} needs torch (pip install torch); "
            "safetensors files need only the safetensors package"
        ) from err
    return torch


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A timm-named state dict from a .pth/.bin torch pickle, a .safetensors file or a MindSpore .ckpt,
    told apart by content; MindCV names (from a .ckpt or a MindSpore safetensors file) are renamed."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingFileError(f"weights file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(16)
    try:
        if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
            torch = _import_torch(path)
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        elif _is_safetensors(head):
            from safetensors.numpy import load_file

            checkpoint = load_file(path)
        elif head[:1] == b"\x0a":  # protobuf field 1, length-delimited: a MindSpore checkpoint
            checkpoint = ms_checkpoint.read(path)
        else:
            raise InvalidInputError(
                f"cannot read weights file {path}: it is neither a PyTorch checkpoint (.pth/.bin), a safetensors "
                "file nor a MindSpore .ckpt"
            )
    except (ImportError, UserError):
        raise
    except Exception as err:  # torch, zipfile and safetensors each raise their own types
        raise InvalidInputError(f"cannot read weights file {path}: {err} (a torn download or copy? delete it, and "
                                "download or copy it again)") from err  # fmt: skip
    if not isinstance(checkpoint, Mapping):
        raise InvalidInputError(f"weights file {path} holds a {type(checkpoint).__name__}, not a state dict")
    state_dict = {k: to_numpy(v) for k, v in _unwrap(checkpoint).items()}
    return mindcv_to_timm(state_dict) if looks_mindcv(state_dict) else state_dict


def save_state_dict(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Writes a state dict as .safetensors, or as a torch pickle for .pth/.pt/.bin.

    An existing `path` is never overwritten, and a failed write leaves nothing under its name.
    """
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.numpy import save_file

        with atomic_output(path) as staged:
            save_file(dict(state_dict), staged)
    elif path.endswith(_TORCH_SUFFIXES):
        torch = _import_torch(path)
        with atomic_output(path) as staged:
            torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}, staged)
    else:
        raise InvalidInputError(f"cannot tell the format of {path}: name it .safetensors, .pth, .pt or .bin")


def save_variables(variables: Variables, directory: str | os.PathLike) -> None:
    """Writes Flax variables as an Orbax checkpoint directory (which must not exist yet)."""
    import orbax.checkpoint as ocp

    with atomic_output(directory) as staged:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(staged, variables)
        checkpointer.wait_until_finished()


def _restore_orbax(directory: str) -> Variables:
    """Variables from an Orbax directory written by `save_variables`."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    on_host = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    try:
        checkpointer = ocp.StandardCheckpointer()
        shapes = checkpointer.metadata(directory).item_metadata
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_host), shapes)
        restored = checkpointer.restore(directory, target)
    except Exception as err:  # orbax raises several types for a directory it cannot read
        raise InvalidInputError(f"cannot read {directory} as Flax variables or a training workdir: {err}") from err
    return {k: dict(v) for k, v in restored.items()}


def _read(path: str | os.PathLike, ema: bool) -> dict[str, np.ndarray]:
    """The timm-named state dict of a training run, an Orbax directory or a weights file (see `load_checkpoint`)."""
    from res2net_jax import workdir

    path = os.fspath(path)
    if workdir.locate(path) is not None:
        return torch_names(workdir.read_variables(path, ema))
    if ema:
        raise InvalidInputError(f"{path} is not a training workdir: only a run's checkpoints hold EMA weights")
    if os.path.isdir(path):
        return torch_names(_restore_orbax(path))
    return load_state_dict(path)


def load_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    reset_head: bool = False,
    rng: jax.Array | None = None,
    ema: bool = False,
) -> Variables:
    """Flax variables for `model` from a training run (WORKDIR, WORKDIR/best or one of their steps:
    `res2net_jax.workdir.locate`; its EMA weights with `ema`), an Orbax directory of variables, or any
    file `load_state_dict` reads. Checked strictly; `reset_head` behaves as in `convert.torch_to_flax`."""
    return torch_to_flax(model, _read(path, ema), reset_head=reset_head, rng=rng)


def load_variables(
    path: str | os.PathLike,
    model_name: str,
    num_classes: int | None = None,
    reset_head: bool = False,
    rng: jax.Array | None = None,
    overrides: Overrides = None,
    ema: bool = False,
) -> Variables:
    """`load_checkpoint` for the registered `model_name` built with `overrides`; `num_classes` defaults
    to the checkpoint's head, as in `convert.from_torch`."""
    return from_torch(_read(path, ema), model_name, num_classes, reset_head, rng, overrides)
