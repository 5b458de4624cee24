"""TFDS input pipelines for training and evaluation: deterministic, resumable, sharded per host.

Every random choice of an example's augmentation is a stateless function of (seed, epoch, example
index), and each epoch's order is a permutation of the split that depends only on (seed, epoch);
batch `b` of epoch `e` is therefore the same in every run, on any number of hosts, and a restarted run
re-reads exactly what it would have seen. Examples are read by index (TFDS datasets as ArrayRecord
files, image folders file by file, as `res2net_jax.datasets` prepares them), so each host reads and
decodes only its own slice of every global batch, and a resumed run reads nothing before its first batch.
The per-example code reads a `Crop`, built once from the config, never the config itself.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from res2net_jax.datasets import DatasetInfo

if TYPE_CHECKING:
    import ml_collections


@dataclasses.dataclass(frozen=True)
class Crop:
    """The host's per-example geometry: training takes a random-resized crop of area fraction in `scale`
    and aspect ratio in `ratio`, evaluation resizes the shorter side to image_size / crop_pct and takes
    the centre; both hand over image_size x image_size uint8 pixels."""

    image_size: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    crop_pct: float

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> Crop:
        return cls(config.image_size, tuple(config.crop_scale), tuple(config.crop_ratio), config.crop_pct)


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


def _random_resized_crop(image_bytes: tf.Tensor, seed: tf.Tensor, crop: Crop) -> tf.Tensor:
    """A crop of random area fraction and aspect ratio (`crop_window`), resized to the training size (bilinear).

    JPEGs decode only the crop window (the window depends on the image's size alone, read from the
    header), so the pixels outside it, on average about half the image, are never decoded.
    """
    draws = tf.random.stateless_uniform([CROP_TRIES, 4], seed)
    output = crop.image_size

    def window(shape: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        top, left, height, width = crop_window(shape[0], shape[1], draws, crop.scale, crop.ratio)
        return tf.stack([top, left]), tf.stack([height, width])

    def jpeg() -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        header = tf.io.extract_jpeg_shape(image_bytes)[:2]
        begin, size = window(header)
        return _decode_jpeg_window(image_bytes, header, begin, size, output)

    def other() -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        image = _decode(image_bytes)
        begin, size = window(tf.shape(image)[:2])
        window_pixels = tf.slice(image, tf.concat([begin, [0]], 0), tf.concat([size, [-1]], 0))
        return window_pixels, output / tf.cast(size, tf.float64), tf.zeros([2], tf.float64)

    pixels, scale, translation = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
    return _resample(pixels, scale, output, translation)


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


def preprocess_train(image_bytes: tf.Tensor, seed: tf.Tensor, crop: Crop) -> tf.Tensor:
    """The host's share of training augmentation: random-resized crop, as uint8 (S, S, 3).

    Flip, colour jitter, normalisation and random erasing follow on the accelerator (`augment`).
    """
    return _random_resized_crop(image_bytes, seed, crop)


def preprocess_eval(image_bytes: tf.Tensor, crop: Crop) -> tf.Tensor:
    """Resize the shorter side to image_size / crop_pct (bilinear), center-crop image_size, as uint8;
    the eval step normalises. Only the crop's pixels are resampled, and a JPEG decodes only the
    source pixels they read (the crop's preimage and the filter's reach around it)."""
    output = crop.image_size

    def geometry(shape: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """The resize's scale and the centre crop's offset in the resized image, for a source `shape`."""
        source = tf.cast(shape, tf.float64)
        short = float(int(output / crop.crop_pct))
        size = tf.maximum(tf.cast(tf.floor(source * short / tf.reduce_min(source)), tf.int32), output)
        offset = tf.round(tf.cast(size - output, tf.float64) / 2)  # half to even, as CenterCrop
        return tf.cast(size, tf.float64) / source, offset

    def jpeg() -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        shape = tf.io.extract_jpeg_shape(image_bytes)[:2]
        scale, offset = geometry(shape)
        reach = tf.math.ceil(1 / tf.minimum(scale, 1.0)) + 1  # the triangle filter's radius in source pixels, and one
        begin = tf.cast(tf.maximum(tf.floor(offset / scale) - reach, 0), tf.int32)
        end = tf.minimum(tf.cast(tf.math.ceil((offset + output) / scale) + reach, tf.int32), shape)
        window = tf.io.decode_and_crop_jpeg(image_bytes, tf.concat([begin, end - begin], 0), channels=3)
        return window, scale, tf.cast(begin, tf.float64) * scale - offset

    def other() -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        image = _decode(image_bytes)
        scale, offset = geometry(tf.shape(image)[:2])
        return image, scale, -offset

    pixels, scale, translation = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
    return _resample(pixels, scale, output, translation)


# --- Reading by index ----------------------------------------------------------------------


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


def _map(ds: tf.data.Dataset, fn: Callable) -> tf.data.Dataset:
    """`ds.map(fn)` on tf.data's threads, in order. `fn` is traced as written (its branches are tf.cond and
    tf.switch_case), not converted by AutoGraph: its conversion cost about 1 s of a run's start on 2 CPU
    cores, and a third of each later epoch's pipeline set-up."""
    fn = tf.autograph.experimental.do_not_convert(fn)
    return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _examples(builder: tfds.core.DatasetBuilder, split: str, indices: np.ndarray, chunk: int) -> tf.data.Dataset:
    """(index, encoded image, label) of the examples `indices` of `split`, in that order, read `chunk`
    at a time on tf.data's threads."""
    read = _reader(builder, split)

    def fetch(positions: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        return positions, *read(positions)

    ds = tf.data.Dataset.from_tensor_slices(indices.astype(np.int64)).batch(chunk)
    return _map(ds, fetch).unbatch()


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
    crop: Crop,
    *,
    global_batch: int,
    seed: int,
    epoch: int,
    start_batch: int,
    process_index: int,
    process_count: int,
) -> tf.data.Dataset:
    """This host's slice of the global training batches of `epoch`, from batch `start_batch` on.

    Yields {'image': uint8 (B, S, S, 3) cropped and resized, 'label', 'epoch', 'index': int32 (B,)} with
    B = `global_batch` (the examples of one optimiser update) / process_count; 'index' is the example's
    position in the split, which with 'epoch' seeds its augmentation on the device
    (`augment.augment_batch`). The epoch ends after num_train // global_batch full batches.
    This host reads only its part of each global batch (`host_order`).
    """
    local_batch = global_batch // process_count
    epoch_seed = seed * 1_000_003 + epoch
    indices = host_order(info.num_train, global_batch, start_batch, process_index, process_count, seed, epoch)

    def prepare(index: tf.Tensor, image: tf.Tensor, label: tf.Tensor) -> dict:
        example_seed = tf.stack([tf.constant(epoch_seed, tf.int64), index])
        image = preprocess_train(image, example_seed, crop)
        label, position = tf.cast(label, tf.int32), tf.cast(index, tf.int32)
        return {"image": image, "label": label, "epoch": tf.constant(epoch, tf.int32), "index": position}

    ds = _examples(builder, info.train_split, indices, local_batch)
    ds = _map(ds, prepare)
    return ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def eval_steps(num_eval: int, eval_batch: int, process_count: int) -> int:
    """Evaluation batches per host: enough for the largest host's share of the whole split."""
    local_batch = eval_batch // process_count
    return math.ceil(math.ceil(num_eval / process_count) / local_batch)


