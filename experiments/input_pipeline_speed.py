"""Images per second of the host input pipelines, this project's (TFDS) beside timm's (PyTorch DataLoader).

    PYTHONPATH=. python experiments/input_pipeline_speed.py --out=experiments/results/pipeline_cpu.json
    PYTHONPATH=. python experiments/input_pipeline_speed.py --dataset=folder:/data/imagenet --out=/tmp/p.json

The accelerator benchmark (benchmark.py) times the train step on device-resident data; this script
times what feeds it, with configs/default.py's recipe (MindCV's: random-resized-crop, flip, colour
jitter 0.4, random erasing 0.5) at --image_size. This project's host decodes the crop window and
resizes it, handing over uint8; the rest of the recipe runs in the jitted step (res2net_jax.augment),
whose cost benchmark.py --augment measures. timm's host does all of it:
`create_transform(S, is_training=True, color_jitter=0.4, re_prob=0.5, re_mode="pixel")` in a PyTorch
DataLoader with one worker process per core, handing over normalised float32. Evaluation: resize to
S / 0.875 and centre crop on both sides.

Both read the same JPEGs (without --dataset, --images synthetic ones of ImageNet's commonest size,
500 x 375, in an image folder), on the same cores. Each (side, pipeline) runs in its own process,
alternated over --rounds so that noise shows as a spread. Reports img/s, img/s per core and the bytes
per image handed to the accelerator; `stages` times each of this project's host operations alone, on
one core, over the same images (where the time goes); `reads` times the read stage alone as host 0 of
1, 2, 4 and 8 hosts, with the records and bytes each host reads per epoch. A GPU step of N img/s needs
a host that feeds N img/s: compare the two figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
import report
from absl import app, flags, logging

from res2net_jax import cli

_DATASET = flags.DEFINE_string("dataset", "", "folder:PATH with train/ and validation/; '' writes synthetic JPEGs.")
_IMAGES = flags.DEFINE_integer("images", 1024, "Synthetic JPEGs to write per split when --dataset is ''.")
_BATCH = flags.DEFINE_integer("batch", 128, "Images per batch.")
_BATCHES = flags.DEFINE_integer("batches", 7, "Timed batches per pipeline, after one untimed batch.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Output height and width.")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Alternations of the two sides.")
_SIDES = flags.DEFINE_list("sides", ["jax", "timm"], "Which sides to time: jax, timm.")
_STAGES = flags.DEFINE_bool("stages", True, "Also time each of this project's host operations alone.")
_READS = flags.DEFINE_bool("reads", True, "Also time the read stage alone, as host 0 of 1, 2, 4 and 8 hosts.")
_OUT = flags.DEFINE_string("out", None, "The JSON file to write (never overwritten).", required=True)
_WORKER = flags.DEFINE_string("worker", None, "Internal: time one side 'SIDE:ROOT' and print JSON.")
PACKAGES = ("tensorflow-cpu", "tensorflow-datasets", "torch", "torchvision", "timm", "pillow", "numpy")
CROP_PCT = 0.875


def cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


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


def _images_per_second(batches: Any, count: int) -> tuple[float, int]:
    """img/s over `count` batches after one untimed batch, and the bytes per image handed over."""
    first = next(batches)
    per_image = sum(np.asarray(v).nbytes for v in first.values()) // len(first["label"])
    start = time.perf_counter()
    seen = sum(len(next(batches)["label"]) for _ in range(count))
    return seen / (time.perf_counter() - start), per_image


def _config(root: str) -> Any:
    from configs import default

    config = default.get_config()
    config.update({"dataset": f"folder:{root}", "image_size": _IMAGE_SIZE.value, "batch_size": _BATCH.value,
                   "eval_batch_size": _BATCH.value, "crop_pct": CROP_PCT})  # fmt: skip
    return config


def _jax(root: str) -> dict[str, Any]:
    from res2net_jax import cli

    cli.quiet_startup()  # before TensorFlow is imported
    from res2net_jax import datasets, input_pipeline

    cli.hide_tf_from_accelerators()
    config = _config(root)
    builder = datasets.get_builder(config)
    info = datasets.dataset_info(builder, config)
    crop = input_pipeline.Crop.from_config(config)
    train = input_pipeline.train_dataset(builder, info, crop, global_batch=config.batch_size, seed=config.seed,
                                         epoch=0, start_batch=0, process_index=0, process_count=1)  # fmt: skip
    evaluation = input_pipeline.eval_dataset(builder, info, crop, eval_batch=config.eval_batch_size,
                                             process_index=0, process_count=1)  # fmt: skip
    figures = {}
    for name, ds in (("train", train), ("eval", evaluation)):
        img_s, per_image = _images_per_second(input_pipeline.as_numpy(ds), _BATCHES.value)
        figures[name] = {"img_s": img_s, "img_s_per_core": img_s / cores(), "bytes_per_image": per_image}
    return figures


def _timm(root: str) -> dict[str, Any]:
    import torch
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    size = _IMAGE_SIZE.value
    train_tf = create_transform(size, is_training=True, color_jitter=0.4, re_prob=0.5, re_mode="pixel")
    eval_tf = create_transform(size, is_training=False, crop_pct=CROP_PCT)
    figures = {}
    for name, split, transform in (("train", "train", train_tf), ("eval", "validation", eval_tf)):
        loader = torch.utils.data.DataLoader(
            ImageFolder(os.path.join(root, split), transform), batch_size=_BATCH.value, shuffle=name == "train",
            num_workers=cores(), drop_last=True, persistent_workers=False,
        )  # fmt: skip
        batches = ({"image": x.numpy(), "label": y.numpy()} for x, y in loader)
        img_s, per_image = _images_per_second(batches, _BATCHES.value)
        figures[name] = {"img_s": img_s, "img_s_per_core": img_s / cores(), "bytes_per_image": per_image}
    return figures


def _stages(root: str) -> dict[str, float]:
    """Milliseconds per image of each host operation of this project's training pipeline, alone, on
    one core, over the train split's files (read from memory)."""
    from res2net_jax import cli

    cli.quiet_startup()
    import tensorflow as tf

    from res2net_jax import input_pipeline

    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    crop = input_pipeline.Crop.from_config(_config(root))
    folder = os.path.join(root, "train")
    files = [os.path.join(d, f) for d, _, names in sorted(os.walk(folder)) for f in sorted(names)]
    blobs = [tf.constant(open(f, "rb").read()) for f in files[: _BATCH.value]]
    seed = tf.constant([0, 1], tf.int64)
    size = [crop.image_size, crop.image_size]
    draws = tf.random.stateless_uniform([input_pipeline.CROP_TRIES, 4], seed)

    def window(data: tf.Tensor) -> tf.Tensor:
        shape = tf.io.extract_jpeg_shape(data)
        top, left, h, w = input_pipeline.crop_window(shape[0], shape[1], draws, crop.scale, crop.ratio)
        return tf.stack([top, left, h, w])

    def decode_window(data: tf.Tensor) -> tf.Tensor:
        return tf.io.decode_and_crop_jpeg(data, window(data), channels=3)

    operations = {
        "decode_whole": tf.function(lambda data: tf.io.decode_jpeg(data, channels=3)),
        "window": tf.function(window),
        "decode_window": tf.function(decode_window),
        # TensorFlow's antialiased resize (ScaleAndTranslate), which the pipeline used before PIL's.
        "decode_window_tf_resize": tf.function(
            lambda data: tf.image.resize(decode_window(data), size, method="bilinear", antialias=True)
        ),
        "host_train_total": tf.function(lambda data: input_pipeline.preprocess_train(data, seed, crop)),
        "host_eval_total": tf.function(lambda data: input_pipeline.preprocess_eval(data, crop)),
    }
    figures = {}
    for name, operation in operations.items():
        for blob in blobs[:2]:
            operation(blob)  # traces
        start = time.perf_counter()
        for blob in blobs:
            operation(blob).numpy()
        figures[name] = 1000 * (time.perf_counter() - start) / len(blobs)
    return figures


