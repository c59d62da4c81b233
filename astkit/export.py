"""A distilled set out of astkit and back: pixels, an image folder, ``load_distilled``.

* :func:`to_pixels` turns images in a dataset's normalised (and maybe
  ZCA-whitened) space into ``[0, 1]`` pixels; the one owner of that rule
  (the figures draw with it too). :func:`from_pixels` is its inverse.
* :func:`export_distilled` writes a distilled set as an image folder::

      DIR/<class name>/<index>.png     one PNG per image (soft labels: by argmax class)
      DIR/labels.json                  class names, each file's class (and logits),
                                       the learned lr, the normalisation, ZCA, provenance

* :func:`load_distilled` reads a distilled file, a run folder or such an
  export folder back as a ``torch.utils.data.Dataset``.

See docs/export.md.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch.utils.data import Dataset

from astkit import labels as label_rules
from astkit import store
from astkit._version import __version__
from astkit.errors import FileFormatError, UserError
from astkit.results import DistilledSet
from astkit.run_folder import RunFolder

__all__ = ["DistilledDataset", "EXPORT_FORMAT", "FORMATS", "LABELS_FILE", "export_distilled", "from_pixels",
           "load_distilled", "to_pixels"]

#: the file of an export folder that describes it
LABELS_FILE = "labels.json"
#: ``labels.json``'s ``format``: how a previous export is recognised
EXPORT_FORMAT = "astkit-export"
EXPORT_VERSION = 1
#: the image formats :func:`export_distilled` writes
FORMATS = ("png",)


# ================================================================= pixels
def _zca_object(zca: Any):
    if zca is None:
        return None
    if isinstance(zca, Mapping):
        if not zca:
            return None
        from astkit.data import ZCA

        return ZCA.from_tensors(0.0, dict(zca))
    return zca


def _channel_values(values: Sequence[float] | None, channels: int) -> torch.Tensor | None:
    if values is None or len(values) != channels:
        return None
    return torch.tensor([float(v) for v in values]).view(1, -1, 1, 1)


def to_pixels(images: torch.Tensor, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
              zca: Any = None, *, clamp: bool = True) -> torch.Tensor:
    """Images as ``[0, 1]`` pixels: undo ZCA (a ``ZCA`` or its tensors), then
    ``x * std + mean``; without mean/std each image is min-max scaled.

    :param images: ``(N, C, H, W)`` in the dataset's normalised space.
    :param clamp: clip to ``[0, 1]`` (``False``: the values as they come out).
    """
    x = images.detach().float().cpu()
    zca = _zca_object(zca)
    if zca is not None:
        x = zca.invert(x)
    m, s = _channel_values(mean, x.shape[1]), _channel_values(std, x.shape[1])
    if m is not None and s is not None:
        x = x * s + m
        return x.clamp(0.0, 1.0) if clamp else x
    flat = x.flatten(1)
    lo, hi = flat.min(dim=1).values.view(-1, 1, 1, 1), flat.max(dim=1).values.view(-1, 1, 1, 1)
    return ((x - lo) / (hi - lo).clamp_min(1e-12)).clamp(0.0, 1.0)


def from_pixels(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``[0, 1]`` pixels ``(N, C, H, W)`` normalised per channel: ``(x - mean) / std`` (no ZCA)."""
    m, s = _channel_values(mean, pixels.shape[1]), _channel_values(std, pixels.shape[1])
    if m is None or s is None:
        raise FileFormatError(f"{len(mean)} mean and {len(std)} std values for {pixels.shape[1]}-channel images; "
                              "give one of each per channel")
    return (pixels.float() - m) / s


# ================================================================ sources
def distilled_file(path: str | Path) -> Path:
    """The distilled file ``path`` names: the file itself, or a run folder's ``distilled.safetensors``."""
    path = Path(path)
    if path.is_dir():
        file = RunFolder(path).distilled
        if not file.is_file():
            raise UserError(f"{path} is a folder without {file.name}; pass a distilled .safetensors file or a run "
                            "folder whose distillation finished")
        return file
    return store.require_file(path, "a distilled .safetensors file")


