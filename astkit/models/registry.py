"""The model registry: look up a factory by name, check its options, build it."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Callable

from torch import nn

from astkit.errors import UserError
from astkit.models import alexnet, convnet, resnet, vgg

#: ``factory(channels, num_classes, image_size, **options) -> nn.Module``
ModelFactory = Callable[..., nn.Module]

#: every built-in model, by lowercase name
BUILTIN_MODELS: dict[str, ModelFactory] = {
    **convnet.MODELS, **resnet.MODELS, **vgg.MODELS, **alexnet.MODELS,
}

_POSITIONAL = {"channels", "num_classes", "image_size"}


def _registry(registry: Mapping[str, ModelFactory] | None) -> Mapping[str, ModelFactory]:
    return BUILTIN_MODELS if registry is None else registry


def model_names(registry: Mapping[str, ModelFactory] | None = None) -> list[str]:
    """The registered names, sorted."""
    return sorted(_registry(registry))


def get_factory(name: str, registry: Mapping[str, ModelFactory] | None = None) -> ModelFactory:
    """The factory registered as ``name`` (exact, else lowercased); UserError if none."""
    models = _registry(registry)
    for key in (name, str(name).lower()):
        if key in models:
            return models[key]
    raise UserError(f"unknown model {name!r}; known models: {', '.join(sorted(models))}")


def _option_parameters(factory: ModelFactory) -> list[inspect.Parameter] | None:
    """The named option parameters of ``factory`` (not channels, classes, image size), or None if it takes
    any (``**kwargs``) or can't be inspected."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p for p in params if p.kind in kinds and p.name not in _POSITIONAL]


def model_options(factory: ModelFactory) -> list[str] | None:
    """The option names ``factory`` accepts, or None if it takes any (``**kwargs``) or can't be inspected."""
    params = _option_parameters(factory)
    return None if params is None else [p.name for p in params]


def default_options(name: str, registry: Mapping[str, ModelFactory] | None = None) -> dict[str, Any]:
    """The option values ``name``'s factory takes when none is given (a variant's fixed ones included);
    only the fixed ones when the factory cannot be inspected."""
    factory = get_factory(name, registry)
    defaults = {p.name: p.default for p in _option_parameters(factory) or [] if p.default is not p.empty}
    return {**defaults, **getattr(factory, "fixed", {})}


def describe_model(name: str, registry: Mapping[str, ModelFactory] | None = None) -> str:
    """One line about ``name``: the first line of its factory's docstring."""
    doc = inspect.getdoc(get_factory(name, registry)) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def build_model(name: str, *, channels: int, num_classes: int, image_size,
                registry: Mapping[str, ModelFactory] | None = None, **options: Any) -> nn.Module:
    """Build the model registered as ``name``; an option given as None means the model's default."""
    factory = get_factory(name, registry)
    known = model_options(factory)
    if known is not None:
        for option in options:
            if option not in known:
                listed = ", ".join(known) or "none"
                raise UserError(f"model {name!r} has no option {option!r}; its options: {listed}")
    options = {k: v for k, v in options.items() if v is not None}
    if isinstance(image_size, list):
        image_size = tuple(image_size)
    return factory(int(channels), int(num_classes), image_size, **options)
