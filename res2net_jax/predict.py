"""Top-k classes of image files.

    python -m res2net_jax.predict --weights=res2net50d cat.jpg dog.png      # timm's published weights
    python -m res2net_jax.predict --model=res2net50_26w_4s --weights=model.safetensors cat.jpg
    python -m res2net_jax.predict --weights=runs/quickstart/best --format=csv digits/*.png

A run, published weights and save_pretrained directories name their model and classes, and their
preprocessing (a run's image size and crop; config.json's pretrained_cfg). Images are
resized and centre-cropped on the host (PIL, as timm's evaluation transform) and classified in
batches of --batch_size, so the model compiles once whatever the image sizes. Each unreadable or
refused image (beyond `inference.MAX_PIXELS` or `MAX_ASPECT`) is reported by name and skipped; the
exit status is then 1.
"""

from __future__ import annotations

import csv
import json
import sys

from res2net_jax import cli

cli.quiet_startup()  # before anything imports TensorFlow

import numpy as np  # noqa: E402
from absl import flags, logging  # noqa: E402

from res2net_jax.convert import num_classes_of  # noqa: E402
from res2net_jax.errors import InvalidInputError  # noqa: E402
from res2net_jax.inference import center_crop, imagenet_classes, load_image, make_predict_fn  # noqa: E402
from res2net_jax.registry import create_model  # noqa: E402

_MODEL = flags.DEFINE_string(
    "model", None, "Registered model name, e.g. res2net50_26w_4s (default: the one a training workdir names)."
)
_WEIGHTS = flags.DEFINE_string(
    "weights",
    None,
    "A training workdir (WORKDIR, WORKDIR/best, or a step of either), a registered name (timm's published "
    "weights), hf-hub:ORG/REPO, a save_pretrained directory, a .pth/.bin/.safetensors/.ckpt file or an Orbax "
    "directory.",
    required=True,
)
_EMA = flags.DEFINE_bool("ema", False, "Use a training workdir's EMA of the weights.")
_TOP_K = flags.DEFINE_integer("top_k", 5, "How many classes to print per image.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Images per compiled batch (the last one is padded).")
_FORMAT = flags.DEFINE_enum("format", "text", ["text", "json", "csv"], "Output: readable text, JSON or CSV.")


def main(argv: list[str]) -> None:
    """Classifies each image named on the command line."""
    logging.set_verbosity(logging.WARNING)
    paths = argv[1:]
    if not paths:
        raise InvalidInputError("name at least one image file to classify")
    for flag in (_TOP_K, _BATCH_SIZE):
        if flag.value < 1:
            raise InvalidInputError(f"--{flag.name}={flag.value} is not allowed: use a whole number >= 1")
    name, overrides, variables, names, data = cli.load_weights(_WEIGHTS.value, _MODEL.value, ema=_EMA.value)
    model = create_model(name, num_classes=num_classes_of(variables), **overrides)
    # Crops come from the host at input_size: the compiled function does not resample them.
    top_k = min(_TOP_K.value, model.num_classes)
    predict = make_predict_fn(model, variables, top_k, data.input_size, crop_pct=1.0, mean=data.mean, std=data.std)
    if names is None and model.num_classes == len(imagenet_classes()):
        names = imagenet_classes()
    batch_size = min(_BATCH_SIZE.value, len(paths))
    failed, kept, results, crops = [], [], [], []

    def classify() -> None:  # the crops so far, padded to one batch shape
        count = len(crops)
        result = predict(np.stack(crops + [np.zeros_like(crops[0])] * (batch_size - count)))
        for probs, classes in zip(np.asarray(result.top_probs[:count]), np.asarray(result.top_classes[:count]),
                                  strict=True):  # fmt: skip
            results.append(
                [(int(c), names[c] if names else None, float(p)) for p, c in zip(probs, classes, strict=True)]
            )
        crops.clear()

    for path in paths:
        try:
            crops.append(center_crop(load_image(path), data.input_size, data.crop_pct, data.interpolation))
            kept.append(path)
        except InvalidInputError as err:  # unreadable, or beyond the size limits
            print(cli.one_line(err), file=sys.stderr)
            failed.append(path)
        if len(crops) == batch_size:
            classify()
    if crops:
        classify()
    _write(kept, results)
    if failed:
        print(f"{len(failed)} of {len(paths)} images could not be classified: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


def _write(paths: list[str], results: list[list[tuple[int, str | None, float]]]) -> None:
    """Each image's top classes (index, name, probability) on stdout in --format. Class names come from
    the weights' config.json, which anyone can write: text and CSV show their control characters as
    escapes (JSON escapes them itself), so a name cannot act on the terminal or forge rows."""
    results = [[(c, None if label is None else cli.printable(label), p) for c, label, p in rows] for rows in results]
    paths = [cli.printable(path) for path in paths]
    if _FORMAT.value == "json":
        top = [[{"class": c, "label": label, "prob": p} for c, label, p in rows] for rows in results]
        json.dump([{"path": path, "top": t} for path, t in zip(paths, top, strict=True)], sys.stdout, indent=1)
        print()
    elif _FORMAT.value == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["path", "rank", "class", "label", "prob"])
        for path, rows in zip(paths, results, strict=True):
            for rank, (c, label, p) in enumerate(rows, 1):
                writer.writerow([path, rank, c, label if label is not None else "", f"{p:.6f}"])
    else:
        for path, rows in zip(paths, results, strict=True):
            print(path)
            for c, label, p in rows:
                print(f"  {p:7.2%}  {c:4d}  {label if label is not None else f'class {c}'}")


if __name__ == "__main__":
    cli.run(main)
