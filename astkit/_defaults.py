"""The MTT baseline: astkit's answer to every behaviour hook.

Registered as ``astkit.defaults`` in every run, with ``trylast`` so that an
enabled plugin's answer replaces it. Together these reproduce MTT
(Cazenavette et al. 2022): plain cross-entropy experts, random real
initialisation, inner weight 1, one final matching term, no perturbation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from astkit.hookspecs import hookimpl
from astkit.matching import MatchPoint


@hookimpl(trylast=True)
def astkit_expert_loss(batch):
    """Cross-entropy of the model on the (augmented) batch."""
    return F.cross_entropy(batch.logits(), batch.labels)


@hookimpl(trylast=True)
def astkit_init_synthetic(dataset, ipc, generator):
    """``ipc`` distinct real images of each class, drawn at random."""
    images, labels = [], []
    for label, indices in enumerate(dataset.class_indices()):
        chosen = indices[torch.randperm(len(indices), generator=generator)[:ipc]]
        images.append(dataset.train_images[chosen])
        labels.append(torch.full((ipc,), label, dtype=torch.long))
    return torch.cat(images).clone(), torch.cat(labels)


@hookimpl(trylast=True)
def astkit_inner_loss_weight():
    """Every inner step weighs 1."""
    return 1.0


@hookimpl(trylast=True)
def astkit_matching_schedule(syn_steps, expert_epochs):
    """One term: after the last student step, against ``start + M``."""
    return [MatchPoint(syn_steps, expert_epochs, 1.0)]


@hookimpl(trylast=True)
def astkit_perturb_expert(params):
    """No perturbation."""
    return params
