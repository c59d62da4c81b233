"""The MTT baseline: astkit's answer to every behaviour hook.

Registered as ``astkit.defaults`` in every run, with ``trylast`` so that an
enabled plugin's answer replaces it. Together these reproduce MTT
(Cazenavette et al. 2022): plain cross-entropy experts and SGD steps, random
real initialisation with hard labels, cross-entropy for the student, experts
in shuffled cycles, uniform start epochs, inner weight 1, one final term of
the normalised squared distance, no perturbation, the optimised set saved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from astkit import labels as label_rules
from astkit.hookspecs import hookimpl
from astkit.matching import MatchPoint, normalised_distance

NAME = "astkit.defaults"


@hookimpl(trylast=True)
def astkit_expert_loss(batch):
    """Cross-entropy of the model on the (augmented) batch."""
    return F.cross_entropy(batch.logits(), batch.labels)


@hookimpl(trylast=True)
def astkit_expert_step(closure, optimizer):
    """Zero the gradients, backpropagate the closure's loss, step."""
    optimizer.zero_grad(set_to_none=True)
    loss = closure()
    loss.backward()
    optimizer.step()
    return loss.detach()


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
def astkit_student_loss(logits, labels, config):
    """Cross-entropy on hard labels; soft cross-entropy at ``distill.label_temperature``."""
    return label_rules.per_sample_loss(logits, labels, config.distill.label_temperature)


@hookimpl(trylast=True)
def astkit_draw_expert(num_experts, generator, state):
    """MTT's cycle: the experts in a shuffled order, reshuffled once all were used."""
    mine = state.setdefault(NAME, {})
    order = mine.get("expert_order") or torch.randperm(num_experts, generator=generator).tolist()
    mine["expert_order"] = order[1:]
    return order[0]


@hookimpl(trylast=True)
def astkit_draw_start_epoch(max_start_epoch, generator):
    """Uniform in ``[0, max_start_epoch)``."""
    return int(torch.randint(0, max_start_epoch, (1,), generator=generator))


@hookimpl(trylast=True)
def astkit_inner_loss_weight():
    """Every inner step weighs 1."""
    return 1.0


@hookimpl(trylast=True)
def astkit_matching_schedule(syn_steps, expert_epochs):
    """One term: after the last student step, against ``start + M``."""
    return [MatchPoint(syn_steps, expert_epochs, 1.0)]


@hookimpl(trylast=True)
def astkit_matching_distance(student, start, target):
    """``||student - target||^2 / ||start - target||^2``."""
    return normalised_distance(student, start, target)


@hookimpl(trylast=True)
def astkit_perturb_expert(params):
    """No perturbation."""
    return params


@hookimpl(trylast=True)
def astkit_synthetic_output(images, labels):
    """The optimised set itself."""
    return images, labels
