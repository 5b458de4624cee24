"""ONNX export of the inference function, translated from its jaxpr.

The eval-mode forward pass of every registered network is a short list of JAX primitives:
convolutions, elementwise arithmetic, windowed max and sum, split and concatenate, a reduction and
one matrix product. Each maps onto one or a few ONNX operators. Tensors keep JAX's NHWC layout;
convolutions and pools transpose to ONNX's NCHW around themselves (onnxruntime cancels the pairs).
The batch dimension stays symbolic. A primitive outside the set is an error that names it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import ClosedJaxpr, Literal

from res2net_jax.errors import MissingDependencyError
from res2net_jax.outputs import atomic_output, new_output_path

OPSET = 17
_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "max": "Max", "min": "Min"}
_TO_NCHW, _TO_NHWC = (0, 3, 1, 2), (0, 2, 3, 1)


def _require(module: str) -> Any:
    """Imports onnx / onnxruntime, which are optional: the error says how to install them."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependencyError(
            f"ONNX export needs {module}: pip install -e '.[onnx]' in the repository (elsewhere: pip install onnx "
            "onnxruntime)"
        ) from err


def _dims(shape: Sequence[Any], symbolic: Any) -> list[Any]:
    """ONNX dims: ints, with a symbolic dimension written as `symbolic`."""
    return [d if isinstance(d, int) else symbolic for d in shape]


class _Graph:
    """ONNX nodes and initializers under construction, with JAX variables mapped to tensor names."""

    def __init__(self) -> None:
        self.onnx = _require("onnx")
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.count = 0

    def fresh(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, value: Any, hint: str = "const") -> str:
        name = self.fresh(hint)
        self.initializers.append(self.onnx.numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: Sequence[str], outputs: int = 1, **attributes: Any) -> list[str]:
        names = [self.fresh(op.lower()) for _ in range(outputs)]
        self.nodes.append(self.onnx.helper.make_node(op, list(inputs), names, **attributes))
        return names

    def one(self, op: str, inputs: Sequence[str], **attributes: Any) -> str:
        return self.node(op, inputs, **attributes)[0]


def _conv(graph: _Graph, eqn: Any, lhs: str, rhs: str) -> list[str]:
    p = eqn.params
    numbers = p["dimension_numbers"]
    if any(d != 1 for d in p["lhs_dilation"]) or p["batch_group_count"] != 1:
        raise NotImplementedError("ONNX export: transposed or batch-grouped convolutions are not supported")
    x = graph.one("Transpose", [lhs], perm=list(numbers.lhs_spec))
    w = graph.one("Transpose", [rhs], perm=list(numbers.rhs_spec))
    pads = [lo for lo, _ in p["padding"]] + [hi for _, hi in p["padding"]]
    y = graph.one("Conv", [x, w], strides=list(p["window_strides"]), pads=pads,
                  dilations=list(p["rhs_dilation"]), group=p["feature_group_count"])  # fmt: skip
    return [graph.one("Transpose", [y], perm=[int(i) for i in np.argsort(numbers.out_spec)])]


def _pool(graph: _Graph, eqn: Any, x: str) -> list[str]:
    """reduce_window max/sum over H and W of an NHWC tensor: MaxPool, or AveragePool counting pads x size."""
    p = eqn.params
    window, strides, padding = p["window_dimensions"], p["window_strides"], p["padding"]
    trivial = all(window[d] == 1 and strides[d] == 1 and tuple(padding[d]) == (0, 0) for d in (0, 3))
    if len(window) != 4 or not trivial or any(d != 1 for d in (*p["base_dilation"], *p["window_dilation"])):
        raise NotImplementedError(f"ONNX export: {eqn.primitive.name} is supported over H and W of NHWC only")
    attributes = {"kernel_shape": list(window[1:3]), "strides": list(strides[1:3]),
                  "pads": [padding[1][0], padding[2][0], padding[1][1], padding[2][1]]}  # fmt: skip
    nchw = graph.one("Transpose", [x], perm=list(_TO_NCHW))
    if eqn.primitive.name == "reduce_window_max":
        pooled = graph.one("MaxPool", [nchw], **attributes)
    else:
        mean = graph.one("AveragePool", [nchw], count_include_pad=1, **attributes)
        pooled = graph.one("Mul", [mean, graph.const(np.float32(window[1] * window[2]))])
    return [graph.one("Transpose", [pooled], perm=list(_TO_NHWC))]


def _broadcast(graph: _Graph, eqn: Any, x: str) -> list[str]:
    """Reshape to the target rank, then Expand; a symbolic target dim stays 1 and broadcasts later."""
    shape, kept = eqn.params["shape"], eqn.params["broadcast_dimensions"]
    operand = eqn.invars[0].aval.shape
    ranked = [1] * len(shape)
    for source, target in enumerate(kept):
        ranked[target] = operand[source]
    reshaped = graph.one("Reshape", [x, graph.const(np.array(_dims(ranked, -1), np.int64))])
    return [graph.one("Expand", [reshaped, graph.const(np.array(_dims(shape, 1), np.int64))])]


def _reshape(graph: _Graph, eqn: Any, x: str) -> list[str]:
    if eqn.params.get("dimensions") is not None:
        raise NotImplementedError("ONNX export: reshape with a dimension order is not supported")
    target = _dims(eqn.params["new_sizes"], -1)
    if target.count(-1) > 1:
        raise NotImplementedError("ONNX export: a reshape with two symbolic dimensions is not supported")
    return [graph.one("Reshape", [x, graph.const(np.array(target, np.int64))])]


