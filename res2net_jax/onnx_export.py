"""ONNX export of the inference function, translated from its jaxpr.

The eval-mode forward pass of every registered network, BatchNorm folded (`fold_batch_norm`), is a
short list of JAX primitives: convolutions (the 1x1 ones as matrix products of the maps), bias adds,
ReLU (max with 0), windowed max and sum, split and concatenate, a mean and one matrix product. The
graph is written as a deployment engineer expects it: NCHW inside (JAX's NHWC maps are stored
transposed, and every axis is mapped), a Conv with its bias for each convolution, Relu, MaxPool /
AveragePool, Split / Concat, GlobalAveragePool and Gemm; values that do not depend on the images
(weights, BN shifts, pooling counts) are computed here and written as initializers. The input is NHWC,
transposed once, or NCHW as timm's export takes it (`nchw=True`); the batch dimension stays symbolic.
A primitive outside the set is an error that names it.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import ClosedJaxpr, Literal

from res2net_jax.errors import InvalidInputError, MissingDependencyError
from res2net_jax.folding import fold_batch_norm
from res2net_jax.outputs import atomic_output, new_output_path

OPSET = 17
MIN_OPSET = 13  # Split, ReduceSum and Squeeze take their sizes and axes as inputs from opset 13 on
_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "max": "Max", "min": "Min"}
_NCHW = (0, 3, 1, 2)  # where each stored (NCHW) axis comes from in JAX's NHWC


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


@dataclasses.dataclass
class _Value:
    """A JAX value in the graph: a known array (`const`, not yet written), or an ONNX tensor `name`, stored
    NCHW when `nchw` (a rank-4 NHWC value in JAX). `scaled` marks a sum written as a mean times a count
    (AveragePool x k), which a division by that count undoes."""

    name: str | None = None
    const: np.ndarray | None = None
    nchw: bool = False
    scaled: tuple[str, float] | None = None
    views: dict[bool | None, str] = dataclasses.field(default_factory=dict)  # written tensors, by layout

    def axis(self, axis: int) -> int:
        """The stored axis of JAX's `axis`."""
        return _NCHW.index(axis) if self.nchw else axis


class _Graph:
    """ONNX nodes and initializers under construction; which node made each tensor, and how often each JAX
    variable is read (a Conv takes the bias add that is its output's only reader)."""

    def __init__(self) -> None:
        self.onnx = _require("onnx")
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.count = 0
        self.producer: dict[str, Any] = {}

    def fresh(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, value: np.ndarray, hint: str = "const") -> str:
        name = self.fresh(hint)
        self.initializers.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op: str, inputs: Sequence[str], outputs: int = 1, **attributes: Any) -> list[str]:
        names = [self.fresh(op.lower()) for _ in range(outputs)]
        node = self.onnx.helper.make_node(op, list(inputs), names, **attributes)
        self.nodes.append(node)
        for name in names:
            self.producer[name] = node
        return names

    def one(self, op: str, inputs: Sequence[str], **attributes: Any) -> str:
        return self.node(op, inputs, **attributes)[0]

    def tensor(self, value: _Value, nchw: bool | None = None) -> str:
        """`value` as a tensor, stored NCHW or not as asked (None: as it is); each array and each transpose
        is written once."""
        if value.const is None and (nchw is None or nchw == value.nchw):
            return value.name
        if nchw not in value.views:
            if value.const is not None:
                array = value.const.transpose(_NCHW) if nchw and value.const.ndim == 4 else value.const
                value.views[nchw] = self.const(array)
            else:
                perm = _NCHW if nchw else tuple(int(i) for i in np.argsort(_NCHW))
                value.views[nchw] = self.one("Transpose", [value.name], perm=list(perm))
        return value.views[nchw]

    def prune(self, output: str) -> None:
        """Drops the nodes and initializers that `output` does not depend on (a count multiplied in, then
        divided out)."""
        needed, kept = {output}, []
        for node in reversed(self.nodes):
            if any(o in needed for o in node.output):
                needed.update(node.input)
                kept.append(node)
        self.nodes = kept[::-1]
        self.initializers = [i for i in self.initializers if i.name in needed]


