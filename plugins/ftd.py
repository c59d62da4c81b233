"""FTD: flat trajectory distillation (Du et al., CVPR 2023).

Two parts, both from the authors' code (FTD-distillation @711532a):

* Flat experts (``astkit_expert_step``). Each expert batch takes one GSAM
  step (``buffer/gsam/gsam.py``) instead of a plain one. With ``g`` the
  gradient at ``w`` and ``T(w) = |w|`` (``adaptive``) or ``1``:

      e     = rho * T(w)^2 g / (||T(w) g|| + 1e-12)       (norms over all parameters)
      g_p   = grad L(w + e)                                (same batch)
      cos   = <g, g_p> / (||g|| ||g_p|| + 1e-12)
      g_perp = g - cos ||g|| g_p / (||g_p|| + 1e-12)
      d     = g_p - alpha g_perp                           ("sam": d = g_p)

  then ``w`` is restored and the expert's own optimiser (``experts.*``: lr,
  momentum, weight decay) steps along ``d``. The loss is the closure's, so
  every ``astkit_expert_loss`` plugin (smooth-experts) is part of both
  gradients. The second pass leaves the model's buffers (BatchNorm running
  statistics) as they were, as GSAM's ``disable_running_stats`` does.
* An EMA of the images (``astkit_init_state``, ``astkit_update_synthetic``,
  ``astkit_synthetic_output``), as FTD's ``ModelEmaV2``: the shadow starts as
  the initial images; after every applied update
  ``ema <- d * ema + (1 - d) * images`` (no warm-up, no bias correction).
  The EMA is what is saved in ``distilled.safetensors`` and evaluated; the
  checkpoint keeps the optimised images. It never feeds back into the
  optimisation. ``ema_decay = 0`` turns it off.

Preset ``ftd-reference``: FTD's buffer script (SGD lr 0.01, no momentum, no
weight decay, constant lr) with GSAM rho 0.01, alpha 0.4, adaptive, EMA 0.999.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from astkit import UserError, hookimpl

NAME = "ftd"
SHARPNESS = ("gsam", "sam", "none")
#: GSAM's ``perturb_eps``
EPS = 1e-12
#: the options (namespace ``ftd``) and their defaults
OPTIONS = {
    "sharpness": "gsam",
    "rho": 0.01,
    "alpha": 0.4,
    "adaptive": True,
    "ema_decay": 0.999,
}


# --------------------------------------------------------------- options
def settings(config) -> dict:
    """The plugin's options, checked (a one-line UserError for a bad value)."""
    options = {**OPTIONS, **config.plugin(NAME)}
    sharpness = options["sharpness"]
    if sharpness not in SHARPNESS:
        raise UserError(f"ftd.sharpness must be 'gsam', 'sam' or 'none', got {sharpness!r}")
    rho, alpha, decay = (_number(options, key) for key in ("rho", "alpha", "ema_decay"))
    if rho < 0:
        raise UserError(f"ftd.rho must be >= 0 (the perturbation radius), got {rho}; "
                        f"write e.g. ftd.rho=0.01 (FTD's script)")
    if alpha < 0:
        raise UserError(f"ftd.alpha must be >= 0 (GSAM's weight of the orthogonal gradient), got {alpha}; "
                        f"write e.g. ftd.alpha=0.4")
    if not 0 <= decay < 1:
        raise UserError(f"ftd.ema_decay must be in [0, 1) (0 turns the EMA off), got {decay}; "
                        f"write e.g. ftd.ema_decay=0.999")
    adaptive = options["adaptive"]
    if not isinstance(adaptive, bool):
        raise UserError(f"ftd.adaptive must be true or false, got {adaptive!r}")
    return {"sharpness": sharpness, "rho": rho, "alpha": alpha, "adaptive": adaptive, "ema_decay": decay}


def _number(options: dict, key: str) -> float:
    value = options[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"ftd.{key} must be a finite number, got {value!r}")
    return float(value)


@hookimpl
def astkit_plugin_options():
    return {NAME: dict(OPTIONS)}


@hookimpl
def astkit_check_config(config):
    """Refuse bad options when the engine is built, before experts are trained."""
    settings(config)


