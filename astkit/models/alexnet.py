"""AlexNet of DC for small images: five convs with ReLU, three max-pools, one linear layer."""

from __future__ import annotations

from torch import nn

from astkit.models.layers import FeatureClassifier, conv_size, image_hw, make_pool, positive


class AlexNet(FeatureClassifier):
    """DC's AlexNet; ``width`` is the first conv's channels (128), the rest scale with it.

    Pools that would shrink a side below 1 px are skipped, so any input size works.
    """

    def __init__(self, channels: int, num_classes: int, image_size, width: int = 128):
        super().__init__()
        width = positive("width", width, "alexnet")
        c1, c2, c3 = width, max(1, width * 3 // 2), 2 * width  # 128, 192, 256 at the default width
        plan = [(c1, 5, 4 if channels == 1 else 2, True), (c2, 5, 2, True),
                (c3, 3, 1, False), (c2, 3, 1, False), (c2, 3, 1, True)]
        size = image_hw(image_size)
        layers: list[nn.Module] = []
        in_channels = channels
        for out_channels, kernel, padding, pooled in plan:
            size = conv_size(size, kernel, padding)
            layers += [nn.Conv2d(in_channels, out_channels, kernel, padding=padding), nn.ReLU()]
            if pooled:
                pool, size = make_pool("maxpool", size)
                layers.append(pool)
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_channels * size[0] * size[1], num_classes)



def alexnet(channels: int, num_classes: int, image_size, *, width: int = 128) -> AlexNet:
    """AlexNet (DC, small-image): five convs, ReLU, max-pools, no norm."""
    return AlexNet(channels, num_classes, image_size, width=width)


MODELS = {"alexnet": alexnet}
