"""Res2Net, Res2NeXt and DLA-Res2Net as Flax Linen modules.

Submodule names follow the PyTorch reference (timm / official Res2Net) so that every converted
weight has one obvious home: PyTorch `layer1.0.convs.2.weight` lives at Flax
`params/layer1_0/convs_2/kernel` (a numeric path component joins its parent with '_').
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from res2net_jax.errors import InvalidInputError
from res2net_jax.layers import (
    BatchNorm,
    DropPath,
    accumulation_dtype,
    avg_pool_2x2_same,
    avg_pool_ceil_exclude_pad,
    avg_pool_include_pad,
    max_pool,
    pytorch_conv,
)

Dtype = Any


def _check_images(x: jax.Array, channels: int, multiple: int = 1) -> None:
    if x.ndim != 4 or x.shape[-1] != channels:
        hint = " (NCHW? transpose to NHWC)" if x.ndim == 4 and x.shape[1] == channels else ""
        raise ValueError(f"expected NHWC images with {channels} channels (in_chans), got shape {x.shape}{hint}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"expected normalised float images, got {x.dtype}; res2net_jax.make_predict_fn preprocesses uint8 images"
        )
    height, width = x.shape[1:3]
    if height < 32 or width < 32 or height % multiple or width % multiple:
        rule = f"divisible by {multiple}" if multiple > 1 else "at least 32 px"
        raise ValueError(f"image size {height}x{width} is not supported: height and width must be {rule}")


class Bottle2neck(nn.Module):
    """The hierarchical split-and-add bottleneck.

    1x1 conv to `width * scale` channels, split into `scale` groups; group i > 1 is added to the
    previous branch's output before its 3x3 conv (except in a stage's first block, where every branch
    sees only its own group and the last group is average-pooled); concat, 1x1 conv, residual add.
    `shortcut` is 'identity', 'conv' (1x1 conv with stride + BN) or 'avg_conv' (2x2 average pool
    when strided, then 1x1 conv + BN; in a dilated stage timm's stride-1 'same' 2x2 pool); DLA passes
    its residual in instead. `dilation` dilates the 3x3 convolutions (a dilated backbone, as timm's).
    `drop_path` is the stochastic-depth rate of the residual branch (after bn3, before the add, as timm's).
    """

    width: int
    out_features: int
    scale: int = 4
    cardinality: int = 1
    stride: int = 1
    dilation: int = 1
    pool_dilated: bool = False
    first: bool = False
    shortcut: str = "identity"
    drop_path: float = 0.0
    conv: Callable[..., nn.Conv] = pytorch_conv  # the network's convolution and BN, configured once
    norm: Callable[..., BatchNorm] = BatchNorm

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, residual: jax.Array | None = None) -> jax.Array:
        out = self.conv(self.width * self.scale, 1, name="conv1")(x)
        out = nn.relu(self.norm(name="bn1")(out, train))
        splits = jnp.split(out, self.scale, axis=-1) if self.scale > 1 else [out]
        branches = []
        for i in range(max(1, self.scale - 1)):
            branch_in = splits[i] if i == 0 or self.first else branches[-1] + splits[i]
            y = self.conv(
                self.width, 3, stride=self.stride, dilation=self.dilation, groups=self.cardinality, name=f"convs_{i}"
            )(branch_in)
            branches.append(nn.relu(self.norm(name=f"bns_{i}")(y, train)))
        if self.scale > 1:
            last = splits[-1]
            branches.append(avg_pool_include_pad(last, 3, self.stride, 1) if self.first else last)
        out = jnp.concatenate(branches, axis=-1)
        out = self.conv(self.out_features, 1, name="conv3")(out)
        out = self.norm(name="bn3", scale_init=nn.initializers.zeros)(out, train)
        out = DropPath(self.drop_path, name="drop_path")(out, train)
        if residual is None:
            residual = self._shortcut(x, train)
        return nn.relu(out + residual)

    def _shortcut(self, x: jax.Array, train: bool) -> jax.Array:
        if self.shortcut == "identity":
            return x
        if self.shortcut == "conv":
            y = self.conv(self.out_features, 1, stride=self.stride, name="downsample_0")(x)
            return self.norm(name="downsample_1")(y, train)
        if self.shortcut == "avg_conv":
            if self.stride > 1:
                x = avg_pool_ceil_exclude_pad(x, self.stride)
            elif self.pool_dilated:
                x = avg_pool_2x2_same(x)
            y = self.conv(self.out_features, 1, name="downsample_1")(x)
            return self.norm(name="downsample_2")(y, train)
        raise ValueError(f"unknown shortcut {self.shortcut!r}: use 'identity', 'conv' or 'avg_conv'")


STEM_INDEX = 0  # timm's feature index of the stem's output (before the max pool), stride 2


def _feature_dicts(all_features: list[dict[str, Any]], out_indices: Sequence[int], name: str) -> list[dict[str, Any]]:
    """timm's feature_info dicts of `out_indices`; an index the network does not have is an error."""
    known = [f["index"] for f in all_features]
    unknown = [i for i in out_indices if i not in known]
    if unknown:
        raise InvalidInputError(f"{name} has no feature index {unknown}: its indices are {known}")
    return [all_features[known.index(i)] for i in out_indices]


def _layer_factories(network: nn.Module) -> dict[str, Callable[..., nn.Module]]:
    """The network's convolution (compute dtype) and BatchNorm (compute dtype, synchronised axis, folded for
    inference), configured once and handed to its blocks as the fields `conv` and `norm`."""
    return {
        "conv": functools.partial(pytorch_conv, dtype=network.dtype),
        "norm": functools.partial(BatchNorm, dtype=network.dtype, axis_name=network.axis_name, folded=network.fold_bn),
    }


def _block_class(remat: bool) -> type[Bottle2neck]:
    """Bottle2neck, or with `remat` the same block under `nn.remat` (gradient checkpointing: its
    activations are recomputed in the backward pass instead of kept); `train` is static."""
    return nn.remat(Bottle2neck, static_argnums=(2,)) if remat else Bottle2neck


class _Backbone(nn.Module):
    """What Res2Net and DLA share as timm-style backbones: the fields below (keyword-only), and the
    feature and head methods. Each network provides the field `out_indices`, `_all_features()` (timm's
    feature_info dicts of every map, the last the classifier's input), `_maps(x, train, out_indices)`
    and `forward_head`."""

    num_classes: int = dataclasses.field(default=1000, kw_only=True)
    in_chans: int = dataclasses.field(default=3, kw_only=True)
    features_only: bool = dataclasses.field(default=False, kw_only=True)
    output_stride: int = dataclasses.field(default=32, kw_only=True)
    drop_rate: float = dataclasses.field(default=0.0, kw_only=True)
    remat: bool = dataclasses.field(default=False, kw_only=True)
    fold_bn: bool = dataclasses.field(default=False, kw_only=True)
    dtype: Dtype = dataclasses.field(default=jnp.float32, kw_only=True)
    axis_name: str | None = dataclasses.field(default=None, kw_only=True)

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """Channels, stride, timm module name and index of each map `features` returns."""
        return _feature_dicts(self._all_features(), self.out_indices, type(self).__name__)

    def features(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, ...]:
        """The maps of `out_indices` (timm's indexing), for backbone use."""
        return self._maps(x, train, self.out_indices)

    def forward_features(self, x: jax.Array, train: bool = False) -> jax.Array:
        """The last map, the classifier's input (timm's forward_features)."""
        return self._maps(x, train, (self._all_features()[-1]["index"],))[0]

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array | tuple[jax.Array, ...]:
        """Logits (float32) for NHWC images normalised with the ImageNet mean and std; the feature maps
        of `out_indices` if `features_only`. Training (`train=True`) with `drop_rate` or `drop_path_rate`
        draws from the 'dropout' RNG stream."""
        if self.features_only:
            return self.features(x, train)
        return self.forward_head(self.forward_features(x, train), train=train)


class Res2Net(_Backbone):
    """Res2Net / Res2NeXt on the ResNet layout.

    v1: 7x7/2 stem and 1x1 strided-conv shortcuts. v1b ("d"): `deep_stem` (three 3x3 convs, 32-32-64)
    and `avg_down` shortcuts (2x2 average pool, then a stride-1 1x1 conv).

    Backbone use, as timm builds it: `features_only` returns the maps of `out_indices` (0: the stem at
    stride 2; 1-4: the stages) instead of logits, and `output_stride` 16 or 8 replaces the last one or
    two stages' stride by dilation. `num_classes=0` returns the pooled features; `in_chans` sets the
    input's channel count.

    Fine-tuning, as timm's: `drop_rate` is dropout on the pooled features, `drop_path_rate` stochastic
    depth rising linearly from 0 at the first block to `drop_path_rate` at the last; `remat` recomputes
    each block's activations in the backward pass (gradient checkpointing) to save memory. `fold_bn`:
    inference with each BN folded into its convolution (`fold_batch_norm` makes the variables).
    """

    layers: Sequence[int]
    base_width: int = 26
    scale: int = 4
    cardinality: int = 1
    deep_stem: bool = False
    avg_down: bool = False
    out_indices: Sequence[int] = (0, 1, 2, 3, 4)
    drop_path_rate: float = 0.0

    def setup(self) -> None:
        _ = self.feature_info  # checks out_indices and output_stride
        factories = _layer_factories(self)
        conv, norm = factories["conv"], factories["norm"]
        if self.deep_stem:
            self.conv1 = {"0": conv(32, 3, stride=2), "1": norm(), "3": conv(32, 3), "4": norm(), "6": conv(64, 3)}
        else:
            self.conv1 = conv(64, 7, stride=2)
        self.bn1 = norm()
        in_features, net_stride, dilation = 64, 4, 1
        block_class, num_blocks, block_index = _block_class(self.remat), sum(self.layers), 0
        for stage, (depth, planes) in enumerate(zip(self.layers, (64, 128, 256, 512), strict=True)):
            width = (planes * self.base_width // 64) * self.cardinality
            stage_stride, previous_dilation = (1 if stage == 0 else 2), dilation
            if net_stride >= self.output_stride:  # timm: dilate instead of striding past output_stride
                dilation, stage_stride = dilation * stage_stride, 1
            else:
                net_stride *= stage_stride
            blocks = []
            for index in range(depth):
                stride = stage_stride if index == 0 else 1
                needs_projection = index == 0 and (stride != 1 or in_features != planes * 4)
                blocks.append(
                    block_class(
                        width=width,
                        out_features=planes * 4,
                        scale=self.scale,
                        cardinality=self.cardinality,
                        stride=stride,
                        dilation=previous_dilation if index == 0 else dilation,
                        pool_dilated=dilation > 1,
                        first=needs_projection,
                        shortcut=("avg_conv" if self.avg_down else "conv") if needs_projection else "identity",
                        drop_path=self.drop_path_rate * block_index / max(num_blocks - 1, 1),  # timm's rule
                        **factories,
                    )
                )
                in_features, block_index = planes * 4, block_index + 1
            setattr(self, f"layer{stage + 1}", blocks)
        self.head_drop = nn.Dropout(self.drop_rate)
        if self.num_classes and not self.features_only:
            self.fc = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32)

    def _all_features(self) -> list[dict[str, Any]]:
        if self.output_stride not in (8, 16, 32):
            raise InvalidInputError(f"output_stride must be 8, 16 or 32, got {self.output_stride}")
        stem = {"num_chs": 64, "reduction": 2, "module": "act1", "index": STEM_INDEX}
        return [stem] + [
            {"num_chs": planes * 4, "reduction": min(4 * 2**i, self.output_stride), "module": f"layer{i + 1}",
             "index": i + 1}
            for i, planes in enumerate((64, 128, 256, 512))
        ]  # fmt: skip

    def _maps(self, x: jax.Array, train: bool, out_indices: Sequence[int]) -> tuple[jax.Array, ...]:
        """The stem's map (index 0) and each stage's (1-4), those of `out_indices`."""
        _check_images(x, self.in_chans)
        x = x.astype(self.dtype)
        if self.deep_stem:
            for key in ("0", "1", "3", "4", "6"):
                layer = self.conv1[key]
                x = nn.relu(layer(x, train)) if isinstance(layer, BatchNorm) else layer(x)
        else:
            x = self.conv1(x)
        x = nn.relu(self.bn1(x, train))
        maps = [x]
        x = max_pool(x, 3, 2, 1)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4)[: max(out_indices)]:
            for block in stage:
                x = block(x, train)
            maps.append(x)
        return tuple(maps[i] for i in out_indices)

    def forward_head(self, x: jax.Array, pre_logits: bool = False, train: bool = False) -> jax.Array:
        """Global average pool, dropout (`drop_rate`, in training) and classifier over the last stage's map
        (timm's forward_head); the pooled features alone with `pre_logits` or when num_classes is 0."""
        acc = accumulation_dtype(self.dtype)
        x = self.head_drop(jnp.mean(x.astype(acc), axis=(1, 2)), deterministic=not train)
        if pre_logits or not self.num_classes:
            return x
        return self.fc(x.astype(self.dtype)).astype(acc)


class DlaRoot(nn.Module):
    """Aggregation node: 1x1 conv over the concatenated children, BN, ReLU."""

    out_features: int
    conv: Callable[..., nn.Conv] = pytorch_conv
    norm: Callable[..., BatchNorm] = BatchNorm

    @nn.compact
    def __call__(self, children: list[jax.Array], train: bool) -> jax.Array:
        x = self.conv(self.out_features, 1, name="conv")(jnp.concatenate(children, axis=-1))
        return nn.relu(self.norm(name="bn")(x, train))


class DlaTree(nn.Module):
    """A DLA hierarchical aggregation tree of Res2Net blocks (timm's DlaTree, expansion 2)."""

    levels: int
    in_features: int
    out_features: int
    stride: int = 1
    level_root: bool = False
    base_width: int = 28
    scale: int = 4
    cardinality: int = 1
    remat: bool = False
    conv: Callable[..., nn.Conv] = pytorch_conv
    norm: Callable[..., BatchNorm] = BatchNorm

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, children: list[jax.Array] | None = None) -> jax.Array:
        children = [] if children is None else list(children)
        bottom = max_pool(x, self.stride, self.stride, 0) if self.stride > 1 else x
        if self.level_root:
            children.append(bottom)
        common = {"conv": self.conv, "norm": self.norm}
        if self.levels == 1:
            shortcut = bottom
            if self.in_features != self.out_features:
                shortcut = self.conv(self.out_features, 1, name="project_0")(bottom)
                shortcut = self.norm(name="project_1")(shortcut, train)
            x1 = self._block(self.stride, "tree1")(x, train, shortcut)
            x2 = self._block(1, "tree2")(x1, train)
            return DlaRoot(self.out_features, name="root", **common)([x2, x1, *children], train)
        tree_args = {"base_width": self.base_width, "scale": self.scale, "cardinality": self.cardinality,
                     "remat": self.remat, **common}  # fmt: skip
        x1 = DlaTree(self.levels - 1, self.in_features, self.out_features, self.stride, name="tree1", **tree_args)(
            x, train
        )
        return DlaTree(self.levels - 1, self.out_features, self.out_features, name="tree2", **tree_args)(
            x1, train, [*children, x1]
        )

    def _block(self, stride: int, name: str) -> Bottle2neck:
        width = (self.out_features * self.base_width // 64) * self.cardinality // 2
        return _block_class(self.remat)(
            width=width,
            out_features=self.out_features,
            scale=self.scale,
            cardinality=self.cardinality,
            stride=stride,
            first=stride > 1,
            conv=self.conv,
            norm=self.norm,
            name=name,
        )


class DLA(_Backbone):
    """DLA-60 with Res2Net / Res2NeXt bottlenecks.

    The reference adds a 2x2 max-pooled input to a padded stride-2 conv output, so height and width
    must be divisible by 32 (timm raises for other sizes too). Backbone use as timm's: `features_only`
    returns the maps of `out_indices` (level i at stride 2**i, i = 0..5); no dilated variant
    (`output_stride` 32 only, as in timm). `num_classes=0` returns the pooled features; `in_chans`
    sets the input's channel count. `drop_rate`, `remat` and `fold_bn` as Res2Net's; timm's DLA has no
    stochastic depth, so neither has this one.
    """

    levels: Sequence[int] = (1, 1, 1, 2, 3, 1)
    channels: Sequence[int] = (16, 32, 128, 256, 512, 1024)
    base_width: int = 28
    scale: int = 4
    cardinality: int = 1
    out_indices: Sequence[int] = (1, 2, 3, 4, 5)

    def setup(self) -> None:
        _ = self.feature_info  # checks out_indices and output_stride
        c = self.channels
        factories = _layer_factories(self)
        conv, norm = factories["conv"], factories["norm"]
        self.base_layer = {"0": conv(c[0], 7), "1": norm()}
        self.level0 = self._conv_level(c[0], self.levels[0], 1, factories)
        self.level1 = self._conv_level(c[1], self.levels[1], 2, factories)
        tree_args = {"base_width": self.base_width, "scale": self.scale, "cardinality": self.cardinality,
                     "remat": self.remat, **factories}  # fmt: skip
        self.level2 = DlaTree(self.levels[2], c[1], c[2], 2, level_root=False, **tree_args)
        self.level3 = DlaTree(self.levels[3], c[2], c[3], 2, level_root=True, **tree_args)
        self.level4 = DlaTree(self.levels[4], c[3], c[4], 2, level_root=True, **tree_args)
        self.level5 = DlaTree(self.levels[5], c[4], c[5], 2, level_root=True, **tree_args)
        self.head_drop = nn.Dropout(self.drop_rate)
        if self.num_classes and not self.features_only:
            self.fc = conv(self.num_classes, 1, bias=True)

    @staticmethod
    def _conv_level(
        features: int, num_convs: int, stride: int, factories: dict[str, Callable[..., nn.Module]]
    ) -> dict[str, nn.Module]:
        layers: dict[str, nn.Module] = {}
        for i in range(num_convs):
            layers[str(3 * i)] = factories["conv"](features, 3, stride=stride if i == 0 else 1)
            layers[str(3 * i + 1)] = factories["norm"]()
        return layers

    @staticmethod
    def _run_conv_level(layers: dict[str, nn.Module], x: jax.Array, train: bool) -> jax.Array:
        for i in range(len(layers) // 2):
            x = nn.relu(layers[str(3 * i + 1)](layers[str(3 * i)](x), train))
        return x

    def _all_features(self) -> list[dict[str, Any]]:
        if self.output_stride != 32:
            raise InvalidInputError(
                f"DLA networks have no dilated variant: output_stride must be 32 (as in timm), got {self.output_stride}"
            )
        return [
            {"num_chs": c, "reduction": 2**i, "module": f"level{i}", "index": i} for i, c in enumerate(self.channels)
        ]

    def _maps(self, x: jax.Array, train: bool, out_indices: Sequence[int]) -> tuple[jax.Array, ...]:
        """The maps of levels 0-5 (level i at stride 2**i), those of `out_indices`."""
        _check_images(x, self.in_chans, multiple=32)
        x = x.astype(self.dtype)
        x = self._run_conv_level(self.base_layer, x, train)
        maps = [self._run_conv_level(self.level0, x, train)]
        maps.append(self._run_conv_level(self.level1, maps[-1], train))
        for level in (self.level2, self.level3, self.level4, self.level5)[: max(out_indices) - 1]:
            maps.append(level(maps[-1], train))
        return tuple(maps[i] for i in out_indices)

    def forward_head(self, x: jax.Array, pre_logits: bool = False, train: bool = False) -> jax.Array:
        """Global average pool, dropout (`drop_rate`, in training) and the 1x1-conv classifier over the last
        level's map (timm's forward_head); the pooled features alone with `pre_logits` or when num_classes
        is 0."""
        acc = accumulation_dtype(self.dtype)
        x = self.head_drop(jnp.mean(x.astype(acc), axis=(1, 2), keepdims=True), deterministic=not train)
        if pre_logits or not self.num_classes:
            return x[:, 0, 0]
        return jnp.squeeze(self.fc(x.astype(self.dtype)), axis=(1, 2)).astype(acc)
