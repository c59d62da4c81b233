"""Smooth expert trajectories (AST, Sec. IV-B, eq. 19).

Momentum makes better experts but steeper trajectories that students match
badly. AST trains experts with

    L_SC = lambda_e * CE(f(A(x)), y) + mu * E_x[(||grad_x W(x)||_2 - K)^2]

* clipping: ``lambda_e`` ramps linearly from ``ramp_start`` to 1 over the
  first ``ramp_epochs`` epochs (``lambda_e = s + (1 - s) e / R``), then 1.
  Paper: 0.5 over 5 epochs; authors' code: 0.50, 0.55, ..., 0.95 over 10.
* gradient penalty (WGAN-GP style): ``W(x)`` is the logits, the gradient of
  their sum with respect to the input, ``K = 1``. Paper: ``mu = 1``, the
  norm of each sample's whole input gradient, on the same augmented inputs
  as the CE (one shared forward pass). Authors' code: ``mu = 2``, on the
  un-augmented batch, the norm over channels only (per pixel), then the mean.

Both parts are wrappers of the ``astkit_expert_loss`` hook and can be
switched off alone (``clipping = false`` / ``penalty = false``) for the Table
VII ablation. Momentum itself is the expert optimiser's
``experts.momentum``.
"""

from __future__ import annotations

import torch

from astkit import UserError, hookimpl

NAME = "smooth-experts"
VARIANTS = {
    "paper": {"ramp_start": 0.5, "ramp_epochs": 5, "mu": 1.0, "K": 1.0, "norm": "sample", "inputs": "augmented"},
    "reference": {"ramp_start": 0.5, "ramp_epochs": 10, "mu": 2.0, "K": 1.0, "norm": "channel", "inputs": "clean"},
}


def clip_weight(epoch: int, ramp_epochs: int, ramp_start: float = 0.5) -> float:
    """``lambda_e``: linear from ``ramp_start`` to 1 over ``ramp_epochs`` epochs."""
    if epoch >= ramp_epochs:
        return 1.0
    return ramp_start + (1.0 - ramp_start) * epoch / ramp_epochs


def gradient_penalty(input_grad: torch.Tensor, K: float = 1.0, norm: str = "sample") -> torch.Tensor:
    """``mean((||g|| - K)^2)``: per sample over all dims, or per pixel over channels."""
    if norm == "sample":
        norms = input_grad.flatten(1).norm(dim=1)
    elif norm == "channel":
        norms = input_grad.norm(dim=1)
    else:
        raise UserError(f"{NAME}.norm must be 'sample' or 'channel', got {norm!r}")
    return (norms - K).pow(2).mean()


def input_gradient(logits: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """``grad_x sum(W(x))``, kept differentiable for the penalty's backward."""
    (grad,) = torch.autograd.grad(logits.sum(), inputs, create_graph=True)
    return grad


def settings(config) -> dict:
    """The plugin's options with the variant's values filled in."""
    options = config.plugin(NAME)
    variant = options["variant"]
    if variant not in VARIANTS:
        raise UserError(f"{NAME}.variant must be 'paper' or 'reference', got {variant!r}")
    merged = {k: (options[k] if options.get(k) is not None else v) for k, v in VARIANTS[variant].items()}
    if merged["inputs"] not in ("augmented", "clean"):
        raise UserError(f"{NAME}.inputs must be 'augmented' or 'clean', got {merged['inputs']!r}")
    fraction = float(options["penalty_fraction"])
    if not 0 < fraction <= 1:
        raise UserError(f"{NAME}.penalty_fraction must be in (0, 1], got {fraction}")
    return {**merged, "clipping": options["clipping"], "penalty": options["penalty"], "penalty_fraction": fraction}


@hookimpl
def astkit_plugin_options():
    return {
        NAME: {
            "variant": "paper",
            "clipping": True,
            "penalty": True,
            "ramp_start": None,
            "ramp_epochs": None,
            "mu": None,
            "K": None,
            "norm": None,
            "inputs": None,
            "penalty_fraction": 1.0,
        }
    }


@hookimpl(wrapper=True)
def astkit_expert_loss(batch, epoch, config):
    s = settings(config)
    shared = s["penalty"] and s["inputs"] == "augmented" and s["penalty_fraction"] == 1.0
    if shared:
        batch.require_input_grad()  # before the forward pass, so it is shared
    loss = yield
    if s["clipping"]:
        loss = clip_weight(epoch, int(s["ramp_epochs"]), float(s["ramp_start"])) * loss
    if s["penalty"]:
        if shared:
            x, logits = batch.images, batch.logits()
        else:
            x = batch.images if s["inputs"] == "augmented" else batch.clean_images
            if s["penalty_fraction"] < 1.0:  # unbiased estimate on a random subsample
                keep = max(1, round(s["penalty_fraction"] * x.shape[0]))
                x = x[torch.randperm(x.shape[0], generator=batch.generator(), device=x.device)[:keep]]
            x = x.detach().requires_grad_(True)
            logits = batch.model(x)
        penalty = gradient_penalty(input_gradient(logits, x), float(s["K"]), s["norm"])
        loss = loss + float(s["mu"]) * penalty
    return loss
