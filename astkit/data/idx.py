"""MNIST and Fashion-MNIST from the standard idx files (gzip or plain)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from astkit.data.raw import RawData
from astkit.errors import FileFormatError, UserError

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Parse one idx file (gzip-compressed or not, detected from its first bytes)."""
    path = Path(path)
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as f:
        data = f.read()
    if len(data) < 4:
        raise FileFormatError(f"{path}: too short to be an idx file")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or code not in _DTYPES:
        raise FileFormatError(f"{path}: not an idx file (bad magic number)")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    dtype = np.dtype(_DTYPES[code])
    count = int(np.prod(dims)) if dims else 1
    offset = 4 + 4 * ndim
    if len(data) - offset < count * dtype.itemsize:
        raise FileFormatError(f"{path}: truncated ({len(data) - offset} bytes of data for shape {dims})")
    array = np.frombuffer(data, dtype, count=count, offset=offset).reshape(dims)
    return array.astype(dtype.newbyteorder("="))  # a writable, native-endian copy


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def candidate_dirs(root: Path, name: str) -> list[Path]:
    """Where idx files are looked for under ``root`` (torchvision layouts included)."""
    torchvision_dir = "FashionMNIST" if name == "fashion-mnist" else "MNIST"  # never the other set's folder
    return [root, root / name, root / name / "raw", root / "raw", root / torchvision_dir / "raw"]


def find_idx_files(root: Path, name: str) -> dict[str, Path] | None:
    """The four idx files from the first candidate directory that has all of them."""
    for directory in candidate_dirs(root, name):
        found = {key: _find(directory, stem) for key, stem in FILES.items()}
        if all(found.values()):
            return found  # type: ignore[return-value]
    return None


def _download(name: str, root: Path) -> None:
    from torchvision import datasets

    cls = datasets.FashionMNIST if name == "fashion-mnist" else datasets.MNIST
    try:
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except Exception as exc:  # network errors come in many types
        raise UserError(f"{name}: download into {root} failed ({exc}); fetch the idx files by hand") from exc


def load_idx_dataset(name: str, root: Path | None, download: bool, class_names: list[str],
                     mean: float, std: float, default_root: Path | None = None) -> RawData:
    """Find, (optionally) download and parse the idx files of ``name``."""
    hint = ("install the Debian package dataset-fashion-mnist or pass --data-root DIR"
            if name == "fashion-mnist" else "pass --data-root DIR holding the idx files")
    search = root if root is not None else default_root
    if search is None:
        raise UserError(f"{name}: no data root given; {hint} (add --download to fetch them)")
    files = find_idx_files(search, name) if search.is_dir() else None
    if files is None and download:
        if root is None:
            raise UserError(f"{name}: no idx files in {search}; pass --data-root DIR to download into")
        _download(name, root)
        files = find_idx_files(root, name)
    if files is None:
        what = "no idx files in" if search.is_dir() else "no directory"
        raise UserError(f"{name}: {what} {search}; {hint} (or add --download)")
    arrays = {key: read_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise FileFormatError(f"{name}: {files[f'{split}_images'].parent} holds mismatched {split} idx files")
    return RawData(arrays["train_images"][:, None], arrays["train_labels"].astype(np.int64),
                   arrays["test_images"][:, None], arrays["test_labels"].astype(np.int64),
                   class_names, (mean,), (std,), str(files["train_images"].parent))


def load_mnist(root: Path | None = None, download: bool = False) -> RawData:
    """mnist: 70000 28x28 handwritten digits (idx files), 1 channel, 10 classes."""
    return load_idx_dataset("mnist", root, download, [str(d) for d in range(10)], 0.1307, 0.3081)


def load_fashion_mnist(root: Path | None = None, download: bool = False) -> RawData:
    """fashion-mnist: 70000 28x28 Zalando clothes (idx files; default /usr/share/datasets/fashion-mnist), 10 classes."""
    return load_idx_dataset("fashion-mnist", root, download, list(FASHION_MNIST_CLASSES), 0.2861, 0.3530,
                            default_root=FASHION_MNIST_SYSTEM_DIR)