def _elementwise(graph: _Graph, eqn: Any, values: list[_Value], uses: Counter) -> _Value:
    name = eqn.primitive.name
    x, y = values
    if name == "max" and y.const is not None and not np.any(y.const):
        return _Value(graph.one("Relu", [graph.tensor(x)]), nchw=x.nchw)
    if name == "div" and x.scaled and y.const is not None and np.all(y.const == x.scaled[1]):
        return _Value(x.scaled[0], nchw=x.nchw)  # AveragePool x k / k
    if name == "add" and y.const is not None and x.name is not None:
        node = graph.producer.get(x.name)
        bias = y.const.reshape(-1)
        if node is not None and uses[eqn.invars[0]] == 1 and y.const.size == bias.size:
            channels = eqn.outvars[0].aval.shape[-1]
            if node.op_type == "Conv" and len(node.input) == 2 and bias.size == channels and x.nchw:
                node.input.append(graph.const(bias.astype(np.float32), "bias"))
                return x
            if node.op_type == "MatMul" and eqn.outvars[0].aval.ndim == 2 and bias.size == channels:
                node.op_type = "Gemm"
                node.input.append(graph.const(bias.astype(np.float32), "bias"))
                return x
    nchw = any(v.nchw for v in values)
    operands = []
    for v, var in zip(values, eqn.invars, strict=True):
        rank = v.const.ndim if v.const is not None else var.aval.ndim
        if nchw and v.const is not None and 0 < rank < 4:  # aligned on NHWC's last axis: made rank 4 first
            v, rank = _Value(const=v.const.reshape((1,) * (4 - rank) + v.const.shape)), 4
        elif nchw and 0 < rank < 4:
            raise NotImplementedError(f"ONNX export: {name} of a rank-{rank} and a rank-4 tensor")
        operands.append(graph.tensor(v, nchw if rank == 4 else None))
    return _Value(graph.one(_BINARY[name], operands), nchw=nchw)


def _conv(graph: _Graph, eqn: Any, x: _Value, w: _Value) -> _Value:
    p = eqn.params
    numbers = p["dimension_numbers"]
    if any(d != 1 for d in p["lhs_dilation"]) or p["batch_group_count"] != 1:
        raise NotImplementedError("ONNX export: transposed or batch-grouped convolutions are not supported")
    if tuple(numbers.lhs_spec) != _NCHW or tuple(numbers.out_spec) != _NCHW:
        raise NotImplementedError("ONNX export: convolutions over NHWC images only")
    kernel = _Value(const=w.const.transpose(numbers.rhs_spec)) if w.const is not None else None
    weight = graph.tensor(kernel) if kernel else graph.one("Transpose", [w.name], perm=list(numbers.rhs_spec))
    pads = [lo for lo, _ in p["padding"]] + [hi for _, hi in p["padding"]]
    y = graph.one("Conv", [graph.tensor(x, nchw=True), weight], strides=list(p["window_strides"]), pads=pads,
                  dilations=list(p["rhs_dilation"]), group=p["feature_group_count"])  # fmt: skip
    return _Value(y, nchw=True)


