"""MindSpore export and import against MindCV itself, run in its own virtual environment.

MindCV's networks load our exported .ckpt files (nothing left unloaded on either side) and compute
the Flax logits; checkpoints MindSpore wrote itself import into Flax. The MindSpore side runs in the
environment tests/mindcv_env/make_venv.sh makes (MindSpore needs NumPy 1.x), through a subprocess.
"""

from __future__ import annotations

import binascii
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT, images_nchw, mindspore_python, nhwc, rel_error, timm_variables

from res2net_jax import convert, create_model, ms_checkpoint, weight_files
from res2net_jax.convert import CheckpointMismatchError
from res2net_jax.ms_checkpoint import CorruptCheckpointError

MINDCV_NAMES = ["res2net50", "res2net101", "res2net152", "res2net50_v1b", "res2net101_v1b", "res2net152_v1b"]
SAVED_BY_MINDSPORE = ["res2net50", "res2net50_v1b"]
TOLERANCE = 1e-5
CLASSES = 10
# Every stride-2 layer (stem, max pool, the first block of stages 2-4) sees an odd height and an even width,
# the two cases of each padding and pooling rule.
SIZE = (33, 64)


def _logits(name: str, variables: dict, x: np.ndarray) -> np.ndarray:
    with jax.default_matmul_precision("highest"):
        model = create_model(name, num_classes=convert.num_classes_of(variables))
        return np.asarray(model.apply(variables, nhwc(x)))


