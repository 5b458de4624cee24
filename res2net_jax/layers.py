"""Layers whose semantics must match PyTorch exactly for converted weights to give the same logits."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any


def accumulation_dtype(dtype: Dtype) -> Dtype:
    """float32 for float32/bfloat16 compute; float64 stays float64 (numerical verification)."""
    return jnp.promote_types(dtype, jnp.float32)


# timm initialises convolutions with Kaiming-normal, fan-out, ReLU gain.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def pointwise_product(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
    *,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
) -> jax.Array:
    """`lax.conv_general_dilated` of NHWC images with a 1x1 HWIO kernel, unit strides and one group (the
    arguments flax's `nn.Conv` passes), computed as a matrix product over the channels: the same sums,
    which XLA:CPU runs faster than the convolution (NOTES.md)."""
    layout = tuple(tuple(spec) for spec in dimension_numbers)
    pointwise = (
        rhs.shape[:2] == (1, 1) and feature_group_count == 1 and layout == ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
    )
    unit = all(tuple(s) == (1, 1) for s in (window_strides, lhs_dilation or (1, 1))) and all(
        tuple(p) == (0, 0) for p in padding
    )
    if not (pointwise and unit):
        raise ValueError("pointwise_product computes unit-stride, unpadded 1x1 convolutions of NHWC images only")
    return lax.dot_general(lhs, rhs.reshape(rhs.shape[2:]), (((3,), (0,)), ((), ())), precision=precision)


def pytorch_conv(
    features: int,
    kernel: int,
    *,
    stride: int = 1,
    dilation: int = 1,
    groups: int = 1,
    bias: bool = False,
    dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.Conv:
    """A PyTorch-style convolution: symmetric padding of dilation x (kernel // 2) on every side.

    Flax's 'SAME' pads (0, 1) at stride 2, PyTorch pads (1, 1): the weights expect the latter. A stride-1
    1x1 convolution with one group is computed as a matrix product (`pointwise_product`), same kernel.
    """
    pad = dilation * (kernel // 2)
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        kernel_dilation=(dilation, dilation),
        padding=((pad, pad), (pad, pad)),
        feature_group_count=groups,
        use_bias=bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=conv_init,
        conv_general_dilated=pointwise_product if (kernel, stride, groups) == (1, 1, 1) else None,
        name=name,
    )


class BatchNorm(nn.Module):
    """Batch normalisation with PyTorch's semantics (eps 1e-5, momentum 0.1 in PyTorch's convention).

    Statistics are computed in float32 (or float64) whatever the compute dtype, with the two-pass variance. In train
    mode the running variance is updated with the unbiased batch variance, as PyTorch does, so running
    statistics after a train step equal PyTorch's. With `axis_name` set, batch statistics are averaged
    over that mapped axis (synchronised BN in a data-parallel step).
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    axis_name: str | None = None
    scale_init: nn.initializers.Initializer = nn.initializers.ones
    folded: bool = False  # inference with BN folded into the convolution before it: only its shift is left

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        channels = x.shape[-1]
        if self.folded:
            if train:
                raise ValueError("a model with fold_bn=True is for inference: train the model without it")
            return x + self.param("bias", nn.initializers.zeros, (channels,), jnp.float32).astype(self.dtype)
        scale = self.param("scale", self.scale_init, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
        acc = accumulation_dtype(self.dtype)
        xf = x.astype(acc)
        if train:
            mean, var = self._batch_moments(xf, tuple(range(x.ndim - 1)))
            if not self.is_initializing():
                count = xf.size // channels
                if self.axis_name is not None:
                    count = count * lax.psum(1, self.axis_name)
                unbiased_var = var * (count / max(count - 1, 1))
                running_mean.value = self.momentum * running_mean.value.astype(acc) + (1 - self.momentum) * mean
                running_var.value = self.momentum * running_var.value.astype(acc) + (1 - self.momentum) * unbiased_var
        else:
            mean, var = running_mean.value, running_var.value
        y = (xf - mean) * (scale * lax.rsqrt(var + self.epsilon)) + bias
        return y.astype(self.dtype)

    def _batch_moments(self, x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
        """Mean and biased variance over `axes`, the variance in two passes (mean squared deviation from
        the mean), which keeps its rounding error independent of the mean's size."""
        mean = self._mean(x, axes)
        return mean, self._mean(jnp.square(x - mean), axes)

    def _mean(self, x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
        mean = jnp.mean(x, axis=axes)
        if self.axis_name is not None:
            mean = lax.pmean(mean, self.axis_name)
        return mean


class DropPath(nn.Module):
    """Stochastic depth on a residual branch, as timm's DropPath: in training each example's branch is
    zeroed with probability `rate` and kept ones are scaled by 1 / (1 - rate); identity in eval mode.
    Draws from the 'dropout' RNG stream."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if not train or self.rate == 0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return x * (mask / keep if keep > 0 else mask).astype(x.dtype)


def _pool(x: jax.Array, init: float, op: Any, window: int, stride: int, padding: list) -> jax.Array:
    # A Python-scalar init lets JAX recognise the max/add monoid, which has a gradient.
    return lax.reduce_window(x, init, op, (1, window, window, 1), (1, stride, stride, 1), [(0, 0), *padding, (0, 0)])


def max_pool(x: jax.Array, window: int, stride: int, pad: int) -> jax.Array:
    """PyTorch MaxPool2d(window, stride, padding=pad), floor mode: padding never wins the max."""
    return _pool(x, -jnp.inf, lax.max, window, stride, [(pad, pad), (pad, pad)])


def avg_pool_include_pad(x: jax.Array, window: int, stride: int, pad: int) -> jax.Array:
    """PyTorch AvgPool2d(window, stride, padding=pad) with count_include_pad=True, floor mode."""
    summed = _pool(x, 0.0, lax.add, window, stride, [(pad, pad), (pad, pad)])
    return summed / (window * window)


def avg_pool_2x2_same(x: jax.Array) -> jax.Array:
    """timm's AvgPool2dSame(2, stride=1): zeros padded after the last row and column, each 2x2 window
    divided by 4 (the padded zeros count). Dilated v1b stages use it in place of a strided pool."""
    return _pool(x, 0.0, lax.add, 2, 1, [(0, 1), (0, 1)]) / 4


def avg_pool_ceil_exclude_pad(x: jax.Array, window: int) -> jax.Array:
    """PyTorch AvgPool2d(window, window, ceil_mode=True, count_include_pad=False).

    An odd-sized input keeps a last, partial window that averages only the pixels it covers.
    """
    padding = [(0, -size % window) for size in x.shape[1:3]]
    summed = _pool(x, 0.0, lax.add, window, window, padding)
    ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
    counts = _pool(ones, 0.0, lax.add, window, window, padding)
    return summed / counts
