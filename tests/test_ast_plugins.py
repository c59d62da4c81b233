"""The five AST techniques: exact checks of each formula and of each hook."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from astkit import ExpertBatch, MatchPoint
from astkit.config import RunConfig
from astkit.errors import UserError
from astkit.plugins import PluginSet, declared_options
from astkit_plugins import (
    balanced_inner_loss,
    intermediate_matching,
    representative_init,
    smooth_experts,
    weight_perturbation,
)


def run_manager(*names, overrides=()):
    found = PluginSet.discover()
    config = RunConfig.load(overrides=list(overrides))
    config.resolve_options(declared_options(found.catalog()))
    return found.manager(found.resolve(list(names))), config


# ------------------------------------------------------- balanced inner loss
@pytest.mark.parametrize(
    "start, expected",
    [
        (0, 1 / math.log(5 + 8)),  # below the middle (max_start 10 -> middle 5)
        (4, 1 / math.log(1 + 8)),
        (5, math.log(0 + 8)),  # at the middle
        (9, math.log(4 + 8)),  # above
    ],
)
def test_balanced_weight_paper(start, expected):
    assert balanced_inner_loss.balanced_weight(start, 10) == pytest.approx(expected, rel=1e-12)


def test_balanced_weight_through_hook_reference_base_5():
    pm, config = run_manager("balanced-inner-loss", overrides=["balanced-inner-loss.variant=reference"])
    nu = pm.hook.astkit_inner_loss_weight(start_epoch=2, max_start_epoch=20, expert_index=0, iteration=0, config=config)
    assert nu == pytest.approx(1 / (math.log(10 - 2 + 8) / math.log(5)))
    pm, config = run_manager("balanced-inner-loss", overrides=["balanced-inner-loss.vartheta=3"])
    assert pm.hook.astkit_inner_loss_weight(start_epoch=13, max_start_epoch=20, expert_index=0, iteration=0,
                                            config=config) == pytest.approx(math.log(6))


# ---------------------------------------------------- intermediate matching
@pytest.mark.parametrize(
    "n, m, steps",
    [(20, 2, [10, 20]), (20, 3, [6, 13, 20]), (30, 4, [7, 15, 22, 30])],
)
def test_matching_points(n, m, steps):
    points = intermediate_matching.matching_points(n, m)
    assert [p.student_step for p in points] == steps
    assert [p.expert_offset for p in points] == list(range(1, m + 1))
    assert all(p.weight == 1.0 for p in points)
    varied = intermediate_matching.matching_points(n, m, "varied")
    assert [p.weight for p in varied] == [i / m for i in range(1, m + 1)]


def test_matching_schedule_hook():
    pm, config = run_manager("intermediate-matching", overrides=["intermediate-matching.beta=varied"])
    points = pm.hook.astkit_matching_schedule(syn_steps=20, expert_epochs=2, start_epoch=0, expert_index=0, iteration=0, config=config)
    assert points == [MatchPoint(10, 1, 0.5), MatchPoint(20, 2, 1.0)]
    pm, config = run_manager("intermediate-matching", overrides=["intermediate-matching.beta=odd"])
    with pytest.raises(UserError, match="beta must be"):
        pm.hook.astkit_matching_schedule(syn_steps=20, expert_epochs=2, start_epoch=0, expert_index=0, iteration=0, config=config)


# ------------------------------------------------------ weight perturbation
def conv_params():
    g = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(6, 3, 3, 3, generator=g),
        "conv.bias": torch.randn(6, generator=g),
        "norm.weight": torch.ones(6),
        "fc.weight": torch.randn(10, 24, generator=g),
    }


def test_filterwise_perturbation_has_rho_times_filter_norm():
    params = conv_params()
    pm, config = run_manager("weight-perturbation")
    out = pm.hook.astkit_perturb_expert(params=params, generator=torch.Generator().manual_seed(1), start_epoch=0, expert_index=0, iteration=0,
                                        config=config)
    for name in ("conv.weight", "fc.weight"):
        diff = (out[name] - params[name]).flatten(1).norm(dim=1)
        torch.testing.assert_close(diff, 0.1 * params[name].flatten(1).norm(dim=1))
    for name in ("conv.bias", "norm.weight"):
        assert out[name] is params[name]


def test_reference_perturbation_is_elementwise_on_conv_weights_only():
    params = conv_params()
    g = torch.Generator().manual_seed(3)
    out = weight_perturbation.perturb_reference(params, 1.0, g)
    d = torch.randn(params["conv.weight"].shape, generator=torch.Generator().manual_seed(3))
    expected = params["conv.weight"] + (d / d.norm()) * params["conv.weight"]
    torch.testing.assert_close(out["conv.weight"], expected)
    assert out["fc.weight"] is params["fc.weight"]


# ----------------------------------------------------------- smooth experts
@pytest.mark.parametrize(
    "epoch, ramp, expected",
    [(0, 5, 0.5), (1, 5, 0.6), (4, 5, 0.9), (5, 5, 1.0), (20, 5, 1.0), (3, 10, 0.65), (9, 10, 0.95), (10, 10, 1.0)],
)
def test_clip_weight_schedule(epoch, ramp, expected):
    assert smooth_experts.clip_weight(epoch, ramp, 0.5) == pytest.approx(expected)


def linear_model():
    """logits = A x: the input gradient of sum(logits) is sum of A's rows."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 3, 4, bias=True))
    a = model[1].weight.detach()
    return model, a.sum(0).view(2, 3, 3)


