"""The in-memory :class:`Dataset`: normalised tensors plus what was done to them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from astkit.data.zca import ZCA


@dataclass
class Dataset:
    """A whole dataset held once in memory as tensors.

    Images are float32 ``(N, C, H, W)``, normalised per channel with
    ``mean``/``std`` (given on [0, 1] pixels) and, if ``zca`` is set, whitened.
    """

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    zca: ZCA | None = None
    source: str = ""
    _class_indices: list[torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train_images.shape[2]), int(self.train_images.shape[3])

    def class_indices(self) -> list[torch.Tensor]:
        """For each class, the indices of its train images (computed once)."""
        if self._class_indices is None:
            order = torch.argsort(self.train_labels, stable=True)
            counts = torch.bincount(self.train_labels, minlength=self.num_classes).tolist()
            self._class_indices = list(torch.split(order, counts))
        return self._class_indices

    def denormalise(self, images: torch.Tensor) -> torch.Tensor:
        """Map images back to [0, 1] pixels for display: undo ZCA, then std/mean; clamped."""
        single = images.dim() == 3
        x = images.detach().float()
        if single:
            x = x.unsqueeze(0)
        if self.zca is not None:
            x = self.zca.invert(x)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        x = (x * std + mean).clamp(0.0, 1.0)
        return x[0] if single else x

    def metadata(self) -> dict[str, Any]:
        """JSON-serialisable description, stored with experts and distilled sets."""
        return {
            "name": self.name,
            "class_names": list(self.class_names),
            "mean": [float(m) for m in self.mean],
            "std": [float(s) for s in self.std],
            "zca": self.zca is not None,
            "zca_eps": self.zca.eps if self.zca is not None else None,
            "channels": self.channels,
            "image_size": list(self.image_size),
            "num_train": int(self.train_images.shape[0]),
            "num_test": int(self.test_images.shape[0]),
            "source": self.source,
        }
