"""Registry, parameter counts, backbone features, dtypes and input checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import images_nchw, nhwc, rel_error, state_dict_numpy, timm_model, timm_pair

from res2net_jax import convert, create_model, get_spec, list_models
from res2net_jax.registry import ALIASES, MODELS

TIMM_NAMES = [
    "res2net50_26w_4s", "res2net101_26w_4s", "res2net50_26w_6s", "res2net50_26w_8s", "res2net50_48w_2s",
    "res2net50_14w_8s", "res2next50", "res2net50d", "res2net101d", "dla60_res2net", "dla60_res2next",
]  # fmt: skip
MINDCV_NAMES = ["res2net50", "res2net101", "res2net152", "res2net50_v1b", "res2net101_v1b", "res2net152_v1b"]


def _param_count(name: str) -> int:
    model = create_model(name)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes["params"]))


def test_registry_names() -> None:
    assert sorted(TIMM_NAMES + MINDCV_NAMES) == list_models()
    # The MindCV names that timm also has are aliases of the same network.
    assert get_spec("res2net50") is get_spec("res2net50_26w_4s")
    assert get_spec("res2net101_v1b") is get_spec("res2net101d")
    assert set(ALIASES) <= set(MINDCV_NAMES)


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(ValueError, match="unknown model 'res2net5O'.*Did you mean.*res2net50"):
        create_model("res2net5O")


@pytest.mark.parametrize("name", list(MODELS))
def test_parameter_count_equals_timm_and_published(name: str) -> None:
    count = _param_count(name)
    assert count == sum(p.numel() for p in timm_model(name).parameters())
    published = MODELS[name].params_m
    if published is not None:  # published figures are rounded to 0.01M
        assert abs(count / 1e6 - published) < 0.01


BACKBONES = [  # (name, out_indices, output_stride, image height, width)
    ("res2net50d", (0, 1, 2, 3, 4), 32, 97, 113),
    ("res2net50d", (0, 1, 2, 3, 4), 16, 64, 80),
    ("res2net50_26w_4s", (1, 3, 4), 8, 64, 64),
    ("res2next50", (1, 2), 16, 64, 96),
    ("dla60_res2next", (0, 1, 2, 3, 4, 5), 32, 64, 96),
]


@pytest.mark.parametrize(("name", "out_indices", "output_stride", "height", "width"), BACKBONES)
def test_features_only_equals_timm(name: str, out_indices: tuple, output_stride: int, height: int, width: int) -> None:
    """create_model(features_only=True, out_indices, output_stride) against timm's, on the same weights:
    each map to 1e-5, and feature_info as timm's (index 0 the stem at stride 2; dilation past the stride)."""
    backbone = {"features_only": True, "out_indices": out_indices}
    if output_stride != 32:
        backbone["output_stride"] = output_stride
    reference = timm_model(name, **backbone)
    model = create_model(name, **backbone)
    variables = convert.from_torch(state_dict_numpy(reference), name, overrides=backbone)
    assert model.feature_info == reference.feature_info.get_dicts()
    x = images_nchw(1, height, width)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x))
    features = model.apply(variables, jnp.asarray(nhwc(x)))
    assert len(features) == len(expected) == len(out_indices)
    for ours, theirs in zip(features, expected, strict=True):
        assert rel_error(ours, nhwc(theirs.numpy())) <= 1e-5


def test_classifier_weights_serve_a_truncated_backbone() -> None:
    """A classifier's checkpoint loads into a features_only model that stops at stage 2 (its head and
    later stages left out, as timm does), and gives the classifier's own maps (`features`)."""
    reference, full = timm_pair("res2net50_26w_4s")
    x = jnp.asarray(nhwc(images_nchw(1, 64, 64)))
    classifier = create_model("res2net50_26w_4s")
    expected = classifier.apply(full, x, method=classifier.features)
    backbone = {"features_only": True, "out_indices": (1, 2)}
    variables = convert.from_torch(state_dict_numpy(reference), "res2net50_26w_4s", overrides=backbone)
    assert "layer3_0" not in variables["params"] and "fc" not in variables["params"]
    ours = create_model("res2net50_26w_4s", **backbone).apply(variables, x)
    for a, b in zip(ours, expected[1:3], strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["res2net50_14w_8s", "dla60_res2net"])
def test_num_classes_0_gives_timm_pooled_features(name: str) -> None:
    reference, _ = timm_pair(name, num_classes=0)
    variables = convert.from_torch(state_dict_numpy(reference), name)  # no head in the file: num_classes 0
    x = images_nchw(2, 64, 96)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).numpy()
    pooled = create_model(name, num_classes=0).apply(variables, jnp.asarray(nhwc(x)))
    assert pooled.shape == expected.shape == (2, 2048 if name.startswith("res2net") else 1024)
    assert rel_error(pooled, expected) <= 1e-5
    classifier, _ = timm_pair(name)  # a classifier's checkpoint drops its head for num_classes=0
    headless = convert.from_torch(state_dict_numpy(classifier), name, num_classes=0)
    assert "fc" not in headless["params"] and convert.num_classes_of(headless) == 0


