"""ResNet18 of DC/MTT: CIFAR-style stem (3x3, stride 1, no max-pool), BasicBlocks [2, 2, 2, 2]."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from astkit.models.layers import image_hw, make_norm, positive
from astkit.models.variant import Variant


def strided_size(size: tuple[int, int] | None, stride: int) -> tuple[int, int] | None:
    """Spatial size after a 3x3 (padding 1) or 1x1 (padding 0) convolution of ``stride``."""
    return None if size is None else ((size[0] - 1) // stride + 1, (size[1] - 1) // stride + 1)


class BasicBlock(nn.Module):
    """Two 3x3 conv-norm layers with a (projected when needed) shortcut.

    ``size`` is the input's spatial size (needed by ``layernorm`` only).
    """

    def __init__(self, in_planes: int, planes: int, stride: int, norm: str,
                 size: tuple[int, int] | None = None):
        super().__init__()
        out = strided_size(size, stride)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = make_norm(norm, planes, "resnet18", out)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = make_norm(norm, planes, "resnet18", out)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          make_norm(norm, planes, "resnet18", out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """DC/MTT's ResNet18; ``width`` is the first stage's channels (64), doubled per stage."""

    def __init__(self, channels: int, num_classes: int, image_size=None, width: int = 64,
                 norm: str = "instancenorm"):
        super().__init__()
        width = positive("width", width, "resnet18")
        size = None if image_size is None else image_hw(image_size)
        self.conv1 = nn.Conv2d(channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = make_norm(norm, width, "resnet18", size)
        stages, in_planes = [], width
        for i in range(4):
            planes = width * 2 ** i
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(in_planes, planes, stride, norm, size),
                                        BasicBlock(planes, planes, 1, norm, strided_size(size, stride))))
            size = strided_size(size, stride)
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.classifier = nn.Linear(in_planes, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


def resnet18(channels: int, num_classes: int, image_size, *, width: int = 64,
             norm: str = "instancenorm") -> ResNet18:
    """ResNet18 (DC/MTT, CIFAR-style stem) with instance norm."""
    return ResNet18(channels, num_classes, image_size, width=width, norm=norm)


MODELS = {
    "resnet18": resnet18,
    "resnet18-bn": Variant("resnet18-bn", resnet18, "ResNet18 (DC/MTT, CIFAR-style stem) with batch norm.",
                           norm="batchnorm"),
}
