"""The functional core of training: state, optimiser, schedules, mixup/cutmix and the steps.

Pure functions over pytrees, with no input pipeline, I/O, TensorFlow or ml_collections import, so
that benchmarks (on machines with JAX alone) can build the same step `res2net_jax.train` runs. The
step is written for one device with named-axis collectives (gradient mean, synchronised BN
statistics over axis 'batch') and mapped over a 1-D mesh of all devices with `jax.shard_map` inside
`jax.jit`: the pmap programming model on the current JAX API.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from res2net_jax import augment
from res2net_jax.errors import InvalidInputError
from res2net_jax.layers import BatchNorm
from res2net_jax.registry import create_model

if TYPE_CHECKING:  # configs are ml_collections.ConfigDicts; only their fields are read here
    import ml_collections

AXIS = "batch"
DROPOUT_STREAM = 1  # folded into a step's key for the model's 'dropout' RNG stream


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs: weights, BN statistics, optimiser, EMA and the RNG."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any
    ema_batch_stats: Any
    rng: jax.Array  # raw key data, so it checkpoints as a plain array


# --- Model -----------------------------------------------------------------------------------


# config.dtype's choices: "auto" is bfloat16 on GPU/TPU and float32 on CPU.
DTYPES = {"auto": None, "float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(config: ml_collections.ConfigDict, devices: list[jax.Device]) -> Any:
    """config.dtype (`DTYPES`) for the platform of `devices`."""
    if DTYPES[config.dtype] is None:
        return jnp.bfloat16 if devices[0].platform in ("gpu", "tpu") else jnp.float32
    return DTYPES[config.dtype]


def build_model(config: ml_collections.ConfigDict, num_classes: int, dtype: Any) -> nn.Module:
    """The configured model, its BN statistics synchronised over the data-parallel axis, with the
    config's dropout, stochastic depth (Res2Net only, as in timm) and gradient checkpointing."""
    regularisation = {"drop_rate": config.drop_rate, "remat": config.remat}
    if config.drop_path_rate:
        regularisation["drop_path_rate"] = config.drop_path_rate
    return create_model(
        config.model, num_classes=num_classes, dtype=dtype, axis_name=AXIS, **regularisation,
        **dict(config.model_overrides),
    )  # fmt: skip


# --- Optimiser --------------------------------------------------------------------------------


# config.lr_schedule's choices after warmup: (config, steps_per_epoch, decay_steps) -> schedule of the
# steps after warmup, decay_steps of them.
LR_SCHEDULES: dict[str, Callable[[Any, int, int], optax.Schedule]] = {
    "cosine": lambda config, steps_per_epoch, decay_steps: optax.cosine_decay_schedule(
        config.learning_rate, decay_steps, alpha=config.min_lr / config.learning_rate if config.learning_rate else 0
    ),
    "step": lambda config, steps_per_epoch, decay_steps: optax.exponential_decay(
        config.learning_rate, int(config.lr_decay_epochs * steps_per_epoch), config.lr_decay_rate, staircase=True
    ),
    "constant": lambda config, steps_per_epoch, decay_steps: optax.constant_schedule(config.learning_rate),
}


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """Linear warmup, then config.lr_schedule (`LR_SCHEDULES`): cosine to min_lr, step decay every
    lr_decay_epochs, or constant."""
    warmup = int(config.warmup_epochs * steps_per_epoch)
    if config.lr_schedule not in LR_SCHEDULES:
        raise InvalidInputError(f"unknown lr_schedule {config.lr_schedule!r}: use {', '.join(LR_SCHEDULES)}")
    main = LR_SCHEDULES[config.lr_schedule](config, steps_per_epoch, max(total_steps - warmup, 1))
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, config.learning_rate, warmup), main], [warmup])


def weight_decay_mask(params: Any, decay_bn_and_bias: bool) -> Any:
    """True where weight decay applies: every weight, or only conv/dense kernels."""
    return jax.tree.map(lambda p: decay_bn_and_bias or p.ndim > 1, params)


