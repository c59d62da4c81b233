"""DATM: difficulty-aligned trajectory matching (Guo et al., ICLR 2024).

Two of DATM's parts are this plugin; the rest is engine configuration.

* A growing start-epoch window (``astkit_draw_start_epoch``). At iteration
  ``it`` the upper bound is

      U = min(max, cur + int((max - cur) * it / expansion_end))

  and the start ``s`` is uniform in ``[min, U)``: early iterations match the
  easy (early) part of the trajectories, later ones the whole range.
  ``max`` is ``distill.max_start_epoch``; ``cur`` is
  ``datm.initial_max_start_epoch`` (unset: ``U = max`` throughout). The
  window is a function of the iteration alone, so a resumed run continues it.
* The initial set (``astkit_init_synthetic``). ``init = "correct"``: for each
  class, real images in a random order, the first ``ipc`` that expert 0
  (at ``label_snapshot``) classifies correctly; when a class runs out, the
  next expert rescans it. ``init = "real"``: random real images, as the
  baseline. With ``soft_labels`` the labels are float logits: for
  ``"correct"`` each image's mean logits over the experts that classify it
  correctly, for ``"real"`` expert 0's logits.

Learning the labels (``distill.learn_labels``, ``lr_labels``,
``labels_momentum``, ``label_temperature``) and DATM's loss-gated update
(``distill.max_loss_to_update``) are engine keys; the preset
``datm-reference`` sets them with FTD's experts (plugin ``ftd``).
"""

from __future__ import annotations

import math

import torch

from astkit import UserError, hookimpl

NAME = "datm"
INITS = ("correct", "real")
#: images per forward pass when classifying real images (DATM scans batches of 256)
BATCH = 256
#: the options (namespace ``datm``) and their defaults
OPTIONS = {
    "min_start_epoch": 0,
    "initial_max_start_epoch": None,
    "expansion_end": 3000,
    "init": "correct",
    "soft_labels": True,
    "label_snapshot": -1,
}


# ------------------------------------------------------------ the window
def upper_bound(iteration: int, initial: int | None, maximum: int, expansion_end: int) -> int:
    """DATM's upper bound ``U`` of the start epoch at ``iteration`` (excluded)."""
    if initial is None:
        return maximum
    return min(maximum, initial + int((maximum - initial) * iteration / expansion_end))


def _whole(options: dict, key: str) -> int | None:
    """``datm.<key>`` as an int (None stays None); a one-line UserError otherwise."""
    value = options.get(key, OPTIONS[key])
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or float(value) != int(value):
        raise UserError(f"datm.{key} must be a whole number, got {value!r}; write e.g. datm.{key}=10")
    return int(value)


def window(config, max_start_epoch: int) -> tuple[int, int | None, int]:
    """``(min, initial, expansion_end)`` from the options, checked against ``max_start_epoch``."""
    options = config.plugin(NAME)
    low, initial = _whole(options, "min_start_epoch"), _whole(options, "initial_max_start_epoch")
    end = _whole(options, "expansion_end")
    if low is None or low < 0 or low >= max_start_epoch:
        raise UserError(f"datm.min_start_epoch = {low} must be in 0..{max_start_epoch - 1} (below "
                        f"distill.max_start_epoch = {max_start_epoch}); lower it or raise distill.max_start_epoch")
    if initial is not None and not low + 1 <= initial <= max_start_epoch:
        raise UserError(f"datm.initial_max_start_epoch = {initial} must be in {low + 1}..{max_start_epoch} (above "
                        f"datm.min_start_epoch, at most distill.max_start_epoch); set it in that range, or unset it "
                        f"for a fixed window")
    if end is None or end < 1:
        raise UserError(f"datm.expansion_end = {end} must be >= 1; set the iteration at which the window "
                        f"reaches distill.max_start_epoch")
    return low, initial, end


@hookimpl
def astkit_draw_start_epoch(max_start_epoch, iteration, generator, config):
    """Uniform in ``[min_start_epoch, U(iteration))``."""
    low, initial, end = window(config, max_start_epoch)
    upper = upper_bound(iteration, initial, max_start_epoch, end)
    return int(torch.randint(low, upper, (1,), generator=generator))


