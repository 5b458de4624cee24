"""What gradient checkpointing (`remat`) saves: the compiled train step's memory with and without it.

    PYTHONPATH=. python experiments/remat_memory.py --models=res2net50,res2net50d \\
        --out=experiments/results/remat_memory_CARD.json

For each model, the package's train step (`steps.make_train_step`, one device, synthetic uint8 batch) is
compiled with remat off and on, and XLA's memory analysis of each executable is recorded: temporaries
(activations kept for the backward pass, workspace), arguments and outputs. Nothing runs, so the figures
are the compiler's plan on the card it runs on; no TensorFlow or ml_collections is imported (the step
reads the config's fields only), so it runs on a machine with JAX alone.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import report
from absl import app, flags
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from res2net_jax import cli, create_model, steps

_MODELS = flags.DEFINE_list("models", ["res2net50", "res2net50d"], "Registered names.")
_BATCH = flags.DEFINE_integer("batch", 32, "Training batch size on the one device.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Input height and width.")
_LAYERS = flags.DEFINE_list("layers", [], "Blocks per stage instead of the model's own (smoke runs).")
_OUT = flags.DEFINE_string("out", None, "The JSON file to write (never overwritten).", required=True)
PACKAGES = ("jax", "jaxlib", "flax", "optax")
MIB = 2**20


def _config() -> types.SimpleNamespace:
    """The fields the step and optimiser read: MindCV's recipe, no augmentation (it changes no memory plan)."""
    return types.SimpleNamespace(
        optimizer="momentum", momentum=0.9, weight_decay=1e-4, decay_bn_and_bias=False, grad_clip_norm=0.0,
        grad_accum_steps=1, label_smoothing=0.1, mixup_alpha=0.0, cutmix_alpha=0.0, mix_switch_prob=0.5,
        ema_decay=0.0, seed=0, freeze="", freeze_bn=False, hflip=False, color_jitter=0.0, random_erasing=0.0,
    )  # fmt: skip


def step_memory(name: str, remat: bool) -> dict[str, float]:
    """MiB of temporaries, arguments and outputs of the compiled train step of `name`."""
    config, device = _config(), jax.devices()[0]
    dtype = jnp.bfloat16 if device.platform in ("gpu", "tpu") else jnp.float32
    overrides = {"layers": tuple(int(n) for n in _LAYERS.value)} if _LAYERS.value else {}
    model = create_model(name, dtype=dtype, axis_name=steps.AXIS, remat=remat, **overrides)
    tx = steps.create_optimizer(config, optax.constant_schedule(0.1))
    mesh = jax.sharding.Mesh(np.array([device]), (steps.AXIS,))
    size, batch = _IMAGE_SIZE.value, _BATCH.value
    shapes = jax.eval_shape(
        lambda: steps.init_train_state(config, tx, model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
    )
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(steps.AXIS))
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), shapes)
    batch_shapes = {"image": ((batch, size, size, 3), jnp.uint8), "label": ((batch,), jnp.int32),
                    "epoch": ((batch,), jnp.int32), "index": ((batch,), jnp.int32)}  # fmt: skip
    data = {key: jax.ShapeDtypeStruct(shape, dt, sharding=split) for key, (shape, dt) in batch_shapes.items()}
    compiled = steps.make_train_step(model, tx, config, mesh).lower(state, data).compile()
    analysis = compiled.memory_analysis()
    return {
        "temp_mib": analysis.temp_size_in_bytes / MIB,
        "argument_mib": analysis.argument_size_in_bytes / MIB,
        "output_mib": analysis.output_size_in_bytes / MIB,
        "dtype": jnp.dtype(dtype).name,
    }


def main(argv: list[str]) -> None:
    del argv
    report.refuse_existing(_OUT.value)
    results = {}
    for name in _MODELS.value:
        plain, remat = step_memory(name, remat=False), step_memory(name, remat=True)
        results[name] = {"plain": plain, "remat": remat, "temp_ratio": remat["temp_mib"] / plain["temp_mib"]}
        print(f"{name}: temporaries {plain['temp_mib']:.0f} MiB plain, {remat['temp_mib']:.0f} MiB with remat "
              f"({results[name]['temp_ratio']:.2f}x)", flush=True)  # fmt: skip
    settings = {"batch": _BATCH.value, "image_size": _IMAGE_SIZE.value, "layers": _LAYERS.value}
    report.write(_OUT.value, PACKAGES, settings, models=results)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