def _sgd(momentum: bool, nesterov: bool = False) -> Callable[[Any, optax.Schedule, Any], optax.GradientTransformation]:
    """PyTorch-style SGD: weight decay added to the gradient before the momentum."""

    def build(config: ml_collections.ConfigDict, schedule: optax.Schedule, mask: Any) -> optax.GradientTransformation:
        return optax.chain(
            optax.add_decayed_weights(config.weight_decay, mask),
            optax.sgd(schedule, momentum=config.momentum if momentum else None, nesterov=nesterov),
        )

    return build


# config.optimizer's choices: (config, schedule, weight-decay mask) -> the optimiser.
OPTIMIZERS: dict[str, Callable[[Any, optax.Schedule, Any], optax.GradientTransformation]] = {
    "sgd": _sgd(momentum=False),
    "momentum": _sgd(momentum=True),
    "nesterov": _sgd(momentum=True, nesterov=True),
    "adamw": lambda config, schedule, mask: optax.adamw(schedule, weight_decay=config.weight_decay, mask=mask),
    "lamb": lambda config, schedule, mask: optax.lamb(schedule, weight_decay=config.weight_decay, mask=mask),
}


def create_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
    """config.optimizer (`OPTIMIZERS`: SGD plain, momentum or Nesterov, AdamW, LAMB), with clipping, weight
    decay and frozen parameters. The schedule is a function of the update count (gradient accumulation
    happens inside the train step)."""
    if config.optimizer not in OPTIMIZERS:
        raise InvalidInputError(f"unknown optimizer {config.optimizer!r}: use {', '.join(OPTIMIZERS)}")
    mask = functools.partial(weight_decay_mask, decay_bn_and_bias=config.decay_bn_and_bias)
    tx = OPTIMIZERS[config.optimizer](config, schedule, mask)
    if config.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
    if config.freeze:
        labels = functools.partial(frozen_labels, pattern=config.freeze)
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx


def is_frozen(path: tuple[str, ...], pattern: str) -> bool:
    """Whether config.freeze's `pattern` is found in a parameter's path, joined by '/' ('layer1_0/bn1/scale')."""
    return re.search(pattern, "/".join(path)) is not None


def frozen_labels(params: Any, pattern: str) -> Any:
    """'frozen' where `pattern` is found in a parameter's path ('layer1_0/bn1/scale'), else 'train'.

    A pattern that freezes nothing, or everything, is an error: it is surely not what was meant."""
    labels = flax.traverse_util.path_aware_map(
        lambda path, _: "frozen" if is_frozen(path, pattern) else "train", params
    )
    kinds = set(jax.tree.leaves(labels))
    if kinds != {"frozen", "train"}:
        example = "/".join(next(iter(flax.traverse_util.flatten_dict(params))))
        what = "no parameter" if kinds == {"train"} else "every parameter"
        raise InvalidInputError(f"config.freeze={pattern!r} matches {what}; paths look like {example!r}")
    return labels


def frozen_bn(pattern: str) -> Callable[..., Any]:
    """A Flax method interceptor (`nn.intercept_methods`) that runs each BatchNorm whose scale `pattern`
    freezes (its path as `frozen_labels` sees it) in eval mode: its running statistics normalise and
    are not updated, as in timm's `freeze` (FrozenBatchNorm2d). The others keep the mode asked for."""

    def intercept(next_fun: Callable[..., Any], args: tuple, kwargs: dict, context: Any) -> Any:
        module = context.module
        if (
            isinstance(module, BatchNorm)
            and context.method_name == "__call__"
            and is_frozen((*module.path, "scale"), pattern)
        ):
            kwargs = {**kwargs, "train": False}
            args = args[:1]
        return next_fun(*args, **kwargs)

    return intercept


# --- Loss and mixup/cutmix on device ------------------------------------------------------------