def _pool(graph: _Graph, eqn: Any, x: _Value) -> _Value:
    """reduce_window max/sum over H and W of an NHWC map: MaxPool, or AveragePool counting pads x size."""
    p = eqn.params
    window, strides, padding = p["window_dimensions"], p["window_strides"], p["padding"]
    trivial = all(window[d] == 1 and strides[d] == 1 and tuple(padding[d]) == (0, 0) for d in (0, 3))
    if len(window) != 4 or not trivial or any(d != 1 for d in (*p["base_dilation"], *p["window_dilation"])):
        raise NotImplementedError(f"ONNX export: {eqn.primitive.name} is supported over H and W of NHWC only")
    attributes = {"kernel_shape": list(window[1:3]), "strides": list(strides[1:3]),
                  "pads": [padding[1][0], padding[2][0], padding[1][1], padding[2][1]]}  # fmt: skip
    stored = graph.tensor(x, nchw=True)
    if eqn.primitive.name == "reduce_window_max":
        return _Value(graph.one("MaxPool", [stored], **attributes), nchw=True)
    mean = graph.one("AveragePool", [stored], count_include_pad=1, **attributes)
    size = float(window[1] * window[2])
    total = graph.one("Mul", [mean, graph.const(np.float32(size))])
    return _Value(total, nchw=True, scaled=(mean, size))


def _mean_or_sum(graph: _Graph, eqn: Any, x: _Value) -> _Value:
    """reduce_sum over H and W of an NHWC map: GlobalAveragePool (then x H*W, which the mean's division
    undoes); other sums as ReduceSum over the stored axes."""
    axes = tuple(eqn.params["axes"])
    shape = eqn.invars[0].aval.shape
    if x.nchw and axes == (1, 2) and eqn.outvars[0].aval.ndim == 2:
        pooled = graph.one("GlobalAveragePool", [x.name])
        mean = graph.one("Flatten", [pooled], axis=1)
        size = float(shape[1] * shape[2])
        return _Value(graph.one("Mul", [mean, graph.const(np.float32(size))]), scaled=(mean, size))
    reduced = graph.one("ReduceSum", [graph.tensor(x, nchw=False), graph.const(np.array(axes, np.int64))], keepdims=0)
    return _Value(reduced)


def _translate(graph: _Graph, eqn: Any, values: list[_Value], uses: Counter) -> list[_Value]:
    name, p = eqn.primitive.name, eqn.params
    if name in _BINARY:
        return [_elementwise(graph, eqn, values, uses)]
    (x, *_) = values
    if name == "convert_element_type":
        if np.dtype(p["new_dtype"]) == np.dtype(eqn.invars[0].aval.dtype):
            return [x]
        target = graph.onnx.helper.np_dtype_to_tensor_dtype(np.dtype(p["new_dtype"]))
        return [_Value(graph.one("Cast", [graph.tensor(x)], to=target), nchw=x.nchw)]
    if name == "conv_general_dilated":
        return [_conv(graph, eqn, *values)]
    if name in ("reduce_window_max", "reduce_window_sum"):
        return [_pool(graph, eqn, x)]
    if name == "split":
        sizes = graph.const(np.array([int(s) for s in p["sizes"]], np.int64))
        outputs = graph.node("Split", [graph.tensor(x), sizes], outputs=len(p["sizes"]), axis=x.axis(p["axis"]))
        return [_Value(o, nchw=x.nchw) for o in outputs]
    if name == "concatenate":
        nchw = any(v.nchw for v in values)
        inputs = [graph.tensor(v, nchw) for v in values]
        return [_Value(graph.one("Concat", inputs, axis=_NCHW.index(p["dimension"]) if nchw else p["dimension"]),
                       nchw=nchw)]  # fmt: skip
    if name == "reduce_sum":
        return [_mean_or_sum(graph, eqn, x)]
    if name == "squeeze":
        dims = p["dimensions"]
        if x.nchw:  # a (N, 1, 1, C) map: stored (N, C, 1, 1)
            dims = [x.axis(d) for d in dims]
            if sorted(dims) != [2, 3]:
                raise NotImplementedError("ONNX export: squeeze of a map's channel axis")
        return [_Value(graph.one("Squeeze", [graph.tensor(x), graph.const(np.array(dims, np.int64))]))]
    if name == "broadcast_in_dim":
        return [_broadcast(graph, eqn, x)]
    if name == "reshape":
        if p.get("dimensions") is not None:
            raise NotImplementedError("ONNX export: reshape with a dimension order is not supported")
        target = [d if isinstance(d, int) else -1 for d in p["new_sizes"]]
        if target.count(-1) > 1:
            raise NotImplementedError("ONNX export: a reshape with two symbolic dimensions is not supported")
        if len(target) == 4 and target[1:3] == [1, 1] and eqn.invars[0].aval.ndim == 2:  # (N, C) -> a 1x1 map
            return [_reshaped_to_map(graph, x, target[3])]
        return [_Value(graph.one("Reshape", [graph.tensor(x, nchw=False), graph.const(np.array(target, np.int64))]))]
    if name == "dot_general":
        (lhs_contract, rhs_contract), batch = p["dimension_numbers"]
        lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
        if any(batch) or tuple(lhs_contract) != (lhs.ndim - 1,) or tuple(rhs_contract) != (0,) or rhs.ndim != 2:
            raise NotImplementedError("ONNX export: only x @ W products (contracting x's last axis) are supported")
        if lhs.ndim == 4 and values[1].const is not None:  # a 1x1 convolution (layers.pointwise_product)
            kernel = graph.const(values[1].const.T[:, :, None, None])
            return [_Value(graph.one("Conv", [graph.tensor(x, nchw=True), kernel]), nchw=True)]
        return [_Value(graph.one("MatMul", [graph.tensor(v, nchw=False) for v in values]))]
    raise NotImplementedError(f"ONNX export: no translation for the JAX primitive {name!r}")


