"""CIFAR-10, CIFAR-100 and SVHN through torchvision, converted straight from its arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from astkit.data.raw import RawData
from astkit.errors import UserError

# What torchvision needs under root, per dataset (checked first for a one-line error).
MARKERS = {
    "cifar10": ["cifar-10-batches-py"],
    "cifar100": ["cifar-100-python"],
    "svhn": ["train_32x32.mat", "test_32x32.mat"],
}
STATS = {  # MTT's normalisation constants
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}


def _locate(name: str, root: Path | None, download: bool) -> Path:
    if root is None:
        raise UserError(f"{name}: no data root given; pass --data-root DIR (add --download to fetch it there)")
    for directory in (root, root / name):
        if all((directory / marker).exists() for marker in MARKERS[name]):
            return directory
    if download:
        return root
    what = "no directory" if not root.is_dir() else f"no {' / '.join(MARKERS[name])} in"
    raise UserError(f"{name}: {what} {root}; pass --data-root DIR holding it, or add --download")


def _open(name: str, directory: Path, download: bool, train: bool):
    from torchvision import datasets

    try:
        if name == "svhn":
            return datasets.SVHN(str(directory), split="train" if train else "test", download=download)
        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        return cls(str(directory), train=train, download=download)
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
        raise UserError(f"{name}: cannot read {directory} ({exc}); fix the files or add --download") from exc


def _arrays(name: str, ds) -> tuple[np.ndarray, np.ndarray]:
    if name == "svhn":
        return ds.data, np.asarray(ds.labels, dtype=np.int64)  # already (N, 3, 32, 32)
    return ds.data.transpose(0, 3, 1, 2), np.asarray(ds.targets, dtype=np.int64)  # NHWC -> NCHW


def load_torchvision_set(name: str, root: Path | None, download: bool) -> RawData:
    """Load ``name`` (a key of :data:`MARKERS`) from ``root``, downloading only if asked."""
    directory = _locate(name, root, download)
    train, test = _open(name, directory, download, True), _open(name, directory, download, False)
    train_images, train_labels = _arrays(name, train)
    test_images, test_labels = _arrays(name, test)
    classes = [str(d) for d in range(10)] if name == "svhn" else list(train.classes)
    mean, std = STATS[name]
    return RawData(np.ascontiguousarray(train_images), train_labels, np.ascontiguousarray(test_images),
                   test_labels, classes, mean, std, str(directory))


def load_cifar10(root: Path | None = None, download: bool = False) -> RawData:
    """cifar10: 60000 32x32 colour images, 10 classes (torchvision)."""
    return load_torchvision_set("cifar10", root, download)


def load_cifar100(root: Path | None = None, download: bool = False) -> RawData:
    """cifar100: 60000 32x32 colour images, 100 classes (torchvision)."""
    return load_torchvision_set("cifar100", root, download)


def load_svhn(root: Path | None = None, download: bool = False) -> RawData:
    """svhn: 99289 32x32 house-number digits, 10 classes (torchvision)."""
    return load_torchvision_set("svhn", root, download)
