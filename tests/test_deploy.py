"""Deployment artefacts run outside Flax and give the Flax logits: StableHLO through
jax.export.deserialize, the SavedModel through TensorFlow, ONNX through onnxruntime."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import images_nchw, nhwc, rel_error, timm_variables

from res2net_jax import convert, create_model, deploy, onnx_export, weight_files

NAME = "res2net50d"
SIZE = 64
TOLERANCE = 1e-4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHALLOW = {"layers": (1, 1, 1, 1)}  # the exporters are generic over the module; depth only costs time


def _images(batch: int) -> np.ndarray:
    return nhwc(images_nchw(batch, SIZE, SIZE, seed=batch))


def _logits(model, variables: dict, images: np.ndarray) -> np.ndarray:
    """Flax's logits, jitted (eager mode would compile every operation separately)."""
    with jax.default_matmul_precision("highest"):
        return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images))


@pytest.fixture(scope="module")
def shallow() -> tuple:
    """A reduced-depth res2net50d with random weights, BN statistics and head."""
    return create_model(NAME, num_classes=10, **SHALLOW), timm_variables(NAME, num_classes=10, **SHALLOW)


def test_stablehlo_runs_any_batch_with_the_flax_logits(shallow: tuple, tmp_path) -> None:
    model, variables = shallow
    path = tmp_path / "model.jaxexport"
    deploy.export_stablehlo(model, variables, SIZE, path)
    run = deploy.load_stablehlo(path)
    for batch in (1, 3):
        assert rel_error(run(_images(batch)), _logits(model, variables, _images(batch))) <= TOLERANCE
    with pytest.raises(FileExistsError, match="choose a new output path"):
        deploy.export_stablehlo(model, variables, SIZE, path)


def test_savedmodel_runs_in_tensorflow_with_the_flax_logits(shallow: tuple, tmp_path) -> None:
    import tensorflow as tf

    model, variables = shallow
    directory = tmp_path / "savedmodel"
    deploy.export_savedmodel(model, variables, SIZE, directory)
    serve = tf.saved_model.load(str(directory)).signatures["serving_default"]
    for batch in (1, 3):
        logits = serve(images=tf.constant(_images(batch)))["logits"].numpy()
        assert rel_error(logits, _logits(model, variables, _images(batch))) <= TOLERANCE


@pytest.mark.parametrize(
    ("name", "overrides", "size"),
    [(NAME, SHALLOW, SIZE), ("res2net50_26w_4s", SHALLOW, 65), ("dla60_res2next", {}, SIZE)],
)
def test_onnx_runs_in_onnxruntime_with_the_flax_logits(name: str, overrides: dict, size: int, tmp_path) -> None:
    """v1b (avg-down), v1 (max-pool stem, strided shortcut) at an odd size, and DLA with grouped convs."""
    model = create_model(name, num_classes=10, **overrides)
    variables = timm_variables(name, num_classes=10, **overrides)
    path = tmp_path / "model.onnx"
    onnx_export.export_onnx(model, variables, size, path)
    run = onnx_export.load_onnx(path)
    for batch in (1, 3):
        images = nhwc(images_nchw(batch, size, size, seed=batch))
        assert rel_error(run(images), _logits(model, variables, images)) <= TOLERANCE


def test_export_cli_writes_stablehlo_of_a_full_model(tmp_path) -> None:
    variables = timm_variables(NAME, num_classes=10)
    weights, out = tmp_path / "weights.safetensors", tmp_path / "cli.jaxexport"
    weight_files.save_state_dict(convert.to_torch(variables, NAME), weights)
    done = subprocess.run(
        [sys.executable, "-m", "res2net_jax.export", "--format=stablehlo", f"--model={NAME}", f"--weights={weights}",
         f"--out={out}", f"--image_size={SIZE}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    expected = _logits(create_model(NAME, num_classes=10), variables, _images(3))
    assert rel_error(deploy.load_stablehlo(out)(_images(3)), expected) <= TOLERANCE
