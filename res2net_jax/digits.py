"""scikit-learn's 8x8 handwritten digits as a TFDS dataset: real labelled images, no download.

1,797 images, 10 classes; a fixed, stratified 80/20 train/test split. The 16 grey levels are scaled
to 0-255 and stored as RGB PNGs so the standard image pipeline reads them unchanged.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds


def load() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits as uint8 RGB (N, 8, 8, 3), grey levels 0-16 scaled to 0-255, and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.repeat(np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None], 3, axis=-1)
    return images, digits.target


def split(labels: np.ndarray) -> tuple[list[int], list[int]]:
    """Train and test indices: a fifth of each class (in a seed-0 shuffled order) is test, so both
    splits are balanced; the train and test splits list them in that order."""
    order = np.random.RandomState(0).permutation(len(labels))
    test = set()
    for label in range(10):
        members = [i for i in order if labels[i] == label]
        test.update(members[: len(members) // 5])
    return [int(i) for i in order if i not in test], [int(i) for i in order if i in test]


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
        images, labels = load()
        train_ids, test_ids = split(labels)
        return {
            "train": self._generate_examples(images, labels, train_ids),
            "test": self._generate_examples(images, labels, test_ids),
        }

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray, ids: list[int]):
        for i in ids:
            yield int(i), {"image": images[i], "label": int(labels[i])}