def _reshaped_to_map(graph: _Graph, x: _Value, channels: int) -> _Value:
    """(N, C) as a 1x1 map, stored (N, C, 1, 1): the same data; a scaled mean stays undoable."""
    shape = graph.const(np.array([-1, channels, 1, 1], np.int64))
    out = _Value(graph.one("Reshape", [x.name, shape]), nchw=True)
    if x.scaled:
        mean = graph.one("Reshape", [x.scaled[0], shape])
        out.scaled = (mean, x.scaled[1])
    return out


def _broadcast(graph: _Graph, eqn: Any, x: _Value) -> _Value:
    """Broadcasting of an image-dependent tensor: Reshape to the target rank, then Expand (a symbolic
    target dimension stays 1 and broadcasts later)."""
    shape, kept = eqn.params["shape"], eqn.params["broadcast_dimensions"]
    ranked = [1] * len(shape)
    for source, target in enumerate(kept):
        ranked[target] = eqn.invars[0].aval.shape[source]
    dims = [d if isinstance(d, int) else -1 for d in ranked]
    reshaped = graph.one("Reshape", [graph.tensor(x, nchw=False), graph.const(np.array(dims, np.int64))])
    full = [d if isinstance(d, int) else 1 for d in shape]
    return _Value(graph.one("Expand", [reshaped, graph.const(np.array(full, np.int64))]))


def _known(eqn: Any, values: list[_Value]) -> list[_Value] | None:
    """An equation whose inputs are all known arrays, computed here (a symbolic batch dimension in its
    output shape becomes 1, which broadcasts): None if it cannot be."""
    if any(v.const is None for v in values):
        return None
    params = dict(eqn.params)
    if eqn.primitive.name == "broadcast_in_dim":
        params["shape"] = tuple(d if isinstance(d, int) else 1 for d in params["shape"])
        params["sharding"] = None
    try:
        out = eqn.primitive.bind(*[jnp.asarray(v.const) for v in values], **params)
    except Exception:  # a primitive that needs the symbolic shape: write it as a node
        return None
    outs = out if eqn.primitive.multiple_results else [out]
    return [_Value(const=np.asarray(o)) for o in outs]


