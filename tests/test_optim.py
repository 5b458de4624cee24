"""Optimisers, schedules and batch mixing against PyTorch and hand computations."""

from __future__ import annotations

import functools
import json
import math
import subprocess
import sys

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import timm
import torch
from conftest import (
    ROOT,
    assert_train_passes_equal,
    bn_stats_by_torch_key,
    images_nchw,
    timm_pair,
    timm_train_pass_64,
    train_pass_64,
)
from launch import env

from configs import default
from res2net_jax import augment, create_model, steps


def _config(**fields):
    config = default.get_config()
    config.update(fields)
    return config


def test_cosine_schedule_with_warmup_by_hand() -> None:
    config = _config(learning_rate=0.1, warmup_epochs=2.0, lr_schedule="cosine", min_lr=0.001)
    schedule = steps.learning_rate_schedule(config, steps_per_epoch=10, total_steps=120)
    assert float(schedule(0)) == 0.0
    assert math.isclose(float(schedule(10)), 0.05, rel_tol=1e-6)
    assert math.isclose(float(schedule(20)), 0.1, rel_tol=1e-6)
    progress = (70 - 20) / 100
    expected = 0.001 + (0.1 - 0.001) * 0.5 * (1 + math.cos(math.pi * progress))
    assert math.isclose(float(schedule(70)), expected, rel_tol=1e-5)
    assert math.isclose(float(schedule(120)), 0.001, rel_tol=1e-5)


def test_step_and_constant_schedules_by_hand() -> None:
    config = _config(learning_rate=0.1, warmup_epochs=0.0, lr_schedule="step", lr_decay_epochs=30.0)
    schedule = steps.learning_rate_schedule(config, steps_per_epoch=10, total_steps=1400)
    assert [round(float(schedule(s)), 8) for s in (0, 299, 300, 599, 600, 900)] == [0.1, 0.1, 0.01, 0.01, 0.001, 0.0001]
    config = _config(learning_rate=0.3, warmup_epochs=0.0, lr_schedule="constant")
    assert float(steps.learning_rate_schedule(config, 10, 100)(77)) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="unknown lr_schedule"):
        steps.learning_rate_schedule(_config(lr_schedule="linear"), 10, 100)


def _params(seed: int) -> dict:
    rng = np.random.RandomState(seed)
    return {
        "conv": {"kernel": rng.randn(3, 3, 4, 8).astype(np.float32)},
        "bn": {"scale": rng.randn(8).astype(np.float32)},
    }


@pytest.mark.parametrize(
    ("name", "torch_optimizer"),
    [
        ("momentum", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01)),
        ("nesterov", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)),
        ("sgd", lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.01)),
        ("adamw", lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.01, eps=1e-8)),
    ],
)
def test_optimizers_match_torch(name: str, torch_optimizer) -> None:
    """Three updates with decay on every weight (decay_bn_and_bias) equal PyTorch's."""
    config = _config(optimizer=name, learning_rate=0.1, momentum=0.9, weight_decay=0.01, decay_bn_and_bias=True)
    tx = steps.create_optimizer(config, optax.constant_schedule(0.1))
    params = jax.tree.map(jnp.asarray, _params(0))
    state = tx.init(params)
    reference = {k: torch.nn.Parameter(torch.from_numpy(np.array(v[next(iter(v))]))) for k, v in _params(0).items()}
    optimizer = torch_optimizer(list(reference.values()))
    for step in range(3):
        grads = jax.tree.map(jnp.asarray, _params(step + 1))
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        for key, value in _params(step + 1).items():
            reference[key].grad = torch.from_numpy(np.array(value[next(iter(value))]))
        optimizer.step()
    for key, value in params.items():
        np.testing.assert_allclose(next(iter(value.values())), reference[key].detach().numpy(), rtol=2e-5, atol=1e-6)


