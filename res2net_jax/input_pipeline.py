"""TFDS input pipelines for training and evaluation: deterministic, resumable, sharded per host.

Every random choice of an example's augmentation is a stateless function of (seed, epoch, example
index), and each epoch's order is a permutation of the split that depends only on (seed, epoch);
batch `b` of epoch `e` is therefore the same in every run, on any number of hosts, and a restarted run
re-reads exactly what it would have seen. Examples are read by index (TFDS datasets as ArrayRecord
files, image folders file by file), so each host reads and decodes only its own slice of every global
batch, and a resumed run reads nothing before its first batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import fcntl
import glob
import json
import math
import os
import shutil
import socket
import sys
import urllib.parse
from collections.abc import Callable, Iterator

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from res2net_jax import digits, network  # digits registers the offline `sklearn_digits` dataset
from res2net_jax.errors import InvalidInputError, MissingFileError
from res2net_jax.steps import update_batch_size

FOLDER_PREFIX = "folder:"
RANDOM_ACCESS_FORMAT = "array_record"  # the TFDS file format that reads an example by its index
DATASET_INFO = "dataset_info.json"  # a prepared TFDS dataset's description, file format included
_MANUAL_DATASETS = {"imagenet2012", "imagenet2012_subset", "imagenet2012_real"}
IMAGENET_TARS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")  # as image-net.org ships them


def hide_tf_from_accelerators() -> None:
    """Keep TensorFlow off GPUs/TPUs: JAX owns them, tf.data runs on the host CPU."""
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the trainer needs to know about a dataset."""

    num_classes: int
    num_train: int
    num_eval: int
    train_split: str
    eval_split: str
    class_names: tuple[str, ...]


# The file types TFDS's ImageFolder reads (it skips others) by extension, with their files' first and last
# bytes: JPEG's start-of-image and end-of-image markers, PNG's signature and IEND chunk (type and CRC). A
# file that is not an image, or was cut short, fails them.
_JPEG_MARKS = (b"\xff\xd8\xff", b"\xff\xd9")
_IMAGE_MARKS = {".jpg": _JPEG_MARKS, ".jpeg": _JPEG_MARKS, ".png": (b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82")}
FOLDER_IMAGE_TYPES = tuple(_IMAGE_MARKS)


def _is_whole_image(path: str, marks: tuple[bytes, bytes]) -> bool:
    """Whether `path` starts as its type's files do and ends with their end mark; a file whose end mark is
    not in its last bytes (cut short, or data appended after the image, as some cameras do) is decoded
    whole (by PIL: TensorFlow's decoder logs to stderr what it refuses)."""
    start, end = marks
    with open(path, "rb") as f:
        if f.read(len(start)) != start:
            return False
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64))
        if end in f.read():
            return True
    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, SyntaxError, ValueError):  # PIL's errors for truncated and malformed data
        return False
    return True


