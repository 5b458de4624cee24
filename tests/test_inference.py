"""The jitted inference function, its preprocessing, and the predict command."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import timm_pair
from PIL import Image

from res2net_jax import create_model, inference, make_predict_fn, preprocess, weight_files
from res2net_jax.errors import InvalidInputError
from res2net_jax.inference import center_crop, imagenet_classes

MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def _torch_eval_transform(images: np.ndarray) -> np.ndarray:
    """The timm/torchvision evaluation transform: Resize(256, bilinear, antialias), CenterCrop(224), normalise."""
    _, height, width, _ = images.shape
    size = (256, int(256 * width / height)) if height <= width else (int(256 * height / width), 256)
    x = F.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2).float(), size=size, mode="bilinear",
                      antialias=True, align_corners=False)  # fmt: skip
    top, left = round((size[0] - 224) / 2), round((size[1] - 224) / 2)
    x = (x[:, :, top : top + 224, left : left + 224] / 255 - MEAN) / STD
    return x.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("shape", [(300, 400), (100, 80), (256, 256), (517, 333)])
def test_preprocess_matches_torch_eval_transform(shape: tuple[int, int]) -> None:
    images = (np.random.RandomState(0).rand(2, *shape, 3) * 255).astype(np.uint8)
    ours = np.asarray(preprocess(jnp.asarray(images)))
    assert ours.shape == (2, 224, 224, 3)
    np.testing.assert_allclose(ours, _torch_eval_transform(images), atol=1e-4)


def test_preprocess_rejects_float_input() -> None:
    with pytest.raises(ValueError, match="uint8 batch of RGB images"):
        preprocess(jnp.zeros((1, 64, 64, 3), jnp.float32))


def test_predict_fn_gives_timm_top_k_and_compiles_once_per_shape() -> None:
    reference, variables = timm_pair("res2next50")
    model = create_model("res2next50")
    predict = make_predict_fn(model, variables, top_k=5)
    images = (np.random.RandomState(1).rand(3, 240, 320, 3) * 255).astype(np.uint8)
    result = predict(images)
    with torch.no_grad():
        expected = reference(torch.from_numpy(_torch_eval_transform(images)).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(result.logits, expected, rtol=0, atol=1e-3 * np.abs(expected).max())
    probs = torch.softmax(torch.from_numpy(expected), -1).numpy()
    top5 = np.argsort(-expected, axis=-1)[:, :5]
    np.testing.assert_array_equal(result.top_classes, top5)
    np.testing.assert_allclose(result.top_probs, np.take_along_axis(probs, top5, axis=-1), atol=1e-4)

    compiled = predict.func  # the jitted function under functools.partial
    predict(images[::-1].copy())
    assert compiled._cache_size() == 1
    predict(images[:, :200])
    assert compiled._cache_size() == 2


def test_predict_fn_refuses_weights_holding_nan_or_infinity() -> None:
    """Its compiled ReLUs may drop a NaN (`inference_compiler_options`): a diverged network would print
    confident classes instead of NaN, so such weights are refused before anything compiles."""
    _, variables = timm_pair("res2net50_26w_4s", num_classes=10)
    for bad in (np.nan, np.inf):
        broken = jax.tree.map(np.array, variables)
        broken["params"]["layer2_0"]["conv1"]["kernel"][0, 0, 0, 0] = bad
        with pytest.raises(InvalidInputError, match="the weights hold NaN or infinite values"):
            make_predict_fn(create_model("res2net50_26w_4s", num_classes=10), broken)


def test_inference_options_fall_back_to_xlas_defaults_when_xla_refuses_them(monkeypatch) -> None:
    """An XLA that no longer has the experimental option compiles the inference function with its defaults
    instead of failing."""
    monkeypatch.setattr(inference, "_CPU_INFERENCE_OPTIONS", {"xla_cpu_experimental_ynn_fusion_type": "NO_SUCH_TYPE"})
    inference.inference_compiler_options.cache_clear()
    try:
        assert inference.inference_compiler_options() == {}
    finally:
        inference.inference_compiler_options.cache_clear()


def test_class_names_follow_tfds_imagenet2012_order() -> None:
    import importlib.util

    tfds_dir = importlib.util.find_spec("tensorflow_datasets").submodule_search_locations[0]
    with open(os.path.join(tfds_dir, "datasets", "imagenet2012", "labels.txt")) as f:
        tfds_wnids = f.read().split()
    names = imagenet_classes()
    assert [name.split(" ")[0] for name in names] == tfds_wnids
    assert names[0] == "n01440764 tench, Tinca tinca"


def test_predict_command(tmp_path, tmp_weights: dict) -> None:
    rng = np.random.RandomState(0)
    rgb = (rng.rand(90, 120, 3) * 255).astype(np.uint8)
    files = {
        "rgb.jpg": Image.fromarray(rgb),
        "gray.png": Image.fromarray(rgb[..., 0]),
        "palette.png": Image.fromarray(rgb).convert("P"),
        "rgba.png": Image.fromarray(np.dstack([rgb, rgb[..., :1]])),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
    }
    for name, image in files.items():
        image.save(tmp_path / name)
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8 truncated")
    paths = [str(tmp_path / n) for n in ["rgb.jpg", "missing.png", "gray.png", "corrupt.jpg", "palette.png",
                                         "rgba.png", "cmyk.jpg"]]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "res2net_jax.predict", "--model=res2net50", f"--weights={tmp_weights['safetensors']}",
         *paths],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""),
    )  # fmt: skip
    assert done.returncode == 1
    assert "missing.png: cannot read image" in done.stderr and "corrupt.jpg: cannot read image" in done.stderr
    assert "2 of 7 images could not be classified" in done.stderr
    blocks = done.stdout.strip().split("\n" + str(tmp_path))
    assert len(blocks) == 5  # every readable image, in order, each with five classes
    names = set(imagenet_classes())
    for block in blocks:
        rows = block.strip().splitlines()[1:]
        assert len(rows) == 5
        assert all(row.split(maxsplit=2)[2] in names for row in rows)

    # The command's top class for the RGB image is the one the library computes from the host's crop.
    variables = weight_files.load_variables(tmp_weights["safetensors"], "res2net50")
    predict = make_predict_fn(create_model("res2net50"), variables, crop_pct=1.0)
    top = int(predict(center_crop(rgb)[None]).top_classes[0, 0])
    assert blocks[0].splitlines()[1].split()[1] == str(top)

    # Batches of 2 (the last padded), as JSON and as CSV: the same classes as one at a time.
    readable = [p for p in paths if not p.endswith(("missing.png", "corrupt.jpg"))]
    command = [sys.executable, "-m", "res2net_jax.predict", "--model=res2net50", "--batch_size=2",
               f"--weights={tmp_weights['safetensors']}", *readable]  # fmt: skip
    as_json = subprocess.run([*command, "--format=json"], capture_output=True, text=True, timeout=300)
    assert as_json.returncode == 0, as_json.stderr[-2000:]
    rows = json.loads(as_json.stdout)
    assert [r["path"] for r in rows] == readable
    for row, block in zip(rows, blocks, strict=True):
        assert [t["class"] for t in row["top"]] == [int(line.split()[1]) for line in block.strip().splitlines()[1:]]
    as_csv = subprocess.run([*command, "--format=csv", "--top_k=2"], capture_output=True, text=True, timeout=300)
    table = list(csv.reader(io.StringIO(as_csv.stdout)))
    assert table[0] == ["path", "rank", "class", "label", "prob"] and len(table) == 1 + 2 * len(readable)
    assert [int(r[2]) for r in table[1:3]] == [t["class"] for t in rows[0]["top"][:2]]


def test_center_crop_is_timm_eval_transform() -> None:
    """The host crop predict uses: timm's create_transform(224, crop_pct=0.875) up to ToTensor, exactly."""
    from timm.data import create_transform

    transform = create_transform(224, is_training=False, crop_pct=0.875)
    before_normalize = torchvision.transforms.Compose(transform.transforms[:-1])
    for shape in [(300, 451, 3), (500, 333, 3), (224, 224, 3)]:
        image = (np.random.RandomState(shape[0]).rand(*shape) * 255).astype(np.uint8)
        expected = before_normalize(Image.fromarray(image)).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(center_crop(image) / np.float32(255), expected)
