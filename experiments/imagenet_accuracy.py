"""Top-1/top-5 of weights files on ImageNet validation (TFDS imagenet2012), written as a result JSON.

    PYTHONPATH=. python experiments/imagenet_accuracy.py --out=experiments/results/imagenet_val.json \\
        --weights=res2net50=res2net50_26w_4s.safetensors,res2net50_v1b=res2net50d.safetensors
    python experiments/render.py experiments/results/h100.json experiments/results/imagenet_val.json

The weights are any file main.py's eval takes (timm .pth/.bin/.safetensors, MindCV .ckpt, an Orbax
directory). ImageNet must be prepared for TFDS by hand (see README, Training and validation); any
other TFDS name or folder:PATH works too. Evaluation is `res2net_jax.train.evaluate` with the
timm/MindCV transform (resize the shorter side to image_size / crop_pct, bilinear with antialiasing,
center crop). Expect the published figures of the weights: res2net50 77.99 / 93.86,
res2net101 79.19 / 94.47, res2net50_v1b (res2net50d) 80.28 / 95.03, res2net101_v1b 81.24 / 95.35.
Writes `models.<name>.{top1, top5, loss, weights}`.
"""

from __future__ import annotations

from typing import Any

import report
from absl import app, flags, logging

from res2net_jax import cli

_WEIGHTS = flags.DEFINE_list("weights", None, "name=path pairs: a registered model and its weights.", required=True)
_DATASET = flags.DEFINE_string("dataset", "imagenet2012", "TFDS name or folder:PATH.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data directory ('' for TFDS's default).")
_SPLIT = flags.DEFINE_string("split", "", "Evaluation split ('' picks validation, else test).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Center-crop size.")
_CROP_PCT = flags.DEFINE_float("crop_pct", 0.875, "The shorter side is resized to image_size / crop_pct.")
_BATCH = flags.DEFINE_integer("batch", 256, "Evaluation batch (divisible by the device count).")
_BACKEND = flags.DEFINE_string("backend", "auto", "auto, cpu, gpu or tpu.")
_LAYERS = flags.DEFINE_list("layers", [], "Blocks per stage instead of the model's own (tests).")
_OUT = flags.DEFINE_string("out", None, "The JSON file to write (never overwritten).", required=True)
PACKAGES = ("jax", "jaxlib", "flax", "tensorflow", "tensorflow-datasets")


def _pairs(items: list[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise app.UsageError(f"--weights takes name=path pairs, got {item!r}")
        pairs[name] = path
    return pairs


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)
    weights = _pairs(_WEIGHTS.value)
    report.refuse_existing(_OUT.value)
    from configs import default
    from res2net_jax import cli

    cli.quiet_startup()  # before TensorFlow is imported
    from res2net_jax import registry, train

    cli.hide_tf_from_accelerators()
    unknown = sorted(set(weights) - set(registry.list_models()))
    if unknown:
        raise app.UsageError(f"unknown model {', '.join(unknown)}: see res2net_jax.list_models()")
    results: dict[str, Any] = {}
    for name, path in weights.items():
        config = default.get_config()
        config.update(
            model=name, eval_weights=path, dataset=_DATASET.value, data_dir=_DATA_DIR.value, eval_split=_SPLIT.value,
            image_size=_IMAGE_SIZE.value, crop_pct=_CROP_PCT.value, eval_batch_size=_BATCH.value,
            batch_size=_BATCH.value, backend=_BACKEND.value,
        )  # fmt: skip
        if _LAYERS.value:
            config.model_overrides.layers = tuple(int(n) for n in _LAYERS.value)
        results[name] = {**train.evaluate(config, workdir=None), "weights": path}
    settings = {
        "dataset": _DATASET.value, "split": _SPLIT.value or "validation", "image_size": _IMAGE_SIZE.value,
        "crop_pct": _CROP_PCT.value, "batch": _BATCH.value, "layers": _LAYERS.value or "the model's own",
    }  # fmt: skip
    report.write(_OUT.value, PACKAGES, settings, models=results)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
