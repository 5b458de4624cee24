"""timm's fine-tuning knobs against timm: forward_features / forward_head(pre_logits), stochastic depth
(per-block rates, and train-mode logits on the same masks), dropout before the classifier, gradient
checkpointing (remat), and the config fields and timm config.json entries that set them."""

from __future__ import annotations

import copy
import importlib
import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import timm.layers.drop
import torch
from conftest import images_nchw, nhwc, rel_error, timm_pair
from flax.traverse_util import flatten_dict

from res2net_jax import config_check, create_model, from_pretrained, get_spec, layers, save_pretrained, steps
from res2net_jax.errors import InvalidInputError

TOLERANCE = 1e-5


@pytest.mark.parametrize(("name", "size"), [("res2net50d", (97, 113)), ("dla60_res2next", (64, 96))])
def test_forward_features_and_forward_head_equal_timm(name: str, size: tuple[int, int]) -> None:
    reference, variables = timm_pair(name, num_classes=10)
    model = create_model(name, num_classes=10)
    x = images_nchw(2, *size)
    with torch.no_grad():
        features = reference.forward_features(torch.from_numpy(x))
        pooled = reference.forward_head(features, pre_logits=True).numpy()
        logits = reference.forward_head(features).numpy()
        features = features.numpy()
    with jax.default_matmul_precision("highest"):
        ours = model.apply(variables, nhwc(x), method=model.forward_features)
        assert rel_error(ours, nhwc(features)) <= TOLERANCE
        assert rel_error(model.apply(variables, ours, pre_logits=True, method=model.forward_head), pooled) <= TOLERANCE
        assert rel_error(model.apply(variables, ours, method=model.forward_head), logits) <= TOLERANCE


def _block_rates(model: nn.Module) -> list[float]:
    bound = model.bind({})
    return [block.drop_path for stage in (bound.layer1, bound.layer2, bound.layer3, bound.layer4) for block in stage]


@pytest.mark.parametrize(("name", "rate"), [("res2net50d", 0.1), ("res2net101", 0.25)])
def test_stochastic_depth_rates_per_block_equal_timms(name: str, rate: float) -> None:
    reference = timm.create_model(get_spec(name).name, drop_path_rate=rate)
    expected = [0.0 if block.drop_path is None else block.drop_path.drop_prob
                for stage in (reference.layer1, reference.layer2, reference.layer3, reference.layer4)
                for block in stage]  # fmt: skip
    rates = _block_rates(create_model(name, drop_path_rate=rate))
    assert len(rates) == len(expected) and rates[-1] == pytest.approx(rate)
    np.testing.assert_allclose(rates, expected, rtol=1e-12)


def _recorded(module_type: type, calls: list) -> object:
    """A method interceptor that records (module, input, output) of each `module_type` call."""

    def intercept(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, module_type) and context.method_name == "__call__":
            calls.append((context.module, args[0], out))
        return out

    return intercept