def test_gradient_penalty_closed_form():
    model, g = linear_model()
    x = torch.randn(5, 2, 3, 3, requires_grad=True)
    grad = smooth_experts.input_gradient(model(x), x)
    torch.testing.assert_close(grad, g.expand(5, 2, 3, 3))
    sample = smooth_experts.gradient_penalty(grad, 1.0, "sample")
    assert sample.item() == pytest.approx(((g.norm() - 1) ** 2).item(), rel=1e-6)
    channel = smooth_experts.gradient_penalty(grad, 1.0, "channel")
    assert channel.item() == pytest.approx(((g.norm(dim=0) - 1) ** 2).mean().item(), rel=1e-6)


@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_smooth_expert_loss_through_hook(variant):
    model, g = linear_model()
    torch.manual_seed(1)
    clean = torch.randn(8, 2, 3, 3)
    images = clean + 0.1
    labels = torch.randint(0, 4, (8,))
    pm, config = run_manager("smooth-experts", overrides=[f"smooth-experts.variant={variant}"])
    batch = ExpertBatch(model, images, labels, clean)
    loss = pm.hook.astkit_expert_loss(batch=batch, epoch=2, num_epochs=10, config=config)
    ce = F.cross_entropy(model(images), labels)
    if variant == "paper":
        expected = 0.7 * ce + 1.0 * (g.norm() - 1) ** 2
    else:
        expected = 0.6 * ce + 2.0 * ((g.norm(dim=0) - 1) ** 2).mean()
    torch.testing.assert_close(loss, expected)


def test_smooth_expert_parts_switch_off_alone():
    model, g = linear_model()
    x, y = torch.randn(4, 2, 3, 3), torch.tensor([0, 1, 2, 3])
    ce = F.cross_entropy(model(x), y)
    pm, config = run_manager("smooth-experts", overrides=["smooth-experts.penalty=false"])
    clip_only = pm.hook.astkit_expert_loss(batch=ExpertBatch(model, x, y, x), epoch=0, num_epochs=5, config=config)
    torch.testing.assert_close(clip_only, 0.5 * ce)
    pm, config = run_manager("smooth-experts", overrides=["smooth-experts.clipping=false"])
    pen_only = pm.hook.astkit_expert_loss(batch=ExpertBatch(model, x, y, x), epoch=0, num_epochs=5, config=config)
    torch.testing.assert_close(pen_only, ce + (g.norm() - 1) ** 2)


