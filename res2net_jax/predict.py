"""Top-k ImageNet classes of image files.

    python -m res2net_jax.predict --model=res2net50_26w_4s --weights=model.safetensors cat.jpg dog.png

Each unreadable or refused image (beyond `inference.MAX_PIXELS` or `MAX_ASPECT`) is reported by name
and skipped; the exit status is then 1.
"""

from __future__ import annotations

import sys

from res2net_jax import cli

cli.quiet_startup()  # before anything imports TensorFlow

import numpy as np  # noqa: E402
from absl import flags, logging  # noqa: E402

from res2net_jax.convert import load_variables, num_classes_of  # noqa: E402
from res2net_jax.errors import InvalidInputError  # noqa: E402
from res2net_jax.inference import imagenet_classes, load_image, make_predict_fn  # noqa: E402
from res2net_jax.registry import create_model, get_spec  # noqa: E402

_MODEL = flags.DEFINE_string("model", None, "Registered model name, e.g. res2net50_26w_4s.", required=True)
_WEIGHTS = flags.DEFINE_string("weights", None, ".pth/.bin/.safetensors file or Orbax directory.", required=True)
_TOP_K = flags.DEFINE_integer("top_k", 5, "How many classes to print per image.")


def main(argv: list[str]) -> None:
    """Classifies each image named on the command line."""
    logging.set_verbosity(logging.WARNING)
    paths = argv[1:]
    if not paths:
        raise InvalidInputError("name at least one image file to classify")
    spec = get_spec(_MODEL.value)
    variables = load_variables(_WEIGHTS.value, _MODEL.value)
    model = create_model(_MODEL.value, num_classes=num_classes_of(variables))
    predict = make_predict_fn(model, variables, _TOP_K.value, spec.input_size, spec.crop_pct)
    names = imagenet_classes() if model.num_classes == len(imagenet_classes()) else None
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
