"""The labels of a synthetic set: hard class indices or soft logits.

Hard labels are int64 class indices ``(N,)``. Soft labels are float logits
``(N, num_classes)``: the target of image ``i`` is ``softmax(labels[i] / T)``
with ``T = distill.label_temperature`` (DATM's learnable labels are such
logits, T = 1). This module owns the rules: what is valid, the class a label
stands for, and the default loss on each kind.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from astkit.errors import UserError


def is_soft(labels: torch.Tensor) -> bool:
    """True for soft labels (float ``(N, C)``), False for hard ones (integer ``(N,)``)."""
    return labels.ndim == 2 and labels.is_floating_point()


def classes(labels: torch.Tensor) -> torch.Tensor:
    """The class each label stands for: the index itself, or the argmax of soft logits."""
    return labels.detach().argmax(1) if is_soft(labels) else labels


def problem(labels: torch.Tensor, n: int, num_classes: int) -> str | None:
    """Why ``labels`` are not labels of ``n`` images of ``num_classes`` classes, or None."""
    if not torch.is_tensor(labels):
        return f"labels must be a tensor, got {type(labels).__name__}"
    if labels.ndim == 1:
        if labels.is_floating_point() or labels.dtype == torch.bool:
            return f"hard labels must be integers, got {labels.dtype}"
        if labels.shape[0] != n:
            return f"{labels.shape[0]} labels for {n} images"
        if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            return f"hard labels must lie in 0..{num_classes - 1}"
        return None
    if labels.ndim == 2:
        if not labels.is_floating_point():
            return f"soft labels (N x C) must be float logits, got {labels.dtype}"
        if tuple(labels.shape) != (n, num_classes):
            return f"soft labels are {tuple(labels.shape)}, expected ({n}, {num_classes})"
        if not torch.isfinite(labels).all():
            return "soft labels hold NaN/Inf"
        return None
    return f"labels must be (N,) class indices or (N, C) soft logits, got shape {tuple(labels.shape)}"


def checked(labels: torch.Tensor, n: int, num_classes: int, source: str) -> torch.Tensor:
    """``labels`` in canonical form (int64 or float32); raise a one-line
    :class:`UserError` naming ``source`` when they are not valid."""
    why = problem(labels, n, num_classes)
    if why is not None:
        raise UserError(f"{source}: {why}")
    return labels.float() if is_soft(labels) else labels.long()


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Cross-entropy per sample: on hard labels, or on soft logits at ``temperature``
    (``T^2 * sum_c -softmax(y/T)_c * log_softmax(z/T)_c``)."""
    if not is_soft(labels):
        return F.cross_entropy(logits, labels, reduction="none")
    t = float(temperature)
    target = torch.softmax(labels / t, dim=1)
    return -(target * torch.log_softmax(logits / t, dim=1)).sum(1) * (t * t)
