"""scikit-learn's embedded 8x8 digits, split deterministically."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from astkit.data.raw import RawData

SPLIT_SEED = 0
TEST_FRACTION = 0.25


def load_digits(root: Path | None = None, download: bool = False) -> RawData:
    """digits: scikit-learn's 1797 8x8 handwritten digits, 1 channel, 10 classes (embedded, no download)."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    images = (bunch.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8), values 0..16 -> [0, 1]
    labels = bunch.target.astype(np.int64)
    index = np.arange(len(labels))
    train, test = train_test_split(index, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=labels)
    train, test = np.sort(train), np.sort(test)
    return RawData(images[train], labels[train], images[test], labels[test],
                   [str(d) for d in range(10)], source="sklearn")
