"""Image-folder datasets: any ``train/<class>/*`` tree, Tiny ImageNet, MTT's ImageNet subsets."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np

from astkit.data.raw import RawData
from astkit.errors import UserError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ImageNet-1k class indices (sorted-wnid order) of the 10-class subsets, as in MTT's utils.Config.
MTT_SUBSET_CLASSES: dict[str, list[int]] = {
    "imagenette": [0, 217, 482, 491, 497, 566, 569, 571, 574, 701],
    "imagewoof": [193, 182, 258, 162, 155, 167, 159, 273, 207, 229],
    "imagemeow": [281, 282, 283, 284, 285, 291, 292, 290, 289, 287],
    "imagesquawk": [84, 130, 88, 144, 145, 22, 96, 9, 100, 89],
    "imagefruit": [953, 954, 949, 950, 951, 957, 952, 945, 943, 948],
    "imageyellow": [309, 986, 954, 951, 987, 779, 599, 291, 72, 11],
}
LAYOUT = "train/<class>/* and val/<class>/*"


# ----------------------------------------------------------------- files
def list_images(directory: Path) -> list[Path]:
    """Image files anywhere under ``directory``, sorted."""
    return sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def class_dirs(directory: Path) -> list[str]:
    """Names of the visible subdirectories of ``directory``, sorted."""
    return sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def _require_dir(name: str, root: Path | None) -> Path:
    if root is None:
        raise UserError(f"{name}: no data root given; pass --data-root DIR holding {LAYOUT}")
    if not root.is_dir():
        raise UserError(f"{name}: no directory {root}; pass --data-root DIR holding {LAYOUT}")
    return root


def _split_dir(name: str, root: Path, candidates: Sequence[str]) -> Path:
    for candidate in candidates:
        if (root / candidate).is_dir():
            return root / candidate
    raise UserError(f"{name}: no {'/ or '.join(candidates)}/ folder in {root}; expected {LAYOUT}")


def folder_split(name: str, directory: Path, classes: list[str], *, train: bool) -> tuple[list[Path], list[int]]:
    """Image paths and labels of ``directory/<class>/...`` for the given class order."""
    index = {c: i for i, c in enumerate(classes)}
    present = class_dirs(directory)
    unknown = [c for c in present if c not in index]
    if unknown and not train:
        raise UserError(f"{name}: {directory} has classes not in train/: {', '.join(unknown[:5])}")
    paths: list[Path] = []
    labels: list[int] = []
    for c in (classes if train else [c for c in present if c in index]):
        files = list_images(directory / c)
        if train and not files:
            raise UserError(f"{name}: class folder {directory / c} holds no images")
        paths += files
        labels += [index[c]] * len(files)
    if not paths:
        raise UserError(f"{name}: no images in {directory}; expected {LAYOUT}")
    return paths, labels


# ----------------------------------------------------------------- pixels
def fit_image(image, size: tuple[int, int]):
    """Resize the shorter side to cover ``size`` (H, W), then centre-crop (as MTT's transforms)."""
    from torchvision.transforms import functional as TF

    h, w = size
    if (image.height, image.width) == (h, w):
        return image
    if h == w:
        image = TF.resize(image, h)
    else:
        scale = max(h / image.height, w / image.width)
        image = TF.resize(image, [max(h, round(image.height * scale)), max(w, round(image.width * scale))])
    return TF.center_crop(image, [h, w])


def read_images(paths: Sequence[Path], size: tuple[int, int], mode: str) -> np.ndarray:
    """Decode, convert to ``mode`` ("RGB" or "L") and fit every image: uint8 ``(N, C, H, W)``."""
    from PIL import Image

    channels = 1 if mode == "L" else 3
    decode_errors = _decode_errors()
    out = np.empty((len(paths), size[0], size[1], channels), dtype=np.uint8)

    def one(i: int) -> None:
        try:
            with Image.open(paths[i]) as image:
                fitted = fit_image(image.convert(mode), size)
        except decode_errors as exc:
            raise _unreadable(paths[i], exc) from exc
        out[i] = np.asarray(fitted, dtype=np.uint8).reshape(size[0], size[1], channels)

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(one, range(len(paths))))
    return out.transpose(0, 3, 1, 2)


