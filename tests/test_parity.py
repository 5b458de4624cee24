"""Every variant against timm: same weights, same inputs, same logits and BN updates."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import (
    assert_train_passes_equal,
    images_nchw,
    nhwc,
    rel_error,
    state_dict_numpy,
    timm_model,
    timm_pair,
    timm_train_pass_64,
    timm_variables,
    train_pass_64,
)

from res2net_jax import convert, create_model
from res2net_jax.registry import MODELS

TOLERANCE = 1e-5
F64_TOLERANCE = 1e-9
# An odd size for the ResNet layout; DLA's reference itself needs multiples of 32.
SMALL_SIZE = {"dla60_res2net": (64, 96), "dla60_res2next": (64, 96)}
ODD_SIZE = (97, 113)


# Train mode runs the same blocks as eval mode; these deeper networks repeat their 50-layer
# counterparts' blocks (the same code), so their train mode is covered there and they are checked
# in eval mode and through the checkpoint round trip, which cover their depth and every key.
DEEPER_REPEATS = {"res2net101_26w_4s", "res2net101d", "res2net152", "res2net152_v1b"}


@pytest.mark.parametrize("name", list(MODELS))
def test_eval_logits_and_checkpoint_round_trip_match_timm(name: str) -> None:
    reference, variables = timm_pair(name)
    state_dict = state_dict_numpy(reference)
    x = images_nchw(2, *SMALL_SIZE.get(name, ODD_SIZE))

    # Eval mode, float32: within 1e-5 of timm.
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).numpy()
    with jax.default_matmul_precision("highest"):
        logits = jax.jit(lambda v, x: create_model(name).apply(v, x, train=False))(variables, nhwc(x))
    assert logits.shape == expected.shape
    assert rel_error(logits, expected) <= TOLERANCE

    # The checkpoint survives the round trip bit for bit (fresh counters are 0, as written).
    assert_state_dicts_equal(convert.to_torch(variables, name), state_dict)


@pytest.mark.parametrize("name", [name for name in MODELS if name not in DEEPER_REPEATS])
def test_train_mode_logits_and_bn_update_match_timm(name: str) -> None:
    """Train mode (batch statistics). Normalising by the statistics of 2 images amplifies float32
    rounding (timm float32 vs timm float64 differ by 2e-5 to 1e-3 here), so exactness is checked in
    float64 on both sides, and float32 must be as accurate as timm's own float32."""
    reference, variables = timm_pair(name)
    state_dict = state_dict_numpy(reference)
    x = images_nchw(2, *SMALL_SIZE.get(name, ODD_SIZE))
    expected_64 = timm_train_pass_64(reference, x)
    with torch.no_grad():
        expected_32 = reference.train()(torch.from_numpy(x)).numpy()
    ours_64 = train_pass_64(create_model(name, dtype=jnp.float64), variables, x)
    assert_train_passes_equal(ours_64, expected_64, F64_TOLERANCE)
    moved = [k for k, v in ours_64[1].items() if not np.array_equal(v, state_dict[k])]
    assert len(moved) == len(ours_64[1]), "train mode must update every BN's running statistics"

    with jax.default_matmul_precision("highest"):
        model_32 = create_model(name)
        logits_32, _ = jax.jit(lambda v, x: model_32.apply(v, x, train=True, mutable=["batch_stats"]))(
            variables, nhwc(x)
        )
    assert rel_error(logits_32, expected_64[0]) <= 2 * rel_error(expected_32, expected_64[0]) + 1e-6


def assert_state_dicts_equal(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        np.testing.assert_array_equal(actual[key], value, err_msg=key)


@pytest.mark.parametrize("name", ["res2net50_26w_4s", "res2net50d", "res2next50", "dla60_res2net"])
def test_224px_jitted_matches_timm(name: str) -> None:
    reference, variables = timm_pair(name, seed=1)
    model = create_model(name)
    x = images_nchw(2, 224, 224, seed=1)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).numpy()
    with jax.default_matmul_precision("highest"):
        logits = jax.jit(model.apply)(variables, nhwc(x))
    assert rel_error(logits, expected) <= TOLERANCE


@pytest.mark.parametrize("name", ["res2net50d", "dla60_res2next"])
def test_train_mode_gradients_match_timm(name: str) -> None:
    """Gradients of a cross-entropy loss in train mode, every parameter, in float64 on both sides."""
    reference = copy.deepcopy(timm_model(name)).double().train()
    variables = timm_variables(name)
    x = images_nchw(2, *SMALL_SIZE.get(name, ODD_SIZE))
    labels = np.array([3, 997])
    loss = torch.nn.functional.cross_entropy(reference(torch.from_numpy(x).double()), torch.from_numpy(labels))
    loss.backward()
    expected = {k: p.grad.numpy() for k, p in reference.named_parameters()}

    with jax.enable_x64(True):
        model = create_model(name, dtype=jnp.float64)

        def loss_fn(params: dict) -> jax.Array:
            logits, _ = model.apply(
                {"params": params, "batch_stats": variables["batch_stats"]},
                nhwc(x).astype(jnp.float64),
                train=True,
                mutable=["batch_stats"],
            )
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1))

        params_64 = jax.tree.map(lambda p: p.astype(jnp.float64), variables["params"])
        grads = jax.jit(jax.grad(loss_fn))(params_64)
        grads_torch = convert.to_torch({"params": grads, "batch_stats": variables["batch_stats"]}, name)
    assert set(expected) <= set(grads_torch)
    for key, value in expected.items():
        assert rel_error(grads_torch[key], value) <= 1e-5, key
