"""Datasets prepared for reading by index: TFDS names and image folders, checked, built once, described.

`get_builder` turns `config.dataset` (a TFDS name or `folder:/path`) into a TFDS builder whose examples
can be read by index: a TFDS dataset is prepared as ArrayRecord files (built from the scikit-learn
digits or ImageNet's tars, or downloaded) under a lock, a TFRecord one copied once, and an image folder
scanned for files that are not whole images. What cannot be prepared here (ImageNet without its tars,
a download from a host that cannot be reached) is refused in one line before anything is written.
Reading and preprocessing the examples is `res2net_jax.input_pipeline`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import fcntl
import glob
import json
import os
import shutil
import socket
import sys
import urllib.parse
from collections.abc import Iterator

import ml_collections
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from res2net_jax import digits, network  # digits registers the offline `sklearn_digits` dataset
from res2net_jax.errors import InvalidInputError, MissingFileError

FOLDER_PREFIX = "folder:"
RANDOM_ACCESS_FORMAT = "array_record"  # the TFDS file format that reads an example by its index
DATASET_INFO = "dataset_info.json"  # a prepared TFDS dataset's description, file format included
_MANUAL_DATASETS = {"imagenet2012", "imagenet2012_subset", "imagenet2012_real"}
IMAGENET_TARS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")  # as image-net.org ships them


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

    A dataset prepared as TFRecord (TFDS's default file format, as `tfds build` and other TFDS programs
    write it) is copied once into an `array_record/` directory inside its own, a
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