def mix_batch(
    rng: jax.Array, images: jax.Array, targets: jax.Array, config: ml_collections.ConfigDict
) -> tuple[jax.Array, jax.Array]:
    """timm-style batch mixup / cutmix: pair each example with the batch reversed.

    With both enabled, cutmix is chosen with probability mix_switch_prob. Applied to the global
    batch, so the result does not depend on how many devices share it.
    """
    use_mixup, use_cutmix = config.mixup_alpha > 0, config.cutmix_alpha > 0
    if not (use_mixup or use_cutmix):
        return images, targets
    lam_rng, switch_rng, box_rng = jax.random.split(rng, 3)
    if use_mixup and use_cutmix:
        cutmix = jax.random.uniform(switch_rng) < config.mix_switch_prob
    else:
        cutmix = jnp.asarray(use_cutmix)
    alpha = jnp.where(cutmix, config.cutmix_alpha or 1.0, config.mixup_alpha or 1.0)
    lam = jax.random.beta(lam_rng, alpha, alpha)
    flipped = jnp.flip(images, axis=0)
    height, width = images.shape[1:3]
    cut_h = (height * jnp.sqrt(1 - lam)).astype(jnp.int32)
    cut_w = (width * jnp.sqrt(1 - lam)).astype(jnp.int32)
    cy = jax.random.randint(box_rng, (), 0, height)
    cx = jax.random.randint(jax.random.fold_in(box_rng, 1), (), 0, width)
    y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
    x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
    rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    box_lam = 1 - (y1 - y0) * (x1 - x0) / (height * width)
    mixed = jnp.where(cutmix, jnp.where(box[None, :, :, None], flipped, images), lam * images + (1 - lam) * flipped)
    lam = jnp.where(cutmix, box_lam, lam)
    return mixed.astype(images.dtype), lam * targets + (1 - lam) * jnp.flip(targets, axis=0)


def smoothed_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    """One-hot targets with label smoothing: 1 - smoothing + smoothing / K on the label."""
    return optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)


# --- Steps ------------------------------------------------------------------------------------


def update_batch_size(config: ml_collections.ConfigDict) -> int:
    """Examples per optimiser update: batch_size (one forward/backward pass) x grad_accum_steps."""
    return config.batch_size * config.grad_accum_steps


