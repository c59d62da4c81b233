"""Weight perturbation of the expert start (AST, Sec. IV-D, eq. 23).

Evaluation trains from random initialisations the student never saw, so AST
perturbs the start ``theta_t`` of every iteration. Paper: for every weight
tensor with two or more dimensions and every filter ``j`` (a slice along the
output dimension), ``d ~ N(0, I)`` is rescaled to the filter's norm,
``d <- d / ||d|| * ||theta_j||``, and ``theta*_j = theta_j + rho * d_j`` with
``rho = 0.1`` (filter-normalised directions, as in loss-landscape plots);
biases and norm parameters are unchanged. Authors' code ("reference"): only
4-D convolution weights, ``d`` normalised by the norm of the whole tensor,
``theta + rho * d * theta`` element-wise, ``rho = 1``.
"""

from __future__ import annotations

import torch

from astkit import UserError, hookimpl

NAME = "weight-perturbation"
DEFAULT_RHO = {"paper": 0.1, "reference": 1.0}


def perturb_filterwise(params: dict[str, torch.Tensor], rho: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The paper's filter-normalised Gaussian perturbation."""
    out = {}
    for name, theta in params.items():
        if theta.ndim < 2:
            out[name] = theta
            continue
        d = _normal(theta, generator)
        flat_d, flat_t = d.reshape(d.shape[0], -1), theta.reshape(theta.shape[0], -1)
        scale = flat_t.norm(dim=1, keepdim=True) / flat_d.norm(dim=1, keepdim=True).clamp_min(1e-12)
        out[name] = theta + rho * (flat_d * scale).reshape(theta.shape)
    return out


def perturb_reference(params: dict[str, torch.Tensor], rho: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The authors' code: conv weights only, tensor-normalised, element-wise."""
    out = {}
    for name, theta in params.items():
        if theta.ndim != 4:
            out[name] = theta
            continue
        d = _normal(theta, generator)
        out[name] = theta + rho * (d / d.norm()) * theta
    return out


def _normal(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(like.shape, generator=generator, dtype=like.dtype).to(like.device)


@hookimpl
def astkit_plugin_options():
    return {NAME: {"variant": "paper", "rho": None}}


@hookimpl
def astkit_perturb_expert(params, generator, config):
    options = config.plugin(NAME)
    variant = options["variant"]
    if variant not in DEFAULT_RHO:
        raise UserError(f"{NAME}.variant must be 'paper' or 'reference', got {variant!r}")
    rho = float(options["rho"]) if options["rho"] is not None else DEFAULT_RHO[variant]
    perturb = perturb_filterwise if variant == "paper" else perturb_reference
    return perturb(params, rho, generator)