def scan_image_folder(root: str, splits: list[str]) -> str:
    """Checks an image folder before TFDS reads it and says what it reads and skips, in one line.

    Refused, naming the files: images that are not whole JPEG/PNG files (text named .jpg, random bytes, a
    truncated file: tf.data would stop training with a traceback that names none of them), a class with
    no image in the training split, a class present only in evaluation splits (never trained). Files of
    other types and sub-folders inside a class folder are skipped, as TFDS skips them, and counted."""
    counts: dict[str, dict[str, int]] = {}
    bad, skipped = [], []
    for split in splits:
        split_dir = os.path.join(root, split)
        counts[split] = {}
        for label in sorted(os.listdir(split_dir)):
            class_dir = os.path.join(split_dir, label)
            if not os.path.isdir(class_dir):
                continue
            counts[split][label] = 0
            for entry in sorted(os.scandir(class_dir), key=lambda e: e.name):
                extension = os.path.splitext(entry.name)[1].lower()
                if not entry.is_file() or extension not in FOLDER_IMAGE_TYPES:
                    skipped.append(os.path.relpath(entry.path, root) + ("/" if entry.is_dir() else ""))
                elif not _is_whole_image(entry.path, _IMAGE_MARKS[extension]):
                    bad.append(entry.path)
                else:
                    counts[split][label] += 1
    if bad:
        listed = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise InvalidInputError(f"{len(bad)} file(s) in {root} are not whole JPEG or PNG images: {listed}; "
                                "repair, convert or remove them")  # fmt: skip
    train = "train" if "train" in counts else splits[0]
    empty = [label for label, n in counts[train].items() if n == 0]
    if empty:
        raise InvalidInputError(f"class {empty[0]!r} of {root}/{train} holds no .jpg/.jpeg/.png image: add some, "
                                "convert its images, or remove the class")  # fmt: skip
    for split in splits:
        untrained = sorted(set(counts[split]) - set(counts[train]))
        if untrained:
            raise InvalidInputError(f"class {untrained[0]!r} is in {root}/{split} but not in {root}/{train}: it would "
                                    "be evaluated but never trained; add it to training or remove it")  # fmt: skip
    summary = ", ".join(f"{split} {sum(c.values())} images" for split, c in counts.items())
    note = ""
    if skipped:
        shown = ", ".join(skipped[:3]) + (" ..." if len(skipped) > 3 else "")
        note = f"; skipped {len(skipped)} entries that are not .jpg/.jpeg/.png files ({shown})"
    return f"{FOLDER_PREFIX}{root}: {len(counts[train])} classes, {summary}{note}"


