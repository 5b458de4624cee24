"""A user's journey through one workdir: train, then evaluate, predict and export every format from
the run and from its best checkpoint, naming no model, each giving the Flax logits of those weights
(and timm those of the pretrained directory)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import timm
import torch
from conftest import SIX_STEPS, rel_error
from launch import MODEL, OVERRIDES, ROOT, cli_calls, env, run_here, run_variables
from PIL import Image

from res2net_jax import create_model, deploy, from_pretrained, get_spec, inference, onnx_export, weight_files
from res2net_jax import workdir as run_dir

pytestmark = pytest.mark.usefixtures("xla_cache")
SIZE = 32
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, six_step_run: str) -> str:
    """Six steps with an EMA on the 4-class noise folder (class0 ... class3), a copy of its own."""
    workdir = str(tmp_path_factory.mktemp("journey") / "run")
    shutil.copytree(six_step_run, workdir)
    return workdir


def _images(batch: int = 2) -> np.ndarray:
    return np.random.RandomState(batch).randn(batch, SIZE, SIZE, 3).astype(np.float32)


def _logits(variables: dict) -> np.ndarray:
    model = create_model(MODEL, num_classes=4, **OVERRIDES)
    with jax.default_matmul_precision("highest"):
        return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, _images()))


def _module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env(1), capture_output=True, text=True)


def test_the_run_names_its_model_classes_and_settings(trained: str) -> None:
    info = run_dir.describe(run_dir.locate(os.path.join(trained, "best")))
    assert (info.model, info.model_overrides, info.num_classes) == (get_spec(MODEL).name, OVERRIDES, 4)
    assert info.class_names == ["class0", "class1", "class2", "class3"]
    with open(os.path.join(trained, "config.json")) as f:
        assert json.load(f)["num_train_steps"] == 6
    best_step = os.listdir(os.path.join(trained, "best"))[0]
    paths = [trained, f"{trained}/best", f"{trained}/best/{best_step}", f"{trained}/best/{best_step}/state"]
    loaded = [run_variables(p) for p in paths]
    for variables in loaded[2:]:  # the best step, named three ways
        np.testing.assert_array_equal(variables["params"]["fc"]["bias"], loaded[1]["params"]["fc"]["bias"])
    ema = run_variables(trained, ema=True)
    assert not np.array_equal(ema["params"]["fc"]["bias"], loaded[0]["params"]["fc"]["bias"])


@pytest.mark.parametrize("where", ["", "best"])
def test_every_export_of_the_run_gives_its_logits(where: str, trained: str, tmp_path) -> None:
    source = os.path.join(trained, where) if where else trained
    expected = _logits(run_variables(source))
    outputs = {"torch": "w.safetensors", "orbax": "flax", "mindspore": "w.ckpt", "stablehlo": "f.jaxexport",
               "savedmodel": "saved", "onnx": "f.onnx", "pretrained": "hf"}  # fmt: skip
    calls = [[f"--format={fmt}", f"--weights={source}", f"--out={tmp_path / name}", f"--image_size={SIZE}"]
             for fmt, name in outputs.items()]  # fmt: skip
    for fmt, done in zip(outputs, cli_calls("res2net_jax.export", *calls), strict=True):  # test_convert: the command
        assert done.returncode == 0 and f" as {fmt} to " in done.stdout, f"{fmt}: {done.stderr[-3000:]}"
    got = {
        "torch": _logits(weight_files.load_variables(tmp_path / "w.safetensors", MODEL, overrides=OVERRIDES)),
        "orbax": _logits(weight_files.load_variables(tmp_path / "flax", MODEL, overrides=OVERRIDES)),
        "mindspore": _logits(weight_files.from_mindspore(tmp_path / "w.ckpt", MODEL, overrides=OVERRIDES)),
        "stablehlo": np.asarray(deploy.load_stablehlo(tmp_path / "f.jaxexport")(_images())),
        "onnx": onnx_export.load_onnx(tmp_path / "f.onnx")(_images()),
    }
    # pretrained: timm's format, which names the reduced architecture and the run's classes for timm too.
    model, variables = from_pretrained(str(tmp_path / "hf"))
    got["pretrained"] = np.asarray(model.apply(variables, _images(), train=False))
    with torch.no_grad():
        reference = timm.create_model(f"local-dir:{tmp_path / 'hf'}", pretrained=True).eval()
        got["timm"] = reference(torch.from_numpy(_images().transpose(0, 3, 1, 2))).numpy()
    assert reference.pretrained_cfg["label_names"] == ["class0", "class1", "class2", "class3"]
    # It carries the run's evaluation transform too: predict reads the directory as it reads the run.
    image = str(tmp_path / "x.png")
    Image.fromarray((np.random.RandomState(1).rand(40, 30, 3) * 255).astype(np.uint8)).save(image)
    from_run = _module("res2net_jax.predict", f"--weights={source}", "--format=json", image)
    from_directory = _module("res2net_jax.predict", f"--weights={tmp_path / 'hf'}", "--format=json", image)
    assert from_run.returncode == 0 and from_directory.returncode == 0, from_directory.stderr[-3000:]
    assert json.loads(from_directory.stdout) == json.loads(from_run.stdout)
    import tensorflow as tf

    serve = tf.saved_model.load(str(tmp_path / "saved")).signatures["serving_default"]
    got["savedmodel"] = serve(images=tf.constant(_images()))["logits"].numpy()
    for fmt, logits in got.items():
        assert rel_error(logits, expected) <= TOLERANCE, fmt


def test_predict_and_eval_read_the_run(trained: str, noise_folder: str, tmp_path) -> None:
    image = str(tmp_path / "x.png")
    Image.fromarray((np.random.RandomState(0).rand(36, 36, 3) * 255).astype(np.uint8)).save(image)
    done = _module("res2net_jax.predict", f"--weights={trained}/best", "--ema", image)
    assert done.returncode == 0, done.stderr[-3000:]
    variables = run_variables(f"{trained}/best", ema=True)
    model = create_model(MODEL, num_classes=4, **OVERRIDES)
    crop = inference.center_crop(inference.load_image(image), SIZE, 1.0)  # the host crop predict makes
    result = inference.make_predict_fn(model, variables, 4, SIZE, 1.0)(crop[None])
    top = int(result.top_classes[0, 0])
    assert f"{float(result.top_probs[0, 0]):7.2%}  {top:4d}  class{top}" in done.stdout  # names from classes.txt
    done = run_here(trained, noise_folder, *SIX_STEPS, mode="eval")
    assert done.returncode == 0, done.stderr[-3000:]
    with open(os.path.join(trained, "eval.jsonl")) as f:
        record = json.loads(f.readlines()[-1])
    final = run_dir.read_metrics(trained)[-1]
    assert (record["top1"], record["ema_top1"]) == (final["top1"], final["ema_top1"])