HOST_COUNTS = (1, 2, 4, 8)


def _reads(root: str) -> dict[str, Any]:
    """The read stage alone (records out of storage, no decoding), as host 0 of N hosts, over the train
    split's JPEGs stored as a TFDS dataset: records/s, seconds and bytes read per host per epoch.

    `by_index`: this project's reads (ArrayRecord files, only this host's slice of each global batch,
    in the epoch's permutation). `whole_split`: the read stage before per-host reads, for comparison:
    every host read every record of the TFRecord files in order through a 16,384-example shuffle
    buffer, batched globally and kept its slice, so its cost does not fall with N. `copy_s`: the one-time
    ArrayRecord copy of the TFRecord files (`datasets.get_builder`)."""
    from res2net_jax import cli

    cli.quiet_startup()
    import tensorflow as tf
    import tensorflow_datasets as tfds

    from res2net_jax import datasets, input_pipeline

    tfds.disable_progress_bar()
    folder = os.path.join(root, "train")
    classes = sorted(os.listdir(folder))
    files = [
        (os.path.join(folder, c, f), classes.index(c))
        for c in classes
        for f in sorted(os.listdir(os.path.join(folder, c)))
    ]
    features = tfds.features.FeaturesDict(
        {"image": tfds.features.Image(), "label": tfds.features.ClassLabel(num_classes=len(classes))}
    )
    examples = [(i, {"image": path, "label": label}) for i, (path, label) in enumerate(files)]
    with tempfile.TemporaryDirectory() as data_dir:
        builder = tfds.dataset_builders.store_as_tfds_dataset(
            "synthetic_jpegs", "1.0.0", features, {"train": examples}, data_dir=data_dir, file_format="tfrecord"
        )
        count = builder.info.splits["train"].num_examples
        record_bytes = sum(os.path.getsize(f) for f in builder.info.splits["train"].filepaths) / count
        batch = _BATCH.value
        epochs = 3

        def whole_split() -> int:
            options = tf.data.Options()
            options.deterministic = True
            read_config = tfds.ReadConfig(options=options, interleave_cycle_length=1)
            ds = builder.as_dataset(
                split="train",
                decoders={"image": tfds.decode.SkipDecoding()},
                shuffle_files=False,
                read_config=read_config,
            )
            ds = ds.enumerate().shuffle(min(count, 16_384), seed=0, reshuffle_each_iteration=False)
            ds = ds.batch(batch, drop_remainder=True).map(lambda i, ex: (i[:batch], ex["image"][:batch]))
            return sum(len(i) for i, _ in ds.as_numpy_iterator())

        start = time.perf_counter()
        for _ in range(epochs):
            read = whole_split()
        seconds = (time.perf_counter() - start) / epochs
        figures = {"records": count, "record_bytes": record_bytes,
                   "whole_split": {"records_s": read / seconds, "s_per_epoch_per_host": seconds,
                                   "bytes_per_epoch_per_host": count * record_bytes}}  # fmt: skip
        start = time.perf_counter()
        builder = datasets._read_by_index(builder)
        figures["copy_s"] = time.perf_counter() - start
        for hosts in HOST_COUNTS:
            local = batch // hosts
            indices = input_pipeline.host_order(count, batch, 0, 0, hosts, 0, 0)
            start = time.perf_counter()
            for _ in range(epochs):
                examples = input_pipeline._examples(builder, "train", indices, local).batch(local)
                read = sum(len(index) for index, _, _ in examples.as_numpy_iterator())
            seconds = (time.perf_counter() - start) / epochs
            figures[f"by_index_{hosts}_hosts"] = {"records_s": read / seconds, "s_per_epoch_per_host": seconds,
                                                   "bytes_per_epoch_per_host": read * record_bytes}  # fmt: skip
    return figures


