"""One 3x3 convolution, forward and with its gradients, in JAX (jit) and PyTorch on the same device.

    PYTHONPATH=. python experiments/conv_probe.py --out=experiments/results/conv_probe_cpu.json

It isolates where a whole-network gap between the frameworks comes from: the convolutions
themselves (the backend's kernels) or the network around them. Shapes are Res2Net-50's: a
26-channel branch of layer1, a 104-channel branch of layer4's width at layer1's resolution, and the
stem's 64 channels at 112 px; batch --batch, NHWC (PyTorch channels_last), float32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import report
from absl import app, flags

from res2net_jax import cli

_BATCH = flags.DEFINE_integer("batch", 16, "Images per call.")
_SHAPES = flags.DEFINE_list("shapes", ["26x56", "104x56", "64x112"], "CHANNELSxSIZE of each convolution.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per figure, after one untimed call.")
_OUT = flags.DEFINE_string("out", None, "The JSON file to write (never overwritten).", required=True)


def _ms(fn: Callable[[], Any], sync: Callable[[Any], Any]) -> float:
    return 1000 * report.seconds_per_call(fn, sync, _REPEATS.value)


def _measure(channels: int, size: int) -> dict[str, float]:
    import jax
    import jax.numpy as jnp
    import torch

    batch = _BATCH.value
    x, w = jnp.ones((batch, size, size, channels)), jnp.full((3, 3, channels, channels), 0.01)

    def conv(x: jax.Array, w: jax.Array) -> jax.Array:
        return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))

    forward = jax.jit(conv)
    gradients = jax.jit(jax.grad(lambda x, w: conv(x, w).sum(), argnums=(0, 1)))
    xt = torch.ones(batch, channels, size, size).contiguous(memory_format=torch.channels_last).requires_grad_()
    wt = torch.full((channels, channels, 3, 3), 0.01, requires_grad=True)

    def torch_forward() -> torch.Tensor:
        with torch.no_grad():
            return torch.nn.functional.conv2d(xt, wt, padding=1)

    def torch_gradients() -> torch.Tensor:
        xt.grad = wt.grad = None
        torch.nn.functional.conv2d(xt, wt, padding=1).sum().backward()
        return wt.grad

    return {
        "jax_forward_ms": _ms(lambda: forward(x, w), jax.block_until_ready),
        "torch_forward_ms": _ms(torch_forward, lambda out: out),
        "jax_forward_backward_ms": _ms(lambda: gradients(x, w), jax.block_until_ready),
        "torch_forward_backward_ms": _ms(torch_gradients, lambda out: out),
    }


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    report.refuse_existing(_OUT.value)
    shapes = {}
    for shape in _SHAPES.value:
        channels, size = (int(n) for n in shape.split("x"))
        shapes[shape] = _measure(channels, size)
        print(shape, {k: round(v, 1) for k, v in shapes[shape].items()}, flush=True)
    settings = {"batch": _BATCH.value, "repeats": _REPEATS.value, "dtype": "float32", "layout": "NHWC"}
    report.write(_OUT.value, ("jax", "jaxlib", "torch"), settings, shapes=shapes)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
