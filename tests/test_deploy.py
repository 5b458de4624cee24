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
from launch import assert_one_line_error

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


def test_the_onnx_graph_is_what_timms_export_holds_or_less(tmp_path) -> None:
    """Full res2net50d: BatchNorm folded into Conv biases, NCHW inside (one Transpose for NHWC input, none
    with nchw=True, which then takes what timm's model takes and gives timm's logits), no more nodes than
    torch.onnx.export writes for timm's network, and onnxruntime fuses every Conv that feeds a Relu."""
    import collections

    import onnx
    import onnxruntime
    import torch
    from conftest import timm_pair

    reference, variables = timm_pair(NAME)
    model = create_model(NAME)
    timm_path = tmp_path / "timm.onnx"
    torch.onnx.export(reference, torch.zeros(1, 3, SIZE, SIZE), timm_path, opset_version=onnx_export.OPSET,
                      dynamo=False, input_names=["images"], output_names=["logits"])  # fmt: skip
    timm_nodes = [n.op_type for n in onnx.load(timm_path).graph.node if n.op_type not in ("Identity", "Constant")]
    images = images_nchw(2, SIZE, SIZE)
    with torch.no_grad():
        expected = reference(torch.from_numpy(images)).numpy()
    allowed = {"Conv", "Relu", "Add", "MaxPool", "AveragePool", "Split", "Concat", "GlobalAveragePool", "Flatten",
               "Gemm", "Identity", "Transpose"}  # fmt: skip
    for nchw in (False, True):
        path = tmp_path / f"nchw_{nchw}.onnx"
        onnx_export.export_onnx(model, variables, SIZE, path, nchw=nchw)
        nodes = onnx.load(path).graph.node
        ops = collections.Counter(n.op_type for n in nodes)
        assert set(ops) <= allowed and ops["Transpose"] == (0 if nchw else 1), ops
        assert all(len(n.input) == 3 for n in nodes if n.op_type == "Conv")  # each with its folded bias
        assert len(nodes) - ops["Identity"] - ops["Transpose"] <= len(timm_nodes), collections.Counter(timm_nodes)
        logits = onnx_export.load_onnx(path)(images if nchw else nhwc(images))
        assert rel_error(logits, expected) <= TOLERANCE
    consumers = collections.Counter(i for n in nodes for i in n.input)
    relu_inputs = {n.input[0] for n in nodes if n.op_type == "Relu"}
    fusable = sum(n.op_type == "Conv" and n.output[0] in relu_inputs and consumers[n.output[0]] == 1 for n in nodes)
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    optimised = collections.Counter(n.op_type for n in onnx.load(tmp_path / "optimised.onnx").graph.node)
    assert fusable == ops["Relu"] - 16 and optimised["FusedConv"] == fusable, optimised  # 16: after residual adds


def test_bad_onnx_settings_are_one_line_and_write_nothing(tmp_path) -> None:
    for flags, message in [
        (["--format=onnx", "--opset=11"], "--opset=11 is not one the graph can be written in: choose 13 to"),
        (["--format=stablehlo", "--nchw"], "--opset and --nchw are settings of --format=onnx"),
    ]:
        out = tmp_path / "model.out"
        command = [sys.executable, "-m", "res2net_jax.export", f"--model={NAME}", "--weights=none", f"--out={out}"]
        done = subprocess.run([*command, *flags], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert_one_line_error(done, f"error: {message}")
        assert os.listdir(tmp_path) == []


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