def test_weight_decay_skips_bn_and_bias_by_default() -> None:
    mask = steps.weight_decay_mask(jax.tree.map(jnp.asarray, _params(0)), decay_bn_and_bias=False)
    assert mask == {"conv": {"kernel": True}, "bn": {"scale": False}}
    config = _config(optimizer="momentum", weight_decay=0.5, learning_rate=1.0, momentum=0.0)
    tx = steps.create_optimizer(config, optax.constant_schedule(1.0))
    params = jax.tree.map(jnp.asarray, _params(0))
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates["conv"]["kernel"], -0.5 * params["conv"]["kernel"], rtol=1e-6)
    np.testing.assert_array_equal(updates["bn"]["scale"], 0.0)


def test_clipping_bounds_the_update_norm() -> None:
    params = jax.tree.map(jnp.asarray, _params(0))
    clipped = steps.create_optimizer(_config(optimizer="sgd", weight_decay=0.0, grad_clip_norm=1.0),
                                     optax.constant_schedule(1.0))  # fmt: skip
    updates, _ = clipped.update(jax.tree.map(jnp.asarray, _params(1)), clipped.init(params), params)
    assert float(optax.tree.norm(updates)) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("freeze_bn", [False, True])
def test_frozen_parameters_stay_bit_identical_through_training(freeze_bn: bool) -> None:
    """config.freeze: the stem and first stage keep their exact values through three Nesterov updates
    with weight decay and clipping, while every other parameter moves; their BN running statistics
    stay too with freeze_bn, and move (batch statistics) without it."""
    config = _config(optimizer="nesterov", weight_decay=1e-2, grad_clip_norm=1.0, batch_size=8, seed=0,
                     freeze="^(conv1|bn1|layer1_)", freeze_bn=freeze_bn, hflip=False, color_jitter=0.0,
                     random_erasing=0.0)  # fmt: skip
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), (steps.AXIS,))
    model = steps.build_model(config, num_classes=3, dtype=jnp.float32).clone(layers=(1, 1, 1, 1), base_width=4)
    rng = np.random.RandomState(0)
    batch = {"image": rng.randint(0, 256, (8, 32, 32, 3)).astype(np.uint8), "label": rng.randint(0, 3, 8),
             "epoch": np.zeros(8, np.int32), "index": np.arange(8, dtype=np.int32)}  # fmt: skip
    variables = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 32, 32, 3)))
    tx = steps.create_optimizer(config, optax.constant_schedule(0.5))
    state = steps.init_train_state(config, tx, variables)
    before = flax.traverse_util.flatten_dict(jax.tree.map(np.asarray, variables), sep="/")
    train_step = steps.make_train_step(model, tx, config, mesh)
    for _ in range(3):
        state, _ = train_step(state, batch)
    after = {"params": state.params, "batch_stats": state.batch_stats}
    after = flax.traverse_util.flatten_dict(jax.tree.map(np.asarray, after), sep="/")
    frozen = 0
    for path, old in before.items():
        collection, name = path.split("/", 1)
        if name.startswith(("conv1/", "bn1/", "layer1_")) and (collection == "params" or freeze_bn):
            np.testing.assert_array_equal(after[path], old, err_msg=path)
            frozen += 1
        else:
            assert not np.array_equal(after[path], old), path
    assert frozen >= (20 if freeze_bn else 10)


