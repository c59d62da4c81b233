"""Instance norm with an analytic double backward: DC/MTT's ``GroupNorm(c, c)``, faster to unroll.

The distillation unroll differentiates every student step twice: the step's
gradient is taken with ``create_graph=True`` and the matching loss is then
backpropagated through it. For ``F.group_norm`` PyTorch builds the
differentiable first backward from many element-wise operations and
differentiates those again. Here the first backward is one fused
``native_group_norm_backward`` call, and its own backward is written out: per
(sample, channel) group every output is a combination of at most four full
tensors (the two upstream gradients, the input, a constant) whose coefficients
come from five reductions. Values and derivatives of every order equal
``F.group_norm``'s (tests compare them in float64).

With ``g`` the gradient at the output, ``u, u_w, u_b`` the gradients at the
first backward's outputs, ``xh = r (x - mu)``, ``A = mean(g)``,
``B = mean(g xh)``, ``t = g - A - xh B`` (so that ``dL/dx = r w t``),
``Qu = mean(u)``, ``Qx = mean(u xh)``, ``T = mean(u t)``::

    d/dg = r w (u - Qu - xh Qx) + u_w xh + u_b
    d/dx = -r^2 w B u + K t + (r^2 w (B Qx - T)) xh + r^2 w B Qu,   K = r u_w - r^2 w Qx
    d/dw = sum over samples of r M T                                  (M = H x W)
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd import Function

aten = torch.ops.aten


def _groups(x: torch.Tensor) -> tuple[int, int, int]:
    n, c = x.shape[:2]
    return n, c, x.numel() // max(n * c, 1)


class _InstanceNorm(Function):
    """``y = w (x - mu) / sqrt(var + eps) + b`` per (sample, channel)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        n, c, m = _groups(x)
        y, mean, rstd = aten.native_group_norm(x.contiguous(), weight, bias, n, c, m, c, eps)
        ctx.save_for_backward(x, weight, mean, rstd)  # x itself (not a copy): its graph is needed twice over
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, mean, rstd = ctx.saved_tensors
        gx, gw, gb = _InstanceNormBackward.apply(g, x, weight, mean, rstd, ctx.eps)
        return gx, gw, gb, None


class _InstanceNormBackward(Function):
    """The first backward (fused kernel) as a function of ``(g, x, w)``, with its own backward written out."""

    @staticmethod
    def forward(ctx, g, x, weight, mean, rstd, eps):
        n, c, m = _groups(x)
        gx, gw, gb = aten.native_group_norm_backward(g.contiguous(), x.contiguous(), mean, rstd, weight, n, c, m, c,
                                                      [True, True, True])
        ctx.save_for_backward(g, x, weight, mean, rstd)
        ctx.eps = eps
        return gx, gw, gb

    @staticmethod
    def backward(ctx, u, u_w, u_b):
        g, x, weight, mean, rstd = ctx.saved_tensors
        n, c, m = _groups(x)
        rows = n * c
        g2, x2 = g.reshape(rows, m), x.reshape(rows, m)
        u2 = torch.zeros_like(g2) if u is None else u.reshape(rows, m)
        if torch.is_grad_enabled():  # a higher order is asked for: mu and r as functions of x
            var, mu = torch.var_mean(x2, dim=1, correction=0, keepdim=True)
            r = torch.rsqrt(var + ctx.eps)
        else:
            r, mu = rstd.reshape(rows, 1), mean.reshape(rows, 1)

        def per_row(per_channel):  # (C,) -> (N*C, 1)
            return per_channel.reshape(1, c).expand(n, c).reshape(rows, 1)

        w = per_row(weight)
        uw = torch.zeros_like(w) if u_w is None else per_row(u_w)
        ub = torch.zeros_like(w) if u_b is None else per_row(u_b)
        s_g, s_u = g2.sum(1, keepdim=True), u2.sum(1, keepdim=True)
        d_gx = torch.linalg.vecdot(g2, x2).unsqueeze(1)
        d_ux = torch.linalg.vecdot(u2, x2).unsqueeze(1)
        d_ug = torch.linalg.vecdot(u2, g2).unsqueeze(1)
        a = s_g / m
        b = r * (d_gx - mu * s_g) / m
        qu = s_u / m
        qx = r * (d_ux - mu * s_u) / m
        t = d_ug / m - a * qu - b * qx  # mean(u * (g - A - xh B))
        rw, r2w = r * w, r * r * w
        # d/dg = rw u + xh (uw - rw qx) + (ub - rw qu), with xh = r x - r mu
        c_xh = uw - rw * qx
        grad_g = (x2 * (r * c_xh)).add_(ub - rw * qu - r * mu * c_xh).addcmul_(u2, rw)
        # d/dx = -r2w b u + k (g - a - xh b) + r2w (b qx - t) xh + r2w b qu
        k = r * uw - r2w * qx
        c_xh = r2w * (b * qx - t) - k * b
        c_0 = r2w * b * qu - k * a - c_xh * r * mu
        grad_x = (x2 * (c_xh * r)).add_(c_0).addcmul_(u2, -r2w * b).addcmul_(g2, k)
        grad_w = (r * (m * t)).reshape(n, c).sum(0)
        return grad_g.view_as(g), grad_x.view_as(x), grad_w, None, None, None


def instance_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``F.group_norm(x, C, weight, bias, eps)`` with the analytic double backward."""
    return _InstanceNorm.apply(x, weight, bias, eps)


class InstanceNorm(nn.GroupNorm):
    """``GroupNorm(c, c)`` (same parameters and state dict) run through :func:`instance_norm`."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__(channels, channels, eps=eps, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3 or not x.is_floating_point():
            return super().forward(x)
        return instance_norm(x, self.weight, self.bias, self.eps)
