"""ZCA whitening fitted as MTT fits it (kornia, ``compute_inv=True``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from kornia.enhance import ZCAWhitening, linear_transform

from astkit.errors import FileFormatError


@dataclass
class ZCA:
    """A fitted ZCA transform on flattened images (features = C*H*W).

    ``mean`` is ``(1, D)``, ``transform`` and ``inverse`` are ``(D, D)``, as
    :class:`kornia.enhance.ZCAWhitening` fits them with ``dim=0``.
    """

    eps: float
    mean: torch.Tensor
    transform: torch.Tensor
    inverse: torch.Tensor

    @classmethod
    def fit(cls, images: torch.Tensor, eps: float = 0.1) -> ZCA:
        """Fit on ``images`` ``(N, C, H, W)`` (MTT: the normalised train set)."""
        zca = ZCAWhitening(eps=float(eps), compute_inv=True)
        zca.fit(images.float())
        return cls(float(eps), zca.mean_vector, zca.transform_matrix, zca.transform_inv)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """Whiten ``images`` (any leading batch size, same C, H, W as fitted)."""
        return self._linear(images, self.transform, self.mean)

    def invert(self, images: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`apply` (kornia's ``inverse_transform``)."""
        mean_inv = -self.mean.mm(self.transform)
        return self._linear(images, self.inverse, mean_inv)

    def _linear(self, images: torch.Tensor, matrix: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        features = matrix.shape[0]
        if images[0].numel() != features:
            raise FileFormatError(f"ZCA was fitted on {features} features, images have {images[0].numel()}")
        return linear_transform(images, matrix.to(images), mean.to(images), 0)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fitted tensors, for a safetensors file (``eps`` goes in metadata)."""
        return {"mean": self.mean, "transform": self.transform, "inverse": self.inverse}

    @classmethod
    def from_tensors(cls, eps: float, tensors: dict[str, torch.Tensor]) -> ZCA:
        """Rebuild from :meth:`tensors` output."""
        missing = {"mean", "transform", "inverse"} - set(tensors)
        if missing:
            raise FileFormatError(f"ZCA tensors lack {', '.join(sorted(missing))}")
        return cls(float(eps), tensors["mean"], tensors["transform"], tensors["inverse"])
