"""XLA compile options for the package's jitted functions (train and eval steps, the inference function).

On CPU, XLA's own matrix products, and the 1x1 convolutions it rewrites into them, are slow; with its
YNNPACK dot fusions on, the train step runs about 1.7x faster and inference 1.4x faster on the 2-core
EPYC, as accurate against float64 as without them (experiments/NOTES.md). The option is experimental in
XLA: where this jaxlib does not know it, and on other backends, nothing is set.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_CPU = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


@functools.cache
def _cpu_takes_options() -> bool:
    """Whether this XLA compiles with `_CPU` (a tiny product, compiled once per process)."""
    ones = jnp.ones((2, 2), jnp.float32)
    try:
        jax.jit(jnp.dot, compiler_options=_CPU).lower(ones, ones).compile()
    except jax.errors.JaxRuntimeError:  # "No such compile option" or an unknown enum value: a newer XLA
        return False
    return True


def compiler_options() -> dict[str, str]:
    """The options for `jax.jit(..., compiler_options=...)` on JAX's default backend: {} but on CPU."""
    if jax.default_backend() != "cpu" or not _cpu_takes_options():
        return {}
    return dict(_CPU)