# ------------------------------------------------------- the GSAM step
def _norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all tensors together (GSAM: the norm of the per-tensor norms)."""
    return torch.norm(torch.stack([t.norm(p=2) for t in tensors]), p=2)


def perturbation(params: list[torch.Tensor], grads: list[torch.Tensor], rho: float,
                 adaptive: bool) -> list[torch.Tensor]:
    """``e = rho T(w)^2 g / (||T(w) g|| + eps)``, ``T(w) = |w|`` (adaptive) or 1."""
    if adaptive:
        norm = _norm([p.abs() * g for p, g in zip(params, grads)])
    else:
        norm = _norm(grads)
    scale = rho / (norm + EPS)
    return [g * scale * p.pow(2) if adaptive else g * scale for p, g in zip(params, grads)]


def gsam_direction(g: list[torch.Tensor], g_p: list[torch.Tensor], alpha: float) -> list[torch.Tensor]:
    """``g_p - alpha g_perp``, ``g_perp = g - cos(g, g_p) ||g|| g_p / ||g_p||`` (GSAM's eps)."""
    inner = sum(torch.sum(a * b) for a, b in zip(g, g_p))
    new_norm, old_norm = _norm(g_p), _norm(g)
    cosine = inner / (new_norm * old_norm + EPS)
    return [b - alpha * (a - cosine * old_norm * b / (new_norm + EPS)) for a, b in zip(g, g_p)]


def _gradient(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]


@contextmanager
def buffers_kept(model: torch.nn.Module):
    """The model's buffers (BatchNorm running statistics) as they were after the block."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


@hookimpl
def astkit_expert_step(model, closure, optimizer, config):
    """One sharpness-aware step (GSAM or SAM) on one batch; ``none``: the baseline's step."""
    s = settings(config)
    if s["sharpness"] == "none":
        return None
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    loss = closure()
    g = _gradient(loss, params)
    with torch.no_grad():
        weights = [p.detach().clone() for p in params]
        for p, e in zip(params, perturbation(weights, g, s["rho"], s["adaptive"])):
            p.add_(e)
    try:
        with buffers_kept(model):
            g_p = _gradient(closure(), params)
    finally:
        with torch.no_grad():
            for p, w in zip(params, weights):
                p.copy_(w)
    direction = g_p if s["sharpness"] == "sam" else gsam_direction(g, g_p, s["alpha"])
    optimizer.zero_grad(set_to_none=True)
    for p, d in zip(params, direction):
        p.grad = d
    optimizer.step()
    return loss.detach()


# --------------------------------------------------------- the image EMA
def _shadow(state: dict, what: str) -> torch.Tensor:
    mine = state.get(NAME)
    if not isinstance(mine, dict) or not torch.is_tensor(mine.get("ema")):
        raise UserError(f"ftd.ema_decay > 0 but the run's state holds no EMA of the images to {what} (this "
                        f"distillation started with ftd.ema_decay = 0 or without plugin ftd); resume with "
                        f"ftd.ema_decay=0, or start the distillation again")
    return mine["ema"]


@hookimpl
def astkit_init_state(images, state, config):
    """The shadow starts as a copy of the initial images (FTD's ModelEmaV2)."""
    if settings(config)["ema_decay"] > 0:
        state[NAME] = {"ema": images.detach().clone()}


@hookimpl
def astkit_update_synthetic(images, state, config):
    """``ema <- d * ema + (1 - d) * images`` after every applied update."""
    decay = settings(config)["ema_decay"]
    if decay > 0:
        ema = _shadow(state, "update").to(images.device)
        state[NAME]["ema"] = decay * ema + (1 - decay) * images.detach()


@hookimpl
def astkit_synthetic_output(images, labels, state, config):
    """The EMA images (with the current labels) are saved and evaluated."""
    if settings(config)["ema_decay"] == 0:
        return None
    return _shadow(state, "save").to(device=images.device, dtype=images.dtype), labels


# ---------------------------------------------------------------- preset
#: FTD's published buffer script (buffer/run_buffer.sh, buffer_FTD.py; METHOD-MORE.md section 1).
FTD_REFERENCE = {
    "description": "FTD's published code: plugin ftd; experts SGD lr 0.01, momentum 0, weight decay 0, no lr "
                   "decay, each step GSAM with rho 0.01 (run_buffer.sh), alpha 0.4, adaptive; the saved and "
                   "evaluated set is the EMA of the images with decay 0.999. Per dataset/IPC (FTD Table 7, "
                   "docs/techniques/ftd.md) set distill.syn_steps, distill.expert_epochs, distill.max_start_epoch, "
                   "distill.batch_syn, distill.lr_img, distill.lr_lr, distill.lr_teacher, ftd.alpha and "
                   "ftd.ema_decay (CIFAR-10 IPC10: 30, 2, 20, all, 100, 1e-5, 0.001, 0.3, 0.9995); FTD also "
                   "uses 100 experts of 50 epochs, batch 256 and ZCA",
    "config": {"experts": {"optimizer": "sgd", "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0, "lr_decay": 1.0}},
    "options": {NAME: {"sharpness": "gsam", "rho": 0.01, "alpha": 0.4, "adaptive": True, "ema_decay": 0.999}},
}


@hookimpl
def astkit_register_presets(register):
    register("ftd-reference", [NAME], FTD_REFERENCE["description"], config=FTD_REFERENCE["config"],
             options=FTD_REFERENCE["options"])