def _decode_errors() -> tuple[type[BaseException], ...]:
    """What PIL raises for a file it cannot decode (a broken PNG chunk is a SyntaxError)."""
    from PIL import Image

    return (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def _unreadable(path: Path, exc: BaseException) -> UserError:
    return UserError(f"cannot read image {path} ({exc}); replace or delete the file")


def _probe(path: Path) -> tuple[tuple[int, int], str]:
    """The size and mode of the first image, read in the same guarded way as the rest."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()  # decode now: a corrupt first image fails here, not in the probe's caller
            return (image.height, image.width), ("L" if image.mode in ("1", "L", "I", "I;16", "F") else "RGB")
    except _decode_errors() as exc:
        raise _unreadable(path, exc) from exc


def _raw(train: tuple[list[Path], list[int]], test: tuple[list[Path], list[int]], classes: list[str],
         size: tuple[int, int], mode: str, mean, std, source: Path) -> RawData:
    return RawData(read_images(train[0], size, mode), np.asarray(train[1], dtype=np.int64),
                   read_images(test[0], size, mode), np.asarray(test[1], dtype=np.int64),
                   classes, mean, std, str(source))


# ----------------------------------------------------------------- loaders
def load_image_folder(root: Path | None = None, download: bool = False, *, name: str = "imagefolder",
                      image_size: int | tuple[int, int] | None = None, mode: str | None = None,
                      mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                      classes: list[str] | None = None) -> RawData:
    """imagefolder: any train/<class>/* + test|val/<class>/*; size of the first image, mean/std from train."""
    root = _require_dir(name, root)
    train_dir = _split_dir(name, root, ["train"])
    test_dir = _split_dir(name, root, ["test", "val"])
    classes = classes if classes is not None else class_dirs(train_dir)
    if not classes:
        raise UserError(f"{name}: no class folders in {train_dir}; expected {LAYOUT}")
    train = folder_split(name, train_dir, classes, train=True)
    first_size, first_mode = _probe(train[0][0])
    size = first_size if image_size is None else (
        (image_size, image_size) if isinstance(image_size, int) else tuple(image_size))
    mode = mode or first_mode
    test = folder_split(name, test_dir, classes, train=False)
    return _raw(train, test, classes, size, mode, mean, std, root)


def load_imagenet_subset(root: Path | None = None, download: bool = False, *, name: str = "imagenette",
                         image_size: int = 128) -> RawData:
    """A 10-class ImageNet subset from train/<class>/ + val/<class>/, 128x128, ImageNet mean/std.

    ``root`` holds the subset's class folders, or the full ImageNet (1000 wnid
    folders), from which MTT's classes for ``name`` are picked in MTT's order.
    """
    root = _require_dir(name, root)
    train_dir = _split_dir(name, root, ["train"])
    classes = class_dirs(train_dir)
    if len(classes) == 1000 and name in MTT_SUBSET_CLASSES:
        classes = [classes[i] for i in MTT_SUBSET_CLASSES[name]]
    return load_image_folder(root, download, name=name, image_size=image_size, mode="RGB",
                             mean=IMAGENET_MEAN, std=IMAGENET_STD, classes=classes)


def _tiny_val(name: str, val_dir: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    annotations = val_dir / "val_annotations.txt"
    if not annotations.is_file():
        return folder_split(name, val_dir, classes, train=False)
    index = {c: i for i, c in enumerate(classes)}
    paths, labels = [], []
    for line in annotations.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        if parts[1] not in index:
            raise UserError(f"{name}: {annotations} names class {parts[1]} that train/ lacks")
        paths.append(val_dir / "images" / parts[0])
        labels.append(index[parts[1]])
    if not paths:
        raise UserError(f"{name}: {annotations} lists no images")
    return paths, labels


def load_tiny_imagenet(root: Path | None = None, download: bool = False) -> RawData:
    """tiny-imagenet: 200 classes of 64x64 images from train/<wnid>/ and val/ (official or per-class layout)."""
    name = "tiny-imagenet"
    root = _require_dir(name, root)
    train_dir = _split_dir(name, root, ["train"])
    classes = class_dirs(train_dir)
    if not classes:
        raise UserError(f"{name}: no class folders in {train_dir}; expected {LAYOUT}")
    train = folder_split(name, train_dir, classes, train=True)
    test = _tiny_val(name, _split_dir(name, root, ["val"]), classes)
    return _raw(train, test, classes, (64, 64), "RGB", IMAGENET_MEAN, IMAGENET_STD, root)


def subset_loaders() -> dict[str, partial]:
    """One loader per MTT ImageNet subset name."""
    loaders = {}
    for subset in MTT_SUBSET_CLASSES:
        loader = partial(load_imagenet_subset, name=subset)
        loader.__doc__ = f"{subset}: MTT's 10-class ImageNet subset from train/<class>/ + val/<class>/, 128x128."
        loaders[subset] = loader
    return loaders
