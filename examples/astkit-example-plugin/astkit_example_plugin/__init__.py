"""An example astkit plugin: a cosine inner-loss weight and an MLP model."""

import math

from torch import nn

import astkit

__version__ = "0.1.0"
NAME = "cosine-weight"


@astkit.hookimpl
def astkit_plugin_options():
    return {NAME: {"amplitude": 0.5}}


@astkit.hookimpl
def astkit_inner_loss_weight(start_epoch, max_start_epoch, config):
    """1 + a * cos(pi * start / max_start): early starts up-weighted, late ones down."""
    amplitude = config.plugin(NAME)["amplitude"]
    return 1.0 + amplitude * math.cos(math.pi * start_epoch / max_start_epoch)


class MLP(nn.Module):
    """A two-layer perceptron on flattened images (``width`` hidden units)."""

    def __init__(self, channels, num_classes, image_size, width=64):
        super().__init__()
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(channels * h * w, width), nn.ReLU())
        self.classifier = nn.Linear(width, num_classes)

    def embed(self, x):
        return self.body(x)

    def forward(self, x):
        return self.classifier(self.embed(x))


@astkit.hookimpl
def astkit_register_models(register):
    register("mlp", MLP)
