"""Run any ``nn.Module`` on one flat parameter vector.

The distillation student is a single 1-D tensor ``theta``; each step of the
unrolled loop is ``theta - lr * grad`` on that tensor, so the meta-gradient is
one autograd graph with no per-step copying of parameters. ``FlatModel``
splits ``theta`` into views shaped like the module's parameters and calls the
module through :func:`torch.func.functional_call`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call


@dataclass(frozen=True)
class ParamLayout:
    """Names, shapes and sizes of a module's parameters in flat order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, module: nn.Module) -> "ParamLayout":
        named = list(module.named_parameters())
        return cls(tuple(n for n, _ in named), tuple(tuple(p.shape) for _, p in named))

    @property
    def numels(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @property
    def size(self) -> int:
        return sum(self.numels)

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``flat`` shaped like each parameter (differentiable)."""
        pieces = torch.split(flat, self.numels)
        return {n: p.view(s) for n, p, s in zip(self.names, pieces, self.shapes)}

    def flatten(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The flat vector of ``params`` (in layout order)."""
        return torch.cat([params[n].reshape(-1) for n in self.names])

    def to_json(self) -> dict:
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes]}

    @classmethod
    def from_json(cls, data: dict) -> "ParamLayout":
        return cls(tuple(data["names"]), tuple(tuple(s) for s in data["shapes"]))


class FlatModel:
    """Call ``module`` with its parameters taken from a flat vector."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.layout = ParamLayout.of(module)
        self.buffers = dict(module.named_buffers())

    def initial(self) -> torch.Tensor:
        """The module's current parameters as one flat vector (a copy)."""
        with torch.no_grad():
            return self.layout.flatten(dict(self.module.named_parameters())).clone()

    def __call__(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        params = self.layout.split(flat)
        if self.buffers:
            params = {**params, **self.buffers}
        return functional_call(self.module, params, (x,))

    def load_into(self, flat: torch.Tensor) -> nn.Module:
        """Copy ``flat`` into the module's parameters and return the module."""
        with torch.no_grad():
            for name, value in self.layout.split(flat.detach()).items():
                self.module.get_parameter(name).copy_(value)
        return self.module