def get_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """The TFDS builder for `config.dataset`, prepared (built or downloaded) if it is not yet.

    `config.dataset` is a TFDS name (imagenet2012, imagenette, cifar10, cifar100, sklearn_digits, ...)
    or `folder:/path` for a directory with one subdirectory per split holding one per class.
    """
    name = config.dataset
    if name.startswith(FOLDER_PREFIX):
        root = os.path.expanduser(name[len(FOLDER_PREFIX) :])
        if not os.path.isdir(root):
            raise InvalidInputError(f"image folder {root} does not exist")
        splits = [d for d in sorted(os.listdir(root)) if os.path.isdir(os.path.join(root, d))]
        if not splits or not any(
            os.path.isdir(os.path.join(root, splits[0], d)) for d in os.listdir(root + "/" + splits[0])
        ):
            raise InvalidInputError(
                f"image folder {root} must hold one directory per split (train/, validation/), "
                "each with one directory of images per class"
            )
        print(scan_image_folder(root, splits), flush=True)
        return tfds.folder_dataset.ImageFolder(root)
    base_name = name.split(":")[0].split("/")[0]
    known = tfds.list_builders(with_community_datasets=False)  # the community list would be fetched from GCS
    if base_name not in known:
        close = difflib.get_close_matches(base_name, known, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise InvalidInputError(
            f"unknown dataset {name!r}.{hint} Use a TFDS image-classification name or folder:/path/to/images"
        )
    data_dir = config.get("data_dir") or None
    builder = tfds.builder(name, data_dir=data_dir)
    if _is_prepared(builder) and os.path.exists(_array_record_info(builder)):
        return _read_by_index(builder)
    if not _is_prepared(builder):
        _check_preparable(builder, name, base_name)
    with _preparing(builder):
        return _prepare(name, base_name, data_dir)


def _array_record_info(builder: tfds.core.DatasetBuilder) -> str:
    """The dataset_info.json of `builder`'s ArrayRecord files: its own, or its copy's (`_read_by_index`)."""
    directory = os.fspath(builder.data_dir)
    if builder.info.file_format.value != RANDOM_ACCESS_FORMAT:
        directory = os.path.join(directory, RANDOM_ACCESS_FORMAT)
    return os.path.join(directory, DATASET_INFO)


def _check_preparable(builder: tfds.core.DatasetBuilder, name: str, base_name: str) -> None:
    """Refuses, before anything is written, a dataset that cannot be prepared here: ImageNet without its
    tars, or a download from a host that cannot be reached."""
    if base_name in _MANUAL_DATASETS:
        missing = [f for f in IMAGENET_TARS if not os.path.isfile(os.path.join(_manual_dir(builder), f))]
        if missing:
            raise MissingFileError(
                f"{name} must be downloaded by hand: {' and '.join(missing)} missing from {_manual_dir(builder)} "
                "(from https://image-net.org, ILSVRC2012); put them there and run again to build the dataset"
            )
    else:
        _check_downloadable(builder, name)


def _manual_dir(builder: tfds.core.DatasetBuilder) -> str:
    return os.path.join(builder.data_dir_root, "downloads", "manual")


@contextlib.contextmanager
def _preparing(builder: tfds.core.DatasetBuilder) -> Iterator[None]:
    """Holds the dataset's preparation lock (an flock, released by the kernel however its holder ends), so
    that one process at a time prepares it; what an interrupted preparation left (TFDS's
    `incomplete.*` directories, partial ArrayRecord copies) is removed first, and said so in one line."""
    root = os.fspath(builder.data_dir_root)
    try:
        os.makedirs(root, exist_ok=True)
        handle = open(os.path.join(root, f".{builder.name}.prepare.lock"), "a")
    except OSError:  # a read-only data_dir: nothing is prepared or removed there, and `_prepare` says so
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # a process preparing it now: wait, then find it prepared
        versions = os.path.dirname(os.fspath(builder.data_dir))
        left = glob.glob(os.path.join(versions, "incomplete.*")) + glob.glob(
            os.path.join(os.fspath(builder.data_dir), RANDOM_ACCESS_FORMAT, "*.partial-*")
        )
        for path in left:
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        if left:
            print(f"removed what an interrupted preparation of {builder.name} left: "
                  f"{', '.join(os.path.basename(p) for p in sorted(left))}", flush=True)  # fmt: skip
        yield


def _prepare(name: str, base_name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    """`get_builder` for a dataset not yet prepared as ArrayRecord files, under its preparation lock (another
    process may have prepared it meanwhile)."""
    builder = tfds.builder(name, data_dir=data_dir)
    if not _is_prepared(builder):
        builder = tfds.builder(name, data_dir=data_dir, file_format=RANDOM_ACCESS_FORMAT)
        download_config = None
        if base_name in _MANUAL_DATASETS:
            print(f"building {name} from {_manual_dir(builder)}, once (hours for the whole of ImageNet)", flush=True)
            download_config = tfds.download.DownloadConfig(manual_dir=_manual_dir(builder))
        if not sys.stderr.isatty():  # TFDS's progress bars print raw escape sequences into a log
            tfds.disable_progress_bar()
        builder.download_and_prepare(download_config=download_config)
    return _read_by_index(builder)


def _check_downloadable(builder: tfds.core.DatasetBuilder, name: str) -> None:
    """Refuses, in one line and at once, a dataset TFDS would download when its homepage's host cannot be
    reached: TFDS's client retries for about 3.5 minutes and ends in a 155-line traceback."""
    homepage = builder.info.homepage
    if isinstance(builder, digits.SklearnDigits) or not homepage or network.reachable(homepage):
        return
    root = builder.data_dir_root
    raise MissingFileError(
        f"{name} is not prepared in {root} and TFDS must download it, but {urllib.parse.urlsplit(homepage).hostname} "
        f"cannot be reached (offline?): prepare it where there is network (tfds build {name} "
        f"--file_format=array_record) and copy its directory into {root}, or point --config.data_dir at a "
        "directory that holds it"
    )


def _read_by_index(builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetBuilder:
    """A builder that reads `builder`'s examples by index, from ArrayRecord files: `builder` itself when
    its files are ArrayRecord (as get_builder prepares datasets).

    A dataset prepared as TFRecord (by another TFDS program, or by this project's releases before
    examples were read by index) is copied once into an `array_record/` directory inside its own, a
    TFDS dataset directory of its own (TFDS's layout for a converted dataset), and read from there; its
    TFRecord files stay as they were, for other programs. Each file of the copy is written under a
    name of its own process and renamed when complete, and the copy's dataset_info.json last, so an
    interrupted copy resumes where it stopped, and the hosts of a run that start it together each
    write whole files (the same ones).
    """
    info = builder.info
    if info.file_format.value == RANDOM_ACCESS_FORMAT:
        return builder
    source = os.fspath(builder.data_dir)
    copy = os.path.join(source, RANDOM_ACCESS_FORMAT)
    if not os.path.exists(os.path.join(copy, DATASET_INFO)):
        if info.file_format.value != "tfrecord":
            raise InvalidInputError(
                f"{info.full_name} in {source} is stored as {info.file_format.value}: prepare it again "
                "in another --config.data_dir, where it is written as ArrayRecord"
            )
        try:
            _copy_to_array_record(builder, copy)
        except OSError as err:
            raise InvalidInputError(
                f"cannot write ArrayRecord copies of {info.full_name} in {copy} ({err.strerror or err}): "
                "give this user write access there, or copy the dataset to a writable --config.data_dir"
            ) from None
    return tfds.builder_from_directory(copy)


def _copy_to_array_record(builder: tfds.core.DatasetBuilder, copy: str) -> None:
    """Writes the ArrayRecord copy of a TFRecord dataset (`_read_by_index`) into directory `copy`."""
    info, source = builder.info, os.fspath(builder.data_dir)
    files = []
    for split in info.splits.values():
        template = split.filename_template.replace(data_dir=copy, filetype_suffix=RANDOM_ACCESS_FORMAT)
        files += zip(split.filepaths, split.replace(filename_template=template).filepaths, strict=True)
    missing = [(tfrecord, target) for tfrecord, target in files if not target.exists()]
    if missing:
        print(f"copying {len(missing)} of {info.full_name}'s TFRecord files to ArrayRecord files in {copy}, once, "
              "so that each host reads only the examples it uses", flush=True)  # fmt: skip
    os.makedirs(copy, exist_ok=True)
    adapter = tfds.core.file_adapters.ADAPTER_FOR_FORMAT[tfds.core.file_adapters.FileFormat.ARRAY_RECORD]
    own = f"partial-{socket.gethostname()}-{os.getpid()}"
    for tfrecord, target in missing:
        partial = target.parent / f"{target.name}.{own}"
        records = tf.data.TFRecordDataset(os.fspath(tfrecord), buffer_size=8 << 20).as_numpy_iterator()
        adapter.write_examples(partial, enumerate(records))
        partial.replace(target)
    for name in os.listdir(source):  # features.json, label files: the dataset's metadata
        if name != DATASET_INFO and name.endswith((".json", ".txt")):
            shutil.copyfile(os.path.join(source, name), os.path.join(copy, f"{name}.{own}"))
            os.replace(os.path.join(copy, f"{name}.{own}"), os.path.join(copy, name))
    with open(os.path.join(source, DATASET_INFO)) as f:
        settings = json.load(f)
    settings["fileFormat"] = RANDOM_ACCESS_FORMAT
    settings.pop("alternativeFileFormats", None)
    with open(os.path.join(copy, f"{DATASET_INFO}.{own}"), "w") as f:
        json.dump(settings, f, indent=2)
    os.replace(os.path.join(copy, f"{DATASET_INFO}.{own}"), os.path.join(copy, DATASET_INFO))


def _is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
    try:
        return bool(builder.info.splits)
    except Exception:  # an unprepared builder raises on reading its splits in some TFDS versions
        return False


def dataset_info(builder: tfds.core.DatasetBuilder, config: ml_collections.ConfigDict) -> DatasetInfo:
    """Class count and split sizes; the eval split defaults to 'validation', else 'test'."""
    splits = builder.info.splits
    train_split = config.get("train_split") or "train"
    eval_split = config.get("eval_split") or ("validation" if "validation" in splits else "test")
    for split in (train_split, eval_split):
        if split.split("[")[0] not in splits:
            raise InvalidInputError(f"{config.dataset} has no split {split!r}; it has {', '.join(splits)}")
        if "[" in split and isinstance(builder, tfds.folder_dataset.ImageFolder):
            raise InvalidInputError(f"an image folder's split is a whole directory: {split!r} cannot be sliced; "
                                    "move the images to keep into a directory of their own")  # fmt: skip
    for split in (train_split, eval_split):  # found now, not after an epoch of training
        if splits[split].num_examples == 0:
            raise InvalidInputError(f"split {split!r} of {config.dataset} holds no examples: name a split that has "
                                    "some (config.train_split, config.eval_split), or add images to it")  # fmt: skip
    label = builder.info.features["label"]
    return DatasetInfo(
        num_classes=label.num_classes,
        num_train=splits[train_split].num_examples,
        num_eval=splits[eval_split].num_examples,
        train_split=train_split,
        eval_split=eval_split,
        class_names=tuple(label.names),
    )


def default_image_size(builder: tfds.core.DatasetBuilder) -> int:
    """The training size for config.image_size = 0: small fixed-size images (CIFAR's 32 px, the digits'
    8 px) train at their own size, at least the 32 px the networks need; anything else at 224."""
    height, width = builder.info.features["image"].shape[:2]
    if height and width and max(height, width) <= 64:
        return max(32, height, width)
    return 224


# --- Per-example preprocessing ----------------------------------------------------------------


def _decode(image_bytes: tf.Tensor) -> tf.Tensor:
    return tf.io.decode_image(image_bytes, channels=3, expand_animations=False)


CROP_TRIES = 10  # torchvision's RandomResizedCrop tries 10 windows before its centre fallback


def crop_window(
    height: tf.Tensor, width: tf.Tensor, draws: tf.Tensor, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """torchvision's RandomResizedCrop window (top, left, height, width) from uniform `draws` [CROP_TRIES, 4].

    Try i takes area fraction U(scale), aspect ratio log-uniform in `ratio`, sides rounded half to even;
    the first try that fits wins, at a uniform integer offset. When none fits, the centre crop of the
    whole image with its aspect ratio clamped to `ratio`. (TensorFlow's sample_distorted_bounding_box
    draws the ratio uniformly and retries differently, which trained the quickstart recipe about a point
    worse than timm: experiments/NOTES.md.) Computed in float64, as torchvision computes in Python.
    """
    height, width = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
    draws = tf.cast(draws, tf.float64)
    area = height * width * (scale[0] + draws[:, 0] * (scale[1] - scale[0]))
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = tf.exp(log_low + draws[:, 1] * (log_high - log_low))
    w = tf.round(tf.sqrt(area * aspect))
    h = tf.round(tf.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = tf.argmax(tf.cast(fits, tf.int32))
    in_ratio = width / height
    fallback_h = tf.where(in_ratio < ratio[0], tf.round(width / ratio[0]), height)
    fallback_w = tf.where(in_ratio > ratio[1], tf.round(height * ratio[1]), width)
    any_fits = tf.reduce_any(fits)
    crop_h = tf.where(any_fits, h[first], fallback_h)
    crop_w = tf.where(any_fits, w[first], fallback_w)
    top = tf.where(any_fits, tf.floor(draws[first, 2] * (height - crop_h + 1)), tf.floor((height - crop_h) / 2))
    left = tf.where(any_fits, tf.floor(draws[first, 3] * (width - crop_w + 1)), tf.floor((width - crop_w) / 2))
    return tuple(tf.cast(v, tf.int32) for v in (top, left, crop_h, crop_w))


def _random_resized_crop(image_bytes: tf.Tensor, seed: tf.Tensor, config: ml_collections.ConfigDict) -> tf.Tensor:
    """A crop of random area fraction and aspect ratio (`crop_window`), resized to the training size (bilinear).

    JPEGs decode only the crop window (the window depends on the image's size alone, read from the
    header), so the pixels outside it, on average about half the image, are never decoded.
    """
    draws = tf.random.stateless_uniform([CROP_TRIES, 4], seed)
    output = config.image_size

    def window(shape: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        top, left, height, width = crop_window(shape[0], shape[1], draws, config.crop_scale, config.crop_ratio)
        return tf.stack([top, left]), tf.stack([height, width])

    def jpeg() -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        header = tf.io.extract_jpeg_shape(image_bytes)[:2]
        begin, size = window(header)
        return _decode_jpeg_window(image_bytes, header, begin, size, config.image_size)

    def other() -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        image = _decode(image_bytes)
        begin, size = window(tf.shape(image)[:2])
        crop = tf.slice(image, tf.concat([begin, [0]], 0), tf.concat([size, [-1]], 0))
        return crop, output / tf.cast(size, tf.float64), tf.zeros([2], tf.float64)

    crop, scale, translation = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
    return _resample(crop, scale, output, translation)


DCT_RATIOS = (1, 2, 4, 8)  # the scales libjpeg decodes at directly


def _decode_jpeg_window(
    image_bytes: tf.Tensor, shape: tf.Tensor, begin: tf.Tensor, size: tf.Tensor, output: int
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Decodes only the window (begin, size) of a JPEG of `shape`, at the largest DCT scale 1/r
    (r in DCT_RATIOS) that keeps both of the window's sides >= `output`: libjpeg then skips most of
    the inverse DCT's work. Returns the decoded pixels with the scale and translation (`_resample`)
    that map the window exactly onto `output` x `output` pixels: at r > 1 the decoded block covers
    the window's scaled pixels, and the window's fractional edges are resampled, not rounded."""
    fits = tf.stack([tf.reduce_min(size) >= ratio * output for ratio in DCT_RATIOS[1:]])
    branch = tf.reduce_sum(tf.cast(fits, tf.int32))

    def decode(ratio: int) -> Callable[[], tuple[tf.Tensor, tf.Tensor, tf.Tensor]]:
        def run() -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
            scaled = (shape + ratio - 1) // ratio
            start = begin // ratio
            end = tf.minimum((begin + size + ratio - 1) // ratio, scaled)
            pixels = tf.io.decode_and_crop_jpeg(image_bytes, tf.concat([start, end - start], 0), 3, ratio=ratio)
            scale = ratio * output / tf.cast(size, tf.float64)
            translation = -(tf.cast(begin, tf.float64) / ratio - tf.cast(start, tf.float64)) * scale
            return pixels, scale, translation

        return run

    return tf.switch_case(branch, [decode(ratio) for ratio in DCT_RATIOS])


def _resample(image: tf.Tensor, scale: tf.Tensor, output: int, translation: tf.Tensor) -> tf.Tensor:
    """`image` (uint8) scaled by `scale` (height, width), then the `output` x `output` pixels at offset
    -`translation`, with PIL's antialiased bilinear filter: what timm's transforms compute (PIL's
    `resize`, whose `box` makes a centre crop of a resize cost only the crop). PIL releases Python's
    lock while it resamples, so tf.data's threads resample in parallel, and it resamples in about half
    the time of TensorFlow's antialiased resize (ScaleAndTranslate): experiments/NOTES.md, lever 5."""

    def resize(pixels: np.ndarray, scale: np.ndarray, translation: np.ndarray) -> np.ndarray:
        (scale_y, scale_x), (shift_y, shift_x) = scale, translation
        top, left = -shift_y / scale_y, -shift_x / scale_x
        box = (left, top, left + output / scale_x, top + output / scale_y)
        return np.asarray(Image.fromarray(pixels).resize((output, output), Image.Resampling.BILINEAR, box=box))

    resized = tf.numpy_function(resize, [image, scale, translation], tf.uint8, stateful=False)
    return tf.ensure_shape(resized, [output, output, 3])


def preprocess_train(image_bytes: tf.Tensor, seed: tf.Tensor, config: ml_collections.ConfigDict) -> tf.Tensor:
    """The host's share of training augmentation: random-resized crop, as uint8 (S, S, 3).

    Flip, colour jitter, normalisation and random erasing follow on the accelerator (`augment`).
    """
    return _random_resized_crop(image_bytes, seed, config)


def preprocess_eval(image_bytes: tf.Tensor, config: ml_collections.ConfigDict) -> tf.Tensor:
    """Resize the shorter side to image_size / crop_pct (bilinear), center-crop image_size, as uint8;
    the eval step normalises. Only the crop's pixels are resampled, and a JPEG decodes only the
    source pixels they read (the crop's preimage and the filter's reach around it)."""
    output = config.image_size

    def geometry(shape: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """The resize's scale and the centre crop's offset in the resized image, for a source `shape`."""
        source = tf.cast(shape, tf.float64)
        short = float(int(config.image_size / config.crop_pct))
        size = tf.maximum(tf.cast(tf.floor(source * short / tf.reduce_min(source)), tf.int32), config.image_size)
        offset = tf.round(tf.cast(size - config.image_size, tf.float64) / 2)  # half to even, as CenterCrop
        return tf.cast(size, tf.float64) / source, offset

    def jpeg() -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        shape = tf.io.extract_jpeg_shape(image_bytes)[:2]
        scale, offset = geometry(shape)
        reach = tf.math.ceil(1 / tf.minimum(scale, 1.0)) + 1  # the triangle filter's radius in source pixels, and one
        begin = tf.cast(tf.maximum(tf.floor(offset / scale) - reach, 0), tf.int32)
        end = tf.minimum(tf.cast(tf.math.ceil((offset + config.image_size) / scale) + reach, tf.int32), shape)
        window = tf.io.decode_and_crop_jpeg(image_bytes, tf.concat([begin, end - begin], 0), channels=3)
        return window, scale, tf.cast(begin, tf.float64) * scale - offset

    def other() -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        image = _decode(image_bytes)
        scale, offset = geometry(tf.shape(image)[:2])
        return image, scale, -offset

    pixels, scale, translation = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
    return _resample(pixels, scale, output, translation)


# --- Datasets ---------------------------------------------------------------------------------


def _reader(builder: tfds.core.DatasetBuilder, split: str) -> Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
    """A function from example indices of `split` (int64) to their encoded images and labels that reads
    those examples and no others: records of the split's ArrayRecord files, parsed by TensorFlow, or
    an image folder's files. Python touches only the record reads, so tf.data's threads run in parallel."""
    if isinstance(builder, tfds.folder_dataset.ImageFolder):
        examples = builder._split_examples[split]  # ImageFolder's (path, class) list; TFDS has no public accessor
        paths = tf.constant([example.image_path for example in examples])
        names = builder.info.features["label"]
        labels = tf.constant([names.str2int(example.label) for example in examples], tf.int64)

        def read_files(indices: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            images = tf.map_fn(tf.io.read_file, tf.gather(paths, indices), fn_output_signature=tf.string)
            return images, tf.gather(labels, indices)

        return read_files
    source = builder.as_data_source(split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    serialized = builder.info.features.get_serialized_info()
    spec = {key: tf.io.FixedLenFeature(serialized[key].shape, serialized[key].tf_dtype) for key in ("image", "label")}

    def read_records(indices: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        def read(keys: np.ndarray) -> np.ndarray:
            records = np.empty(len(keys), object)
            records[:] = [source[key] for key in keys.tolist()]  # faster than its thread pool (__getitems__)
            return records

        records = tf.ensure_shape(tf.numpy_function(read, [indices], tf.string, stateful=False), [None])
        example = tf.io.parse_example(records, spec)
        return example["image"], example["label"]

    return read_records


def _examples(builder: tfds.core.DatasetBuilder, split: str, indices: np.ndarray, chunk: int) -> tf.data.Dataset:
    """(index, encoded image, label) of the examples `indices` of `split`, in that order, read `chunk`
    at a time on tf.data's threads."""
    read = _reader(builder, split)

    def fetch(positions: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        return positions, *read(positions)

    ds = tf.data.Dataset.from_tensor_slices(indices.astype(np.int64)).batch(chunk)
    return ds.map(fetch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).unbatch()


def host_order(
    num_examples: int,
    global_batch: int,
    start_batch: int,
    process_index: int,
    process_count: int,
    seed: int,
    epoch: int,
) -> np.ndarray:
    """The example indices this host reads in epoch `epoch`, batch `start_batch` on: its slice of each
    global batch. Batch b holds positions [b G, (b + 1) G) of the epoch's order, a permutation of the
    split that depends only on (seed, epoch) (TensorFlow's stateless index_shuffle), computed for this
    host's positions alone."""
    local_batch = global_batch // process_count
    batches = np.arange(start_batch, num_examples // global_batch)
    mine = np.arange(process_index * local_batch, (process_index + 1) * local_batch)
    positions = (batches[:, None] * global_batch + mine[None, :]).reshape(-1)
    order = tf.random.experimental.index_shuffle(
        positions.astype(np.int64), seed=tf.constant([seed, epoch], tf.int64), max_index=num_examples - 1
    )
    return order.numpy()


def train_dataset(
    builder: tfds.core.DatasetBuilder,
    info: DatasetInfo,
    config: ml_collections.ConfigDict,
    epoch: int,
    start_batch: int,
    process_index: int,
    process_count: int,
) -> tf.data.Dataset:
    """This host's slice of the global training batches of `epoch`, from batch `start_batch` on.

    Yields {'image': uint8 (B, S, S, 3) cropped and resized, 'label', 'epoch', 'index': int32 (B,)} with
    B = the examples of one update (batch_size x grad_accum_steps) / process_count; 'index' is the
    example's position in the split, which with 'epoch' seeds its augmentation on the device
    (`augment.augment_batch`). The epoch ends after num_train // (B x process_count) full batches.
    This host reads only its part of each global batch (`host_order`).
    """
    global_batch = update_batch_size(config)
    local_batch = global_batch // process_count
    epoch_seed = config.seed * 1_000_003 + epoch
    indices = host_order(info.num_train, global_batch, start_batch, process_index, process_count, config.seed, epoch)

    def prepare(index: tf.Tensor, image: tf.Tensor, label: tf.Tensor) -> dict:
        seed = tf.stack([tf.constant(epoch_seed, tf.int64), index])
        image = preprocess_train(image, seed, config)
        label, position = tf.cast(label, tf.int32), tf.cast(index, tf.int32)
        return {"image": image, "label": label, "epoch": tf.constant(epoch, tf.int32), "index": position}

    ds = _examples(builder, info.train_split, indices, local_batch)
    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def eval_steps(info: DatasetInfo, config: ml_collections.ConfigDict, process_count: int) -> int:
    """Evaluation batches per host: enough for the largest host's share of the whole split."""
    local_batch = config.eval_batch_size // process_count
    return math.ceil(math.ceil(info.num_eval / process_count) / local_batch)


def eval_dataset(
    builder: tfds.core.DatasetBuilder,
    info: DatasetInfo,
    config: ml_collections.ConfigDict,
    process_index: int,
    process_count: int,
) -> tf.data.Dataset:
    """This host's share of the whole eval split as uint8 images, padded to `eval_steps` full batches.

    Padding examples carry mask 0, so metrics count every real example exactly once.
    """
    local_batch = config.eval_batch_size // process_count

    def prepare(index: tf.Tensor, image: tf.Tensor, label: tf.Tensor) -> dict:
        del index
        image = preprocess_eval(image, config)
        return {"image": image, "label": tf.cast(label, tf.int32), "mask": tf.constant(1.0)}

    indices = np.arange(process_index, info.num_eval, process_count)
    ds = _examples(builder, info.eval_split, indices, local_batch)
    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    size = config.image_size
    padding = {"image": tf.zeros([size, size, 3], tf.uint8), "label": tf.constant(0), "mask": tf.constant(0.0)}
    pad_count = eval_steps(info, config, process_count) * local_batch - len(indices)
    ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat(pad_count))
    return ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def as_numpy(ds: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
    """The dataset's batches as dicts of numpy arrays."""
    return iter(tfds.as_numpy(ds))