def make_train_step(
    model: nn.Module, tx: optax.GradientTransformation, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """A jitted step: one optimiser update from a global batch of `update_batch_size(config)` examples;
    the state is replicated, the batch split over devices. The batch holds uint8 images with each
    example's epoch and index (`input_pipeline.train_dataset`), augmented here before mixup/cutmix.

    With grad_accum_steps = k the batch is processed as k passes of batch_size examples (examples
    [j * batch_size, (j + 1) * batch_size) in pass j, on any number of devices), their gradients
    averaged: the same update as one pass over k * batch_size examples, except that BN normalises
    each pass by its own statistics (and updates its running statistics k times).
    """
    num_classes = model.num_classes
    ema_decay = config.ema_decay
    passes = config.grad_accum_steps
    num_devices = mesh.devices.size

    def gradients(
        state: TrainState, batch_stats: Any, images: jax.Array, targets: jax.Array, dropout_rng: jax.Array
    ) -> tuple:
        def loss_fn(params: Any) -> tuple[jax.Array, Any]:
            with nn.intercept_methods(frozen_bn(config.freeze)) if config.freeze_bn else contextlib.nullcontext():
                logits, updates = model.apply(
                    {"params": params, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"],
                    rngs={"dropout": dropout_rng},
                )  # fmt: skip
            # The mean over the global batch. Params are replicated (invariant over AXIS), so autodiff
            # sums their gradient over devices: the gradient of this mean is already the global one.
            loss = jax.lax.pmean(jnp.mean(optax.softmax_cross_entropy(logits, targets)), AXIS)
            return loss, updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return loss, batch_stats, grads

    def per_device(state: TrainState, images: jax.Array, targets: jax.Array) -> tuple[TrainState, dict]:
        # Dropout and stochastic depth: a key per step, device and pass (the mixing key is the step's own).
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        device_key = jax.random.fold_in(jax.random.fold_in(step_key, DROPOUT_STREAM), jax.lax.axis_index(AXIS))
        if passes == 1:
            loss, batch_stats, grads = gradients(state, state.batch_stats, images, targets, device_key)
        else:

            def one_pass(carry: tuple, batch: tuple) -> tuple:
                loss_sum, batch_stats, grad_sum = carry
                index, *examples = batch
                loss, batch_stats, grads = gradients(
                    state, batch_stats, *examples, jax.random.fold_in(device_key, index)
                )
                grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
                return (loss_sum + loss.astype(loss_sum.dtype), batch_stats, grad_sum), None

            split = (x.reshape(passes, x.shape[0] // passes, *x.shape[1:]) for x in (images, targets))
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            carry = (jnp.zeros((), jnp.float32), state.batch_stats, zeros)
            (loss_sum, batch_stats, grad_sum), _ = jax.lax.scan(one_pass, carry, (jnp.arange(passes), *split))
            loss, grads = loss_sum / passes, jax.tree.map(lambda g: g / passes, grad_sum)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if ema_decay > 0:
            ema = functools.partial(optax.incremental_update, step_size=1 - ema_decay)
            ema_params, ema_batch_stats = ema(params, state.ema_params), ema(batch_stats, state.ema_batch_stats)
        else:
            ema_params, ema_batch_stats = state.ema_params, state.ema_batch_stats
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            batch_stats=batch_stats,
            opt_state=opt_state,
            ema_params=ema_params,
            ema_batch_stats=ema_batch_stats,
        )
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS)), out_specs=(P(), P()))

    def by_pass(x: jax.Array) -> jax.Array:
        """Orders the global batch so that each device's shard holds its part of pass 0, then of pass 1, ...:
        pass j is then examples [j * batch_size, (j + 1) * batch_size) whatever the device count."""
        if passes == 1:
            return x
        parts = x.reshape(passes, num_devices, x.shape[0] // (passes * num_devices), *x.shape[1:])
        return jnp.swapaxes(parts, 0, 1).reshape(x.shape)

    augmentation = augment.Augmentation.from_config(config)

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        targets = smoothed_one_hot(batch["label"], num_classes, config.label_smoothing)
        images = augment.augment_batch(batch["image"], batch["epoch"], batch["index"], augmentation)
        images, targets = mix_batch(rng, images.astype(model.dtype), targets, config)
        return sharded(state, by_pass(images), by_pass(targets))

    return train_step


def make_eval_step(model: nn.Module) -> Callable[[Any, dict], dict]:
    """A jitted function from variables and a masked global batch of uint8 images to metric sums."""

    @jax.jit
    def eval_step(variables: Any, batch: dict) -> dict:
        logits = model.apply(variables, augment.normalize(batch["image"]).astype(model.dtype), train=False)
        labels, mask = batch["label"], batch["mask"]
        top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]  # top-5 is top-all with fewer classes
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return {
            "top1": jnp.sum((top5[:, 0] == labels) * mask),
            "top5": jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) * mask),
            "loss": jnp.sum(loss * mask),
            "count": jnp.sum(mask),
        }

    return eval_step


def init_train_state(config: ml_collections.ConfigDict, tx: optax.GradientTransformation, variables: Any) -> TrainState:
    """Step 0 from initial variables: a fresh optimiser state, the EMA (if any) and the seeded RNG."""
    params, batch_stats = variables["params"], variables["batch_stats"]
    with_ema = config.ema_decay > 0
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        # Copies: the step donates the state, and one buffer cannot be donated twice.
        ema_params=jax.tree.map(jnp.copy, params) if with_ema else None,
        ema_batch_stats=jax.tree.map(jnp.copy, batch_stats) if with_ema else None,
        rng=jax.random.key_data(jax.random.fold_in(jax.random.key(config.seed), 1)),
    )