def test_stochastic_depth_and_dropout_in_training_equal_timm_on_the_same_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Train mode in float64 with drop_path_rate and drop_rate: each of our masks, read from what our layers
    did, is checked against timm's definition (kept examples scaled by 1 / keep, the others zero); timm's
    network is then given the same masks, with its own per-block rates, and gives the same logits."""
    name, overrides, num_classes = "res2net50d", {"layers": (2, 2, 2, 2)}, 10
    reference, variables = timm_pair(name, num_classes=num_classes, **overrides)
    x = images_nchw(8, 64, 64)
    with jax.enable_x64(True):
        model = create_model(name, num_classes=num_classes, dtype=jnp.float64, drop_path_rate=0.4, drop_rate=0.3,
                             **overrides)  # fmt: skip

        def run(variables: dict, x: jax.Array) -> tuple:
            paths, dropouts = [], []
            with (
                nn.intercept_methods(_recorded(layers.DropPath, paths)),
                nn.intercept_methods(_recorded(nn.Dropout, dropouts)),
            ):
                logits, _ = model.apply(variables, x, train=True, mutable=["batch_stats"],
                                        rngs={"dropout": jax.random.key(7)})  # fmt: skip
            return logits, [(m.rate, i, o) for m, i, o in paths], [(m.rate, i, o) for m, i, o in dropouts]

        logits, paths, dropouts = jax.jit(run)(variables, nhwc(x).astype(jnp.float64))
    path_masks, dropout_masks = [], []
    for rate, before, after in paths:
        if float(rate) == 0:  # timm builds no DropPath for a rate-0 block (the first)
            continue
        mask = np.any(np.asarray(after) != 0, axis=(1, 2, 3))
        np.testing.assert_allclose(after, np.asarray(before) * (mask / (1 - float(rate)))[:, None, None, None],
                                   rtol=1e-15)  # fmt: skip
        path_masks.append(mask)
    ((rate, before, after),) = dropouts
    mask = np.asarray(after) != 0
    np.testing.assert_allclose(after, np.where(mask, np.asarray(before) / (1 - float(rate)), 0), rtol=1e-15)
    dropout_masks.append(mask)
    every = np.concatenate([np.ravel(m) for m in path_masks])
    assert len(path_masks) == 7 and 0 < every.mean() < 1  # some examples' branches dropped, some kept

    def timm_drop_path(x: torch.Tensor, drop_prob: float, training: bool, scale_by_keep: bool) -> torch.Tensor:
        assert training and scale_by_keep
        mask = torch.from_numpy(path_masks.pop(0).astype(np.float64))[:, None, None, None]
        return x * mask / (1 - drop_prob)

    def timm_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
        assert training
        return x * torch.from_numpy(dropout_masks.pop(0).astype(np.float64)) / (1 - p)

    monkeypatch.setattr(timm.layers.drop, "drop_path", timm_drop_path)
    monkeypatch.setattr(torch.nn.functional, "dropout", timm_dropout)
    state = reference.state_dict()
    reference = timm.create_model(name, num_classes=num_classes, drop_path_rate=0.4, drop_rate=0.3, **overrides)
    reference.load_state_dict(state)
    reference = copy.deepcopy(reference).double().train()
    with torch.no_grad():
        expected = reference(torch.from_numpy(x).double()).numpy()
    assert not path_masks and not dropout_masks  # timm drew as many masks as we did
    assert rel_error(logits, expected) <= 1e-9


@pytest.mark.parametrize(("name", "overrides"), [("res2net50d", {"layers": (1, 2, 2, 1)}), ("dla60_res2net", {})])
def test_remat_gives_the_plain_models_gradients_and_statistics(name: str, overrides: dict) -> None:
    """In float64, so that the comparison sees the computation and not float32 rounding of other fusions."""
    variables = timm_pair(name, num_classes=10, **overrides)[1]  # every weight random: every gradient non-zero
    with jax.enable_x64(True):
        # float64 variables too: float32 ones give float32 gradients, whose last-bit rounding of two float64
        # results that differ by 1e-16 showed as 1e-10 on one machine
        variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
        x = jnp.asarray(nhwc(images_nchw(2, 64, 64)), jnp.float64)
        models = [create_model(name, num_classes=10, dtype=jnp.float64, remat=remat, **overrides)
                  for remat in (False, True)]  # fmt: skip
        assert set(flatten_dict(jax.eval_shape(models[1].init, jax.random.key(0), x))) == set(flatten_dict(variables))

        def loss(params: dict, model: nn.Module) -> tuple:
            logits, updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                                          mutable=["batch_stats"])  # fmt: skip
            return jnp.mean(jax.nn.log_softmax(logits)[:, 3]), updates["batch_stats"]

        grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
        (plain, plain_stats), (remat, remat_stats) = (grad(variables["params"], model) for model in models)
    for ours, theirs in ((remat, plain), (remat_stats, plain_stats)):
        for path, value in flatten_dict(theirs).items():
            assert rel_error(flatten_dict(ours)[path], value) <= 1e-12, path


def test_training_knobs_are_config_fields_checked_in_one_line() -> None:
    config = importlib.import_module("configs.quickstart").get_config()
    config.drop_rate, config.drop_path_rate, config.remat = 0.2, 0.1, True
    config_check.check(config)
    model = steps.build_model(config, 10, jnp.float32)
    assert (model.drop_rate, model.drop_path_rate, model.remat) == (0.2, 0.1, True)
    for field, value, message in [
        ("drop_path_rate", 1.0, "config.drop_path_rate=1.0 is not allowed: use a number in [0, 1)"),
        ("drop_rate", -0.1, "config.drop_rate=-0.1 is not allowed: use a number in [0, 1)"),
    ]:
        bad = copy.deepcopy(config)
        bad[field] = value
        with pytest.raises(InvalidInputError, match=re.escape(message)):
            config_check.check(bad)
    dla = copy.deepcopy(config)
    dla.model, dla.model_overrides = "dla60_res2net", {}
    with pytest.raises(InvalidInputError, match="dla60_res2net has no stochastic depth .timm's DLA has none either"):
        config_check.check(dla)
    dla.drop_path_rate = 0.0
    config_check.check(dla)
    overridden = copy.deepcopy(config)
    overridden.model_overrides.drop_path_rate = 0.1
    with pytest.raises(InvalidInputError, match="model_overrides.drop_path_rate is a training setting: set "
                                                "--config.drop_path_rate instead"):  # fmt: skip
        config_check.check(overridden)


def test_a_timm_config_json_sets_the_rates(tmp_path) -> None:
    """timm's save_for_hf records drop_rate / drop_path_rate in model_args; from_pretrained honours them, as
    timm does reading the same directory."""
    _, variables = timm_pair("res2net50d", num_classes=5)
    directory = tmp_path / "model"
    save_pretrained(directory, "res2net50d", variables, overrides={"drop_rate": 0.2, "drop_path_rate": 0.05})
    config = json.loads((directory / "config.json").read_text())
    assert config["model_args"] == {"drop_rate": 0.2, "drop_path_rate": 0.05}
    model, _ = from_pretrained(str(directory))
    reference = timm.create_model(f"local-dir:{directory}", pretrained=True)
    assert (model.drop_rate, model.drop_path_rate) == (reference.drop_rate, 0.05)
    assert _block_rates(model)[-1] == reference.layer4[-1].drop_path.drop_prob
