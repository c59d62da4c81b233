"""Stage 2's core: unroll the student on the synthetic set and match it.

Pure functions of tensors, so that the meta-gradient with respect to the
images and the student lr can be checked against finite differences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

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
        raise UserError("the matching schedule is empty; the schedule plugin must return at least one MatchPoint")
    for p in points:
        if not 1 <= p.student_step <= syn_steps:
            raise UserError(f"matching point {p} has student_step outside 1..{syn_steps}; fix or disable the schedule plugin")
        if not 1 <= p.expert_offset <= expert_epochs:
            raise UserError(f"matching point {p} has expert_offset outside 1..{expert_epochs}; fix or disable the schedule plugin")
    return points


Plan = list[tuple[Optional[torch.Tensor], Any]]


def plan_steps(
    images: torch.Tensor,
    syn_steps: int,
    batch_syn: int | None,
    augment: Any,
    generator: torch.Generator | None,
) -> Plan:
    """Draw every step's mini-batch indices and augmentation parameters.

    Drawn up front, in step order, from ``generator``, so a recomputation
    replays exactly the same batches and augmentations.
    """
    n = images.shape[0]
    chunks: list[torch.Tensor] = []
    plan: Plan = []
    for _ in range(syn_steps):
        idx = None
        size = n
        if batch_syn is not None and batch_syn < n:
            if not chunks:
                chunks = list(torch.randperm(n, generator=generator).to(images.device).split(batch_syn))
            idx = chunks.pop(0)
            size = idx.numel()
        params = None
        if augment is not None and augment.enabled:
            params = augment.sample((size, *images.shape[1:]), generator=generator, device=images.device,
                                    dtype=images.dtype)
        plan.append((idx, params))
    return plan


def student_step(forward, theta, velocity, images, labels, lr, step_plan, augment, inner_weight, momentum,
                 create_graph, shard=None, loss_fn=None):
    """One SGD step of the student: ``theta - lr * b`` (``b`` the heavy-ball velocity).

    The inner loss is the mean of ``loss_fn(logits, labels)`` (per-sample
    losses; default: cross-entropy on hard labels). With a
    :class:`~astkit.collectives.BatchShard`, this rank computes the gradient
    on its rows of the (augmented) mini-batch and the ranks' parts are
    summed: every rank takes the same step as a single process would.
    """
    idx, params = step_plan
    x, y = (images, labels) if idx is None else (images[idx], labels[idx])
    if params is not None:
        x = augment.apply(x, params)
    loss_fn = loss_fn or _cross_entropy
    if shard is None:
        loss = loss_fn(forward(theta, x), y).mean()
        point = theta
    else:
        rows = shard.rows(x.shape[0])
        point = shard.replicated(theta)
        loss = loss_fn(forward(point, x[rows]), y[rows]).sum() / x.shape[0]
    if inner_weight != 1.0:
        loss = loss * inner_weight
    (grad,) = torch.autograd.grad(loss, point, create_graph=create_graph)
    if shard is not None:
        grad = shard.summed(grad)
    if momentum:
        velocity = grad if velocity is None else momentum * velocity + grad
        grad = velocity
    return theta - lr * grad, velocity


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels, reduction="none")


def choose_segment(setting: int | str, syn_steps: int, step_bytes: int, budget_bytes: int) -> int:
    """The ``segment`` of :func:`unroll` for ``distill.recompute_segment``.

    An integer is used as given. ``"auto"`` keeps the whole graph (0) when
    ``syn_steps`` steps of ``step_bytes`` each fit in ``budget_bytes``;
    otherwise the longest segments of which two fit (at least 1 step): the
    backward pass recomputes a segment while memory freed from the previous
    one is only partly reused (about 1.85 segments' worth resident at the
    peak, measured with ``allocator = "retain"``), and the unroll recomputes
    ``syn_steps - segment`` first-order steps, so the longer the segment,
    the less it recomputes.
    """
    if setting != "auto":
        return int(setting)
    if step_bytes * syn_steps <= budget_bytes:
        return 0
    return max(1, min(syn_steps - 1, budget_bytes // (2 * max(step_bytes, 1))))


def graph_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs: the size of the
    graph it builds (what a step of the unroll keeps alive until the meta-gradient is taken)."""
    sizes: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        sizes[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(sizes.values())


def unroll(
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    lr: torch.Tensor,
    syn_steps: int,
    *,
    inner_weight: float = 1.0,
    augment: Any = None,
    batch_syn: int | None = None,
    generator: torch.Generator | None = None,
    momentum: float = 0.0,
    keep: set[int] | None = None,
    segment: int = 0,
    shard: Any = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> dict[int, torch.Tensor]:
    """Run ``syn_steps`` differentiable SGD steps of the student.

    ``forward(theta, x)`` gives logits. Each step takes a mini-batch of
    ``batch_syn`` synthetic images (all when ``None``; otherwise MTT's
    shuffled chunks), augments it with ``augment`` (a :class:`~astkit.augment.DSA`),
    and updates ``theta <- theta - lr * b`` with ``b = grad`` (or the
    heavy-ball ``b = momentum * b + grad`` when ``momentum > 0``).

    ``segment = k > 0`` cuts the steps into segments of ``k`` counted from
    the last step (the first one takes the remainder), keeps the student at
    each cut and the graph of the last segment, and recomputes the earlier
    segments during the backward pass: the same gradients, with memory for
    about ``k`` steps' graph, for one more first-order step for each of the
    ``syn_steps - k`` steps before the last segment.

    ``loss_fn(logits, labels)`` gives the per-sample inner losses (default:
    cross-entropy on hard labels); ``labels`` may be soft and require grad,
    and then receive the meta-gradient too.

    ``shard`` (a :class:`~astkit.collectives.BatchShard`, under torchrun)
    splits every step's mini-batch across the ranks. Every rank must call
    ``unroll`` with the same arguments; the student and the lr's gradient are
    then the same on every rank, and each rank's image gradient holds the
    rows it processed (sum them over ranks for the full gradient).

    :return: ``{step: theta_step}`` for the steps in ``keep`` (default: the
        last), each differentiable with respect to ``images``, ``lr`` (and
        ``labels`` when they require grad).
    """
    keep_steps = sorted({syn_steps} if keep is None else set(keep))
    plan = plan_steps(images, syn_steps, batch_syn, augment, generator)
    args = (forward, plan, augment, inner_weight, momentum, shard, loss_fn)
    if segment and segment < syn_steps:
        outs = _RecomputedUnroll.apply(images, lr, labels, start, args, keep_steps, segment)
        return dict(zip(keep_steps, outs))
    theta, velocity, kept = start, None, {}
    for step, step_plan in enumerate(plan, 1):
        theta, velocity = student_step(forward, theta, velocity, images, labels, lr, step_plan, augment,
                                       inner_weight, momentum, create_graph=True, shard=shard, loss_fn=loss_fn)
        if step in keep_steps:
            kept[step] = theta
    return kept


class _RecomputedUnroll(torch.autograd.Function):
    """The unroll with segment recomputation (exact gradients, bounded memory).

    The forward pass keeps the student at the start of every segment (cut
    every ``segment`` steps back from the last) and builds the graph of the
    last segment only; the backward pass uses that graph, then recomputes
    the earlier segments one at a time, last first.
    """

    @staticmethod
    def forward(ctx, images, lr, labels, start, args, keep_steps, segment):
        forward, plan, augment, inner_weight, momentum, shard, loss_fn = args
        theta, velocity = start.detach(), None
        last = len(plan) - segment  # where the last segment starts
        boundaries, kept = {0: (theta, None)}, {}
        x, alpha, y = images.detach(), lr.detach(), labels.detach()
        with torch.enable_grad():
            for step in range(1, last + 1):
                new, velocity = student_step(forward, theta.requires_grad_(True), velocity, x, y, alpha,
                                             plan[step - 1], augment, inner_weight, momentum, create_graph=False,
                                             shard=shard, loss_fn=loss_fn)
                theta = new.detach()
                velocity = velocity.detach() if velocity is not None else None
                if (last - step) % segment == 0:
                    boundaries[step] = (theta, velocity)
                if step in keep_steps:
                    kept[step] = theta
            tail = _segment_graph(args, last, len(plan), theta, velocity, images, lr, labels, ctx.needs_input_grad[2])
        kept.update({step: theta.detach() for step, theta in tail.thetas.items() if step in keep_steps})
        ctx.save_for_backward(images, lr, labels)
        ctx.args, ctx.keep_steps, ctx.boundaries, ctx.tail = args, keep_steps, boundaries, tail
        return tuple(kept[k] for k in keep_steps)

    @staticmethod
    def backward(ctx, *grad_kept):
        images, lr, labels = ctx.saved_tensors
        direct = {k: g for k, g in zip(ctx.keep_steps, grad_kept) if g is not None}
        image_grad, lr_grad = torch.zeros_like(images), torch.zeros_like(lr)
        label_grad = torch.zeros_like(labels) if ctx.needs_input_grad[2] else None
        a_theta = a_velocity = None
        starts = sorted(ctx.boundaries)
        for s, e in reversed(list(zip(starts, starts[1:] + [len(ctx.args[1])]))):
            if ctx.tail is not None and ctx.tail.start == s:
                graph, ctx.tail = ctx.tail, None  # built by the forward pass; freed once used
            else:
                with torch.enable_grad():
                    graph = _segment_graph(ctx.args, s, e, *ctx.boundaries[s], images, lr, labels, label_grad is not None)
            with torch.enable_grad():
                total = None
                for step, theta in graph.thetas.items():
                    if step in direct:
                        total = _add(total, (direct[step] * theta).sum())
                if a_theta is not None:
                    total = _add(total, (a_theta * graph.theta).sum())
                if a_velocity is not None and graph.velocity is not None:
                    total = _add(total, (a_velocity * graph.velocity).sum())
                if total is None:
                    continue
                inputs = [graph.theta0, graph.x, graph.alpha]
                if graph.velocity0 is not None:
                    inputs.append(graph.velocity0)
                if label_grad is not None:
                    inputs.append(graph.y)
                grads = torch.autograd.grad(total, inputs, allow_unused=True)
            a_theta = grads[0]
            if grads[1] is not None:
                image_grad += grads[1]
            if grads[2] is not None:
                lr_grad += grads[2]
            a_velocity = grads[3] if graph.velocity0 is not None else None
            if label_grad is not None and grads[-1] is not None:
                label_grad += grads[-1]
        return image_grad, lr_grad, label_grad, None, None, None, None


@dataclass
class _SegmentGraph:
    """Steps ``start+1..end`` of the unroll as a graph from fresh leaves."""

    start: int
    theta0: torch.Tensor
    velocity0: Optional[torch.Tensor]
    x: torch.Tensor
    alpha: torch.Tensor
    y: torch.Tensor
    thetas: dict[int, torch.Tensor]
    theta: torch.Tensor
    velocity: Optional[torch.Tensor]


def _segment_graph(args, start, end, theta_s, velocity_s, images, lr, labels, label_grad) -> _SegmentGraph:
    """Run steps ``start+1..end`` from detached copies, keeping the graph (call under enable_grad)."""
    forward, plan, augment, inner_weight, momentum, shard, loss_fn = args
    theta0 = theta_s.detach().requires_grad_(True)
    velocity0 = velocity_s.detach().requires_grad_(True) if velocity_s is not None else None
    x, alpha = images.detach().requires_grad_(True), lr.detach().requires_grad_(True)
    y = labels.detach().requires_grad_(label_grad)
    theta, velocity, thetas = theta0, velocity0, {}
    for step in range(start + 1, end + 1):
        theta, velocity = student_step(forward, theta, velocity, x, y, alpha, plan[step - 1], augment,
                                       inner_weight, momentum, create_graph=True, shard=shard, loss_fn=loss_fn)
        thetas[step] = theta
    return _SegmentGraph(start, theta0, velocity0, x, alpha, y, thetas, theta, velocity)


def _add(total, term):
    return term if total is None else total + term


def normalised_distance(student: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MTT's ``||student - target||^2 / ||start - target||^2``."""
    return (student - target).pow(2).sum() / (start - target).pow(2).sum()


def matching_loss(
    student: dict[int, torch.Tensor],
    start: torch.Tensor,
    targets: dict[int, torch.Tensor],
    schedule: Sequence[MatchPoint],
    distance: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, MatchPoint], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``sum_i w_i d(student_i, start, target_i)``, ``d`` the ``distance``
    (default: :func:`normalised_distance`).

    :return: the total and the unweighted terms, in schedule order.
    """
    terms = []
    total = start.new_zeros(())
    for point in schedule:
        target = targets[point.expert_offset]
        if distance is None:
            term = normalised_distance(student[point.student_step], start, target)
        else:
            term = distance(student[point.student_step], start, target, point)
        terms.append(term)
        total = total + point.weight * term
    return total, terms
