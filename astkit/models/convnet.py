"""ConvNet of DC/DSA/MTT: conv3x3 -> norm -> activation -> pool blocks, one linear layer.

As in DC/DSA/MTT's ``ConvNet._make_layers``, a 1-channel 28x28 image (MNIST,
Fashion-MNIST) is treated as a 32x32 one: the first convolution pads by 3,
so the maps are 32, 16, 8, 4 (317,706 parameters at width 128 with 10
classes; 320,010 for 3x32x32, whose first convolution has two more input
channels). Every other convolution pads by 1.
"""

from __future__ import annotations

import math

from torch import nn

from astkit.models.layers import (
    FeatureClassifier,
    check_pooling,
    conv_size,
    image_hw,
    make_activation,
    make_norm,
    make_pool,
    positive,
)
from astkit.models.variant import Variant


def auto_depth(image_size: int | tuple[int, int], pooling: str = "avgpool") -> int:
    """3 blocks up to 32 px, 4 up to 64, else 5 (MTT's rule).

    With pooling, capped at ``log2(shorter side) - 1`` so that the last
    normalisation still sees maps of at least 4x4 px (an instance norm over a
    2x2 or 1x1 map erases the features: 8x8 digits get depth 2).
    """
    h, w = image_hw(image_size)
    side = max(h, w)
    depth = 3 if side <= 32 else 4 if side <= 64 else 5
    if pooling != "none":
        depth = min(depth, max(1, int(math.log2(min(h, w))) - 1))
    return depth


def first_padding(channels: int, image_size: int | tuple[int, int]) -> int:
    """The first convolution's padding: 3 for 1-channel 28x28 images (DC/DSA/MTT
    treat them as 32x32), else 1.

    DC/DSA/MTT pad every 1-channel input by 3 but size the classifier (and
    layer norms) for 32x32 maps only when the image is 28 px, so 28x28 is the
    one 1-channel size their network is built for; astkit pads other sizes by 1.
    """
    return 3 if channels == 1 and image_hw(image_size) == (28, 28) else 1


class ConvNet(FeatureClassifier):
    """MTT's ConvNet; ``depth=None`` picks the depth from the resolution."""

    def __init__(self, channels: int, num_classes: int, image_size, width: int = 128, depth: int | None = None,
                 norm: str = "instancenorm", activation: str = "relu", pooling: str = "avgpool"):
        super().__init__()
        pooling = check_pooling(pooling, "convnet")
        size = image_hw(image_size)
        width = positive("width", width, "convnet")
        depth = auto_depth(size, pooling) if depth is None else positive("depth", depth, "convnet")
        layers: list[nn.Module] = []
        in_channels = channels
        for d in range(depth):
            padding = first_padding(channels, image_size) if d == 0 else 1
            size = conv_size(size, 3, padding)
            conv = nn.Conv2d(in_channels, width, 3, padding=padding)
            norm_layer = make_norm(norm, width, "convnet", size)  # LayerNorm: over this depth's C x H x W
            pool, size = make_pool(pooling, size)
            layers += [conv, norm_layer, make_activation(activation, "convnet"), pool]
            in_channels = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * size[0] * size[1], num_classes)


def convnet(channels: int, num_classes: int, image_size, *, width: int = 128, depth: int | None = None,
            norm: str = "instancenorm", activation: str = "relu", pooling: str = "avgpool") -> ConvNet:
    """ConvNet (DC/MTT): conv3x3-instancenorm-relu-avgpool blocks, width 128, depth from resolution."""
    return ConvNet(channels, num_classes, image_size, width=width, depth=depth, norm=norm,
                   activation=activation, pooling=pooling)


MODELS = {
    "convnet": convnet,
    **{f"convnet-d{d}": Variant(f"convnet-d{d}", convnet, f"ConvNet with depth {d}.", depth=d) for d in range(1, 6)},
    "convnet-bn": Variant("convnet-bn", convnet, "ConvNet with batch norm.", norm="batchnorm"),
    "convnet-nonorm": Variant("convnet-nonorm", convnet, "ConvNet without normalization.", norm="none"),
    "convnet-ln": Variant("convnet-ln", convnet, "ConvNet with layer norm (LayerNorm over C x H x W, as MTT's).",
                          norm="layernorm"),
    "convnet-w32": Variant("convnet-w32", convnet, "ConvNet with width 32.", width=32),
    "convnet-w64": Variant("convnet-w64", convnet, "ConvNet with width 64.", width=64),
}
