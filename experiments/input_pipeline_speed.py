"""Images per second of the TFDS training and evaluation pipelines on this host's CPU.

    PYTHONPATH=. python experiments/input_pipeline_speed.py --out=experiments/results/pipeline_cpu.json
    PYTHONPATH=. python experiments/input_pipeline_speed.py --dataset=imagenet2012 --out=/tmp/imagenet_pipeline.json

The accelerator benchmark (benchmark.py) times the train step on device-resident data; this script
times what feeds it: JPEG decoding and the augmentation of configs/default.py (MindCV's recipe:
random-resized-crop, flip, colour jitter 0.4, random erasing 0.5) for training, resize and center
crop for evaluation, batched as res2net_jax.train reads them. Without --dataset it writes --images
JPEGs of ImageNet's typical size (500 x 375) to a temporary folder dataset and reads those. A GPU
step of N img/s needs a host that feeds N img/s: compare the two figures.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import numpy as np
import report
from absl import app, flags, logging

_DATASET = flags.DEFINE_string("dataset", "", "TFDS name or folder:PATH; '' writes synthetic JPEGs.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data directory ('' for TFDS's default).")
_IMAGES = flags.DEFINE_integer("images", 1024, "Synthetic JPEGs to write when --dataset is ''.")
_BATCH = flags.DEFINE_integer("batch", 128, "Images per batch.")
_BATCHES = flags.DEFINE_integer("batches", 8, "Timed batches per pipeline, after one untimed batch.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Output height and width.")
_OUT = flags.DEFINE_string("out", None, "The JSON file to write (never overwritten).", required=True)
PACKAGES = ("tensorflow", "tensorflow-cpu", "tensorflow-datasets", "numpy")


def _write_jpegs(root: str, count: int) -> None:
    """`count` random-texture JPEGs of 500 x 375 (ImageNet's commonest size), in 10 classes, in train/ and
    validation/ alike."""
    from PIL import Image

    rng = np.random.RandomState(0)
    for split in ("train", "validation"):
        for index in range(count):
            directory = os.path.join(root, split, f"class{index % 10}")
            os.makedirs(directory, exist_ok=True)
            coarse = rng.randint(0, 256, (47, 63, 3), dtype=np.uint8)  # smooth, so JPEG sizes are realistic
            image = Image.fromarray(coarse).resize((500, 375), Image.BILINEAR)
            image.save(os.path.join(directory, f"{index}.jpg"), quality=90)


def _images_per_second(batches: Any, count: int) -> float:
    next(batches)  # the first batch fills the pipeline's buffers and threads
    start = time.perf_counter()
    seen = sum(len(next(batches)["label"]) for _ in range(count))
    return seen / (time.perf_counter() - start)


def _measure(dataset: str) -> dict[str, Any]:
    from configs import default
    from res2net_jax import cli

    cli.quiet_startup()  # before TensorFlow is imported
    from res2net_jax import input_pipeline

    input_pipeline.hide_tf_from_accelerators()
    config = default.get_config()
    config.update({"dataset": dataset, "data_dir": _DATA_DIR.value, "image_size": _IMAGE_SIZE.value,
                   "batch_size": _BATCH.value, "eval_batch_size": _BATCH.value})  # fmt: skip
    builder = input_pipeline.get_builder(config)
    info = input_pipeline.dataset_info(builder, config)
    needed = (_BATCHES.value + 1) * _BATCH.value
    if min(info.num_train, info.num_eval) < needed:
        raise app.UsageError(f"{dataset} has fewer than the {needed} images per split that --batches and --batch "
                             "need: lower them, or raise --images")  # fmt: skip
    train = input_pipeline.train_dataset(builder, info, config, epoch=0, start_batch=0, process_index=0,
                                         process_count=1)  # fmt: skip
    evaluation = input_pipeline.eval_dataset(builder, info, config, process_index=0, process_count=1)
    return {
        "train": {"img_s": _images_per_second(input_pipeline.as_numpy(train), _BATCHES.value)},
        "eval": {"img_s": _images_per_second(input_pipeline.as_numpy(evaluation), _BATCHES.value)},
    }


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)
    report.refuse_existing(_OUT.value)
    settings = {"dataset": _DATASET.value or f"{_IMAGES.value} synthetic 500x375 JPEGs per split",
                "batch": _BATCH.value, "batches": _BATCHES.value, "image_size": _IMAGE_SIZE.value}  # fmt: skip
    if _DATASET.value:
        pipelines = _measure(_DATASET.value)
    else:
        with tempfile.TemporaryDirectory() as root:
            _write_jpegs(root, _IMAGES.value)
            pipelines = _measure(f"folder:{root}")
    print(pipelines)
    report.write(_OUT.value, PACKAGES, settings, pipelines=pipelines)


if __name__ == "__main__":
    app.run(main)
