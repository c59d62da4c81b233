"""Revisions of astkit's built-in networks: files made with a network astkit no longer builds are refused.

Every astkit file records its model spec, and with it ``revision``: the
revision of the built-in networks that made it. A file without one was made
by revision 1. What revision 2 changed, to build DC/DSA/MTT's networks:

* ConvNet (``convnet`` and its variants) on 1-channel 28x28 images: the first
  convolution pads by 3, not 1 (maps 32/16/8/4, not 28/14/7/3);
* ``layernorm`` (``convnet-ln``, ``model.norm=layernorm``): a LayerNorm over
  the C x H x W feature map with per-element affine parameters, not a
  one-group GroupNorm with per-channel ones.

Any other revision-1 network is the one this astkit builds, so its files stay valid.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

#: the revision of the built-in networks this astkit builds
REVISION = 2

EARLIER_CONVNET_28 = ("astkit's earlier ConvNet for 28x28 images "
                      "(first convolution padded by 1; DC/DSA/MTT pad by 3)")
EARLIER_LAYERNORM = ("astkit's earlier layer norm (a one-group GroupNorm with per-channel affine parameters; "
                     "DC/DSA/MTT's LayerNorm has per-element ones over C x H x W)")


def _norm(factory: Any, options: Mapping[str, Any]) -> str | None:
    """The norm a built-in factory builds with ``options`` (None if it takes no norm)."""
    fixed = getattr(factory, "fixed", {})
    if "norm" in fixed:
        return str(fixed["norm"]).lower()
    if options.get("norm") is not None:
        return str(options["norm"]).lower()
    try:
        parameter = inspect.signature(factory).parameters.get("norm")
    except (TypeError, ValueError):
        return None
    return None if parameter is None or parameter.default is inspect.Parameter.empty else str(parameter.default)


def retired_network(name: str, channels: int, image_size: Any, options: Mapping[str, Any],
                    revision: int) -> str | None:
    """What a built-in network recorded at ``revision`` was, when this astkit no
    longer builds it (a phrase that follows "made with"); None when it builds
    the same network (or the model is not built in)."""
    from astkit.models import convnet
    from astkit.models.registry import BUILTIN_MODELS

    if revision >= REVISION:
        return None
    factory = BUILTIN_MODELS.get(name, BUILTIN_MODELS.get(str(name).lower()))
    if factory is None:
        return None
    reasons = []
    base = getattr(factory, "base", factory)
    try:
        size = (int(image_size),) * 2 if isinstance(image_size, int) else tuple(int(s) for s in image_size)
    except (TypeError, ValueError):
        size = ()
    if base is convnet.convnet and int(channels) == 1 and size == (28, 28):
        reasons.append(EARLIER_CONVNET_28)
    if _norm(factory, options) == "layernorm":
        reasons.append(EARLIER_LAYERNORM)
    return " and ".join(reasons) or None
