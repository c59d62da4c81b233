"""What a loader returns (:class:`RawData`) and how it becomes a :class:`Dataset`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from astkit.data.dataset import Dataset
from astkit.data.zca import ZCA
from astkit.errors import UserError


@dataclass
class RawData:
    """Unnormalised images straight from the source.

    Images are ``(N, C, H, W)`` uint8 (0..255) or float in [0, 1] (tensors or
    numpy arrays); labels are integers ``0..len(class_names)-1``. ``mean`` and
    ``std`` (per channel, on [0, 1] pixels) are computed from the train split
    when ``None``.
    """

    train_images: Any
    train_labels: Any
    test_images: Any
    test_labels: Any
    class_names: Sequence[str]
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    source: str = ""


def to_unit_float(images: Any) -> torch.Tensor:
    """uint8 0..255 or float [0, 1] images as one float32 tensor in [0, 1]."""
    x = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    return x.to(torch.float32, copy=True)  # a copy: normalising in place must not touch the loader's tensor


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of float images ``(N, C, H, W)``."""
    flat = images.transpose(0, 1).reshape(images.shape[1], -1).double()
    return tuple(flat.mean(1).tolist()), tuple(flat.std(1, unbiased=False).clamp_min(1e-8).tolist())


def _check(name: str, images: torch.Tensor, labels: torch.Tensor, split: str, classes: int) -> None:
    if images.dim() != 4:
        raise UserError(f"{name}: {split} images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise UserError(f"{name}: {len(labels)} {split} labels for {images.shape[0]} images")
    if images.shape[0] == 0:
        raise UserError(f"{name}: the {split} split is empty")
    if int(labels.min()) < 0 or int(labels.max()) >= classes:
        raise UserError(f"{name}: {split} labels fall outside 0..{classes - 1}")


def build_dataset(name: str, raw: RawData, *, zca: bool = False, zca_eps: float = 0.1) -> Dataset:
    """Convert once to float, normalise per channel, optionally ZCA-whiten."""
    train = to_unit_float(raw.train_images)
    test = to_unit_float(raw.test_images)
    train_labels = torch.as_tensor(np.asarray(raw.train_labels)).to(torch.int64).reshape(-1)
    test_labels = torch.as_tensor(np.asarray(raw.test_labels)).to(torch.int64).reshape(-1)
    classes = list(raw.class_names)
    if len(classes) < 2:
        found = f"one class ({classes[0]})" if classes else "no classes"
        raise UserError(f"{name}: has {found}, distillation needs at least 2; "
                        "give the dataset two or more classes (an image folder: one train/<class>/ folder each)")
    _check(name, train, train_labels, "train", len(classes))
    _check(name, test, test_labels, "test", len(classes))
    counts = torch.bincount(train_labels, minlength=len(classes)).tolist()
    empty = [str(c) for c, n in zip(classes, counts) if n == 0]
    if empty:
        raise UserError(f"{name}: class {empty[0]} has no train images; add images to it or remove the class")
    if test.shape[1:] != train.shape[1:]:
        raise UserError(f"{name}: test images {tuple(test.shape[1:])} differ from train {tuple(train.shape[1:])}")
    if raw.mean is None or raw.std is None:
        mean, std = channel_stats(train)
    else:
        mean, std = tuple(float(m) for m in raw.mean), tuple(float(s) for s in raw.std)
    if len(mean) != train.shape[1] or len(std) != train.shape[1]:
        raise UserError(f"{name}: {len(mean)} mean/std values for {train.shape[1]} channels")
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    train.sub_(m).div_(s)
    test.sub_(m).div_(s)
    fitted = None
    if zca:
        fitted = ZCA.fit(train, eps=zca_eps)
        train, test = fitted.apply(train), fitted.apply(test)
    return Dataset(name, train.contiguous(), train_labels, test.contiguous(), test_labels,
                   [str(c) for c in classes], mean, std, fitted, raw.source)
