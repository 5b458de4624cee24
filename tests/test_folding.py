"""BatchNorm folded into the convolutions: the unfolded model's logits and feature maps, for every variant."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_error

from res2net_jax import create_model, fold_batch_norm
from res2net_jax.registry import MODELS


def random_variables(model, height: int, width: int, seed: int = 0) -> dict:
    """Variables of the model's shapes with every value random: kernels He-normal over their fan-in, every
    BN's statistics and affine parameters uniform (a fresh initialisation zeroes each block's last BN
    scale, which would hide the branches from the check). Drawn from the shapes alone: initialising the
    deep networks op by op took most of each test's time (15 of 24 s for res2net101)."""
    shapes = jax.eval_shape(model.init, jax.random.key(seed), jnp.zeros((1, height, width, model.in_chans)))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        kind, shape = path[-1].key, leaf.shape
        if kind == "kernel":
            return (rng.standard_normal(shape) * np.sqrt(2 / np.prod(shape[:-1]))).astype(np.float32)
        if kind in ("scale", "var"):
            return rng.uniform(0.5, 1.5, shape).astype(np.float32)
        assert kind in ("bias", "mean"), path
        return rng.uniform(-0.5, 0.5, shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def both(model, variables, images) -> tuple[list, list]:
    """The unfolded and the folded model's outputs (as lists of maps), op by op: compiling the deep
    networks would take minutes each."""
    folded, folded_variables = fold_batch_norm(model, variables)
    assert "batch_stats" not in folded_variables

    def run(m, v):
        out = m.apply(v, images, train=False)
        return list(out) if isinstance(out, (tuple, list)) else [out]

    return run(model, variables), run(folded, folded_variables)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_folded_logits_equal_the_unfolded_models(name: str) -> None:
    model = create_model(name, num_classes=10)
    variables = random_variables(model, 64, 64)
    images = np.random.RandomState(1).randn(2, 64, 64, 3).astype(np.float32)
    (expected,), (got,) = both(model, variables, images)
    assert rel_error(got, expected) <= 1e-5


@pytest.mark.parametrize(
    ("name", "options", "height", "width"),
    [
        ("res2net50d", {"features_only": True, "output_stride": 8}, 72, 88),
        ("res2net50_26w_4s", {"features_only": True, "out_indices": (0, 2, 4), "output_stride": 16}, 64, 96),
        ("res2next50", {"num_classes": 0}, 64, 64),
        ("dla60_res2next", {"features_only": True}, 64, 96),
        ("res2net50d", {"in_chans": 1, "num_classes": 5}, 64, 64),
    ],
)
def test_folded_feature_maps_equal_the_unfolded_models(name: str, options: dict, height: int, width: int) -> None:
    model = create_model(name, **options)
    variables = random_variables(model, height, width)
    images = np.random.RandomState(2).randn(2, height, width, model.in_chans).astype(np.float32)
    expected, got = both(model, variables, images)
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape and rel_error(g, e) <= 1e-5


def test_bfloat16_folds_in_float32() -> None:
    """The folded bfloat16 model is as close to the float32 logits as the unfolded bfloat16 model."""
    model = create_model("res2net50d", num_classes=10, layers=(1, 1, 1, 1))
    variables = random_variables(model, 64, 64)
    images = np.random.RandomState(3).randn(2, 64, 64, 3).astype(np.float32)
    (reference,), _ = both(model, variables, images)
    (unfolded,), (folded,) = both(model.clone(dtype=jnp.bfloat16), variables, images)
    assert folded.dtype == jnp.float32
    assert rel_error(folded, reference) <= max(2 * rel_error(unfolded, reference), 1e-2)


def test_a_folded_model_is_for_inference_only() -> None:
    model = create_model("res2net50d", num_classes=10, layers=(1, 1, 1, 1))
    variables = random_variables(model, 64, 64)
    folded, folded_variables = fold_batch_norm(model, variables)
    with pytest.raises(ValueError, match="fold_bn=True is for inference"):
        folded.apply(folded_variables, jnp.zeros((1, 64, 64, 3)), train=True, mutable=["batch_stats"])
    assert fold_batch_norm(folded, folded_variables) == (folded, folded_variables)  # folded once only
    # On the device already: a jitted function would copy NumPy arrays there again on every call.
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(folded_variables))
