"""Deployed inference speed, side by side: this project's ONNX against timm's torch.onnx.export of the same
weights on onnxruntime, and the jitted JAX inference function (BatchNorm folded and compiled with
`inference_compiler_options`, as make_predict_fn and predict run it) against the same unfolded, the same
compiled with XLA's default options, and timm eager.

    PYTHONPATH=. python experiments/deploy_speed.py --out=experiments/results/deploy_speed_cpu.json
    PYTHONPATH=. python experiments/deploy_speed.py --image_size=64 --layers=1,1,1,1 --repeats=2 --rounds=1 \
        --out=/tmp/tiny.json                                                         # a smoke run
    PYTHONPATH=. python experiments/deploy_speed.py --pad_branches=8 --out=...  # with the widened-branch ONNX too

Each side runs in its own process (one framework's threads and caches never meet another's), with as
many threads as the machine has cores, at batch 1 (median ms of a call) and batch 8 (img/s); the sides
alternate, their order reversed every round, and each figure is the median over --rounds. The weights
are timm's res2net50d initialisation (speed does not depend on their values). Run it on an idle
machine: other load changes the ratios (it once made 0.57x read 0.99x).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import report
from absl import app, flags

from res2net_jax import cli

_MODEL = flags.DEFINE_string("model", "res2net50d", "The network (a timm name).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Input height and width.")
_LAYERS = flags.DEFINE_list("layers", [], "Blocks per stage instead of the model's own (smoke runs).")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed calls per batch size and side, after one untimed call.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds over all sides, alternating their order.")
_PAD = flags.DEFINE_integer(
    "pad_branches",
    0,
    "Also time this project's ONNX with every Res2Net branch narrower than a multiple of N channels widened "
    "to one with zero weights (the same logits; onnxruntime's NCHWc kernels take multiples of 8 or 16); 0: not.",
)
_OUT = flags.DEFINE_string("out", None, "The JSON file to write (never overwritten).", required=True)
_WORKER = flags.DEFINE_string("worker", None, "Internal: time one side in the directory given and print JSON.")
SIDES = ("onnx", "timm_onnx", "jit_folded", "jit_unfolded", "jit_xla_defaults", "timm_eager")
BATCHES = (1, 8)
PACKAGES = ("jax", "jaxlib", "flax", "torch", "timm", "onnx", "onnxruntime")


def _overrides() -> dict[str, Any]:
    """The --layers override, as timm's and this project's constructors both take it."""
    return {"layers": [int(n) for n in _LAYERS.value]} if _LAYERS.value else {}


def _median_ms(fn: Any, repeats: int) -> float:
    fn()  # compiles, warms caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _runner(side: str, directory: str) -> Any:
    """A function of NCHW float32 images (numpy) that runs `side` to completion."""
    import numpy as np

    if side in ("onnx", "onnx_padded", "timm_onnx"):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = os.cpu_count()
        path = os.path.join(directory, f"{side}.onnx")
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        return lambda images: session.run(["logits"], {"images": images})[0]
    if side == "timm_eager":
        import timm
        import torch

        torch.set_num_threads(os.cpu_count())
        model = timm.create_model(_MODEL.value, **_overrides())
        model.load_state_dict(torch.load(os.path.join(directory, "timm.pt")))
        model.eval()

        def run(images: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return model(torch.from_numpy(images)).numpy()

        return run
    import jax

    from res2net_jax import create_model, fold_batch_norm, inference, weight_files

    model = create_model(_MODEL.value, **_overrides())
    variables = weight_files.load_variables(os.path.join(directory, "timm.safetensors"), _MODEL.value,
                                            overrides=_overrides())  # fmt: skip
    if side != "jit_unfolded":
        model, variables = fold_batch_norm(model, variables)
    options = {} if side == "jit_xla_defaults" else inference.inference_compiler_options()
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False), compiler_options=options)
    return lambda images: np.asarray(forward(variables, images.transpose(0, 2, 3, 1)))


def _worker(side: str, directory: str) -> dict[str, float]:
    import numpy as np

    run = _runner(side, directory)
    figures = {}
    for batch in BATCHES:
        images = np.random.RandomState(batch).randn(batch, 3, _IMAGE_SIZE.value, _IMAGE_SIZE.value).astype(np.float32)
        ms = _median_ms(lambda images=images: run(images), _REPEATS.value)
        figures[f"b{batch}_ms"] = ms
        figures[f"b{batch}_img_s"] = 1000 * batch / ms
    return figures


def pad_branches(graph: Any, multiple: int) -> int:
    """Widens, in place, each Res2Net block's branches of w channels (a Split of equal pieces between conv1
    and a Concat before conv3) to the next multiple of `multiple`: conv1's output channels, every branch
    convolution's input and output channels and conv3's input channels gain zero weights and biases,
    so the extra channels stay 0 through every Relu, Add and pooling and the logits are unchanged.
    Returns the number of blocks widened."""
    import numpy as np
    from onnx import numpy_helper

    initializers = {i.name: i for i in graph.initializer}
    producer = {output: node for node in graph.node for output in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def get(name: str) -> Any:
        return numpy_helper.to_array(initializers[name])

    def put(name: str, value: Any) -> None:
        initializers[name].CopyFrom(numpy_helper.from_array(value, name))

    def conv_before(node: Any) -> Any:
        while node.op_type != "Conv":
            node = producer[node.input[0]]
        return node

    widened = 0
    for split in [node for node in graph.node if node.op_type == "Split" and len(node.input) > 1]:
        sizes = get(split.input[1])
        width, pieces = int(sizes[0]), len(sizes)
        wide = -(-width // multiple) * multiple
        if wide == width or any(int(size) != width for size in sizes):
            continue
        old_to_new = [piece * wide + channel for piece in range(pieces) for channel in range(width)]
        conv1 = conv_before(producer[split.input[0]])
        for index in (1, 2):  # kernel (out, in, kh, kw) and bias: output channels
            value = get(conv1.input[index])
            grown = np.zeros((wide * pieces, *value.shape[1:]), value.dtype)
            grown[old_to_new] = value
            put(conv1.input[index], grown)
        put(split.input[1], np.full(pieces, wide, sizes.dtype))
        pending, seen, concat = list(split.output), set(), None
        while pending:  # the branches: every node between the Split and the Concat
            for node in consumers.get(pending.pop(), []):
                if node.op_type == "Concat":
                    concat = node
                elif id(node) not in seen:
                    seen.add(id(node))
                    if node.op_type == "Conv":
                        kernel, bias = get(node.input[1]), get(node.input[2])
                        grown = np.zeros((wide, wide, *kernel.shape[2:]), kernel.dtype)
                        grown[:width, :width] = kernel
                        put(node.input[1], grown)
                        put(node.input[2], np.concatenate([bias, np.zeros(wide - width, bias.dtype)]))
                    pending.extend(node.output)
        conv3 = consumers[concat.output[0]][0]
        kernel = get(conv3.input[1])
        grown = np.zeros((kernel.shape[0], wide * pieces, *kernel.shape[2:]), kernel.dtype)
        grown[:, old_to_new] = kernel
        put(conv3.input[1], grown)
        widened += 1
    del graph.value_info[:]  # the intermediate shapes changed: onnxruntime infers them again
    return widened


def _check_same_logits(directory: str, side: str, other: str) -> None:
    """Two ONNX files of `directory` compute the same logits (relative error <= 1e-5) on two images."""
    import numpy as np

    images = np.random.RandomState(0).randn(2, 3, _IMAGE_SIZE.value, _IMAGE_SIZE.value).astype(np.float32)
    expected, got = _runner(side, directory)(images), _runner(other, directory)(images)
    error = float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))
    if error > 1e-5:
        raise RuntimeError(f"{other} computes other logits than {side}: relative error {error:.2g}")


def _prepare(directory: str) -> dict[str, Any]:
    """timm's network and its weights as files, and both ONNX exports of them; the graphs' node counts."""
    import collections

    import onnx
    import timm
    import torch
    from safetensors.torch import save_file

    from res2net_jax import convert, create_model, onnx_export

    model = timm.create_model(_MODEL.value, **_overrides()).eval()
    torch.save(model.state_dict(), os.path.join(directory, "timm.pt"))
    save_file(model.state_dict(), os.path.join(directory, "timm.safetensors"))
    size = _IMAGE_SIZE.value
    torch.onnx.export(model, torch.zeros(1, 3, size, size), os.path.join(directory, "timm_onnx.onnx"),
                      opset_version=onnx_export.OPSET, dynamo=False, input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})  # fmt: skip
    variables = convert.from_torch({k: v.numpy() for k, v in model.state_dict().items()}, _MODEL.value,
                                   overrides=_overrides())  # fmt: skip
    flax_model = create_model(_MODEL.value, **_overrides())
    onnx_export.export_onnx(flax_model, variables, size, os.path.join(directory, "onnx.onnx"), nchw=True)
    sides = ["onnx", "timm_onnx"]
    if _PAD.value:
        padded = onnx.load(os.path.join(directory, "onnx.onnx"))
        if not pad_branches(padded.graph, _PAD.value):
            raise ValueError(f"{_MODEL.value} has no branches to widen to a multiple of {_PAD.value}")
        onnx.save(padded, os.path.join(directory, "onnx_padded.onnx"))
        _check_same_logits(directory, "onnx", "onnx_padded")
        sides.append("onnx_padded")
    nodes = {}
    for side in sides:
        ops = collections.Counter(n.op_type for n in onnx.load(os.path.join(directory, f"{side}.onnx")).graph.node)
        nodes[side] = {"nodes": sum(ops.values()), "ops": dict(ops)}
    return nodes


def main(argv: list[str]) -> None:
    """Prepares the weights and exports, then times each side in its own process, alternating."""
    del argv
    if _WORKER.value:
        side, directory = _WORKER.value.split(":", 1)
        print(json.dumps(_worker(side, directory)))
        return
    report.refuse_existing(_OUT.value)
    with tempfile.TemporaryDirectory(prefix="deploy_speed_") as directory:
        graphs = _prepare(directory)
        timed = SIDES + ("onnx_padded",) if _PAD.value else SIDES
        rounds: dict[str, list[dict[str, float]]] = {side: [] for side in timed}
        for index in range(_ROUNDS.value):
            for side in timed if index % 2 == 0 else timed[::-1]:
                flags_ = [f"--{f.name}={f.value}" for f in (_MODEL, _IMAGE_SIZE, _REPEATS)]
                flags_.append(f"--layers={','.join(_LAYERS.value)}")
                done = subprocess.run([sys.executable, __file__, f"--worker={side}:{directory}", *flags_,
                                       f"--out={_OUT.value}"], capture_output=True, text=True, check=False)  # fmt: skip
                if done.returncode != 0:
                    raise RuntimeError(f"{side} failed: {done.stderr[-2000:]}")
                rounds[side].append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(side, rounds[side][-1], flush=True)
    sides = {side: {key: statistics.median(r[key] for r in results) for key in results[0]}
             for side, results in rounds.items()}  # fmt: skip
    ratios = {
        "onnx_vs_timm_onnx_b1": sides["timm_onnx"]["b1_ms"] / sides["onnx"]["b1_ms"],
        "onnx_vs_timm_onnx_b8": sides["onnx"]["b8_img_s"] / sides["timm_onnx"]["b8_img_s"],
        "jit_folded_vs_unfolded_b8": sides["jit_folded"]["b8_img_s"] / sides["jit_unfolded"]["b8_img_s"],
        "jit_folded_vs_timm_eager_b8": sides["jit_folded"]["b8_img_s"] / sides["timm_eager"]["b8_img_s"],
        "jit_folded_vs_timm_eager_b1": sides["timm_eager"]["b1_ms"] / sides["jit_folded"]["b1_ms"],
        "jit_folded_vs_xla_defaults_b8": sides["jit_folded"]["b8_img_s"] / sides["jit_xla_defaults"]["b8_img_s"],
        "jit_folded_vs_xla_defaults_b1": sides["jit_xla_defaults"]["b1_ms"] / sides["jit_folded"]["b1_ms"],
    }
    if _PAD.value:
        ratios["onnx_padded_vs_onnx_b1"] = sides["onnx"]["b1_ms"] / sides["onnx_padded"]["b1_ms"]
        ratios["onnx_padded_vs_onnx_b8"] = sides["onnx_padded"]["b8_img_s"] / sides["onnx"]["b8_img_s"]
    settings = {"model": _MODEL.value, "image_size": _IMAGE_SIZE.value, "layers": _LAYERS.value or "the model's own",
                "repeats": _REPEATS.value, "rounds": _ROUNDS.value, "threads": os.cpu_count(),
                "pad_branches": _PAD.value}  # fmt: skip
    report.write(_OUT.value, PACKAGES, settings, sides=sides, ratios=ratios, rounds=rounds, graphs=graphs)
    print(json.dumps(ratios, indent=1))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
