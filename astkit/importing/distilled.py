"""A distilled set published by the reference scripts into an astkit distilled file.

MTT's ``distill.py`` (and AST, FTD, DATM after it) saves ``images_best.pt``
(float ``(N, C, H, W)`` in the dataset's normalised space, ZCA-whitened when
run with ``--zca``), ``labels_best.pt`` (int64 class indices; DATM's learned
labels: float logits ``(N, C)``) and ``lr_best.pt`` (the learned student lr,
a Python float or a one-element tensor).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from astkit import labels as label_rules
from astkit import store
from astkit.errors import FileFormatError, UserError
from astkit.importing.torch_files import load_plain
from astkit.results import DistilledSet

DEFAULT_LR_NOTE = ("no --lr given: the set's student lr is {lr:g} (distill.lr_teacher, MTT's starting lr); "
                   "evaluate with --set evaluate.lr=VALUE for another")


def _kind(value: Any) -> str:
    return "tensor" if torch.is_tensor(value) else type(value).__name__


def read_images(path: Path, dataset: Any) -> torch.Tensor:
    """The images of ``path``: a finite float ``(N, C, H, W)`` tensor of ``dataset``'s image shape."""
    images = load_plain(path, "--images")
    where = f"--images {path}"
    if not torch.is_tensor(images):
        raise FileFormatError(f"{where}: holds a {_kind(images)}, not an image tensor (N, C, H, W); "
                              "pass the images_best.pt a reference script saved")
    expected = (dataset.channels, *dataset.image_size)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected or images.shape[0] == 0:
        raise FileFormatError(f"{where}: images are {tuple(images.shape)}, {dataset.name} has (N, "
                              f"{', '.join(str(s) for s in expected)}) images; pass the dataset the set was "
                              "distilled from (--dataset)")
    if not images.is_floating_point():
        raise FileFormatError(f"{where}: images are {images.dtype}; expected float images in the dataset's "
                              "normalised space (as the reference scripts save them)")
    if not bool(torch.isfinite(images).all()):
        raise FileFormatError(f"{where}: images hold NaN or Inf; use a set saved before the run diverged")
    return images.detach().to(torch.float32).contiguous()


def read_labels(path: Path | None, n: int, num_classes: int) -> torch.Tensor:
    """The labels of ``path``, checked for ``n`` images of ``num_classes`` classes
    (:mod:`astkit.labels`); without a file, ``n / num_classes`` per class in class
    order (the reference scripts' layout)."""
    if path is None:
        if n % num_classes:
            raise UserError(f"{n} images do not divide into {num_classes} classes, so the labels cannot be "
                            "the reference's ipc per class in class order; pass --labels labels.pt")
        return torch.arange(num_classes).repeat_interleave(n // num_classes)
    labels = load_plain(path, "--labels")
    if not torch.is_tensor(labels):
        raise FileFormatError(f"--labels {path}: holds a {_kind(labels)}, not a label tensor; "
                              "pass class indices (N,) or soft logits (N, C)")
    return label_rules.checked(labels.detach(), n, num_classes, f"--labels {path}").contiguous()


def read_lr(path: Path) -> float:
    """The student lr of ``path``: a number or a one-element tensor, positive and finite."""
    value = load_plain(path, "--lr")
    if torch.is_tensor(value) and value.numel() == 1 and value.dtype != torch.bool:
        value = float(value.detach().reshape(()))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        shape = f" of shape {tuple(value.shape)}" if torch.is_tensor(value) else ""
        raise FileFormatError(f"--lr {path}: holds a {_kind(value)}{shape}, not a number; "
                              "pass the lr_best.pt that holds one learned lr")
    if not math.isfinite(value) or value <= 0:
        raise FileFormatError(f"--lr {path}: the lr is {value}; a student lr is a positive number")
    return float(value)


def check_paths(images: str | Path, labels: str | Path | None, lr: str | Path | None,
                out: str | Path) -> tuple[Path, Path | None, Path | None]:
    """The input paths, each an existing file, and ``out`` not there yet; the
    checks :func:`import_distilled` makes first (the CLI makes them before it
    loads the data)."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise UserError(f"--out {out} already exists; choose another file name or remove it")

    def existing(option: str, path: str | Path | None) -> Path | None:
        if path is None:
            return None
        return store.require_file(path, "a file written by torch.save", named=option, fix="pass the .pt file")

    return existing("--images", images), existing("--labels", labels), existing("--lr", lr)


def import_distilled(images: str | Path, dataset: Any, out: str | Path, *, labels: str | Path | None = None,
                     lr: str | Path | None = None, default_lr: float = 0.01,
                     config: Mapping[str, Any] | None = None) -> tuple[DistilledSet, list[str]]:
    """Check the published tensors against ``dataset``, write them to ``out`` as
    an astkit distilled file and return the set and notes for the user.

    ``dataset`` says the image shape, the classes, the normalisation and the
    ZCA whitening recorded (its whitening tensors are stored when it has
    one); ``config`` is what the file records as its config (the data and
    model sections, which ``astkit evaluate FILE`` reads back). ``out`` must
    not exist yet.
    """
    images_path, labels_path, lr_path = check_paths(images, labels, lr, out)
    pixels = read_images(images_path, dataset)
    targets = read_labels(labels_path, pixels.shape[0], dataset.num_classes)
    notes = []
    if lr_path is not None:
        student_lr = read_lr(lr_path)
    else:
        student_lr = float(default_lr)
        notes.append(DEFAULT_LR_NOTE.format(lr=student_lr))
    sources = [p for p in (images_path, labels_path, lr_path) if p is not None]
    meta: dict[str, Any] = {
        "dataset": dataset.metadata(),
        "origin": "imported from " + ", ".join(p.name for p in sources),
        "source": {"images": str(images_path.resolve()),
                   "labels": str(labels_path.resolve()) if labels_path is not None else None,
                   "lr": str(lr_path.resolve()) if lr_path is not None else None},
    }
    if config:
        meta["config"] = dict(config)
    zca = dataset.zca.tensors() if dataset.zca is not None else {}
    distilled = DistilledSet(pixels, targets, student_lr, 0, meta, zca)
    distilled.check_fits(dataset)
    distilled.save(out)
    return distilled, notes
