"""Everything astkit draws: image grids, the distillation curves, the Avg_Var plot.

* :func:`save_distilled_grid` draws a :class:`astkit.DistilledSet` (the
  reporter's ``distilled.png``, ``astkit show --png``);
* :func:`save_grid` draws any images in a dataset's normalised space (the
  per-iteration grids);
* :func:`plot_curves` and :func:`plot_experts` draw ``curves.png`` and
  ``avg_var.png``; :func:`plot_comparison` draws ``astkit compare``'s figure.

Plots use matplotlib's Agg canvas directly (no pyplot, no display needed);
every file is written atomically with :func:`astkit.store.atomic_write`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from astkit import labels as label_rules

from astkit import store
from astkit.export import to_pixels
from astkit.results import DistilledSet

__all__ = ["denormalise", "metric_float", "plot_comparison", "plot_curves", "plot_experts", "save_distilled_grid",
           "save_grid"]


# ============================================================ image grids
#: images back into [0, 1] pixels (ZCA undone, then std/mean): one owner, astkit.export
denormalise = to_pixels


def _mosaic(pixels: torch.Tensor, labels: torch.Tensor, pad: int = 1):
    """One array: a row per class (sorted labels), a column per image of it."""
    import numpy as np

    n, c, h, w = pixels.shape
    if c == 3:
        pix = pixels.permute(0, 2, 3, 1).numpy()
    else:  # 1 channel (or an unusual count): grey
        pix = pixels.mean(dim=1).numpy()
    classes = sorted(set(labels.tolist()))
    groups = [(labels == k).nonzero().flatten().tolist() for k in classes]
    cols = max((len(g) for g in groups), default=1)
    shape = (len(classes) * (h + pad) + pad, cols * (w + pad) + pad) + ((3,) if c == 3 else ())
    mosaic = np.ones(shape, dtype=np.float32)
    for r, members in enumerate(groups):
        for col, index in enumerate(members):
            y, x = pad + r * (h + pad), pad + col * (w + pad)
            mosaic[y:y + h, x:x + w] = pix[index]
    return mosaic, classes, cols


def save_grid(
    images: torch.Tensor,
    labels: torch.Tensor,
    path: str | Path,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    zca: Any = None,
    class_names: Sequence[str] | None = None,
    *,
    title: str | None = None,
) -> Path:
    """Write a PNG of ``images``: one row per class, ``ipc`` columns.

    :param images: ``(N, C, H, W)`` in the dataset's normalised (and maybe
        ZCA-whitened) space.
    :param mean, std: per-channel normalisation of the dataset (on [0, 1]
        pixels); without them each image is min-max scaled.
    :param zca: a fitted :class:`astkit.data.ZCA` or its ``tensors()``; undone first.
    :param class_names: row labels (by label index).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    labels = label_rules.classes(labels.detach().cpu())  # soft labels: their argmax class
    labels = labels.long().flatten()
    pixels = denormalise(images, mean, std, zca)
    mosaic, classes, cols = _mosaic(pixels, labels)
    height, width = mosaic.shape[:2]
    scale = max(1, min(round(32 / max(1, pixels.shape[2])), 4000 // max(height, width, 1)))
    names = [str(class_names[k]) if class_names is not None and k < len(class_names) else str(k) for k in classes]
    label_px = 0 if len(classes) > 120 else 8 + 7 * max((len(n) for n in names), default=1)
    title_px = 22 if title else 4
    dpi = 100
    content_w = width * scale + label_px + 4
    fig_w = max(content_w, 6.2 * len(title) + 12 if title else 0)
    fig_h = height * scale + title_px + 4
    fig = Figure(figsize=(fig_w / dpi, fig_h / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    left = label_px + (fig_w - content_w) / 2
    ax = fig.add_axes((left / fig_w, 4 / fig_h, width * scale / fig_w, height * scale / fig_h))
    if mosaic.ndim == 2:
        ax.imshow(mosaic, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(mosaic, interpolation="nearest")
    ax.set_xticks([])
    if label_px:
        h = pixels.shape[2]
        ax.set_yticks([1 + r * (h + 1) + h / 2 - 0.5 for r in range(len(classes))], names, fontsize=8)
        ax.tick_params(axis="y", length=0, pad=2)
    else:
        ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        fig.text(0.5, 1 - 4 / fig_h, title, fontsize=9, ha="center", va="top")
    store.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    return path


def save_distilled_grid(distilled: DistilledSet, path: str | Path, *, title: str | None = None) -> Path:
    """Write a PNG of a distilled set (or a checkpoint's images): one row per class.

    The normalisation, ZCA whitening and class names come from the set itself
    (``distilled.meta["dataset"]``, ``distilled.zca``); a whitened set whose
    inverse is not stored is min-max scaled per image.

    :param title: above the grid (default: the dataset, images per class and
        iteration).
    """
    ds = distilled.meta.get("dataset") or {}
    mean, std, zca = ds.get("mean"), ds.get("std"), distilled.zca or None
    if ds.get("zca") and zca is None:  # whitened, but the inverse is not in the file
        mean = std = None
    if title is None:
        title = f"{ds.get('name', 'distilled')}: {distilled.ipc} images per class, iteration {distilled.iteration}"
    return save_grid(distilled.images, distilled.labels, path, mean, std, zca, ds.get("class_names"), title=title)


# ================================================================= plots
def _figure(ncols: int, width: float = 4.2, height: float = 3.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _save_figure(fig, path: Path) -> Path:
    store.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


def plot_curves(history: Sequence[Mapping[str, Any]], evaluations: Sequence[tuple[int, Any]], path: Path) -> Path:
    """Matching loss and learned lr per iteration; accuracy at each evaluation."""
    its = [int(m["iteration"]) + 1 for m in history]
    fig, axes = _figure(3 if evaluations else 2)
    losses = [metric_float(m.get("loss")) for m in history]
    axes[0].plot(its, losses, lw=1, marker="." if len(its) < 50 else None)
    finite = [v for v in losses if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 20:
        axes[0].set_yscale("log")
    axes[0].set(title="matching loss", xlabel="iteration")
    axes[1].plot(its, [metric_float(m.get("lr")) for m in history], lw=1, color="tab:orange",
                 marker="." if len(its) < 50 else None)
    axes[1].set(title="learned student lr", xlabel="iteration")
    if evaluations:
        archs = sorted({name for _, result in evaluations for name in result.architectures})
        for name in archs:
            points = [(it, r[name]) for it, r in evaluations if name in r.architectures]
            axes[2].errorbar([p[0] for p in points], [p[1].mean for p in points], yerr=[p[1].std for p in points],
                             marker="o", capsize=3, label=name)
        axes[2].set(title="test accuracy of fresh nets", xlabel="iteration")
        axes[2].legend(fontsize=8)
    _finish_axes(axes)
    return _save_figure(fig, path)


def plot_comparison(series: Sequence[Mapping[str, Any]], path: Path, *, software: str = "astkit") -> Path:
    """Several runs (``astkit compare``): test accuracy against iterations (each
    evaluation, the final one at the last iteration; one line per run and
    architecture) and the matching loss against iterations (one line per run).

    :param series: per run ``{"label", "loss": [(iteration, loss)], "accuracy":
        {architecture: [(iteration, mean, std)]}}``.
    :param software: the PNG's ``Software`` text (how compare knows its own file).
    """
    fig, axes = _figure(2, width=5.0, height=3.6)
    several = len({name for s in series for name in s["accuracy"]}) > 1
    for index, s in enumerate(series):
        color = f"C{index % 10}"
        for name, points in s["accuracy"].items():
            label = f"{s['label']} ({name})" if several else s["label"]
            axes[0].errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points],
                             marker="o", capsize=3, color=color, label=label)
        loss = s["loss"]
        axes[1].plot([p[0] for p in loss], [p[1] for p in loss], lw=1, color=color, label=s["label"],
                     marker="." if len(loss) < 50 else None)
    finite = [p[1] for s in series for p in s["loss"] if math.isfinite(p[1])]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 20:
        axes[1].set_yscale("log")
    axes[0].set(title="test accuracy of fresh nets", xlabel="iteration")
    axes[1].set(title="matching loss", xlabel="iteration")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    _finish_axes(axes)
    store.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", metadata={"Software": software}))
    return path


def _finish_axes(axes) -> None:
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_experts(experts: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Avg_Var per expert (bars) and each expert's test accuracy per epoch."""
    fig, axes = _figure(2)
    indices = [e["index"] for e in experts]
    axes[0].bar([str(i) for i in indices], [e["avg_var"] for e in experts], color="tab:blue")
    axes[0].set(title="Avg_Var (mean squared step per epoch)", xlabel="expert")
    for e in experts:
        acc = e["test_accuracy"]
        axes[1].plot(range(1, len(acc) + 1), acc, marker=".", lw=1, label=f"expert {e['index']}")
    axes[1].set(title="expert test accuracy", xlabel="epoch")
    if len(experts) <= 10:
        axes[1].legend(fontsize=7)
    _finish_axes(axes)
    return _save_figure(fig, path)


def metric_float(value: Any) -> float:
    """A metric as a float: ``null`` (how metrics.jsonl writes NaN/Infinity) or missing is NaN."""
    if value is None:
        return float("nan")
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")