def eval_dataset(
    builder: tfds.core.DatasetBuilder,
    info: DatasetInfo,
    crop: Crop,
    *,
    eval_batch: int,
    process_index: int,
    process_count: int,
) -> tf.data.Dataset:
    """This host's share of the whole eval split as uint8 images, in global batches of `eval_batch`,
    padded to `eval_steps` full batches.

    Padding examples carry mask 0, so metrics count every real example exactly once.
    """
    local_batch = eval_batch // process_count

    def prepare(index: tf.Tensor, image: tf.Tensor, label: tf.Tensor) -> dict:
        del index
        image = preprocess_eval(image, crop)
        return {"image": image, "label": tf.cast(label, tf.int32), "mask": tf.constant(1.0)}

    indices = np.arange(process_index, info.num_eval, process_count)
    ds = _examples(builder, info.eval_split, indices, local_batch)
    ds = _map(ds, prepare)
    size = crop.image_size
    padding = {"image": tf.zeros([size, size, 3], tf.uint8), "label": tf.constant(0), "mask": tf.constant(0.0)}
    pad_count = eval_steps(info.num_eval, eval_batch, process_count) * local_batch - len(indices)
    ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat(pad_count))
    return ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def as_numpy(ds: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
    """The dataset's batches as dicts of numpy arrays."""
    return iter(tfds.as_numpy(ds))
