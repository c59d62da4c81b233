"""The unrolled student and the matching loss: meta-gradients and MTT parity."""

import torch
import torch.nn.functional as F
from torch import nn

from astkit.functional import FlatModel
from astkit.matching import MatchPoint, choose_segment, graph_bytes, matching_loss, unroll


def tiny_net(dtype=torch.float64):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.GroupNorm(3, 3, affine=True), nn.Tanh(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(3 * 2 * 2, 3),
    )
    return net.to(dtype)


def tiny_problem(dtype=torch.float64, steps=3):
    net = tiny_net(dtype)
    flat = FlatModel(net)
    g = torch.Generator().manual_seed(1)
    start = flat.initial()
    mid = start + 0.05 * torch.randn(start.shape, generator=g, dtype=dtype)
    target = start + 0.1 * torch.randn(start.shape, generator=g, dtype=dtype)
    images = torch.randn(6, 1, 4, 4, generator=g, dtype=dtype)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    return flat, start, {1: mid, 2: target}, images, labels


def meta_loss(flat, start, targets, images, labels, lr, schedule, steps=3, momentum=0.0):
    student = unroll(flat, start.clone().requires_grad_(True), images, labels, lr, steps,
                     inner_weight=1.3, momentum=momentum, keep={p.student_step for p in schedule})
    return matching_loss(student, start, targets, schedule)[0]


def test_meta_gradient_matches_central_finite_differences():
    flat, start, targets, images, labels = tiny_problem()
    schedule = [MatchPoint(1, 1, 1.0), MatchPoint(3, 2, 0.5)]
    for momentum in (0.0, 0.9):
        x = images.clone().requires_grad_(True)
        lr = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        loss = meta_loss(flat, start, targets, x, labels, lr, schedule, momentum=momentum)
        gx, glr = torch.autograd.grad(loss, (x, lr))
        analytic = torch.cat([gx.flatten(), glr.reshape(1)])

        eps = 1e-6
        base = torch.cat([images.flatten(), torch.tensor([0.3], dtype=torch.float64)])
        coords = torch.cat([torch.randperm(base.numel() - 1, generator=torch.Generator().manual_seed(0))[:24],
                            torch.tensor([base.numel() - 1])])  # 24 pixels and the lr
        analytic = analytic[coords]
        numeric = torch.zeros_like(analytic)
        for j, i in enumerate(coords.tolist()):
            values = []
            for sign in (1, -1):
                v = base.clone()
                v[i] += sign * eps
                loss_v = meta_loss(flat, start, targets, v[:-1].view_as(images), labels, v[-1], schedule,
                                   momentum=momentum)
                values.append(loss_v.item())
            numeric[j] = (values[0] - values[1]) / (2 * eps)
        rel = (numeric - analytic).norm() / analytic.norm()
        assert rel < 1e-4, f"momentum {momentum}: relative error {rel}"


def mtt_reference_loss(net, start, target, images, labels, syn_lr, syn_steps):
    """MTT's distill.py inner loop and loss, written out in plain PyTorch."""
    shapes = [p.shape for p in net.parameters()]
    names = [n for n, _ in net.named_parameters()]
    numels = [p.numel() for p in net.parameters()]

    def forward(flat, x):
        chunks = torch.split(flat, numels)
        params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}
        return torch.func.functional_call(net, params, (x,))

    student_params = [start.clone().requires_grad_(True)]
    for _ in range(syn_steps):
        ce_loss = F.cross_entropy(forward(student_params[-1], images), labels)
        grad = torch.autograd.grad(ce_loss, student_params[-1], create_graph=True)[0]
        student_params.append(student_params[-1] - syn_lr * grad)
    num_params = start.numel()
    param_loss = F.mse_loss(student_params[-1], target, reduction="sum") / num_params
    param_dist = F.mse_loss(start, target, reduction="sum") / num_params
    return param_loss / param_dist


def test_default_schedule_equals_plain_mtt_loss():
    flat, start, targets, images, labels = tiny_problem(torch.float32)
    lr = torch.tensor(0.01)
    student = unroll(flat, start.clone().requires_grad_(True), images, labels, lr, 3)
    ours = matching_loss(student, start, targets, [MatchPoint(3, 2, 1.0)])[0]
    ref = mtt_reference_loss(flat.module, start, targets[2], images, labels, lr, 3)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)


def test_mini_batches_cycle_through_shuffled_chunks():
    flat, start, targets, images, labels = tiny_problem()
    seen = []

    def forward(theta, x):
        seen.append(x.shape[0])
        return flat(theta, x)

    g = torch.Generator().manual_seed(0)
    unroll(forward, start.clone().requires_grad_(True), images, labels, torch.tensor(0.1, dtype=torch.float64),
           4, batch_syn=4, generator=g)
    assert seen == [4, 2, 4, 2]


