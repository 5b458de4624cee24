"""Strict conversion errors, head replacement, and the file formats the loader reads and writes."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import images_nchw, nhwc, rel_error, state_dict_numpy, timm_model

from res2net_jax import convert, create_model, weight_files
from res2net_jax.convert import CheckpointMismatchError

NAME = "res2net50_26w_4s"


@pytest.fixture(scope="module")
def state_dict() -> dict[str, np.ndarray]:
    return state_dict_numpy(timm_model(NAME))


def test_missing_unexpected_and_misshaped_keys_are_listed(state_dict: dict) -> None:
    broken = dict(state_dict)
    for key in ["layer1.0.conv1.weight", "layer2.1.bns.0.running_var", "layer3.0.conv3.weight"]:
        del broken[key]
    broken["layer9.0.conv1.weight"] = np.zeros((3, 3, 1, 1), np.float32)
    broken["layer4.0.bn3.bias"] = np.zeros(5, np.float32)
    with pytest.raises(CheckpointMismatchError) as raised:
        convert.from_torch(broken, NAME)
    message = str(raised.value)
    assert "missing 3 (layer1.0.conv1.weight, layer2.1.bns.0.running_var, layer3.0.conv3.weight)" in message
    assert "unexpected 1 (layer9.0.conv1.weight)" in message
    assert "mis-shaped 1 (layer4.0.bn3.bias: file (5,) vs model (2048,))" in message


def test_error_says_which_variant_the_file_is(state_dict: dict) -> None:
    mismatch = r"does not fit res2net50d \(res2net50_v1b in MindCV\): .*looks like res2net50_26w_4s"
    with pytest.raises(CheckpointMismatchError, match=mismatch):
        convert.from_torch(state_dict, "res2net50d")
    # A model built by hand is named by the registered network it changes, and the fields it changes. The 12
    # blocks it leaves out hold 25 tensors each: conv1, convs.0-2 and conv3 weights, 4 BNs of 4 tensors.
    reduced = create_model("res2net50_26w_4s", layers=[1, 1, 1, 1])  # a list, as flags and JSON give it
    mismatch = r"does not fit res2net50_26w_4s \(res2net50 in MindCV, layers=\(1, 1, 1, 1\)\): unexpected 300 \("
    with pytest.raises(CheckpointMismatchError, match=mismatch):
        convert.torch_to_flax(reduced, state_dict)
    v1b = state_dict_numpy(timm_model("res2net50d"))
    with pytest.raises(CheckpointMismatchError, match=r"looks like res2net50d"):
        convert.from_torch(v1b, "res2net50")
    with pytest.raises(  # a file without a head reads as num_classes=0: the 425 body variables are missing
        CheckpointMismatchError,
        match=r"missing 425 \(bn1.bias, .*, \.\.\.\); unexpected 1 \(encoder.weight\)\. It does not look like any",
    ):
        convert.from_torch({"encoder.weight": np.zeros((4, 4), np.float32)}, NAME)


def test_other_class_count_needs_reset_head(state_dict: dict) -> None:
    with pytest.raises(CheckpointMismatchError, match="head has 1000 classes but 10.*reset_head=True"):
        convert.from_torch(state_dict, NAME, num_classes=10)
    variables = convert.from_torch(state_dict, NAME, num_classes=10, reset_head=True, rng=jax.random.key(1))
    assert variables["params"]["fc"]["kernel"].shape == (2048, 10)
    assert float(jnp.std(variables["params"]["fc"]["kernel"])) > 0
    # The body is the checkpoint's: stage features equal those of the unchanged 1000-class model.
    full = convert.from_torch(state_dict, NAME)
    x = jnp.asarray(nhwc(images_nchw(1, 64, 64)))
    ten, thousand = create_model(NAME, num_classes=10), create_model(NAME)
    ours = ten.apply(variables, x, method=ten.features)[-1]
    theirs = thousand.apply(full, x, method=thousand.features)[-1]
    np.testing.assert_array_equal(ours, theirs)
    # A 10-class checkpoint then loads as it is.
    reloaded = convert.from_torch(convert.to_torch(variables, NAME), NAME)
    np.testing.assert_array_equal(reloaded["params"]["fc"]["kernel"], variables["params"]["fc"]["kernel"])


def test_loader_reads_every_torch_format(tmp_path, state_dict: dict, tmp_weights: dict) -> None:
    tensors = {k: torch.from_numpy(v) for k, v in state_dict.items()}
    legacy = tmp_path / "legacy.pth"
    torch.save(tensors, legacy, _use_new_zipfile_serialization=False)
    wrapped = tmp_path / "trainer_checkpoint.bin"  # a training checkpoint saved from DataParallel
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in tensors.items()}}, wrapped)
    half = tmp_path / "half.pth"
    torch.save({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()}, half)
    for path in [tmp_weights["pth"], tmp_weights["safetensors"], legacy, wrapped]:
        loaded = weight_files.load_state_dict(path)
        assert set(loaded) == set(state_dict)
        for key, value in state_dict.items():
            np.testing.assert_array_equal(loaded[key], value, err_msg=f"{path}: {key}")
    loaded_half = weight_files.load_state_dict(half)
    assert rel_error(loaded_half["fc.weight"], state_dict["fc.weight"]) < 1e-2


def test_unreadable_files_name_the_file(tmp_path, tmp_weights: dict) -> None:
    with pytest.raises(FileNotFoundError, match="weights file not found: .*nowhere.pth"):
        weight_files.load_state_dict(tmp_path / "nowhere.pth")
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights")
    with pytest.raises(ValueError, match="notes.pth.*neither a PyTorch checkpoint"):
        weight_files.load_state_dict(text)
    for kind in ["pth", "safetensors"]:
        truncated = tmp_path / f"truncated.{kind}"
        truncated.write_bytes(open(tmp_weights[kind], "rb").read()[:100_000])
        with pytest.raises(ValueError, match=f"cannot read weights file .*truncated.{kind}"):
            weight_files.load_state_dict(truncated)
    not_a_dict = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), not_a_dict)
    with pytest.raises(ValueError, match="holds a Tensor, not a state dict"):
        weight_files.load_state_dict(not_a_dict)


def test_orbax_directory_round_trip(tmp_path, state_dict: dict) -> None:
    variables = convert.from_torch(state_dict, NAME)
    directory = tmp_path / "flax"
    weight_files.save_variables(variables, directory)
    with pytest.raises(FileExistsError, match="exists"):
        weight_files.save_variables(variables, directory)
    restored = weight_files.load_variables(directory, NAME)
    for ours, theirs in zip(jax.tree.leaves(restored), jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    with pytest.raises(CheckpointMismatchError, match="does not fit res2net101d"):
        weight_files.load_variables(directory, "res2net101d")
    # A backbone built by hand takes the classifier's directory as timm's do: no head, no stage it does not run.
    backbone = create_model(NAME, features_only=True, out_indices=(1, 2))
    body = weight_files.load_checkpoint(backbone, directory)
    assert sorted(body["params"]) == ["bn1", "conv1", *(f"layer{s}_{b}" for s, n in ((1, 3), (2, 4)) for b in range(n))]
    np.testing.assert_array_equal(body["batch_stats"]["layer2_3"]["bn3"]["var"], state_dict["layer2.3.bn3.running_var"])
    with pytest.raises(ValueError, match="only a run's checkpoints hold EMA weights"):
        weight_files.load_checkpoint(backbone, directory, ema=True)


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, timeout=300)


def test_export_cli_converts_both_ways_and_never_overwrites(tmp_path, state_dict: dict, tmp_weights: dict) -> None:
    flax_dir, back = tmp_path / "flax", tmp_path / "back.safetensors"
    done = _run("res2net_jax.export", "--format=orbax", "--model=res2net50", f"--weights={tmp_weights['pth']}",
                f"--out={flax_dir}")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "wrote res2net50 (1000 classes) as orbax" in done.stdout
    done = _run("res2net_jax.export", "--format=torch", "--model=res2net50", f"--weights={flax_dir}", f"--out={back}")
    assert done.returncode == 0, done.stderr
    reloaded = weight_files.load_state_dict(back)
    for key, value in state_dict.items():
        np.testing.assert_array_equal(reloaded[key], value, err_msg=key)
    before = back.read_bytes()
    done = _run("res2net_jax.export", "--format=torch", "--model=res2net50", f"--weights={flax_dir}", f"--out={back}")
    assert done.returncode != 0 and "exists" in done.stderr
    assert back.read_bytes() == before