def _normalisation(distilled: DistilledSet, path: Path) -> tuple[list[float], list[float], bool]:
    """The set's mean, std and whether its images are ZCA-whitened; refused if they cannot become pixels."""
    ds = distilled.meta.get("dataset") or {}
    channels = int(distilled.images.shape[1])
    mean, std = ds.get("mean"), ds.get("std")
    if not isinstance(mean, list) or not isinstance(std, list) or len(mean) != channels or len(std) != channels:
        raise FileFormatError(f"{path}: records no normalisation (dataset mean and std) for its {channels} "
                              "channels, so its images cannot be turned into pixels")
    whitened = bool(distilled.zca) or bool(ds.get("zca"))
    if whitened and not distilled.zca:
        raise FileFormatError(f"{path}: its images are ZCA-whitened but the file holds no whitening tensors to "
                              "undo it; export a distilled file written by astkit distill or run")
    return [float(v) for v in mean], [float(v) for v in std], whitened


# ================================================================= export
def _folder_names(class_names: Sequence[str]) -> list[str]:
    """One folder name per class: the class name made safe as a file name, unique."""
    names: list[str] = []
    for index, name in enumerate(class_names):
        safe = "".join("_" if c in "/\\\0" else c for c in str(name)).strip().lstrip(".") or str(index)
        if safe.lower() in (n.lower() for n in names):
            safe = f"{safe}-{index}"
        names.append(safe)
    return names


def _previous_export(out: Path) -> dict[str, Any] | None:
    """``labels.json`` of a previous export in ``out``, or None."""
    try:
        record = json.loads((out / LABELS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == EXPORT_FORMAT else None


def check_out(out: Path) -> bool:
    """Raise unless ``out`` may receive an export: missing, empty, or a previous
    export holding nothing else (which the export replaces). True if it exists."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise UserError(f"{out} is a file, not a folder; choose a new or empty folder for the export")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return True
    previous = _previous_export(out)
    if previous is None:
        raise UserError(f"{out} is not empty and is not a previous astkit export (no {LABELS_FILE} written by "
                        "astkit export); choose a new or empty folder")
    ours = {LABELS_FILE, *(str(image.get("file", "")) for image in previous.get("images", [])
                           if isinstance(image, dict))}
    folders = {name.split("/")[0] for name in ours if "/" in name}
    for path in sorted(out.rglob("*")):
        name = path.relative_to(out).as_posix()
        if name not in ours and not (name in folders and path.is_dir()):
            raise UserError(f"{out} holds {name}, which is not part of its previous export; remove it or choose a "
                            "new or empty folder")
    return True


def _write_png(path: Path, pixels: torch.Tensor) -> None:
    """One ``(C, H, W)`` uint8 image as a PNG: grey for 1 channel, RGB for 3."""
    from PIL import Image

    array = pixels.permute(1, 2, 0).numpy()
    image = Image.fromarray(array[:, :, 0], mode="L") if array.shape[2] == 1 else Image.fromarray(array, mode="RGB")
    store.atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def export_distilled(source: str | Path, out: str | Path, fmt: str = "png") -> dict[str, Any]:
    """Write the distilled set ``source`` (a file or a run folder) as an image
    folder ``out``; return what ``labels.json`` records.

    Pixels are the images un-normalised with the dataset's mean and std (ZCA
    undone first when the images are whitened), clipped to ``[0, 255]``.
    ``out`` must be new, empty, or a previous export (replaced as a whole:
    the export is written beside it and renamed into place). Refused, with
    nothing written: an unknown ``fmt``, a non-empty ``out`` that is not a
    previous export, a set that cannot be turned into pixels.
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; astkit exports {', '.join(FORMATS)}")
    path = distilled_file(source)
    distilled = DistilledSet.load(path)
    mean, std, whitened = _normalisation(distilled, path)
    channels = int(distilled.images.shape[1])
    if channels not in (1, 3):
        raise FileFormatError(f"{path}: its images have {channels} channels; a PNG export holds 1 (grey) or 3 (RGB)")
    existed = check_out(Path(out))
    out = Path(os.path.abspath(out))

    ds = distilled.meta.get("dataset") or {}
    classes = label_rules.classes(distilled.labels).long().flatten()
    soft = distilled.soft_labels
    count = int(distilled.labels.shape[1]) if soft else int(classes.max()) + 1 if classes.numel() else 0
    class_names = [str(n) for n in ds.get("class_names") or []]
    if len(class_names) < count:
        class_names += [str(k) for k in range(len(class_names), count)]
    folders = _folder_names(class_names)
    raw = to_pixels(distilled.images, mean, std, distilled.zca or None, clamp=False)
    clipped = int(((raw < 0) | (raw > 1)).sum())
    pixels = (raw.clamp(0.0, 1.0) * 255).round().to(torch.uint8)
    width = len(str(max(len(pixels) - 1, 0)))
    images = []
    for i, k in enumerate(classes.tolist()):
        entry: dict[str, Any] = {"file": f"{folders[k]}/{i:0{width}d}.{fmt}", "class": k}
        if soft:
            entry["logits"] = [float(v) for v in distilled.labels[i]]
        images.append(entry)
    config = distilled.meta.get("config") or {}
    record: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
        "astkit_version": __version__,
        "source": str(path.resolve()),
        "dataset": ds.get("name"),
        "class_names": class_names,
        "class_folders": folders,
        "image_format": fmt,
        "channels": channels,
        "image_size": list(distilled.images.shape[2:]),
        "lr": float(distilled.lr),
        "iteration": int(distilled.iteration),
        "soft_labels": soft,
        "normalisation": {"mean": mean, "std": std},
        "zca": {"applied": whitened, "undone": whitened},
        "clipped_values": clipped,
        "images": images,
    }
    if soft:
        record["label_temperature"] = float((config.get("distill") or {}).get("label_temperature", 1.0))

    store.make_dir(out.parent)
    staging = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
    try:
        store.make_dir(staging)
        for entry, image in zip(images, pixels):
            _write_png(staging / entry["file"], image)
        store.atomic_write_text(staging / LABELS_FILE, _labels_json(record))
        _swap_in(staging, out, existed)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return record