def test_matching_loss_terms_are_normalised_distances():
    start = torch.zeros(3)
    t1, t2 = torch.tensor([1.0, 0, 0]), torch.tensor([2.0, 0, 0])
    student = {2: torch.tensor([0.5, 0, 0]), 4: torch.tensor([2.0, 1, 0])}
    total, terms = matching_loss(student, start, {1: t1, 2: t2}, [MatchPoint(2, 1, 1.0), MatchPoint(4, 2, 0.5)])
    assert [float(t) for t in terms] == [0.25, 0.25]
    assert float(total) == 0.25 + 0.5 * 0.25


def test_segment_recomputation_gives_the_full_graph_gradients():
    from astkit.augment import DSA

    flat, start, targets, images, labels = tiny_problem()
    schedule = [MatchPoint(2, 1, 0.7), MatchPoint(6, 1, 0.4), MatchPoint(7, 2, 1.0)]  # 6, 7: in the last segment
    augment = DSA("color_crop_flip_scale")
    results = []
    for segment in (0, 1, 3, 4, 6):
        for momentum in (0.0, 0.9):
            x = images.clone().requires_grad_(True)
            lr = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
            student = unroll(flat, start.clone().requires_grad_(True), x, labels, lr, 7, inner_weight=0.8,
                             augment=augment, batch_syn=4, generator=torch.Generator().manual_seed(5),
                             momentum=momentum, keep={2, 6, 7}, segment=segment)
            loss = matching_loss(student, start, targets, schedule)[0]
            gx, glr = torch.autograd.grad(loss, (x, lr))
            results.append((segment, momentum, loss.detach(), gx, glr))
    for segment, momentum, loss, gx, glr in results[2:]:
        ref = next(r for r in results if r[0] == 0 and r[1] == momentum)
        torch.testing.assert_close(loss, ref[2], rtol=1e-12, atol=0)
        torch.testing.assert_close(gx, ref[3], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(glr, ref[4], rtol=1e-9, atol=1e-12)


def test_segments_are_cut_back_from_the_last_step_so_only_the_steps_before_the_last_segment_run_twice():
    """7 steps in segments of 3 (1 + 3 + 3): the forward pass runs steps 1-4 first-order and 5-7 with their
    graph, the backward pass recomputes 2-4 then 1: 7 + 4 student forwards in all."""
    flat, start, targets, images, labels = tiny_problem()
    for segment, forwards in ((0, 7), (3, 11), (6, 8), (1, 13)):
        calls = []

        def forward(theta, x):
            calls.append(1)
            return flat(theta, x)

        x = images.clone().requires_grad_(True)
        lr = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
        student = unroll(forward, start.clone().requires_grad_(True), x, labels, lr, 7, segment=segment)
        torch.autograd.grad(((student[7] - targets[2]) ** 2).sum(), (x, lr))
        assert len(calls) == forwards, segment


def test_auto_recompute_segment_keeps_the_graph_that_fits_else_the_longest_segments_of_which_two_fit():
    """``auto``: the whole graph when it fits the budget, else as many steps per segment as fit twice in it
    (at least one); an integer is used as given."""
    assert choose_segment("auto", 20, step_bytes=100, budget_bytes=2000) == 0  # 20 steps fit
    assert choose_segment("auto", 20, step_bytes=100, budget_bytes=1999) == 9  # they do not: two segments of 9 do
    assert choose_segment("auto", 20, step_bytes=100, budget_bytes=1000) == 5
    assert choose_segment("auto", 20, step_bytes=100, budget_bytes=399) == 1
    assert choose_segment("auto", 20, step_bytes=100, budget_bytes=10) == 1  # not even one: one at a time
    assert choose_segment("auto", 80, step_bytes=100, budget_bytes=7999) == 39
    assert choose_segment(0, 20, 100, 10) == 0 and choose_segment(7, 20, 100, 10**9) == 7


def test_graph_bytes_counts_what_autograd_saves():
    a = torch.randn(1000, requires_grad=True)
    b = torch.randn(1000)
    assert graph_bytes(lambda: a * b) == 4000  # d/da needs b (float32): a is not saved, b needs no grad
    assert graph_bytes(lambda: (a * a).exp()) == 8000  # a (once, one storage) and exp's output
    with torch.no_grad():
        assert graph_bytes(lambda: a * b) == 0


def test_recompute_segment_setting_is_auto_or_a_count():
    import pytest

    from astkit import RunConfig, UserError

    assert RunConfig().distill.recompute_segment == "auto" and RunConfig().distill.memory_budget_gib is None
    assert RunConfig.load(overrides=["distill.recompute_segment=6"]).distill.recompute_segment == 6
    assert RunConfig.load(overrides=["distill.recompute_segment=auto"]).distill.recompute_segment == "auto"
    for bad in ("fast", "-1"):
        with pytest.raises(UserError, match="recompute_segment must be 'auto' or an integer >= 0"):
            RunConfig.load(overrides=[f"distill.recompute_segment={bad}"]).validate()
    with pytest.raises(UserError, match="memory_budget_gib must be > 0"):
        RunConfig.load(overrides=["distill.memory_budget_gib=0"]).validate()