@pytest.fixture(scope="module")
def mindcv(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Runs every MindSpore job in one subprocess.

    Returns the input, our logits by model, and (job, outcome) by (model, saved by MindSpore).
    """
    python = mindspore_python()
    directory = tmp_path_factory.mktemp("mindcv")
    x = images_nchw(2, *SIZE)
    np.save(directory / "x.npy", x)
    jobs, flax_logits = [], {}
    for name in MINDCV_NAMES:
        variables = timm_variables(name, num_classes=CLASSES)
        weight_files.to_mindspore(variables, name, directory / f"{name}.ckpt")
        flax_logits[name] = _logits(name, variables, x)
        jobs.append({"model": name, "num_classes": CLASSES, "load": str(directory / f"{name}.ckpt")})
    for name in SAVED_BY_MINDSPORE:
        jobs.append({"model": name, "num_classes": 7, "save": str(directory / f"{name}_by_mindspore.ckpt")})
    for index, job in enumerate(jobs):
        job.update(input=str(directory / "x.npy"), logits=str(directory / f"logits_{index}.npy"))
    spec = directory / "jobs.json"
    spec.write_text(json.dumps({"jobs": jobs, "result": str(directory / "result.json")}))
    done = subprocess.run(
        [python, os.path.join(ROOT, "tests", "mindcv_env", "run_mindcv.py"), str(spec)],
        capture_output=True, text=True, timeout=1200, env=dict(os.environ, PYTHONPATH=""),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-5000:]
    outcomes = json.loads((directory / "result.json").read_text())["jobs"]
    by_key = {(job["model"], "save" in job): (job, outcome) for job, outcome in zip(jobs, outcomes, strict=True)}
    return {"x": x, "flax": flax_logits, "jobs": by_key}


@pytest.mark.parametrize("name", MINDCV_NAMES)
def test_mindcv_loads_our_export_completely_and_computes_our_logits(mindcv: dict, name: str) -> None:
    job, outcome = mindcv["jobs"][(name, False)]
    assert outcome["not_loaded"] == [] and outcome["not_used"] == []
    assert outcome["parameters"] == len(ms_checkpoint.read(job["load"]))
    assert rel_error(mindcv["flax"][name], np.load(job["logits"])) <= TOLERANCE


@pytest.mark.parametrize("name", SAVED_BY_MINDSPORE)
def test_checkpoint_saved_by_mindspore_imports_with_its_logits(mindcv: dict, name: str) -> None:
    job, _ = mindcv["jobs"][(name, True)]
    variables = weight_files.from_mindspore(job["save"], name)
    assert convert.num_classes_of(variables) == 7
    assert rel_error(_logits(name, variables, mindcv["x"]), np.load(job["logits"])) <= TOLERANCE
    # The general loader (main.py's init_weights / eval_weights) recognises the file by its content.
    same = weight_files.load_variables(job["save"], name)
    jax.tree.map(np.testing.assert_array_equal, same, variables)


# --- Without MindSpore: the file format and the errors --------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    directory = tmp_path_factory.mktemp("exported")
    out = {}
    for name in ("res2net50", "res2net50_v1b"):
        variables = timm_variables(name)
        weight_files.to_mindspore(variables, name, directory / f"{name}.ckpt")
        out[name] = (variables, str(directory / f"{name}.ckpt"))
    return out


def test_names_and_counts_are_mindcvs(exported: dict) -> None:
    """427 and 437 tensors (reference.md section 3), v1b's layer1 shortcut without a pool index."""
    v1 = ms_checkpoint.read(exported["res2net50"][1])
    v1b = ms_checkpoint.read(exported["res2net50_v1b"][1])
    assert (len(v1), len(v1b)) == (427, 437)
    assert {"conv1.weight", "bn1.gamma", "bn1.moving_variance", "classifier.weight", "layer1.0.down_sample.0.weight",
            "layer1.0.down_sample.1.beta", "layer2.0.down_sample.0.weight",
            "layer3.5.bns.2.moving_mean"} <= set(v1)  # fmt: skip
    assert {"conv1.0.weight", "conv1.1.gamma", "conv1.6.weight", "layer1.0.down_sample.0.weight",
            "layer1.0.down_sample.1.moving_mean", "layer2.0.down_sample.1.weight",
            "layer4.0.down_sample.2.gamma"} <= set(v1b)  # fmt: skip
    assert v1["classifier.weight"].shape == (1000, 2048) and v1["layer1.0.convs.0.weight"].shape == (26, 26, 3, 3)


def test_round_trip_is_exact(exported: dict, tmp_path) -> None:
    from safetensors.numpy import save_file

    for name, (variables, path) in exported.items():
        jax.tree.map(np.testing.assert_array_equal, weight_files.from_mindspore(path, name), variables)
        # MindSpore's safetensors format keeps MindCV's names; the loader renames them too.
        save_file(ms_checkpoint.read(path), tmp_path / f"{name}.safetensors")
        jax.tree.map(np.testing.assert_array_equal, weight_files.load_variables(tmp_path / f"{name}.safetensors", name),
                     variables)  # fmt: skip


def test_crc_trailer_is_checked(exported: dict, tmp_path) -> None:
    """MindSpore's optional trailer: b'crc_num' and the CRC32 of everything before it, 10 bytes big-endian."""
    with open(exported["res2net50"][1], "rb") as f:
        body = f.read()
    good, bad = tmp_path / "good.ckpt", tmp_path / "bad.ckpt"
    good.write_bytes(body + b"crc_num" + binascii.crc32(body).to_bytes(10, "big"))
    bad.write_bytes(body + b"crc_num" + (binascii.crc32(body) ^ 1).to_bytes(10, "big"))
    assert len(ms_checkpoint.read(good)) == 427
    with pytest.raises(CorruptCheckpointError, match="CRC32 does not match"):
        ms_checkpoint.read(bad)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (payloads here are under 128 bytes, so the length is one byte)."""
    return bytes([number << 3 | 2, len(payload)]) + payload


def test_damaged_bytes_are_one_clear_error(tmp_path) -> None:
    """Whatever bytes a damaged .ckpt holds, reading it returns tensors or raises CorruptCheckpointError:
    random bytes after a checkpoint's first byte, and a small checkpoint with bytes overwritten, 2,000 of
    each (a number where a name belongs once raised MemoryError, a number where content belongs TypeError)."""
    path = tmp_path / "small.ckpt"
    ms_checkpoint.write({"conv.weight": np.ones((2, 3), np.float32), "bn.num_batches": np.int32([7])}, path)
    body = path.read_bytes()
    rng = np.random.default_rng(0)
    for attempt in range(4000):
        if attempt % 2:
            data = b"\x0a" + rng.bytes(int(rng.integers(1, 400)))
        else:
            data = bytearray(body)
            data[int(rng.integers(len(data)))] = int(rng.integers(256))
        path.write_bytes(bytes(data))
        try:
            ms_checkpoint.read(path)
        except CorruptCheckpointError:
            pass
    huge = b"\xff" * 8 + b"\x7f"  # the varint of 2**63 - 1
    name, float32 = _field(1, b"w"), _field(2, b"Float32")
    for data, problem in [
        (_field(1, b"\x08" + huge), "a number where its name or tensor belongs"),  # tag = 2**63 - 1
        (_field(1, name + _field(2, float32 + b"\x18\x05")), "'w' has a number where its type or content belongs"),
        (_field(1, name + _field(2, b"\x08\x00\x08" + huge + float32 + _field(3, b""))),  # dims (0, 2**63 - 1)
         r"'w' has shape \(0, 9223372036854775807\), larger than any array"),
    ]:  # fmt: skip
        path.write_bytes(data)
        with pytest.raises(CorruptCheckpointError, match=problem):
            ms_checkpoint.read(path)


def test_bad_files_are_clear_errors(exported: dict, tmp_path) -> None:
    variables, path = exported["res2net50"]
    with open(path, "rb") as f:
        body = f.read()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(body[: len(body) // 2])
    with pytest.raises(CorruptCheckpointError, match=r"truncated\.ckpt is not a complete MindSpore checkpoint"):
        weight_files.from_mindspore(truncated, "res2net50")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x0a" + np.random.default_rng(0).bytes(4000))
    with pytest.raises(CorruptCheckpointError, match="garbage.ckpt is not a complete MindSpore checkpoint"):
        weight_files.load_variables(garbage, "res2net50")
    mismatch = r"does not fit res2net50d \(res2net50_v1b in MindCV\): .*looks like res2net50_26w_4s"
    with pytest.raises(CheckpointMismatchError, match=mismatch):
        weight_files.from_mindspore(path, "res2net50_v1b")
    with pytest.raises(CheckpointMismatchError, match="head has 1000 classes but 10.*reset_head=True"):
        weight_files.from_mindspore(path, "res2net50", num_classes=10)
    # A training checkpoint's optimiser state is left out, as MindCV's load_param_into_net leaves it;
    # a tensor the network does not have is still refused.
    tensors = ms_checkpoint.read(path)
    with_optimizer = tmp_path / "with_optimizer.ckpt"
    ms_checkpoint.write({**tensors, "moments.conv1.weight": tensors["conv1.weight"],
                         "learning_rate": np.float32([0.1]), "global_step": np.int32([5])}, with_optimizer)  # fmt: skip
    jax.tree.map(np.testing.assert_array_equal, weight_files.from_mindspore(with_optimizer, "res2net50"), variables)
    extra = tmp_path / "extra.ckpt"
    ms_checkpoint.write({**tensors, "layer1.0.convs.9.weight": tensors["layer1.0.convs.0.weight"]}, extra)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected 1 \(layer1\.0\.convs\.9\.weight\)"):
        weight_files.from_mindspore(extra, "res2net50")
    with pytest.raises(FileExistsError, match="choose a new output path"):
        weight_files.to_mindspore(variables, "res2net50", path)
    with pytest.raises(ValueError, match="MindCV has no network like res2next50"):
        weight_files.to_mindspore(variables, "res2next50", tmp_path / "x.ckpt")


def test_export_cli_writes_mindspore(exported: dict, tmp_path) -> None:
    variables, path = exported["res2net50_v1b"]
    out = tmp_path / "cli.ckpt"
    command = [sys.executable, "-m", "res2net_jax.export", "--format=mindspore", "--model=res2net50_v1b",
               f"--weights={path}", f"--out={out}"]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    jax.tree.map(np.testing.assert_array_equal, weight_files.from_mindspore(out, "res2net50_v1b"), variables)
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "exists" in again.stderr
