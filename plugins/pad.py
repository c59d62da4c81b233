"""PAD: prioritize alignment in dataset distillation (Li et al., 2024).

Parameter-selective matching. PAD keeps DATM's distillation (start window,
soft labels, gating: plugin ``datm``) and FTD's GSAM experts (plugin
``ftd``) and changes which parameters the matching loss compares
(``astkit_matching_distance``). Per flat element ``i`` of the P parameters

    e_i = (student_i - target_i)^2        d_i = (start_i - target_i)^2

and the distance is ``sum_K e_i / sum_K d_i`` over a kept set ``K``:

* ``depth_ratio`` r_d and ``skip_layers`` s (both default 0): only the
  elements with flat index ``>= max(floor(r_d * P), offset of layer s)``
  remain (the deleted ``PAD_depth.py``'s element-count cut; the paper's
  "deep layers only" by whole layers, see :func:`layers`);
* ``loss_ratio`` r (default 0.5): among the R remaining elements, the
  ``floor(r * R)`` with the smallest error (on the detached errors,
  recomputed every call, across all layers jointly) are dropped too.

With every option 0 the distance is MTT's ``||student - target||^2 /
||start - target||^2``. The difficulty-scheduled expert data of PAD's stage 1
is not built (docs/techniques/pad.md says why).
"""

from __future__ import annotations

import math

import torch

from astkit import UserError, hookimpl

NAME = "pad"
#: the options (namespace ``pad``) and their defaults
OPTIONS = {"loss_ratio": 0.5, "depth_ratio": 0.0, "skip_layers": 0}


# ----------------------------------------------------------------- options
def _ratio(options: dict, key: str) -> float:
    value = options.get(key, OPTIONS[key])
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise UserError(f"pad.{key} must be a number in [0, 1), got {value!r}; write e.g. pad.{key}=0.5 (0: off)")
    return float(value)


def _skip(options: dict) -> int:
    value = options.get("skip_layers", OPTIONS["skip_layers"])
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or float(value) != int(value) or value < 0:
        raise UserError(f"pad.skip_layers must be a whole number >= 0, got {value!r}; write e.g. pad.skip_layers=1")
    return int(value)


def options_of(config) -> tuple[float, float, int]:
    """``(loss_ratio, depth_ratio, skip_layers)``, checked (one-line UserError)."""
    options = config.plugin(NAME)
    return _ratio(options, "loss_ratio"), _ratio(options, "depth_ratio"), _skip(options)


# ------------------------------------------------------------------ layers
def layers(layout) -> list[tuple[tuple[str, ...], int, int]]:
    """The network's layers in flat order: ``(parameter names, first element, end)``.

    Parameters are grouped by module (the name without its last component:
    ``features.0.weight`` and ``features.0.bias`` are module ``features.0``).
    A module whose parameters all have one shape (a norm's weight and bias,
    per channel or per element; or a lone 1-D parameter) belongs to the layer
    before it; every other module (a convolution or linear layer: a weight
    shaped unlike its bias, or a bias-free weight) starts a layer. So the
    default ConvNet's layers are conv + norm per block, then the classifier.
    """
    modules: list[tuple[str, list[int]]] = []
    for index, name in enumerate(layout.names):
        prefix = name.rpartition(".")[0]
        if modules and modules[-1][0] == prefix:
            modules[-1][1].append(index)
        else:
            modules.append((prefix, [index]))
    offsets = [0]
    for n in layout.numels:
        offsets.append(offsets[-1] + n)
    groups: list[list[int]] = []
    for _, indices in modules:
        shapes = [tuple(layout.shapes[i]) for i in indices]
        affine = all(s == shapes[0] for s in shapes) and (len(shapes) > 1 or len(shapes[0]) <= 1)
        if affine and groups:
            groups[-1].extend(indices)
        else:
            groups.append(list(indices))
    return [(tuple(layout.names[i] for i in g), offsets[g[0]], offsets[g[-1] + 1]) for g in groups]


def cut_index(layout, depth_ratio: float, skip_layers: int) -> int:
    """The first flat element matched: ``max(floor(depth_ratio * P), offset of layer skip_layers)``."""
    found = layers(layout)
    if skip_layers >= len(found):
        raise UserError(f"pad.skip_layers = {skip_layers}, but the network has {len(found)} layers "
                        f"(0..{len(found) - 1} can be skipped); lower pad.skip_layers")
    return max(math.floor(depth_ratio * layout.size), found[skip_layers][1])