@jax.enable_x64(True)
def test_gradient_accumulation_is_one_update_of_the_averaged_passes() -> None:
    """grad_accum_steps=2, batch_size=4: one step = one SGD update with the mean of the gradients of
    examples 0-3 and 4-7, computed by hand pass by pass; BN running statistics updated by both passes.
    In float64: batch statistics of four images amplify float32 rounding to about 1e-5."""
    config = _config(optimizer="sgd", weight_decay=0.0, momentum=0.0, grad_accum_steps=2, batch_size=4, seed=0,
                     label_smoothing=0.0, learning_rate=0.5, ema_decay=0.0, hflip=False, color_jitter=0.0,
                     random_erasing=0.0)  # fmt: skip
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), (steps.AXIS,))
    model = steps.build_model(config, num_classes=3, dtype=jnp.float64).clone(
        layers=(1, 1, 1, 1), base_width=4, axis_name=None
    )
    rng = np.random.RandomState(0)
    pixels = jnp.asarray(rng.randint(0, 256, (8, 32, 32, 3)).astype(np.uint8))
    images = augment.normalize(pixels).astype(jnp.float64)  # what the step feeds the model
    labels = jnp.asarray(rng.randint(0, 3, 8).astype(np.int32))
    variables = jax.tree.map(lambda x: x.astype(jnp.float64), jax.jit(model.init)(jax.random.key(1), images[:1]))
    variables["params"]["layer1_0"]["bn3"]["scale"] = jnp.ones_like(variables["params"]["layer1_0"]["bn3"]["scale"])
    tx = steps.create_optimizer(config, optax.constant_schedule(0.5))
    state = steps.init_train_state(config, tx, variables)

    def loss_fn(params, batch_stats, x, y):
        logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                      mutable=["batch_stats"])  # fmt: skip
        return jnp.mean(optax.softmax_cross_entropy(logits, jax.nn.one_hot(y, 3))), updates["batch_stats"]

    grad = jax.jit(jax.grad(loss_fn, has_aux=True))  # one compilation for both passes
    g1, stats1 = grad(variables["params"], variables["batch_stats"], images[:4], labels[:4])
    g2, stats2 = grad(variables["params"], stats1, images[4:], labels[4:])
    expected = jax.tree.map(lambda p, a, b: p - 0.5 * (a + b) / 2, variables["params"], g1, g2)

    accumulating = steps.build_model(config, 3, jnp.float64).clone(layers=(1, 1, 1, 1), base_width=4)
    train_step = steps.make_train_step(accumulating, tx, config, mesh)
    batch = {"image": pixels, "label": labels, "epoch": jnp.zeros(8, jnp.int32), "index": jnp.arange(8)}
    new_state, _ = train_step(state, batch)
    for ours, theirs in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-12)
    for ours, theirs in zip(jax.tree.leaves(new_state.batch_stats), jax.tree.leaves(stats2), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-12)
    assert int(new_state.step) == 1


@pytest.mark.parametrize(("mixup", "cutmix"), [(0.2, 0.0), (0.0, 1.0)])
def test_mixup_and_cutmix_keep_labels_consistent(mixup: float, cutmix: float) -> None:
    config = _config(mixup_alpha=mixup, cutmix_alpha=cutmix)
    images = jnp.asarray(np.random.RandomState(0).randn(6, 16, 16, 3).astype(np.float32))
    targets = jax.nn.one_hot(jnp.arange(6), 6)
    mixed, mixed_targets = steps.mix_batch(jax.random.key(3), images, targets, config)
    np.testing.assert_allclose(mixed_targets.sum(-1), 1.0, rtol=1e-6)
    lam = float(mixed_targets[0, 0])  # example 0 is paired with example 5
    assert mixed_targets[0, 5] == pytest.approx(1 - lam, abs=1e-6)
    if mixup:
        np.testing.assert_allclose(mixed[0], lam * images[0] + (1 - lam) * images[5], rtol=1e-5, atol=1e-6)
    else:  # the fraction of pixels taken from the partner is exactly 1 - lam
        from_partner = np.all(np.isclose(mixed[0], images[5]), axis=-1) & ~np.all(
            np.isclose(mixed[0], images[0]), axis=-1
        )
        assert from_partner.mean() == pytest.approx(1 - lam, abs=1e-6)


def test_lamb_first_step_by_hand() -> None:
    """LAMB's first step: bias-corrected Adam direction g / (|g| + eps) plus decay, scaled per layer by
    the trust ratio ||w|| / ||direction||."""
    config = _config(optimizer="lamb", weight_decay=0.01, decay_bn_and_bias=True)
    tx = steps.create_optimizer(config, optax.constant_schedule(0.1))
    params = jax.tree.map(jnp.asarray, _params(0))
    grads = jax.tree.map(jnp.asarray, _params(1))
    updates, _ = tx.update(grads, tx.init(params), params)
    for key in params:
        w, g = np.asarray(next(iter(params[key].values()))), np.asarray(next(iter(grads[key].values())))
        direction = g / (np.abs(g) + 1e-6) + 0.01 * w
        expected = -0.1 * np.linalg.norm(w) / np.linalg.norm(direction) * direction
        np.testing.assert_allclose(next(iter(updates[key].values())), expected, rtol=1e-5)


