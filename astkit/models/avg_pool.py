"""2x2 average pooling with stride 2 as strided additions: DC/MTT's ``AvgPool2d(2, 2)``, faster to unroll.

On the CPU, PyTorch's ``avg_pool2d`` and ``avg_pool2d_backward`` kernels on
NCHW maps take two to four times as long as the same work written as two
strided additions (rows, then columns) and as an interleaved copy (100 maps
of 128 x 32 x 32, 2 threads: 11 vs 3 ms and 10.5 vs 4.8 ms); the
unroll runs each of them twice per block and student step (the forward, the
first backward, and their derivatives). Pooling and its backward are
adjoint linear maps, so each one's backward is the other and derivatives of
every order equal ``F.avg_pool2d``'s (tests compare them in float64; the
sum of a window is taken as (top + bottom) then (left + right), so values
agree to rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function


def _pool(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    rows = x.view(n * c * h // 2, 2, w)
    pairs = (rows[:, 0] + rows[:, 1]).view(n * c * h // 2, w // 2, 2)
    return (pairs[..., 0] + pairs[..., 1]).mul_(0.25).view(n, c, h // 2, w // 2)


def _unpool(g: torch.Tensor) -> torch.Tensor:
    n, c, ho, wo = g.shape
    quarter = (g * 0.25).view(n, c, ho, 1, wo, 1)
    return quarter.expand(n, c, ho, 2, wo, 2).reshape(n, c, 2 * ho, 2 * wo)


class _AvgPool2x2(Function):
    @staticmethod
    def forward(ctx, x):
        return _pool(x.contiguous())

    @staticmethod
    def backward(ctx, g):
        return _AvgUnpool2x2.apply(g)


class _AvgUnpool2x2(Function):
    """The backward of the pooling (each window's gradient over 4 to its four pixels); its own backward is the pooling."""

    @staticmethod
    def forward(ctx, g):
        return _unpool(g.contiguous())

    @staticmethod
    def backward(ctx, u):
        return _AvgPool2x2.apply(u)


def avg_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.avg_pool2d(x, 2)`` for 4-d maps of even height and width (others go to ``F.avg_pool2d``)."""
    if x.dim() != 4 or x.shape[-2] % 2 or x.shape[-1] % 2 or not x.is_floating_point() or x.numel() == 0:
        return F.avg_pool2d(x, 2)
    return _AvgPool2x2.apply(x)


class AvgPool2d(nn.AvgPool2d):
    """``nn.AvgPool2d``; a 2x2 window with stride 2 (DC/MTT's) runs through :func:`avg_pool_2x2`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        square = _pair(self.kernel_size) == (2, 2) and _pair(self.stride) == (2, 2)
        if square and _pair(self.padding) == (0, 0) and not self.ceil_mode and self.divisor_override is None:
            return avg_pool_2x2(x)
        return super().forward(x)


def _pair(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)
