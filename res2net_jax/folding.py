"""BatchNorm folded into the convolution before it, for inference.

In eval mode a BN is an affine map per channel, y = (x - mean) * s + beta with s = gamma / sqrt(var + eps);
after a convolution it folds into it: the kernel's output channels scaled by s, and a bias
beta - mean * s. Every BN of these networks follows a convolution directly, so the folded network
computes the same logits with no BN left: an exported graph holds a convolution with bias where it held
five arithmetic nodes, which runtimes that do not fuse BN would run as passes of their own (XLA:CPU
fuses it into the convolution either way: folded and unfolded jit run at the same speed there).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from res2net_jax.layers import BatchNorm

_TRACE_SIZE = 64  # any input size the networks take (DLA: a multiple of 32) reaches every layer


def conv_of_each_bn(model: nn.Module, variables: Any) -> dict[tuple[str, ...], tuple[tuple[str, ...], float]]:
    """Each BN's module path -> (the path of the convolution whose output it normalises, its epsilon),
    found by tracing the eval-mode forward pass (no computation). A BN whose input is not a
    convolution's output is an error: it could not be folded."""
    produced: dict[int, tuple[Any, tuple[str, ...]]] = {}  # id -> (the output, kept alive; the conv's path)
    pairs: dict[tuple[str, ...], tuple[tuple[str, ...], float]] = {}

    def record(next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and isinstance(context.module, nn.Conv):
            produced[id(out)] = (out, tuple(context.module.scope.path))
        elif context.method_name == "__call__" and isinstance(context.module, BatchNorm):
            path = tuple(context.module.scope.path)
            if id(args[0]) not in produced:
                raise ValueError(f"BatchNorm {'/'.join(path)} does not follow a convolution: it cannot be folded")
            pairs[path] = (produced[id(args[0])][1], context.module.epsilon)
        return out

    images = jax.ShapeDtypeStruct((1, _TRACE_SIZE, _TRACE_SIZE, model.in_chans), jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
    return pairs


def fold_batch_norm(model: nn.Module, variables: Any) -> tuple[nn.Module, dict]:
    """The same network with every BN folded into its convolution (`fold_bn=True`, inference only) and its
    variables: kernels scaled per output channel, each BN left with its shift as `bias`, no batch_stats.
    Computed in float64 from the float32 variables and stored as float32, so the folded network's
    logits equal the unfolded one's to float32 rounding; a bfloat16 model casts them as it computes.
    The variables are returned as JAX arrays on the default device: NumPy arrays passed to a jitted
    function are copied to the device on every call (a tenth of a batch-1 call of res2net50d on 2 CPU
    cores, measured). A folded model and its variables are returned as they are."""
    if model.fold_bn:
        return model, variables
    pairs = conv_of_each_bn(model, variables)
    params = {k: np.asarray(v) for k, v in flatten_dict(variables["params"]).items()}
    stats = {k: np.asarray(v) for k, v in flatten_dict(variables["batch_stats"]).items()}
    for bn, (conv, epsilon) in pairs.items():
        scale = params.pop((*bn, "scale")).astype(np.float64)
        shift = params[(*bn, "bias")].astype(np.float64)
        mean, var = stats[(*bn, "mean")].astype(np.float64), stats[(*bn, "var")].astype(np.float64)
        factor = scale / np.sqrt(var + epsilon)
        kernel = params[(*conv, "kernel")]
        params[(*conv, "kernel")] = (kernel.astype(np.float64) * factor).astype(kernel.dtype)
        params[(*bn, "bias")] = (shift - mean * factor).astype(np.float32)
    return model.clone(fold_bn=True), {"params": jax.device_put(unflatten_dict(params))}