def test_frozen_bn_runs_like_timms_freeze() -> None:
    """config.freeze_bn: in a train-mode pass the BN layers of the frozen stem and first stage normalise
    with their running statistics and keep them, the others use and update batch statistics, as in timm
    after `timm.utils.freeze(model, ["conv1", "bn1", "layer1"])` (FrozenBatchNorm2d): the logits and every
    running statistic equal timm's after the same pass (float64)."""
    reference, variables = timm_pair("res2net50d")
    timm.utils.freeze(reference, ["conv1", "bn1", "layer1"])
    x = images_nchw(2, 64, 64)
    model = create_model("res2net50d", dtype=jnp.float64)
    ours = train_pass_64(model, variables, x, steps.frozen_bn("^(conv1|bn1|layer1_)"))
    assert_train_passes_equal(ours, timm_train_pass_64(reference, x))
    before = bn_stats_by_torch_key(variables["params"], variables["batch_stats"])
    for key, value in ours[1].items():
        frozen = key.startswith(("conv1.", "bn1.", "layer1."))
        assert np.array_equal(value, before[key]) == frozen, key


@functools.cache
def _start(model: nn.Module) -> dict:
    """`model`'s initial variables, made once for the runs of `_updated_weights` (dropping has no variables),
    on the host: the train step donates the arrays it is given."""
    return jax.tree.map(np.asarray, jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 32, 32, 3))))


def _updated_weights(devices: int, **fields) -> list[np.ndarray]:
    """The weights after one SGD step of a small Res2Net from the same start, each of `devices` devices
    given the same two examples."""
    config = _config(optimizer="sgd", momentum=0.0, weight_decay=0.0, batch_size=2 * devices, seed=0,
                     label_smoothing=0.0, hflip=False, color_jitter=0.0, random_erasing=0.0, **fields)  # fmt: skip
    rng = np.random.RandomState(0)
    pixels, labels = rng.randint(0, 256, (2, 32, 32, 3)).astype(np.uint8), rng.randint(0, 3, 2).astype(np.int32)
    model = steps.build_model(config, num_classes=3, dtype=jnp.float32).clone(layers=(1, 1, 1, 1), base_width=4)
    tx = steps.create_optimizer(config, optax.constant_schedule(0.5))
    state = steps.init_train_state(config, tx, _start(model.clone(drop_path_rate=0.0, drop_rate=0.0)))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:devices]), (steps.AXIS,))
    batch = {"image": np.tile(pixels, (devices, 1, 1, 1)), "label": np.tile(labels, devices),
             "epoch": np.zeros(2 * devices, np.int32),
             "index": np.tile(np.arange(2, dtype=np.int32), devices)}  # fmt: skip
    state, metrics = steps.make_train_step(model, tx, config, mesh)(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    return [np.asarray(leaf) for leaf in jax.tree.leaves(state.params)]


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(np.allclose(x, y, rtol=1e-4, atol=1e-5) for x, y in zip(a, b, strict=True))


DROPPING = {"drop_path_rate": 0.5, "drop_rate": 0.5}


def per_device_findings() -> dict[str, bool]:
    """Run on two devices (test_the_train_step_draws_dropout_and_stochastic_depth_per_device)."""
    plain, alone = _updated_weights(1), _updated_weights(1, **DROPPING)
    return {"two devices, nothing dropped": _same(_updated_weights(2), plain),
            "two devices, dropping": _same(_updated_weights(2, **DROPPING), alone)}  # fmt: skip


def test_the_train_step_draws_dropout_and_stochastic_depth_per_device() -> None:
    """config.drop_path_rate and drop_rate reach the model in the train step with a key per device: two
    devices given the same examples update the weights as one device alone when nothing is dropped, and
    not when dropping (the second device's masks are its own; were the rates not applied, they would)."""
    code = ("import sys; sys.path.insert(0, 'tests'); import json, test_optim; "
            "print(json.dumps(test_optim.per_device_findings()))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(2), capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == {"two devices, nothing dropped": True,
                                                        "two devices, dropping": False}  # fmt: skip