def _dot(graph: _Graph, eqn: Any, lhs: str, rhs: str) -> list[str]:
    (lhs_contract, rhs_contract), batch = eqn.params["dimension_numbers"]
    lhs_rank, rhs_rank = eqn.invars[0].aval.ndim, eqn.invars[1].aval.ndim
    if any(batch) or tuple(lhs_contract) != (lhs_rank - 1,) or tuple(rhs_contract) != (0,) or rhs_rank != 2:
        raise NotImplementedError("ONNX export: only x @ W products (contracting x's last axis) are supported")
    return [graph.one("MatMul", [lhs, rhs])]


def _translate(graph: _Graph, eqn: Any, inputs: list[str]) -> list[str]:
    name, p = eqn.primitive.name, eqn.params
    if name in _BINARY:
        return [graph.one(_BINARY[name], inputs)]
    if name == "rsqrt":
        return [graph.one("Reciprocal", [graph.one("Sqrt", inputs)])]
    if name == "convert_element_type":
        target = graph.onnx.helper.np_dtype_to_tensor_dtype(np.dtype(p["new_dtype"]))
        return [graph.one("Cast", inputs, to=target)]
    if name == "conv_general_dilated":
        return _conv(graph, eqn, *inputs)
    if name in ("reduce_window_max", "reduce_window_sum"):
        return _pool(graph, eqn, inputs[0])
    if name == "split":
        sizes = graph.const(np.array([int(s) for s in p["sizes"]], np.int64))
        return graph.node("Split", [inputs[0], sizes], outputs=len(p["sizes"]), axis=p["axis"])
    if name == "concatenate":
        return [graph.one("Concat", inputs, axis=p["dimension"])]
    if name == "reduce_sum":
        axes = graph.const(np.array(p["axes"], np.int64))
        return [graph.one("ReduceSum", [inputs[0], axes], keepdims=0)]
    if name == "squeeze":
        return [graph.one("Squeeze", [inputs[0], graph.const(np.array(p["dimensions"], np.int64))])]
    if name == "broadcast_in_dim":
        return _broadcast(graph, eqn, inputs[0])
    if name == "reshape":
        return _reshape(graph, eqn, inputs[0])
    if name == "dot_general":
        return _dot(graph, eqn, *inputs)
    raise NotImplementedError(f"ONNX export: no translation for the JAX primitive {name!r}")


def _emit(graph: _Graph, closed: ClosedJaxpr, inputs: list[str]) -> list[str]:
    """Appends a jaxpr's equations to the graph (sub-jaxprs of jit and custom_jvp inlined)."""
    jaxpr = closed.jaxpr
    names = {var: graph.const(value, "folded") for var, value in zip(jaxpr.constvars, closed.consts, strict=True)}
    names.update(zip(jaxpr.invars, inputs, strict=True))

    def name_of(atom: Any) -> str:
        if isinstance(atom, Literal):
            return graph.const(np.asarray(atom.val, atom.aval.dtype), "literal")
        return names[atom]

    for eqn in jaxpr.eqns:
        inputs_of_eqn = [name_of(v) for v in eqn.invars]
        inner = eqn.params.get("jaxpr") if eqn.primitive.name in ("jit", "pjit") else eqn.params.get("call_jaxpr")
        if eqn.primitive.name in ("jit", "pjit", "custom_jvp_call"):
            outputs = _emit(graph, inner, inputs_of_eqn)
        else:
            outputs = _translate(graph, eqn, inputs_of_eqn)
        names.update(zip(eqn.outvars, outputs, strict=True))
    return [name_of(v) for v in jaxpr.outvars]


def export_onnx(model: nn.Module, variables: Any, image_size: int, path: str | os.PathLike) -> None:
    """Writes the inference function (normalised NHWC float32 `images`, any batch -> float32 `logits`)
    as an ONNX model with the weights as initializers."""
    onnx = _require("onnx")
    new_output_path(path)  # refused before the translation, which takes a while
    leaves, tree = jax.tree.flatten(variables)
    (batch,) = jax.export.symbolic_shape("batch")
    images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)

    def logits(leaves: list[jax.Array], images: jax.Array) -> jax.Array:
        return model.apply(jax.tree.unflatten(tree, leaves), images, train=False).astype(jnp.float32)

    shapes = [jax.ShapeDtypeStruct(np.shape(x), jnp.float32) for x in leaves]
    closed = jax.make_jaxpr(logits)(shapes, images)
    graph = _Graph()
    weights = []
    for leaf in leaves:
        weights.append(graph.fresh("weight"))
        graph.initializers.append(onnx.numpy_helper.from_array(np.asarray(leaf, np.float32), weights[-1]))
    (output,) = _emit(graph, closed, [*weights, "images"])
    graph.nodes.append(onnx.helper.make_node("Identity", [output], ["logits"]))
    float32 = onnx.TensorProto.FLOAT
    onnx_graph = onnx.helper.make_graph(
        graph.nodes,
        "res2net",
        [onnx.helper.make_tensor_value_info("images", float32, ["batch", image_size, image_size, 3])],
        [onnx.helper.make_tensor_value_info("logits", float32, ["batch", closed.out_avals[0].shape[-1]])],
        graph.initializers,
    )
    onnx_model = onnx.helper.make_model(onnx_graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(onnx_model)
    with atomic_output(path) as staged:
        onnx.save(onnx_model, staged)


def load_onnx(path: str | os.PathLike) -> Callable[[np.ndarray], np.ndarray]:
    """An onnxruntime session over the exported file, as a function of the images."""
    session = _require("onnxruntime").InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    return lambda images: session.run(["logits"], {"images": np.asarray(images, np.float32)})[0]