# ---------------------------------------------------------------- distance
def selective_distance(student: torch.Tensor, start: torch.Tensor, target: torch.Tensor, cut: int = 0,
                       loss_ratio: float = 0.0) -> torch.Tensor:
    """``sum_K e_i / sum_K d_i`` over the elements from ``cut`` on, less the
    ``floor(loss_ratio * R)`` of them with the smallest ``e_i`` (ties: the
    earlier index is dropped first)."""
    errors = (student[cut:] - target[cut:]).pow(2)
    spans = (start[cut:] - target[cut:]).pow(2)
    drop = math.floor(loss_ratio * errors.numel())
    if drop >= errors.numel():
        raise UserError(f"pad keeps no parameter: {errors.numel()} remain after the depth/layer cut and "
                        f"pad.loss_ratio = {loss_ratio} drops {drop}; lower pad.loss_ratio or pad.depth_ratio")
    if drop:
        kept = torch.argsort(errors.detach(), stable=True)[drop:]
        errors, spans = errors[kept], spans[kept]
    return errors.sum() / spans.sum()


@hookimpl
def astkit_matching_distance(student, start, target, layout, config):
    """PAD's distance: the selected elements' squared error over their squared span."""
    loss_ratio, depth_ratio, skip_layers = options_of(config)
    return selective_distance(student, start, target, cut_index(layout, depth_ratio, skip_layers), loss_ratio)


@hookimpl
def astkit_plugin_options():
    return {NAME: dict(OPTIONS)}


@hookimpl
def astkit_check_config(config):
    """Refuse bad ratios or a negative skip_layers when the engine is built (the
    upper bound of skip_layers needs the network: checked at the first match)."""
    options_of(config)


# ------------------------------------------------------------------ preset
#: PAD's published code (CIFAR-10 IPC10 config, METHOD-MORE.md section 3): DATM's distillation (plugin
#: ``datm``), FTD's GSAM experts without EMA (plugin ``ftd``), the selection with loss_ratio 0.5.
PAD_REFERENCE = {
    "description": "PAD's published code (CIFAR-10 IPC10 config): plugins datm, ftd and pad; DATM's distillation "
                   "(images its expert 0 classifies correctly, soft labels learned with SGD lr 2 momentum 0.9, "
                   "updates skipped when the matching loss exceeds 1, start window min 0, initial 10, reaching "
                   "distill.max_start_epoch at iteration 1000), FTD's GSAM experts (rho 0.01, alpha 0.3, no EMA; "
                   "SGD lr 0.01, momentum 0, weight decay 0, no lr decay), the matching loss over the half of the "
                   "parameters with the largest error (pad.loss_ratio 0.5, depth_ratio 0); evaluation batch 128. "
                   "Per dataset/IPC (docs/techniques/pad.md) set pad.loss_ratio and DATM's per-setting values "
                   "(distill.max_start_epoch, the window, distill.syn_steps, distill.expert_epochs, distill.lr_img, "
                   "distill.lr_labels ...); PAD's experts also train on an easy-to-hard data schedule, not built here",
    "config": {
        "experts": {"optimizer": "sgd", "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0, "lr_decay": 1.0},
        "distill": {"learn_labels": True, "lr_labels": 2.0, "labels_momentum": 0.9, "max_loss_to_update": 1.0},
        "evaluate": {"batch_size": 128},
    },
    "options": {
        "ftd": {"sharpness": "gsam", "rho": 0.01, "alpha": 0.3, "ema_decay": 0.0},
        "datm": {"init": "correct", "soft_labels": True, "min_start_epoch": 0, "initial_max_start_epoch": 10,
                 "expansion_end": 1000},
        NAME: {"loss_ratio": 0.5, "depth_ratio": 0.0},
    },
}


@hookimpl
def astkit_register_presets(register):
    register("pad-reference", ["datm", "ftd", NAME], PAD_REFERENCE["description"], config=PAD_REFERENCE["config"],
             options=PAD_REFERENCE["options"])
