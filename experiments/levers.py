"""Candidate optimisations of res2net_jax's train step, applied from outside the package for A/B timing.

    PYTHONPATH=. python experiments/benchmark.py --models=res2net50 \\
        --modes=jit,jit:pad_branches,jit:bn_one_pass --out=experiments/results/CARD_levers.json

Each lever is a Flax method interceptor (`flax.linen.intercept_methods`) that changes how some
modules compute, never what: the parameters and the results stay those of the plain model (tested
on the CPU, tests/test_experiments.py), so a lever that measures faster on a card can move into the
package as it is.
benchmark.py runs each `jit:LEVER` mode in its own process beside plain `jit`, so the ratios come
from one run on one card (experiments/NOTES.md has the predictions).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from res2net_jax.layers import BatchNorm

Interceptor = Callable[[Callable[..., Any], tuple, dict, Any], Any]
CHANNEL_MULTIPLE = 8  # tensor-core tiles take channel counts in multiples of 8 (bfloat16)


def pad_branches(next_fun: Callable[..., Any], args: tuple, kwargs: dict, context: Any) -> Any:
    """The 3x3 branch convolutions (26, 52, 104, 208 channels in Res2Net-50) computed on channels
    zero-padded to a multiple of 8, the output sliced back: the same sums, plus zeros."""
    module = context.module
    if not (
        isinstance(module, nn.Conv)
        and context.method_name == "__call__"
        and (module.name or "").startswith("convs_")
        and module.feature_group_count == 1
        and not module.is_initializing()
    ):
        return next_fun(*args, **kwargs)
    (x,) = args
    kernel = module.get_variable("params", "kernel")
    pad_in, pad_out = -x.shape[-1] % CHANNEL_MULTIPLE, -module.features % CHANNEL_MULTIPLE
    if not (pad_in or pad_out):
        return next_fun(*args, **kwargs)
    dtype = module.dtype or x.dtype
    x = jnp.pad(x, [(0, 0), (0, 0), (0, 0), (0, pad_in)]).astype(dtype)
    kernel = jnp.pad(kernel, [(0, 0), (0, 0), (0, pad_in), (0, pad_out)]).astype(dtype)
    y = lax.conv_general_dilated(x, kernel, module.strides, module.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y[..., : module.features]


def bn_one_pass(next_fun: Callable[..., Any], args: tuple, kwargs: dict, context: Any) -> Any:
    """Batch statistics from one read of the activations: E[x] and E[x^2] are sibling reductions of the
    same input, which XLA can fuse; variance E[x^2] - E[x]^2 in float32, against the package's two passes."""
    module = context.module
    if not (isinstance(module, BatchNorm) and context.method_name == "_batch_moments"):
        return next_fun(*args, **kwargs)
    x, axes = args
    mean, mean_square = module._mean(x, axes), module._mean(jnp.square(x), axes)
    return mean, jnp.maximum(mean_square - jnp.square(mean), 0.0)


LEVERS: dict[str, Interceptor] = {"pad_branches": pad_branches, "bn_one_pass": bn_one_pass}


@contextlib.contextmanager
def applied(name: str) -> Iterator[None]:
    """The lever `name` in effect for the modules traced inside. JAX caches a function's trace, so only
    functions first traced inside are changed."""
    if name not in LEVERS:
        raise ValueError(f"unknown lever {name!r}: choose from {', '.join(LEVERS)}")
    with nn.intercept_methods(LEVERS[name]):
        yield


if __name__ == "__main__":  # a module the scripts import: run, it says what it is
    print(__doc__)
