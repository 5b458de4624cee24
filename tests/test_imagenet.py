"""ImageNet as image-net.org ships it: main.py builds TFDS's own imagenet2012 from the two tar files
(small ones, written here in the same layout), then trains the design card's config on it."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from launch import ROOT, config_of, env
from PIL import Image

from res2net_jax import train
from res2net_jax.errors import UserError

SYNSETS = ("n01440764", "n01443537", "n01484850")  # the first three ImageNet classes


def _jpeg(rng: np.random.RandomState) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((rng.rand(30, 40, 3) * 255).astype(np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def write_imagenet_tars(manual_dir: str, per_class: int = 4, val_images: int = 6) -> None:
    """ILSVRC2012_img_train.tar (one tar per synset, holding SYNSET_N.JPEG) and ILSVRC2012_img_val.tar
    (flat ILSVRC2012_val_NNNNNNNN.JPEG), as image-net.org ships them."""
    rng = np.random.RandomState(0)
    os.makedirs(manual_dir, exist_ok=True)
    with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "w") as train_tar:
        for synset in SYNSETS:
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as images:
                for i in range(per_class):
                    _add(images, f"{synset}_{i + 1}.JPEG", _jpeg(rng))
            _add(train_tar, f"{synset}.tar", inner.getvalue())
    with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "w") as val:
        for i in range(val_images):
            _add(val, f"ILSVRC2012_val_{i + 1:08d}.JPEG", _jpeg(rng))


def _main(workdir: str, data_dir: str) -> list[str]:
    return [sys.executable, "main.py", "--config=configs/res2net50.py", f"--workdir={workdir}",
            f"--config.data_dir={data_dir}", "--config.batch_size=8", "--config.eval_batch_size=8",
            "--config.num_train_steps=2", "--config.image_size=32", "--config.log_every_steps=1"]  # fmt: skip


def test_main_builds_imagenet_from_the_tars_then_trains(tmp_path) -> None:
    """The refusals in this process (main.py prints a UserError's message as its one line); the build and
    the training through main.py."""
    data_dir, manual = str(tmp_path / "tfds"), str(tmp_path / "tfds" / "downloads" / "manual")
    os.makedirs(manual)
    config = config_of(_main(str(tmp_path / "run"), data_dir))
    with pytest.raises(UserError, match="ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar missing from"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    write_imagenet_tars(manual)
    os.remove(os.path.join(manual, "ILSVRC2012_img_val.tar"))
    with pytest.raises(
        UserError, match=re.escape(f"must be downloaded by hand: ILSVRC2012_img_val.tar missing from {manual}")
    ):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")
    write_imagenet_tars(manual)
    done = subprocess.run(_main(str(tmp_path / "run"), data_dir), cwd=ROOT, env=env(1), capture_output=True,
                          text=True, timeout=1200)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    # TFDS's one warning that the optional test-split tar is absent, nothing else
    assert all("ILSVRC2012_img_test.tar" in line for line in done.stderr.strip().splitlines()), done.stderr[-3000:]
    assert "building imagenet2012 from" in done.stdout
    assert done.stdout.strip().splitlines()[-1].startswith("final (step 2): top-1 ")
    builder = tfds.builder("imagenet2012", data_dir=data_dir)
    assert builder.info.splits["train"].num_examples == 12 and builder.info.splits["validation"].num_examples == 6
    assert builder.info.file_format.value == "array_record"  # read by index: each host reads only its examples
    examples = builder.as_data_source(split="train", decoders={"image": tfds.decode.SkipDecoding()})
    labels = {int(example["label"]) for example in examples}
    assert labels == {0, 1, 2}  # the synsets' indices in TFDS's imagenet2012 label order
