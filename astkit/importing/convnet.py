"""The reference ConvNet's parameter order, and which astkit ConvNet a buffer's shapes are.

The reference scripts (MTT's ``buffer.py``, and AST, FTD, DATM after it)
record ``[p for p in net.parameters()]`` of DC/DSA/MTT's ``ConvNet``: for each
block, the convolution's weight ``(width, in, 3, 3)`` and bias ``(width,)``,
then the norm's affine weight and bias (``instancenorm``, a
``GroupNorm(width, width)``, and ``batchnorm``: ``(width,)`` each;
``layernorm``: ``(width, H, W)`` each; ``none``: nothing); then the
classifier's weight ``(classes, features)`` and bias ``(classes,)``.
astkit's ConvNet is that network (tests/test_convnet_reference.py), so each
reference tensor has one astkit parameter; :func:`reference_parts` names it.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from astkit.errors import FileFormatError, UserError
from astkit.functional import ParamLayout
from astkit.models import convnet as convnet_module
from astkit.trajectory import ModelSpec, describe

MODEL = "convnet"
#: options the shapes cannot tell apart; the reference's default is taken
AMBIGUOUS_NORM_NOTE = ("the buffer's norm layers have per-channel parameters, which instancenorm and batchnorm "
                       "share; assuming instancenorm (MTT's ConvNet); pass --norm batchnorm for a ConvNetBN buffer")
_NORMS = (nn.GroupNorm, nn.BatchNorm2d, nn.LayerNorm)

Shape = tuple[int, ...]


def reference_parts(model: nn.Module) -> list[tuple[str, str]]:
    """``(astkit name, description)`` of each parameter of astkit's ConvNet
    ``model``, in the order of the reference ConvNet's ``net.parameters()``."""
    parts: list[tuple[str, str]] = []
    block = 0
    for index, layer in enumerate(model.features):
        if isinstance(layer, nn.Conv2d):
            block += 1
            parts += [(f"features.{index}.weight", f"block {block} conv weight"),
                      (f"features.{index}.bias", f"block {block} conv bias")]
        elif isinstance(layer, _NORMS) and getattr(layer, "weight", None) is not None:
            parts += [(f"features.{index}.weight", f"block {block} norm weight"),
                      (f"features.{index}.bias", f"block {block} norm bias")]
    parts += [("classifier.weight", "classifier weight"), ("classifier.bias", "classifier bias")]
    own = [name for name, _ in model.named_parameters()]
    if sorted(own) != sorted(name for name, _ in parts):
        raise RuntimeError(f"the reference order does not cover astkit's ConvNet parameters {own}")
    return parts


def reference_names(model: nn.Module) -> list[str]:
    """astkit's parameter names in the reference ConvNet's ``net.parameters()`` order."""
    return [name for name, _ in reference_parts(model)]


def shape_text(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def first_mismatch(shapes: Sequence[Shape], model: nn.Module, described: str) -> str | None:
    """Where a list of reference-order shapes first differs from ``model``'s, or None."""
    parts = reference_parts(model)
    for i, (shape, (name, label)) in enumerate(zip(shapes, parts)):
        expected = tuple(model.get_parameter(name).shape)
        if tuple(shape) != expected:
            return f"parameter {i} ({label}) is {shape_text(shape)}, {described} has {shape_text(expected)} ({name})"
    if len(shapes) != len(parts):
        return f"{len(shapes)} parameter tensors per epoch, {described} has {len(parts)}"
    return None


def _candidates(shapes: Sequence[Shape], given: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The ConvNet options the shapes can be, most likely first (``given`` wins)."""
    convs = [s for s in shapes if len(s) == 4]
    inferred: dict[str, Any] = {}
    if convs:
        inferred["depth"], inferred["width"] = len(convs), int(convs[0][0])
    norms = ["instancenorm"]
    per_block = (len(shapes) - 2) / len(convs) if convs else 0
    if per_block == 2:
        norms = ["none"]
    elif per_block == 4 and len(shapes) > 2:
        norms = ["layernorm"] if len(shapes[2]) == 3 else ["instancenorm", "batchnorm"]
    poolings = ["avgpool", "none"]
    out = []
    for norm in norms:
        for pooling in poolings:
            options = {**inferred, "norm": norm, "pooling": pooling, **given}
            if options not in out:
                out.append(options)
    return out


def _defaults(image_size: tuple[int, int], pooling: str) -> dict[str, Any]:
    """The options astkit's ``convnet`` takes when none is given."""
    signature = inspect.signature(convnet_module.convnet).parameters
    defaults = {k: p.default for k, p in signature.items() if p.default is not inspect.Parameter.empty}
    defaults["depth"] = convnet_module.auto_depth(image_size, pooling)
    return defaults


def resolve_convnet(shapes: Sequence[Shape], *, channels: int, num_classes: int, image_size: tuple[int, int],
                    given: Mapping[str, Any], registry: Mapping | None, source: str) -> tuple[ModelSpec, list[str]]:
    """The astkit ConvNet whose parameters have ``shapes`` (reference order), and notes for the user.

    ``given`` are the ``model.*`` options the user set; the rest (depth,
    width, norm, pooling) are read from the shapes. The spec records the
    given options as given and an inferred one only where it differs from
    astkit's default, so a run with the same ``model.*`` keys builds the same
    spec. Raise naming the first differing parameter when no ConvNet fits.
    """
    given = dict(given)
    first_problem = None
    for options in _candidates(shapes, given):
        spec = ModelSpec(MODEL, channels, num_classes, image_size, options)
        model = spec.build(registry)
        problem = first_mismatch(shapes, model, f"astkit's {describe(spec)}")
        if problem is None:
            break
        first_problem = first_problem or problem
    else:
        hint = ("pass the dataset the buffer was made on (--dataset) and the network's "
                "--width/--depth/--norm/--pooling")
        raise FileFormatError(f"{source}: {first_problem}; {hint}")
    defaults = _defaults(image_size, options.get("pooling", "avgpool"))
    recorded = {k: v for k, v in options.items() if k in given or v != defaults.get(k)}
    spec = ModelSpec(MODEL, channels, num_classes, image_size, recorded)
    if ParamLayout.of(spec.build(registry)) != ParamLayout.of(model):
        raise RuntimeError(f"{describe(spec)} does not build the network that fits {source}")
    notes = [AMBIGUOUS_NORM_NOTE] if "norm" not in given and options["norm"] == "instancenorm" else []
    return spec, notes


def check_model_name(name: str) -> None:
    """Only the reference ConvNet has a known parameter order."""
    if str(name).lower() != MODEL:
        raise UserError(f"import-buffer maps the reference ConvNet only (model {MODEL}); got {name!r}; "
                        f"pass --model {MODEL} with --width/--depth/--norm")
