"""Top-k ImageNet classes of image files.

    python -m res2net_jax.predict --model=res2net50_26w_4s --weights=model.safetensors cat.jpg dog.png
    python -m res2net_jax.predict --weights=runs/quickstart/best digit.png   # a run names its model and classes

Each unreadable or refused image (beyond `inference.MAX_PIXELS` or `MAX_ASPECT`) is reported by name
and skipped; the exit status is then 1.
"""

from __future__ import annotations

import json
import os
import sys

from res2net_jax import cli

cli.quiet_startup()  # before anything imports TensorFlow

import numpy as np  # noqa: E402
from absl import flags, logging  # noqa: E402

from res2net_jax import workdir  # noqa: E402
from res2net_jax.convert import num_classes_of  # noqa: E402
from res2net_jax.errors import InvalidInputError  # noqa: E402
from res2net_jax.inference import imagenet_classes, load_image, make_predict_fn  # noqa: E402
from res2net_jax.registry import create_model, get_spec  # noqa: E402

_MODEL = flags.DEFINE_string(
    "model", None, "Registered model name, e.g. res2net50_26w_4s (default: the one a training workdir names)."
)
_WEIGHTS = flags.DEFINE_string(
    "weights",
    None,
    "A training workdir (WORKDIR, WORKDIR/best, or a step of either), a .pth/.bin/.safetensors/.ckpt "
    "file or an Orbax directory.",
    required=True,
)
_EMA = flags.DEFINE_bool("ema", False, "Use a training workdir's EMA of the weights.")
_TOP_K = flags.DEFINE_integer("top_k", 5, "How many classes to print per image.")


def _input_transform(weights: str, model_name: str) -> tuple[int, float]:
    """The evaluation size and crop a training workdir's run used, else the model's defaults."""
    source = workdir.locate(weights)
    settings_path = os.path.join(source.root, workdir.CONFIG) if source else ""
    if os.path.exists(settings_path):
        with open(settings_path) as f:
            settings = json.load(f)
        return settings["image_size"], settings["crop_pct"]
    spec = get_spec(model_name)
    return spec.input_size, spec.crop_pct


def main(argv: list[str]) -> None:
    """Classifies each image named on the command line."""
    logging.set_verbosity(logging.WARNING)
    paths = argv[1:]
    if not paths:
        raise InvalidInputError("name at least one image file to classify")
    name, overrides, variables, names = cli.load_weights(_WEIGHTS.value, _MODEL.value, ema=_EMA.value)
    model = create_model(name, num_classes=num_classes_of(variables), **overrides)
    input_size, crop_pct = _input_transform(_WEIGHTS.value, name)
    predict = make_predict_fn(model, variables, min(_TOP_K.value, model.num_classes), input_size, crop_pct)
    if names is None and model.num_classes == len(imagenet_classes()):
        names = imagenet_classes()
    failed = []
    for path in paths:
        try:
            image = load_image(path)
        except InvalidInputError as err:  # unreadable, or beyond the size limits
            print(cli.one_line(err), file=sys.stderr)
            failed.append(path)
            continue
        result = predict(image[None])
        print(path)
        for prob, index in zip(np.asarray(result.top_probs[0]), np.asarray(result.top_classes[0]), strict=True):
            label = names[index] if names else f"class {index}"
            print(f"  {prob:7.2%}  {index:4d}  {label}")
    if failed:
        print(f"{len(failed)} of {len(paths)} images could not be classified: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli.run(main)
