"""TFDS pipelines on data made here: deterministic, resumable, per-host slices, whole-split eval."""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
import torch
import torchvision.transforms.functional as tvf
from launch import ROOT, env
from PIL import Image
from timm.data import create_transform

from configs import quickstart
from res2net_jax import datasets, input_pipeline


def _config(data_dir: str, **overrides) -> ml_collections.ConfigDict:
    config = quickstart.get_config()
    config.data_dir = data_dir
    config.batch_size = 16
    config.eval_batch_size = 48
    config.update(overrides)
    return config


def _batches(ds: tf.data.Dataset) -> list[dict[str, np.ndarray]]:
    return list(input_pipeline.as_numpy(ds))


def _train(builder, info, config, epoch: int, start_batch: int, host: int, hosts: int) -> tf.data.Dataset:
    """`input_pipeline.train_dataset` as train.py calls it for `config`."""
    return input_pipeline.train_dataset(
        builder, info, input_pipeline.Crop.from_config(config), global_batch=config.batch_size, seed=config.seed,
        epoch=epoch, start_batch=start_batch, process_index=host, process_count=hosts,
    )  # fmt: skip


def _eval(builder, info, config, host: int, hosts: int) -> tf.data.Dataset:
    """`input_pipeline.eval_dataset` as train.py calls it for `config`."""
    crop = input_pipeline.Crop.from_config(config)
    return input_pipeline.eval_dataset(
        builder, info, crop, eval_batch=config.eval_batch_size, process_index=host, process_count=hosts
    )


def test_digits_dataset_is_built_offline(digits_dir: str) -> None:
    builder = datasets.get_builder(_config(digits_dir))
    info = datasets.dataset_info(builder, _config(digits_dir))
    assert (info.num_classes, info.num_train, info.num_eval, info.eval_split) == (10, 1442, 355, "test")
    assert datasets.default_image_size(builder) == 32  # 8x8 images train at the networks' minimum


@pytest.mark.parametrize(
    ("name", "size"), [("cifar10", 32), ("cifar100", 32), ("imagenette", 224), ("imagenet2012", 224)]
)
def test_image_size_auto_follows_the_dataset(tmp_path, name: str, size: int) -> None:
    assert datasets.default_image_size(tfds.builder(name, data_dir=str(tmp_path))) == size


