"""Writes a model's weights in another format.

    python -m res2net_jax.export --format=torch --model=res2net50d --weights=DIR --out=res2net50d.safetensors
    python -m res2net_jax.export --format=orbax --model=res2net50d --weights=res2net50d.pth --out=DIR
    python -m res2net_jax.export --format=mindspore --model=res2net50_v1b --weights=DIR --out=r50_v1b.ckpt
    python -m res2net_jax.export --format=stablehlo --model=res2net50d --weights=DIR --out=res2net50d.jaxexport
    python -m res2net_jax.export --format=savedmodel --model=res2net50d --weights=DIR --out=res2net50d_savedmodel
    python -m res2net_jax.export --format=onnx --model=res2net50d --weights=DIR --out=res2net50d.onnx
    python -m res2net_jax.export --format=pretrained --weights=runs/quickstart/best --out=digits_model

--weights takes a training workdir (its latest checkpoint; WORKDIR/best for the best one; --ema for the
EMA weights), which names its own model, so --model may be left out, or any file
`res2net_jax.weight_files.load_checkpoint` reads (a .pth/.bin/.safetensors PyTorch state dict, a MindSpore
.ckpt, or an Orbax directory) with --model. stablehlo, savedmodel and onnx write
the inference function with BatchNorm folded into the convolutions (normalised NHWC float32 images of
--image_size, any batch size -> logits; onnx: --nchw for NCHW images as timm's export takes them,
--opset; see `res2net_jax.deploy` and `res2net_jax.onnx_export`). An existing --out is never overwritten, and
the output appears under its name only once complete. pretrained writes what
`res2net_jax.save_pretrained` writes (timm's format, with a run's class names, architecture and
evaluation size and crop), which
`hf upload ORG/REPO DIR` publishes and `from_pretrained`, predict and timm read.
"""

from __future__ import annotations

from res2net_jax import cli

cli.quiet_startup()  # before anything imports TensorFlow

from absl import flags, logging  # noqa: E402

from res2net_jax import convert, deploy, onnx_export, pretrained, weight_files  # noqa: E402
from res2net_jax.errors import InvalidInputError  # noqa: E402
from res2net_jax.models import DLA  # noqa: E402
from res2net_jax.outputs import writable_output_path  # noqa: E402
from res2net_jax.registry import create_model, get_spec  # noqa: E402

_FORMAT = flags.DEFINE_enum(
    "format",
    None,
    ["orbax", "torch", "mindspore", "pretrained", "stablehlo", "savedmodel", "onnx"],
    "orbax: Flax variables; torch: timm-named state dict; mindspore: MindCV-named .ckpt; pretrained: a directory "
    "in timm's format (config.json + model.safetensors); "
    "stablehlo: serialised jax.export of the inference function; savedmodel, onnx: the same as a TF SavedModel "
    "or an ONNX model.",
    required=True,
)
_MODEL = flags.DEFINE_string(
    "model", None, "Registered model name, e.g. res2net50_26w_4s (default: the one a training workdir names)."
)
_WEIGHTS = flags.DEFINE_string(
    "weights",
    None,
    "A training workdir (WORKDIR, WORKDIR/best, or a step of either), a weights file or an Orbax directory.",
    required=True,
)
_EMA = flags.DEFINE_bool("ema", False, "Export a training workdir's EMA of the weights.")
_OUT = flags.DEFINE_string(
    "out",
    None,
    "Output: a directory (orbax, savedmodel); .safetensors, .pth, .pt or .bin (torch); .ckpt (mindspore); a file "
    "(stablehlo, onnx).",
    required=True,
)
_NUM_CLASSES = flags.DEFINE_integer("num_classes", None, "Classes of the written head (default: the input's).")
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", None, "stablehlo/savedmodel/onnx: the input height and width (default: the model's, 224)."
)
_RESET_HEAD = flags.DEFINE_bool("reset_head", False, "Replace a head of another class count with a new one.")
_OPSET = flags.DEFINE_integer("opset", onnx_export.OPSET, "onnx: the ONNX opset the graph is written in.")
_NCHW = flags.DEFINE_bool(
    "nchw", False, "onnx: take NCHW images (batch, 3, size, size), as timm's torch.onnx.export does, not NHWC."
)


_DEPLOY = {
    "stablehlo": deploy.export_stablehlo,
    "savedmodel": deploy.export_savedmodel,
    "onnx": onnx_export.export_onnx,
}


def main(argv: list[str]) -> None:
    """Converts --weights to --format and writes --out."""
    if len(argv) > 1:
        raise InvalidInputError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)
    out = writable_output_path(_OUT.value)  # refused before any work
    if _IMAGE_SIZE.value is not None and _IMAGE_SIZE.value < 32:
        raise InvalidInputError(f"--image_size={_IMAGE_SIZE.value} is not allowed: the models take 32 px or more")
    if _FORMAT.value != "onnx" and (_NCHW.value or _OPSET.value != onnx_export.OPSET):
        raise InvalidInputError(f"--opset and --nchw are settings of --format=onnx, not of --format={_FORMAT.value}")
    if _FORMAT.value == "onnx":
        onnx_export.check_opset(_OPSET.value)
    name, overrides, variables, class_names, data_config = cli.load_weights(
        _WEIGHTS.value, _MODEL.value, _NUM_CLASSES.value, _RESET_HEAD.value, _EMA.value
    )
    model = create_model(name, num_classes=convert.num_classes_of(variables), **overrides)
    if _FORMAT.value == "torch":
        weight_files.save_state_dict(convert.flax_to_torch(model, variables), out)
    elif _FORMAT.value == "mindspore":
        weight_files.to_mindspore(variables, name, out, overrides)
    elif _FORMAT.value == "pretrained":
        pretrained.save_pretrained(out, name, variables, class_names, overrides, data_config)
    elif _FORMAT.value in _DEPLOY:
        image_size = _IMAGE_SIZE.value or get_spec(name).input_size
        if isinstance(model, DLA) and image_size % 32:
            raise InvalidInputError(f"--image_size={image_size} is not allowed for {name}: DLA takes multiples of 32")
        options = {"opset": _OPSET.value, "nchw": _NCHW.value} if _FORMAT.value == "onnx" else {}
        _DEPLOY[_FORMAT.value](model, variables, image_size, out, **options)
    else:
        weight_files.save_variables(variables, out)
    changed = "".join(f", {key}={value}" for key, value in overrides.items())  # a reduced network says so
    print(f"wrote {name}{changed} ({convert.num_classes_of(variables)} classes) as {_FORMAT.value} to {out}")


if __name__ == "__main__":
    cli.run(main)
