"""Stage 2's core: unroll the student on the synthetic set and match it.

Pure functions of tensors, so that the meta-gradient with respect to the
images and the student lr can be checked against finite differences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from astkit.errors import UserError


@dataclass(frozen=True)
class MatchPoint:
    """Compare the student after ``student_step`` steps with the expert at
    ``start + expert_offset`` epochs, weighted by ``weight``."""

    student_step: int
    expert_offset: int
    weight: float = 1.0


def validate_schedule(points: Sequence[MatchPoint], syn_steps: int, expert_epochs: int) -> list[MatchPoint]:
    """Check a matching schedule returned by a plugin (raise UserError)."""
    points = list(points)
    if not points:
        raise UserError("the matching schedule is empty; it needs at least one MatchPoint")
    for p in points:
        if not 1 <= p.student_step <= syn_steps:
            raise UserError(f"matching point {p} has student_step outside 1..{syn_steps}")
        if not 1 <= p.expert_offset <= expert_epochs:
            raise UserError(f"matching point {p} has expert_offset outside 1..{expert_epochs}")
    return points


def unroll(
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    lr: torch.Tensor,
    syn_steps: int,
    *,
    inner_weight: float = 1.0,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_syn: int | None = None,
    generator: torch.Generator | None = None,
    momentum: float = 0.0,
    keep: set[int] | None = None,
) -> dict[int, torch.Tensor]:
    """Run ``syn_steps`` differentiable SGD steps of the student.

    ``forward(theta, x)`` gives logits. Each step takes a mini-batch of
    ``batch_syn`` synthetic images (all when ``None``; otherwise MTT's
    shuffled chunks), augments it, and updates
    ``theta <- theta - lr * b`` with ``b = grad`` (or the heavy-ball
    ``b = momentum * b + grad`` when ``momentum > 0``), keeping the graph.

    :return: ``{step: theta_step}`` for the steps in ``keep`` (default: the
        last), each a differentiable function of ``images``, ``lr``, ``start``.
    """
    keep = {syn_steps} if keep is None else set(keep)
    n = images.shape[0]
    chunks: list[torch.Tensor] = []
    theta = start
    velocity = None
    kept: dict[int, torch.Tensor] = {}
    for step in range(1, syn_steps + 1):
        if batch_syn is None or batch_syn >= n:
            x, y = images, labels
        else:
            if not chunks:
                chunks = list(torch.randperm(n, generator=generator).to(images.device).split(batch_syn))
            idx = chunks.pop(0)
            x, y = images[idx], labels[idx]
        if augment is not None:
            x = augment(x)
        loss = F.cross_entropy(forward(theta, x), y)
        if inner_weight != 1.0:
            loss = loss * inner_weight
        (grad,) = torch.autograd.grad(loss, theta, create_graph=True)
        if momentum:
            velocity = grad if velocity is None else momentum * velocity + grad
            grad = velocity
        theta = theta - lr * grad
        if step in keep:
            kept[step] = theta
    return kept


def matching_loss(
    student: dict[int, torch.Tensor],
    start: torch.Tensor,
    targets: dict[int, torch.Tensor],
    schedule: Sequence[MatchPoint],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``sum_i w_i ||student_i - target_i||^2 / ||start - target_i||^2``.

    :return: the total and the unweighted terms, in schedule order.
    """
    terms = []
    total = start.new_zeros(())
    for point in schedule:
        target = targets[point.expert_offset]
        num = (student[point.student_step] - target).pow(2).sum()
        den = (start - target).pow(2).sum()
        term = num / den
        terms.append(term)
        total = total + point.weight * term
    return total, terms
