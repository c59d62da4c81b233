"""Networks for dataset distillation (DC/DSA/MTT small-image variants) and their registry.

Every model has ``forward(x) -> logits`` and ``embed(x) -> (N, D)`` features,
with ``forward(x) == classifier(embed(x))``, and works under
``torch.func.functional_call``.
"""

from astkit.models.alexnet import AlexNet
from astkit.models.convnet import ConvNet, auto_depth
from astkit.models.registry import (
    BUILTIN_MODELS,
    ModelFactory,
    build_model,
    describe_model,
    get_factory,
    model_names,
    model_options,
)
from astkit.models.resnet import ResNet18
from astkit.models.variant import Variant
from astkit.models.vgg import VGG11

__all__ = [
    "BUILTIN_MODELS", "AlexNet", "ConvNet", "ModelFactory", "ResNet18", "VGG11", "Variant", "auto_depth",
    "build_model", "describe_model", "get_factory", "model_names", "model_options",
]