@pytest.mark.parametrize(("name", "in_chans"), [("res2net50_26w_4s", 1), ("res2net50d", 4), ("dla60_res2net", 2)])
def test_in_chans_equals_timm_and_adapts_rgb_weights_as_timm(name: str, in_chans: int) -> None:
    """A model of `in_chans` channels equals timm's on the same weights; an RGB checkpoint loads into it
    with its first convolution adapted as timm's adapt_input_conv adapts pretrained weights."""
    from timm.models._manipulate import adapt_input_conv

    reference, _ = timm_pair(name, in_chans=in_chans)
    variables = convert.from_torch(state_dict_numpy(reference), name, overrides={"in_chans": in_chans})
    x = np.random.RandomState(2).randn(2, in_chans, 64, 64).astype(np.float32)
    model = create_model(name, in_chans=in_chans)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).numpy()
    assert rel_error(model.apply(variables, jnp.asarray(nhwc(x))), expected) <= 1e-5
    rgb, rgb_variables = timm_pair(name)
    adapted = convert.from_torch(state_dict_numpy(rgb), name, overrides={"in_chans": in_chans})
    first = convert.first_conv_key(model)
    with torch.no_grad():
        rgb.get_submodule(first.removesuffix(".weight")).weight.data = adapt_input_conv(
            in_chans, rgb.state_dict()[first]
        )
        expected = rgb(torch.from_numpy(x)).numpy()
    assert rel_error(model.apply(adapted, jnp.asarray(nhwc(x))), expected) <= 1e-5


def test_backbone_settings_are_checked() -> None:
    """create_model refuses what the network does not have, in one line, before anything runs."""
    with pytest.raises(ValueError, match="no feature index \\[5\\]: its indices are \\[0, 1, 2, 3, 4\\]"):
        create_model("res2net50d", features_only=True, out_indices=(1, 5))
    with pytest.raises(ValueError, match="output_stride must be 8, 16 or 32"):
        create_model("res2net50d", output_stride=4)
    with pytest.raises(ValueError, match="no dilated variant"):
        create_model("dla60_res2net", output_stride=16)
    with pytest.raises(ValueError, match="expected NHWC images with 1 channels \\(in_chans\\)"):
        model = create_model("res2net50_26w_4s", in_chans=1)
        model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))


def test_bfloat16_compute_keeps_float32_state() -> None:
    reference, variables = timm_pair("res2net50_26w_4s")
    x = images_nchw(4, 64, 64)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).numpy()
    model = create_model("res2net50_26w_4s", dtype=jnp.bfloat16)
    train_step = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    logits, updates = train_step(variables, jnp.asarray(nhwc(x)))
    assert logits.dtype == jnp.float32
    assert {leaf.dtype for leaf in jax.tree.leaves(updates)} == {jnp.dtype(jnp.float32)}
    init = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    assert {leaf.dtype for leaf in jax.tree.leaves(init)} == {jnp.dtype(jnp.float32)}
    eval_logits = jax.jit(model.apply)(variables, jnp.asarray(nhwc(x)))
    assert rel_error(eval_logits, expected) < 0.05  # bfloat16 keeps 8 bits of mantissa
    assert np.array_equal(np.argmax(eval_logits, -1), np.argmax(expected, -1))


def test_bad_inputs_are_explained() -> None:
    """The checks run while tracing, so abstract variables suffice (no weights are computed)."""
    model = create_model("res2net50_26w_4s")
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match="NHWC.*NCHW"):
        jax.eval_shape(model.apply, variables, jnp.zeros((1, 3, 64, 64)))
    with pytest.raises(ValueError, match="uint8.*make_predict_fn"):
        jax.eval_shape(model.apply, variables, jnp.zeros((1, 64, 64, 3), jnp.uint8))
    with pytest.raises(ValueError, match="at least 32"):
        jax.eval_shape(model.apply, variables, jnp.zeros((1, 31, 64, 3)))
    dla = create_model("dla60_res2net")
    with pytest.raises(ValueError, match="97x96.*divisible by 32"):
        jax.eval_shape(dla.init, jax.random.key(0), jnp.zeros((1, 97, 96, 3)))
    with pytest.raises(ValueError, match="float16"):
        create_model("res2net50", dtype=jnp.float16)


def test_minimum_and_odd_sizes_match_timm() -> None:
    """32x32 (a 1x1 final feature map) and 33x47 (odd sizes through every stride-2 layer)."""
    reference, variables = timm_pair("res2net50d", num_classes=7)
    apply = jax.jit(create_model("res2net50d", num_classes=7).apply)
    for height, width in [(32, 32), (33, 47)]:
        x = images_nchw(2, height, width)
        with torch.no_grad():
            expected = reference(torch.from_numpy(x)).numpy()
        with jax.default_matmul_precision("highest"):
            logits = apply(variables, nhwc(x))
        assert rel_error(logits, expected) <= 1e-5
