"""scikit-learn's 8x8 handwritten digits as a TFDS dataset: real labelled images, no download.

1,797 images, 10 classes; a fixed, stratified 80/20 train/test split. The 16 grey levels are scaled
to 0-255 and stored as RGB PNGs so the standard image pipeline reads them unchanged.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """The UCI/scikit-learn optical digits (8x8), built offline from the scikit-learn package."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Stratified 80/20 split with seed 0."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="scikit-learn load_digits(): 8x8 grey digits as RGB PNG.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 3)),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.repeat(np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None], 3, axis=-1)
        order = np.random.RandomState(0).permutation(len(images))
        test = set()
        for label in range(10):  # a fifth of each class, so both splits are balanced
            members = [i for i in order if digits.target[i] == label]
            test.update(members[: len(members) // 5])
        train_ids = [i for i in order if i not in test]
        test_ids = [i for i in order if i in test]
        return {
            "train": self._generate_examples(images, digits.target, train_ids),
            "test": self._generate_examples(images, digits.target, test_ids),
        }

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray, ids: list[int]):
        for i in ids:
            yield int(i), {"image": images[i], "label": int(labels[i])}
