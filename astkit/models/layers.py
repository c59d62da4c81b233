"""Building blocks shared by the networks: norms, activations, safe pooling."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from astkit.errors import UserError
from astkit.models.avg_pool import AvgPool2d
from astkit.models.instance_norm import InstanceNorm

NORMS = ("instancenorm", "batchnorm", "layernorm", "none")
ACTIVATIONS = ("relu", "leakyrelu", "sigmoid", "gelu", "tanh")
POOLINGS = ("avgpool", "maxpool", "none")


def _choice(kind: str, value: str, choices: Sequence[str], model: str) -> str:
    key = str(value).lower()
    if key not in choices:
        raise UserError(f"unknown {kind} {value!r} for {model}; choose from: {', '.join(choices)}")
    return key


def make_norm(norm: str, channels: int, model: str = "model", size: tuple[int, int] | None = None) -> nn.Module:
    """The norm layers of DC/DSA/MTT's ``_get_normlayer``.

    ``instancenorm`` is ``GroupNorm(c, c)`` (as :class:`~astkit.models.instance_norm.InstanceNorm`,
    whose double backward is analytic); ``batchnorm`` ``BatchNorm2d(c)``;
    ``layernorm`` is ``LayerNorm([c, H, W])`` with per-element affine
    parameters, over the feature map at that depth (``size`` = ``(H, W)``);
    ``none`` is the identity.
    """
    norm = _choice("norm", norm, NORMS, model)
    if norm == "instancenorm":
        return InstanceNorm(channels)
    if norm == "batchnorm":
        return nn.BatchNorm2d(channels)
    if norm == "layernorm":
        if size is None:
            raise UserError(f"{model} cannot use norm 'layernorm' without an image size")
        return nn.LayerNorm([channels, *size], elementwise_affine=True)
    return nn.Identity()


def make_activation(activation: str, model: str = "model") -> nn.Module:
    activation = _choice("activation", activation, ACTIVATIONS, model)
    return {
        "relu": nn.ReLU,
        "leakyrelu": lambda: nn.LeakyReLU(0.01),
        "sigmoid": nn.Sigmoid,
        "gelu": nn.GELU,
        "tanh": nn.Tanh,
    }[activation]()


def check_pooling(pooling: str, model: str = "model") -> str:
    return _choice("pooling", pooling, POOLINGS, model)


def make_pool(pooling: str, size: tuple[int, int]) -> tuple[nn.Module, tuple[int, int]]:
    """A 2x2/stride-2 pool that skips any side already at 1 px, and the new size (average pooling as
    :class:`~astkit.models.avg_pool.AvgPool2d`, faster on 2x2 windows)."""
    h, w = size
    kernel = (2 if h >= 2 else 1, 2 if w >= 2 else 1)
    if pooling == "none" or kernel == (1, 1):
        return nn.Identity(), size
    pool = AvgPool2d(kernel, kernel) if pooling == "avgpool" else nn.MaxPool2d(kernel, kernel)
    return pool, (h // kernel[0], w // kernel[1])


def conv_size(size: tuple[int, int], kernel: int, padding: int) -> tuple[int, int]:
    """Spatial size after a stride-1 convolution."""
    return size[0] + 2 * padding - kernel + 1, size[1] + 2 * padding - kernel + 1


def image_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    """``image_size`` as ``(H, W)``; an int means a square image."""
    if isinstance(image_size, int):
        hw = (image_size, image_size)
    else:
        hw = tuple(int(s) for s in image_size)
    if len(hw) != 2 or min(hw) < 1:
        raise UserError(f"image_size must be a positive int or (H, W), got {image_size!r}")
    return hw  # type: ignore[return-value]


def positive(name: str, value: int, model: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{model} option {name} must be a positive integer, got {value!r}")
    return value


class FeatureClassifier(nn.Module):
    """A network made of ``self.features`` then one linear ``self.classifier``.

    ``embed`` gives the flattened features (the input of the classifier),
    ``forward`` the logits.
    """

    features: nn.Module
    classifier: nn.Linear

    def embed(self, x):
        return self.features(x).flatten(1)

    def forward(self, x):
        return self.classifier(self.embed(x))