_SIDE = {"jax": _jax, "timm": _timm, "stages": _stages, "reads": _reads}


def _run_worker(side: str, root: str) -> dict[str, Any]:
    flags_passed = (f"--batch={_BATCH.value}", f"--batches={_BATCHES.value}", f"--image_size={_IMAGE_SIZE.value}")
    command = [sys.executable, __file__, f"--worker={side}:{root}", f"--out={_OUT.value}", *flags_passed]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{side} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each round's figures per pipeline, and the median img/s."""
    out = {}
    for pipeline in runs[0]:
        rates = [run[pipeline]["img_s"] for run in runs]
        out[pipeline] = {"img_s_rounds": rates, "img_s": float(np.median(rates)),
                         "img_s_per_core": float(np.median(rates)) / cores(),
                         "bytes_per_image": runs[0][pipeline]["bytes_per_image"]}  # fmt: skip
    return out


def _measure(root: str) -> dict[str, Any]:
    if not os.path.isdir(os.path.join(root, "train")) or not os.path.isdir(os.path.join(root, "validation")):
        raise app.UsageError(f"{root} needs train/ and validation/ folders of class folders")
    needed = (_BATCHES.value + 1) * _BATCH.value
    for split in ("train", "validation"):
        count = sum(len(names) for _, _, names in os.walk(os.path.join(root, split)))
        if count < needed:
            raise app.UsageError(f"{split}/ has {count} images, fewer than the {needed} images that --batches "
                                 "and --batch need: lower them, or raise --images")  # fmt: skip
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in _SIDES.value}
    for round_index in range(_ROUNDS.value):
        for side in _SIDES.value if round_index % 2 == 0 else _SIDES.value[::-1]:
            runs[side].append(_run_worker(side, root))
            print(side, runs[side][-1], flush=True)
    sides = {side: _summary(values) for side, values in runs.items()}
    figures: dict[str, Any] = {"sides": sides}
    if _STAGES.value:
        figures["stages_ms_per_image"] = _run_worker("stages", root)
    if _READS.value:
        figures["reads"] = _run_worker("reads", root)
    if {"jax", "timm"} <= set(sides):
        figures["jax_over_timm"] = {p: sides["jax"][p]["img_s"] / sides["timm"][p]["img_s"] for p in ("train", "eval")}
    return figures


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)
    if _WORKER.value:
        side, root = _WORKER.value.split(":", 1)
        print("RESULT " + json.dumps(_SIDE[side](root)))
        return
    report.refuse_existing(_OUT.value)
    unknown = set(_SIDES.value) - {"jax", "timm"}
    if unknown:
        raise app.UsageError(f"unknown --sides {', '.join(sorted(unknown))}: choose from jax, timm")
    settings = {"dataset": _DATASET.value or f"{_IMAGES.value} synthetic 500x375 JPEGs per split",
                "batch": _BATCH.value, "batches": _BATCHES.value, "image_size": _IMAGE_SIZE.value,
                "rounds": _ROUNDS.value, "cores": cores(), "recipe": "configs/default.py"}  # fmt: skip
    if _DATASET.value:
        if not _DATASET.value.startswith("folder:"):
            raise app.UsageError("--dataset takes folder:PATH (timm reads image folders)")
        figures = _measure(_DATASET.value.removeprefix("folder:"))
    else:
        with tempfile.TemporaryDirectory() as root:
            _write_jpegs(root, _IMAGES.value)
            figures = _measure(root)
    print(json.dumps(figures, indent=1))
    report.write(_OUT.value, PACKAGES, settings, **figures)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