def _labels_json(record: dict[str, Any]) -> str:
    """``labels.json``'s text: one key per line, one line per image."""
    record = store.finite_json(record)
    lines = [f" {json.dumps(key)}: {json.dumps(value)}" for key, value in record.items() if key != "images"]
    images = ",\n".join(f"  {json.dumps(image)}" for image in record["images"])
    lines.append(f' "images": [\n{images}\n ]' if images else ' "images": []')
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _swap_in(staging: Path, out: Path, existed: bool) -> None:
    """Rename the finished export ``staging`` to ``out`` (an empty or previous export is replaced)."""
    old = out.parent / f".{out.name}.{secrets.token_hex(4)}.old"
    try:
        if existed:
            os.rename(out, old)
        os.rename(staging, out)
    except OSError as exc:
        if old.exists() and not out.exists():
            os.rename(old, out)
        store.raise_write_error(out, exc)
    shutil.rmtree(old, ignore_errors=True)


# ================================================================== load
class DistilledDataset(Dataset):
    """A distilled set as a ``torch.utils.data.Dataset`` of ``(image, label)``.

    ``images`` are ``(N, C, H, W)`` in the dataset's normalised space (ZCA
    space when ``whitened``); ``labels`` are int64 class indices, or float
    logits ``(N, C)`` when ``soft`` (an item's label is then its logits row:
    train on ``softmax(logits / label_temperature)``).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, lr: float, class_names: Sequence[str], *,
                 mean: Sequence[float] | None, std: Sequence[float] | None, whitened: bool, source: Path,
                 iteration: int = 0, label_temperature: float = 1.0):
        self.images = images
        self.labels = labels
        self.lr = float(lr)
        self.class_names = [str(n) for n in class_names]
        self.soft = label_rules.is_soft(labels)
        self.mean = None if mean is None else [float(v) for v in mean]
        self.std = None if std is None else [float(v) for v in std]
        #: the images are ZCA-whitened (False from an export folder: ZCA was undone on export)
        self.whitened = bool(whitened)
        self.source = Path(source)
        self.iteration = int(iteration)
        self.label_temperature = float(label_temperature)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def __repr__(self) -> str:
        kind = "soft" if self.soft else "hard"
        return (f"DistilledDataset({len(self)} images {tuple(self.images.shape[1:])}, {len(self.class_names)} "
                f"classes, {kind} labels, lr {self.lr:.4g}, from {self.source})")


def load_distilled(path: str | Path) -> DistilledDataset:
    """A distilled set as a ``torch.utils.data.Dataset`` of ``(image, label)``.

    ``path``: a distilled ``.safetensors`` file, a run folder (its
    ``distilled.safetensors``) or an export folder (``labels.json`` and the
    PNGs of ``astkit export``). From a file, the images are as distilled
    (normalised, ZCA-whitened if the run was). From an export folder, the
    PNGs are re-normalised with the recorded mean and std; if ZCA was undone
    on export it is not re-applied: the images are the pixels normalised
    without ZCA (``whitened`` is False) and 8-bit quantised.
    """
    path = Path(path)
    if path.is_dir() and (path / LABELS_FILE).is_file():
        return _load_export(path)
    file = distilled_file(path)
    distilled = DistilledSet.load(file)
    ds = distilled.meta.get("dataset") or {}
    config = distilled.meta.get("config") or {}
    names = [str(n) for n in ds.get("class_names") or []]
    return DistilledDataset(distilled.images, distilled.labels, distilled.lr, names, mean=ds.get("mean"),
                            std=ds.get("std"), whitened=bool(distilled.zca) or bool(ds.get("zca")), source=file,
                            iteration=distilled.iteration,
                            label_temperature=float((config.get("distill") or {}).get("label_temperature", 1.0)))


def _load_export(folder: Path) -> DistilledDataset:
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    labels_file = folder / LABELS_FILE
    record = _previous_export(folder)
    if record is None:
        raise FileFormatError(f"{labels_file}: not a labels.json written by astkit export; pass an export folder, "
                              "a distilled .safetensors file or a run folder")
    try:
        entries = record["images"]
        channels, size = int(record["channels"]), tuple(int(v) for v in record["image_size"])
        mean, std = record["normalisation"]["mean"], record["normalisation"]["std"]
        soft = bool(record.get("soft_labels"))
        classes = [int(e["class"]) for e in entries]
        logits = [[float(v) for v in e["logits"]] for e in entries] if soft else []
        files = [folder / str(e["file"]) for e in entries]
        lr = float(record["lr"])
    except (KeyError, TypeError, ValueError) as exc:
        raise FileFormatError(f"{labels_file}: damaged export record ({type(exc).__name__}: {exc}); export the "
                              "distilled set again") from None
    mode = "L" if channels == 1 else "RGB"
    pixels = []
    for file in files:
        try:
            with Image.open(file) as image:
                array = torch.from_numpy(np.array(image.convert(mode)))
        except (OSError, UnidentifiedImageError) as exc:
            raise FileFormatError(f"{file}: cannot read this image of the export ({exc}); export the distilled "
                                  "set again") from None
        array = array.unsqueeze(0) if array.ndim == 2 else array.permute(2, 0, 1)
        if tuple(array.shape[1:]) != size:
            raise FileFormatError(f"{file}: {tuple(array.shape[1:])} pixels, {LABELS_FILE} records {size}; export "
                                  "the distilled set again")
        pixels.append(array)
    images = from_pixels(torch.stack(pixels).float() / 255.0 if pixels else torch.zeros(0, channels, *size),
                         mean, std)
    labels = torch.tensor(logits, dtype=torch.float32) if soft else torch.tensor(classes, dtype=torch.int64)
    whitened = bool((record.get("zca") or {}).get("applied")) and not (record.get("zca") or {}).get("undone")
    return DistilledDataset(images, labels, lr, record.get("class_names") or [], mean=mean, std=std,
                            whitened=whitened, source=folder, iteration=int(record.get("iteration", 0)),
                            label_temperature=float(record.get("label_temperature", 1.0)))