# -------------------------------------------------------- initialisation
def init_options(config) -> tuple[str, bool, int]:
    """``(init, soft_labels, label_snapshot)``, checked."""
    options = config.plugin(NAME)
    init = options.get("init", OPTIONS["init"])
    if init not in INITS:
        raise UserError(f"datm.init must be 'correct' or 'real', got {init!r}")
    snapshot = _whole(options, "label_snapshot")
    if snapshot is None:
        raise UserError("datm.label_snapshot must be a snapshot index; write -1 for the final one")
    return init, bool(options.get("soft_labels", OPTIONS["soft_labels"])), snapshot


def _device(config) -> torch.device:
    """The run's device for classifying real images (``auto``: a GPU if there is one)."""
    name = str(config.device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        return torch.device("cpu")


def snapshot_models(experts, snapshot: int, device: torch.device) -> list[torch.nn.Module]:
    """Each expert's network at ``snapshot``, in eval mode on ``device``."""
    models = []
    for index, trajectory in enumerate(experts):
        count = int(trajectory.snapshots.shape[0])
        if not -count <= snapshot < count:
            raise UserError(f"datm.label_snapshot = {snapshot}, but expert {index} has snapshots 0..{count - 1}; "
                            f"use one of them (-1: the final one)")
        models.append(trajectory.build_model(snapshot=snapshot).to(device).eval())
    return models


@torch.no_grad()
def logits_of(model: torch.nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``model``'s logits on ``images`` (on the CPU, float32), in batches of ``BATCH``."""
    return torch.cat([model(images[i : i + BATCH].to(device)).float().cpu() for i in range(0, len(images), BATCH)])


@torch.no_grad()
def select_correct(images: torch.Tensor, label: int, ipc: int, models: list[torch.nn.Module],
                   device: torch.device) -> tuple[list[int], list[int]]:
    """DATM's ``samples_predicted_correctly`` for one class.

    Scans ``images`` (already in random order) with ``models[0]`` and keeps the
    first ``ipc`` it classifies as ``label``; if the class runs out, the next
    expert rescans it and adds the ones it classifies correctly, and so on.
    Returns the positions kept (in the order found) and the expert that chose each;
    raises a UserError when no expert completes the class.
    """
    chosen: list[int] = []
    chooser: list[int] = []
    for expert, model in enumerate(models):
        for start in range(0, len(images), BATCH):
            predicted = model(images[start : start + BATCH].to(device)).argmax(1).cpu()
            for offset in (predicted == label).nonzero().flatten().tolist():
                if start + offset not in chosen:
                    chosen.append(start + offset)
                    chooser.append(expert)
                    if len(chosen) == ipc:
                        return chosen, chooser
    raise UserError(
        f"datm.init = 'correct': the {len(models)} experts together classify only {len(chosen)} images of class "
        f"{label} correctly, fewer than distill.ipc = {ipc}; lower distill.ipc, train better experts, or set "
        f"datm.init=real"
    )


def mean_correct_logits(logits: torch.Tensor, classes: torch.Tensor, always: torch.Tensor | None = None) -> torch.Tensor:
    """Each image's mean logits over the experts that classify it correctly.

    :param logits: ``(E, N, C)``: every expert's logits on every image.
    :param classes: ``(N,)``: the images' classes.
    :param always: ``(N,)`` (optional): an expert counted for each image
        whatever its argmax (the one that chose it), so no mean is empty.
    """
    correct = logits.argmax(2) == classes.view(1, -1)
    if always is not None:
        correct[always, torch.arange(len(classes))] = True
    weights = correct.to(logits.dtype).unsqueeze(2)
    return (logits * weights).sum(0) / weights.sum(0)


def _random_real(dataset, ipc: int, generator: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The baseline's draws: ``ipc`` distinct random real images of each class."""
    images, labels = [], []
    for label, indices in enumerate(dataset.class_indices()):
        chosen = indices[torch.randperm(len(indices), generator=generator)[:ipc]]
        images.append(dataset.train_images[chosen])
        labels.append(torch.full((ipc,), label, dtype=torch.long))
    return images, labels


@hookimpl
def astkit_init_synthetic(dataset, ipc, experts, generator, config):
    """Correctly classified (or random) real images, with soft or hard labels."""
    window(config, config.distill.max_start_epoch)  # refuse a bad window before anything is written
    init, soft, snapshot = init_options(config)
    if not experts and (init == "correct" or soft):
        raise UserError("datm needs trained experts for init 'correct' and for soft labels; train experts first")
    device = _device(config)
    if init == "real":
        images, labels = _random_real(dataset, ipc, generator)
        images, labels = torch.cat(images).clone(), torch.cat(labels)
        if not soft:
            return images, labels
        model = snapshot_models(experts[:1], snapshot, device)[0]
        return images, logits_of(model, images, device)
    models = snapshot_models(experts, snapshot, device)
    images, labels, choosers = [], [], []
    for label, indices in enumerate(dataset.class_indices()):
        candidates = dataset.train_images[indices[torch.randperm(len(indices), generator=generator)]]
        chosen, chooser = select_correct(candidates, label, ipc, models, device)
        images.append(candidates[chosen])
        labels.append(torch.full((ipc,), label, dtype=torch.long))
        choosers += chooser
    images, labels = torch.cat(images).clone(), torch.cat(labels)
    if not soft:
        return images, labels
    logits = torch.stack([logits_of(model, images, device) for model in models])
    return images, mean_correct_logits(logits, labels, torch.tensor(choosers, dtype=torch.long))


@hookimpl
def astkit_plugin_options():
    return {NAME: dict(OPTIONS)}


@hookimpl
def astkit_check_config(config):
    """Refuse bad window or init options when the engine is built, before experts are trained."""
    window(config, config.distill.max_start_epoch)
    init_options(config)


# ---------------------------------------------------------------- preset
#: DATM's published setting (README and configs/CIFAR-10/ConvIN/IPC10.yaml, METHOD-MORE.md section 2),
#: with FTD's GSAM experts (plugin ``ftd``; DATM has no EMA).
DATM_REFERENCE = {
    "description": "DATM's published code (CIFAR-10 IPC10 config): plugins datm and ftd; experts SGD lr 0.01, "
                   "momentum 0, weight decay 0, no lr decay, GSAM rho 0.01 alpha 0.3 (DATM README), no EMA; "
                   "images from real ones its expert 0 classifies correctly, soft labels (mean logits of the "
                   "correct experts) learned with SGD lr 2 momentum 0.9; updates skipped when the matching loss "
                   "exceeds 1; start window min 0, initial 10, reaching distill.max_start_epoch at iteration 1000; "
                   "evaluation batch 128. Per dataset/IPC (DATM's table, docs/techniques/datm.md) set "
                   "distill.max_start_epoch (20 here), datm.min_start_epoch, datm.initial_max_start_epoch, "
                   "datm.expansion_end, distill.lr_labels, distill.max_loss_to_update, datm.init, distill.syn_steps, "
                   "distill.expert_epochs, distill.lr_img, distill.lr_lr, distill.batch_syn; DATM also uses "
                   "100 experts of 100 epochs and ZCA",
    "config": {
        "experts": {"optimizer": "sgd", "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0, "lr_decay": 1.0},
        "distill": {"learn_labels": True, "lr_labels": 2.0, "labels_momentum": 0.9, "max_loss_to_update": 1.0},
        "evaluate": {"batch_size": 128},
    },
    "options": {
        NAME: {"init": "correct", "soft_labels": True, "min_start_epoch": 0, "initial_max_start_epoch": 10,
               "expansion_end": 1000},
        "ftd": {"sharpness": "gsam", "rho": 0.01, "alpha": 0.3, "ema_decay": 0.0},
    },
}


@hookimpl
def astkit_register_presets(register):
    register("datm-reference", [NAME, "ftd"], DATM_REFERENCE["description"], config=DATM_REFERENCE["config"],
             options=DATM_REFERENCE["options"])