def test_train_batches_are_reproducible_resumable_and_split_over_hosts(digits_dir: str) -> None:
    config = _config(digits_dir, crop_scale=(0.3, 1.0), hflip=True, color_jitter=0.4, random_erasing=0.5)
    builder = datasets.get_builder(config)
    info = datasets.dataset_info(builder, config)
    epoch = _batches(_train(builder, info, config, 3, 0, 0, 1))
    assert len(epoch) == 1442 // 16
    assert epoch[0]["image"].shape == (16, 32, 32, 3) and epoch[0]["image"].dtype == np.uint8
    assert set(epoch[0]["epoch"]) == {3} and len(set(np.concatenate([b["index"] for b in epoch]))) == 1442 - 2
    again = _batches(_train(builder, info, config, 3, 0, 0, 1))
    for a, b in zip(epoch, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
    resumed = _batches(_train(builder, info, config, 3, 85, 0, 1))
    for a, b in zip(epoch[85:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
        np.testing.assert_array_equal(a["index"], b["index"])
    # Two hosts each decode their half of every global batch; together they make the same batch.
    halves = [_batches(_train(builder, info, config, 3, 0, i, 2))[:3] for i in range(2)]
    for whole, first, second in zip(epoch[:3], *halves, strict=False):
        for key in ("image", "index"):
            np.testing.assert_array_equal(whole[key], np.concatenate([first[key], second[key]]))
    other_epoch = _batches(_train(builder, info, config, 4, 0, 0, 1))
    assert not np.array_equal(other_epoch[0]["label"], epoch[0]["label"])
    # Each epoch visits every class in proportion (a full shuffle, not a slice).
    counts = collections.Counter(np.concatenate([b["label"] for b in epoch]).tolist())
    assert set(counts) == set(range(10)) and min(counts.values()) > 100


def _recorded_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The example indices the pipelines read from storage from now on (a list that fills as they read)."""
    reads: list[int] = []
    make_reader = input_pipeline._reader

    def reader(builder: tfds.core.DatasetBuilder, split: str):
        read = make_reader(builder, split)

        def record(indices: np.ndarray) -> np.ndarray:
            reads.extend(indices.tolist())
            return indices

        def recorded(indices: tf.Tensor):
            return read(tf.ensure_shape(tf.numpy_function(record, [indices], tf.int64), [None]))

        return recorded

    monkeypatch.setattr(input_pipeline, "_reader", reader)
    return reads


@pytest.mark.parametrize("process_count", [2, 4])
def test_each_host_reads_only_the_examples_it_decodes(digits_dir: str, monkeypatch, process_count: int) -> None:
    config = _config(digits_dir)
    builder = datasets.get_builder(config)
    info = datasets.dataset_info(builder, config)
    whole = _batches(_train(builder, info, config, 1, 0, 0, 1))
    reads = _recorded_reads(monkeypatch)
    local = 16 // process_count
    for host in range(process_count):
        reads.clear()
        batches = _batches(_train(builder, info, config, 1, 0, host, process_count))
        decoded = np.concatenate([batch["index"] for batch in batches])
        mine = np.concatenate([batch["index"][host * local : (host + 1) * local] for batch in whole])
        np.testing.assert_array_equal(decoded, mine)  # its slice of each global batch of one host's run
        assert sorted(reads) == sorted(decoded.tolist())  # read once each, and nothing else
        reads.clear()
        _batches(_eval(builder, info, config, host, process_count))
        assert sorted(reads) == list(range(host, info.num_eval, process_count))
    reads.clear()  # a resumed epoch reads nothing before its first batch
    resumed = _batches(_train(builder, info, config, 1, 85, 0, 1))
    assert sorted(reads) == sorted(np.concatenate([b["index"] for b in resumed]).tolist())
    assert len(reads) == (len(whole) - 85) * 16


def test_a_tfrecord_dataset_is_read_from_arrayrecord_copies_made_once(tmp_path, monkeypatch, capsys) -> None:
    from res2net_jax import digits

    digits.SklearnDigits(data_dir=str(tmp_path)).download_and_prepare()  # TFRecord files, TFDS's default
    skip = {"image": tfds.decode.SkipDecoding()}
    reference = tfds.builder("sklearn_digits", data_dir=str(tmp_path)).as_dataset(split="train", decoders=skip)
    expected = list(tfds.as_numpy(reference))  # TFDS's own TFRecord reader, in the files' order

    def read_all() -> None:
        builder = datasets.get_builder(_config(str(tmp_path)))
        images, labels = input_pipeline._reader(builder, "train")(tf.range(len(expected), dtype=tf.int64))
        assert images.numpy().tolist() == [example["image"] for example in expected]
        assert labels.numpy().tolist() == [example["label"] for example in expected]

    # The hosts of a multi-host run, each starting the copy at once: each writes whole files.
    script = ("from configs import quickstart; from res2net_jax import datasets; "
              f"config = quickstart.get_config(); config.data_dir = {str(tmp_path)!r}; "
              "datasets.get_builder(config)")  # fmt: skip
    hosts = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env(1), stdout=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    outputs = [host.communicate(timeout=300)[0] for host in hosts]
    assert [host.returncode for host in hosts] == [0, 0]
    assert any("copying 2 of sklearn_digits/1.0.0's TFRecord files to ArrayRecord files" in out for out in outputs)
    read_all()
    assert "copying" not in capsys.readouterr().out  # once
    assert tfds.builder("sklearn_digits", data_dir=str(tmp_path)).info.file_format.value == "tfrecord"
    # A copy interrupted while writing the train file (a partial file, no dataset_info.json yet) resumes.
    copy = tmp_path / "sklearn_digits" / "1.0.0" / "array_record"
    (copy / "dataset_info.json").unlink()
    train = next(copy.glob("*-train.array_record-*"))
    train.rename(train.with_name(train.name + ".partial-host-12345"))
    read_all()
    out = capsys.readouterr().out
    assert "copying 1 of sklearn_digits/1.0.0's TFRecord files" in out
    assert f"removed what an interrupted preparation of sklearn_digits left: {train.name}.partial-host-12345" in out
    assert not list(copy.glob("*.partial-*"))
    (copy / "dataset_info.json").unlink()
    train.unlink()

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tfds.core.file_adapters.ArrayRecordFileAdapter, "write_examples", refuse)
    with pytest.raises(ValueError, match=r"cannot write ArrayRecord copies of .*Permission denied.*writable --config"):
        datasets.get_builder(_config(str(tmp_path)))


def test_an_interrupted_preparation_leaves_nothing_behind(tmp_path, capsys) -> None:
    """A preparation killed mid-way leaves TFDS's incomplete.* directory (TFDS's own name for it); the next
    preparation, holding the dataset's lock, removes it, says so and builds the dataset."""
    from tensorflow_datasets.core.utils import file_utils

    builder = tfds.builder("sklearn_digits", data_dir=str(tmp_path))
    left = file_utils._get_incomplete_dir(builder.data_dir)  # where TFDS writes until it renames
    os.makedirs(left)
    open(os.path.join(left, "sklearn_digits-train.array_record-00000-of-00001"), "wb").close()
    config = _config(str(tmp_path))
    info = datasets.dataset_info(datasets.get_builder(config), config)
    assert (info.num_train, info.num_eval) == (1442, 355)
    out = capsys.readouterr().out
    assert (
        f"removed what an interrupted preparation of sklearn_digits left: {os.path.basename(left.rstrip('/'))}" in out
    )
    assert sorted(os.listdir(tmp_path / "sklearn_digits")) == ["1.0.0"]
    datasets.get_builder(config)  # prepared: nothing to remove, nothing said
    assert "removed" not in capsys.readouterr().out


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_covers_the_whole_split_once(digits_dir: str, process_count: int) -> None:
    config = _config(digits_dir)
    builder = datasets.get_builder(config)
    info = datasets.dataset_info(builder, config)
    steps = input_pipeline.eval_steps(info.num_eval, config.eval_batch_size, process_count)
    labels = []
    for index in range(process_count):
        batches = _batches(_eval(builder, info, config, index, process_count))
        assert len(batches) == steps  # every host runs the same number of steps
        for batch in batches:
            labels.extend(batch["label"][batch["mask"] > 0].tolist())
    expected = [
        int(x["label"])
        for x in tfds.as_numpy(tfds.builder("sklearn_digits", data_dir=digits_dir).as_dataset(split="test"))
    ]
    assert sorted(labels) == sorted(expected) and len(labels) == 355


@pytest.mark.parametrize("shape", [(300, 451), (375, 500), (500, 333), (224, 224), (120, 90)])
def test_eval_transform_is_timms(shape: tuple[int, int]) -> None:
    """The host's resize and centre crop, as uint8, against timm's evaluation transform (PIL's Resize(256)
    and CenterCrop(224)): equal, or one level apart where PIL's float32 crop box moves a rounding."""
    image = (np.random.RandomState(shape[0]).rand(*shape, 3) * 255).astype(np.uint8)
    crop = input_pipeline.Crop(224, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), crop_pct=0.875)
    ours = input_pipeline.preprocess_eval(tf.io.encode_png(image), crop).numpy()
    resize, centre = create_transform(224, interpolation="bilinear", crop_pct=0.875).transforms[:2]
    expected = np.asarray(centre(resize(Image.fromarray(image))))
    assert ours.dtype == np.uint8 and ours.shape == expected.shape
    levels = np.abs(ours.astype(np.int32) - expected)
    assert levels.max() <= 1 and levels.mean() < 0.3, (levels.max(), levels.mean())


@pytest.mark.parametrize("shape", [(375, 500), (64, 48), (20, 300)])
def test_train_crop_is_torchvisions_random_resized_crop(shape: tuple[int, int]) -> None:
    """The host's random-resized crop of an image (PNG: the whole image decoded), as uint8, equals
    torchvision's RandomResizedCrop on the same window (PIL's crop, then its bilinear resize) exactly."""
    image = (np.random.RandomState(shape[1]).rand(*shape, 3) * 255).astype(np.uint8)
    config = _config("", image_size=56)
    config.crop_scale = (0.08, 1.0)
    encoded = tf.io.encode_png(image)
    crop = input_pipeline.Crop.from_config(config)
    for seed in range(6):
        seed_tensor = tf.constant([seed, 3], tf.int64)
        ours = input_pipeline.preprocess_train(encoded, seed_tensor, crop).numpy()
        draws = tf.random.stateless_uniform([input_pipeline.CROP_TRIES, 4], seed_tensor)
        top, left, height, width = (int(v) for v in input_pipeline.crop_window(*shape, draws, (0.08, 1.0),
                                                                               config.crop_ratio))  # fmt: skip
        expected = tvf.resized_crop(Image.fromarray(image), top, left, height, width, [56, 56],
                                   tvf.InterpolationMode.BILINEAR)  # fmt: skip
        np.testing.assert_array_equal(ours, np.asarray(expected), err_msg=str(seed))


def test_image_folder_dataset(tmp_path) -> None:
    rng = np.random.RandomState(0)
    for split, count in [("train", 6), ("validation", 3)]:
        for label in ["cat", "dog"]:
            (tmp_path / split / label).mkdir(parents=True)
            for i in range(count):
                Image.fromarray((rng.rand(40, 50, 3) * 255).astype(np.uint8)).save(
                    tmp_path / split / label / f"{i}.png"
                )
    config = _config("", dataset=f"folder:{tmp_path}", batch_size=4, eval_batch_size=4)
    builder = datasets.get_builder(config)
    info = datasets.dataset_info(builder, config)
    assert (info.num_classes, info.num_train, info.num_eval) == (2, 12, 6)
    assert datasets.default_image_size(builder) == 224  # images of any size: the ImageNet size
    assert len(_batches(_train(builder, info, config, 0, 0, 0, 1))) == 3
    eval_batches = _batches(_eval(builder, info, config, 0, 1))
    assert sum(float(b["mask"].sum()) for b in eval_batches) == 6
    with pytest.raises(ValueError, match=r"'train\[:50%\]' cannot be sliced"):
        datasets.dataset_info(builder, _config("", dataset=f"folder:{tmp_path}", train_split="train[:50%]"))
    for name in ("cat", "dog"):  # class folders left empty in validation: found before any training
        shutil.rmtree(tmp_path / "validation" / name)
        (tmp_path / "validation" / name).mkdir()
    empty = _config("", dataset=f"folder:{tmp_path}")
    with pytest.raises(ValueError, match="split 'validation' of folder:.* holds no examples: name a split"):
        datasets.dataset_info(datasets.get_builder(empty), empty)


def _image_folder(root, counts: dict[str, dict[str, int]]) -> str:
    """folder:ROOT with counts[split][class] small PNG images."""
    rng = np.random.RandomState(0)
    for split, classes in counts.items():
        for label, count in classes.items():
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                Image.fromarray((rng.rand(36, 36, 3) * 255).astype(np.uint8)).save(root / split / label / f"{i}.png")
    return f"folder:{root}"


def test_an_image_folder_is_checked_and_what_is_skipped_is_said(tmp_path, capsys) -> None:
    """Files that are not whole images are named before training (tf.data stopped mid-epoch with a
    traceback naming none of them); other files and sub-folders are skipped and counted; a class with no
    image to train on, or only in validation, is refused."""
    dataset = _image_folder(tmp_path / "ok", {"train": {"a": 3, "b": 3}, "validation": {"a": 2, "b": 1}})
    (tmp_path / "ok" / "train" / "a" / "clip.gif").write_bytes(b"GIF89a")
    (tmp_path / "ok" / "train" / "b" / "more").mkdir()
    config = _config("", dataset=dataset)
    datasets.get_builder(config)
    assert capsys.readouterr().out.strip() == (
        f"{dataset}: 2 classes, train 6 images, validation 3 images; skipped 2 entries that are not "
        ".jpg/.jpeg/.png files (train/a/clip.gif, train/b/more/)"
    )
    bad = tmp_path / "bad"
    dataset = _image_folder(bad, {"train": {"a": 2, "b": 2}, "validation": {"a": 1, "b": 1}})
    good = (bad / "train" / "a" / "0.png").read_bytes()
    (bad / "train" / "a" / "notes.jpg").write_text("not an image")
    (bad / "train" / "b" / "noise.png").write_bytes(np.random.RandomState(1).bytes(4000))
    (bad / "validation" / "b" / "cut.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"3 file\(s\) in .* are not whole JPEG or PNG images: .*notes\.jpg, "
                                         r".*noise\.png, .*cut\.png; repair, convert or remove them"):  # fmt: skip
        datasets.get_builder(_config("", dataset=dataset))
    gifs = _image_folder(tmp_path / "gifs", {"train": {"a": 2, "b": 0}, "validation": {"a": 1, "b": 1}})
    (tmp_path / "gifs" / "train" / "b" / "only.gif").write_bytes(b"GIF89a")
    with pytest.raises(ValueError, match="class 'b' of .*/train holds no .jpg/.jpeg/.png image"):
        datasets.get_builder(_config("", dataset=gifs))
    extra = _image_folder(tmp_path / "extra", {"train": {"a": 2, "b": 2}, "validation": {"a": 1, "c": 1}})
    with pytest.raises(ValueError, match="class 'c' is in .*/validation but not in .*/train: it would be evaluated"):
        datasets.get_builder(_config("", dataset=extra))


def test_a_dataset_to_download_without_network_is_one_line_at_once(tmp_path, monkeypatch) -> None:
    """TFDS's client retried for 3.5 minutes, ended in a 155-line traceback and left .tmp folders; here the
    homepage's host is tried once (a closed loopback port and a listening one show what it tells), and an
    unreachable one is one line before anything is written."""
    import socket

    from res2net_jax import network

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert network.reachable(f"http://127.0.0.1:{port}/page")
    assert not network.reachable(f"http://127.0.0.1:{port}/page", timeout_s=2.0)  # closed now
    monkeypatch.setattr(network, "reachable", lambda url: False)
    data_dir = tmp_path / "tfds"
    with pytest.raises(
        FileNotFoundError,
        match="cifar10 is not prepared in .* and TFDS must download it, but "
        "www.cs.toronto.edu cannot be reached .offline.*tfds build cifar10",
    ):
        datasets.get_builder(_config(str(data_dir), dataset="cifar10"))
    assert not data_dir.exists() or not any(data_dir.rglob("*"))


def test_dataset_errors_say_what_to_do(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown dataset 'cifar1O'.*Did you mean.*cifar10"):
        datasets.get_builder(_config(str(tmp_path), dataset="cifar1O"))
    with pytest.raises(FileNotFoundError, match=r"ILSVRC2012_img_train.tar.*downloads/manual"):
        datasets.get_builder(_config(str(tmp_path), dataset="imagenet2012"))
    (tmp_path / "flat").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(ValueError, match="one directory per split"):
        datasets.get_builder(_config("", dataset=f"folder:{tmp_path / 'flat'}"))
    with pytest.raises(ValueError, match="has no split 'valid'"):
        config = _config(str(tmp_path.parent / "digits"), eval_split="valid")
        datasets.dataset_info(datasets.get_builder(config), config)


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("image_size", [128, 40])
def test_jpeg_crop_decoding_equals_decoding_the_whole_image(mode: str, image_size: int) -> None:
    """Training decodes only the crop window of a JPEG; the result must equal decoding everything and
    cropping after (the path PNGs take), fed the very pixels the JPEG decodes to. libjpeg upsamples
    chroma at a window's left edge from fewer neighbours when the edge falls inside a block, which can
    move a few edge values. At 40 px most windows are >= 2x and 4x the output, and libjpeg decodes them
    at 1/2 or 1/4 scale, averaging in the DCT domain instead of the triangle filter: measured 0.7-1.9
    levels of 255 on average, 1-28% of values by more than 2 levels (chroma most)."""
    import io

    coarse = np.random.RandomState(0).randint(0, 256, (30, 40, 3), dtype=np.uint8)
    picture = Image.fromarray(coarse).resize((333, 250), Image.BILINEAR).convert(mode)
    jpeg = io.BytesIO()
    picture.save(jpeg, format="JPEG", quality=90)
    decoded = tf.io.decode_image(jpeg.getvalue(), channels=3).numpy()
    png = io.BytesIO()
    Image.fromarray(decoded).save(png, format="PNG")
    config = _config("", image_size=image_size, color_jitter=0.0, random_erasing=0.0, hflip=False)
    config.crop_scale = (0.08, 1.0)
    crop = input_pipeline.Crop.from_config(config)
    for seed in range(8):
        seed_tensor = tf.constant([seed, 7], tf.int64)
        from_jpeg = input_pipeline.preprocess_train(tf.constant(jpeg.getvalue()), seed_tensor, crop).numpy()
        from_png = input_pipeline.preprocess_train(tf.constant(png.getvalue()), seed_tensor, crop).numpy()
        levels = np.abs(from_jpeg.astype(np.float32) - from_png)
        if image_size == 128:  # no window is 256 px high: always full scale
            assert np.mean(levels > 2) < 0.03 and levels.mean() < 0.5, (seed, np.mean(levels > 2), levels.mean())
        else:
            assert np.mean(levels > 2) < 0.35 and levels.mean() < 2.5, (seed, np.mean(levels > 2), levels.mean())


def _torchvision_window(monkeypatch, height: int, width: int, draws: np.ndarray, scale, ratio) -> tuple:
    """torchvision's RandomResizedCrop.get_params with its random numbers taken from `draws`: try i's
    area and ratio from draws[i, 0:2], its offsets from draws[i, 2:4]. Also whether it fell back."""
    import torchvision.transforms as T

    calls = {"uniform": 0, "randint": 0}

    class Empty:
        def uniform_(self, low, high):
            i = calls["uniform"]
            calls["uniform"] += 1
            u = float(draws[i // 2, i % 2])
            return torch.tensor([float(low) + u * (float(high) - float(low))], dtype=torch.float64)

    def randint(low, high, size):
        k = calls["randint"]
        calls["randint"] += 1
        u = float(draws[(calls["uniform"] - 1) // 2, 2 + k])
        return torch.tensor([low + int(np.floor(u * (high - low)))])

    with monkeypatch.context() as patch:
        patch.setattr(torch, "empty", lambda *shape: Empty())
        patch.setattr(torch, "randint", randint)
        window = T.RandomResizedCrop.get_params(torch.zeros(3, height, width), list(scale), list(ratio))
    return window, calls["randint"] == 0


@pytest.mark.parametrize(
    "height, width, scale",
    [(32, 32, (0.08, 1.0)), (8, 8, (0.6, 1.0)), (375, 500, (0.08, 1.0)), (12, 400, (0.08, 1.0)), (300, 7, (0.35, 1.0))],
)
def test_crop_window_is_torchvision_random_resized_crop(monkeypatch, height: int, width: int, scale) -> None:
    """torchvision's RandomResizedCrop.get_params fed the same uniform draws picks the same window,
    through its tries and its centre fallback (very wide or tall images fall back most of the time)."""
    ratio = (3 / 4, 4 / 3)
    draw_sets = np.random.RandomState(height * width).rand(150, input_pipeline.CROP_TRIES, 4).astype(np.float32)
    fallbacks = 0
    for draws in draw_sets:
        expected, fell_back = _torchvision_window(monkeypatch, height, width, draws, scale, ratio)
        fallbacks += fell_back
        ours = input_pipeline.crop_window(tf.constant(height), tf.constant(width), tf.constant(draws), scale, ratio)
        assert tuple(int(v) for v in ours) == expected, (draws, expected)
    if width / height > 10 or height / width > 10:
        assert fallbacks > 50


@pytest.mark.parametrize(("width", "height", "image_size"), [(500, 375, 224), (333, 250, 64), (90, 120, 112)])
def test_eval_jpeg_decodes_only_what_the_crop_reads(width: int, height: int, image_size: int) -> None:
    """A JPEG's eval transform decodes only the centre crop's preimage plus the filter's reach; the
    result equals decoding the whole image first (the path PNGs take, tested against torchvision)."""
    import io

    coarse = np.random.RandomState(width).randint(0, 256, (30, 40, 3), dtype=np.uint8)
    jpeg = io.BytesIO()
    Image.fromarray(coarse).resize((width, height), Image.BILINEAR).save(jpeg, format="JPEG", quality=90)
    decoded = tf.io.decode_image(jpeg.getvalue(), channels=3).numpy()
    png = io.BytesIO()
    Image.fromarray(decoded).save(png, format="PNG")
    crop = input_pipeline.Crop(image_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), crop_pct=0.875)
    from_jpeg = input_pipeline.preprocess_eval(tf.constant(jpeg.getvalue()), crop).numpy().astype(np.float32)
    from_png = input_pipeline.preprocess_eval(tf.constant(png.getvalue()), crop).numpy()
    levels = np.abs(from_jpeg - from_png)
    # At most 1 level: PIL keeps the crop box in float32, so a box offset within the window rather
    # than within the whole image moves some roundings (measured: 0.002 to 0.2 on average); without
    # the filter's reach around the window, up to 7 levels at the crop's border.
    assert levels.max() <= 1 and levels.mean() < 0.3, (levels.max(), levels.mean())
