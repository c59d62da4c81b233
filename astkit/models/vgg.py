"""VGG11 of DC for small images: conv3x3-norm-relu stacks, max-pools, one linear layer."""

from __future__ import annotations

from torch import nn

from astkit.models.layers import FeatureClassifier, conv_size, image_hw, make_norm, make_pool, positive
from astkit.models.variant import Variant

VGG11_CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(FeatureClassifier):
    """DC's VGG11; 1-channel inputs get padding 3 on the first conv (28 px -> 32 px).

    ``width`` scales every stage (64 = DC's). Pools that would shrink a side
    below 1 px are skipped, so any input size works.
    """

    def __init__(self, channels: int, num_classes: int, image_size, width: int = 64,
                 norm: str = "instancenorm"):
        super().__init__()
        width = positive("width", width, "vgg11")
        size = image_hw(image_size)
        layers: list[nn.Module] = []
        in_channels = channels
        for i, item in enumerate(VGG11_CFG):
            if item == "M":
                pool, size = make_pool("maxpool", size)
                layers.append(pool)
                continue
            out_channels = max(1, item * width // 64)
            padding = 3 if channels == 1 and i == 0 else 1
            size = conv_size(size, 3, padding)
            layers += [nn.Conv2d(in_channels, out_channels, 3, padding=padding),
                       make_norm(norm, out_channels, "vgg11", size), nn.ReLU()]
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_channels * size[0] * size[1], num_classes)



def vgg11(channels: int, num_classes: int, image_size, *, width: int = 64, norm: str = "instancenorm") -> VGG11:
    """VGG11 (DC, small-image) with instance norm."""
    return VGG11(channels, num_classes, image_size, width=width, norm=norm)


MODELS = {
    "vgg11": vgg11,
    "vgg11-bn": Variant("vgg11-bn", vgg11, "VGG11 (DC, small-image) with batch norm.", norm="batchnorm"),
}
