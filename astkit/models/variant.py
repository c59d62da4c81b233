"""Named variants of a model factory with some options fixed."""

from __future__ import annotations

import inspect
from typing import Any, Callable

from torch import nn

from astkit.errors import UserError


class Variant:
    """A factory that calls ``base`` with ``fixed`` options (giving one a different value is an error)."""

    def __init__(self, name: str, base: Callable[..., nn.Module], description: str, **fixed: Any):
        self.name, self.base, self.fixed = name, base, fixed
        self.__doc__ = description
        self.__signature__ = inspect.signature(base)

    def __call__(self, channels: int, num_classes: int, image_size, **options: Any) -> nn.Module:
        for key, value in self.fixed.items():
            if key in options and options[key] != value:
                raise UserError(f"model {self.name!r} fixes {key}={value!r}; got {key}={options[key]!r}")
        return self.base(channels, num_classes, image_size, **{**options, **self.fixed})

    def __repr__(self) -> str:
        fixed = ", ".join(f"{k}={v!r}" for k, v in self.fixed.items())
        return f"Variant({self.name!r}, {self.base.__name__}, {fixed})"
