"""Dataset names -> loaders, and :func:`load_dataset`."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

from astkit.data.dataset import Dataset
from astkit.data.digits import load_digits
from astkit.data.folders import load_image_folder, load_tiny_imagenet, subset_loaders
from astkit.data.idx import load_fashion_mnist, load_mnist
from astkit.data.raw import RawData, build_dataset
from astkit.data.torchvision_sets import load_cifar10, load_cifar100, load_svhn
from astkit.errors import UserError

DatasetLoader = Callable[..., RawData]
"""``loader(root: Path | None, download: bool) -> RawData``; its docstring's first line describes it."""

BUILTIN_DATASETS: dict[str, DatasetLoader] = {
    "digits": load_digits,
    "mnist": load_mnist,
    "fashion-mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "svhn": load_svhn,
    "tiny-imagenet": load_tiny_imagenet,
    **subset_loaders(),
    "imagefolder": load_image_folder,
}


def _registry(registry: Mapping[str, DatasetLoader] | None) -> Mapping[str, DatasetLoader]:
    return BUILTIN_DATASETS if registry is None else registry


def _loader(name: str, registry: Mapping[str, DatasetLoader] | None) -> DatasetLoader:
    known = _registry(registry)
    if name not in known:
        raise UserError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(known))}")
    return known[name]


def dataset_names(registry: Mapping[str, DatasetLoader] | None = None) -> list[str]:
    """Registered dataset names, sorted."""
    return sorted(_registry(registry))


def describe_dataset(name: str, registry: Mapping[str, DatasetLoader] | None = None) -> str:
    """``"<name>: <summary>"``, the summary being its loader's first docstring line."""
    loader = _loader(name, registry)
    doc = (getattr(loader, "__doc__", None) or "").strip()
    line = doc.splitlines()[0].strip() if doc else ""
    if line.startswith(f"{name}:"):
        line = line[len(name) + 1:].strip()
    return f"{name}: {line or '(no description)'}"


def load_dataset(name: str, root: str | Path | None = None, *, download: bool = False, zca: bool = False,
                 zca_eps: float = 0.1, registry: Mapping[str, DatasetLoader] | None = None) -> Dataset:
    """Load ``name`` from ``root`` into memory, normalised and (if ``zca``) ZCA-whitened."""
    loader = _loader(name, registry)
    path = Path(root).expanduser() if root is not None else None
    raw = loader(path, download)
    if not isinstance(raw, RawData):
        raise UserError(f"dataset {name!r}: its loader returned {type(raw).__name__}, not astkit.data.RawData")
    return build_dataset(name, raw, zca=zca, zca_eps=zca_eps)