def _emit(graph: _Graph, closed: ClosedJaxpr, inputs: list[_Value]) -> list[_Value]:
    """Appends a jaxpr's equations to the graph (sub-jaxprs of jit and custom_jvp inlined)."""
    jaxpr = closed.jaxpr
    values = {var: _Value(const=np.asarray(c)) for var, c in zip(jaxpr.constvars, closed.consts, strict=True)}
    values.update(zip(jaxpr.invars, inputs, strict=True))
    uses = Counter(v for eqn in jaxpr.eqns for v in eqn.invars if not isinstance(v, Literal))
    uses.update(v for v in jaxpr.outvars if not isinstance(v, Literal))

    def value_of(atom: Any) -> _Value:
        if isinstance(atom, Literal):
            return _Value(const=np.asarray(atom.val, atom.aval.dtype))
        return values[atom]

    for eqn in jaxpr.eqns:
        operands = [value_of(v) for v in eqn.invars]
        inner = eqn.params.get("jaxpr") if eqn.primitive.name in ("jit", "pjit") else eqn.params.get("call_jaxpr")
        if eqn.primitive.name in ("jit", "pjit", "custom_jvp_call"):
            outputs = _emit(graph, inner, operands)
        else:
            outputs = _known(eqn, operands) or _translate(graph, eqn, operands, uses)
        values.update(zip(eqn.outvars, outputs, strict=True))
    return [value_of(v) for v in jaxpr.outvars]


def check_opset(opset: int) -> None:
    """Refuses an opset the graph cannot be written in, before anything is computed."""
    newest = _require("onnx").defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise InvalidInputError(f"--opset={opset} is not one the graph can be written in: choose {MIN_OPSET} to "
                                f"{newest} (the installed onnx's newest; default {OPSET})")  # fmt: skip


def export_onnx(
    model: nn.Module,
    variables: Any,
    image_size: int,
    path: str | os.PathLike,
    opset: int = OPSET,
    nchw: bool = False,
) -> None:
    """Writes the inference function (normalised float32 `images`, any batch -> float32 `logits`) as an
    ONNX model with BatchNorm folded and the weights as initializers. `images` is NHWC
    (batch, size, size, channels), or NCHW (batch, channels, size, size) with `nchw`, as timm's export."""
    onnx = _require("onnx")
    check_opset(opset)
    new_output_path(path)  # refused before the translation, which takes a while
    model, variables = fold_batch_norm(model, variables)
    leaves, tree = jax.tree.flatten(variables)
    (batch,) = jax.export.symbolic_shape("batch")
    channels = model.in_chans
    images = jax.ShapeDtypeStruct((batch, image_size, image_size, channels), jnp.float32)

    def logits(leaves: list[jax.Array], images: jax.Array) -> jax.Array:
        return model.apply(jax.tree.unflatten(tree, leaves), images, train=False).astype(jnp.float32)

    shapes = [jax.ShapeDtypeStruct(np.shape(x), jnp.float32) for x in leaves]
    closed = jax.make_jaxpr(logits)(shapes, images)
    graph = _Graph()
    weights = [_Value(const=np.asarray(leaf, np.float32)) for leaf in leaves]
    (output,) = _emit(graph, closed, [*weights, _Value("images", nchw=nchw)])
    graph.nodes.append(onnx.helper.make_node("Identity", [graph.tensor(output)], ["logits"]))
    graph.prune("logits")
    float32 = onnx.TensorProto.FLOAT
    shape = ["batch", channels, image_size, image_size] if nchw else ["batch", image_size, image_size, channels]
    onnx_graph = onnx.helper.make_graph(
        graph.nodes,
        "res2net",
        [onnx.helper.make_tensor_value_info("images", float32, shape)],
        [onnx.helper.make_tensor_value_info("logits", float32, ["batch", closed.out_avals[0].shape[-1]])],
        graph.initializers,
    )
    onnx_model = onnx.helper.make_model(onnx_graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    onnx.checker.check_model(onnx_model)
    with atomic_output(path) as staged:
        onnx.save(onnx_model, staged)


def load_onnx(path: str | os.PathLike) -> Callable[[np.ndarray], np.ndarray]:
    """An onnxruntime session over the exported file, as a function of the images."""
    session = _require("onnxruntime").InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    return lambda images: session.run(["logits"], {"images": np.asarray(images, np.float32)})[0]