def test_penalty_subsample_is_the_same_for_a_linear_model():
    model, g = linear_model()
    x, y = torch.randn(10, 2, 3, 3), torch.arange(10) % 4
    pm, config = run_manager("smooth-experts", overrides=["smooth-experts.penalty_fraction=0.3",
                                                          "smooth-experts.clipping=false"])
    loss = pm.hook.astkit_expert_loss(batch=ExpertBatch(model, x, y, x), epoch=0, num_epochs=5, config=config)
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y) + (g.norm() - 1) ** 2)


# --------------------------------------------------- representative init
def train_expert_on_digits(digits):
    from astkit.functional import FlatModel
    from astkit.trajectory import ModelSpec, Trajectory

    spec = ModelSpec("convnet", 1, 10, (8, 8), {"width": 8})
    torch.manual_seed(0)
    model = spec.build()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        for i in range(0, len(digits.train_images), 128):
            loss = F.cross_entropy(model(digits.train_images[i:i + 128]), digits.train_labels[i:i + 128])
            opt.zero_grad()
            loss.backward()
            opt.step()
    flat = FlatModel(model)
    return Trajectory(torch.stack([flat.initial(), flat.initial()]), flat.layout, spec), model


@pytest.mark.parametrize("ipc", [1, 3, 10, 50])
def test_representative_init_picks_the_real_image_nearest_each_centroid(digits, ipc):
    from sklearn.cluster import KMeans

    trajectory, model = train_expert_on_digits(digits)
    pm, config = run_manager("representative-init", overrides=["seed=3"])
    images, labels = pm.hook.astkit_init_synthetic(dataset=digits, ipc=ipc, experts=[trajectory],
                                                  generator=torch.Generator(), config=config)
    assert images.shape == (10 * ipc, 1, 8, 8)
    assert labels.tolist() == [c for c in range(10) for _ in range(ipc)]
    for label in (0, 7):
        indices = digits.class_indices()[label]
        feats = representative_init.embed(model, digits.train_images[indices], "penultimate").double()
        clusters = 10 if ipc == 50 else ipc
        km = KMeans(n_clusters=clusters, n_init=10, random_state=3 + label).fit(feats.numpy())
        chosen = images[labels == label]
        per_cluster = ipc // clusters
        taken = torch.zeros(len(indices), dtype=torch.bool)  # chosen for an earlier centroid
        for k, image in enumerate(chosen):
            where = (digits.train_images[indices] == image).flatten(1).all(1).nonzero().flatten()
            assert len(where) >= 1, "each chosen image is a real image of its class"
            centre = torch.from_numpy(km.cluster_centers_[k // per_cluster])
            dist = (feats - centre).norm(dim=1)
            if k % per_cluster == 0:
                earlier = taken.clone()
            rank = int(((dist < dist[where[0]]) & ~earlier).sum())
            assert rank < per_cluster, "among the nearest to its centroid"
            if per_cluster == 1:
                assert rank == 0
            taken[where[0]] = True


def test_representative_init_reference_uses_logits_and_ten_clusters(digits, tmp_path):
    trajectory, _ = train_expert_on_digits(digits)
    png = tmp_path / "pca.png"
    pm, config = run_manager("representative-init", overrides=["representative-init.variant=reference",
                                                               f"representative-init.pca_png={png}"])
    images, labels = pm.hook.astkit_init_synthetic(dataset=digits, ipc=20, experts=[trajectory],
                                                  generator=torch.Generator(), config=config)
    assert images.shape[0] == 200 and png.read_bytes()[:4] == b"\x89PNG"
    assert representative_init.cluster_count(20, 0, "reference") == 10
    assert representative_init.cluster_count(3, 0, "reference") == 3  # the authors' code selects nothing here
    with pytest.raises(UserError, match="not a multiple"):
        representative_init.select_representatives(torch.randn(30, 4), 5, 2, 0)
