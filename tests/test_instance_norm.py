"""The instance norm with the analytic double backward equals F.group_norm(x, C) at every order."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from astkit.functional import FlatModel
from astkit.matching import unroll
from astkit.models import build_model
from astkit.models.instance_norm import InstanceNorm, instance_norm


def _inputs(shape=(3, 4, 5, 5), seed=0, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    if channels_last:  # as convolutions often return them: the saved input must stay the graph's own tensor
        x = x.to(memory_format=torch.channels_last)
        assert not x.is_contiguous()
    x.requires_grad_(True)
    w = torch.randn(shape[1], generator=g, dtype=torch.float64).requires_grad_(True)
    b = torch.randn(shape[1], generator=g, dtype=torch.float64).requires_grad_(True)
    return x, w, b


def _reference(x, w, b):
    return F.group_norm(x, x.shape[1], w, b, 1e-5)


def _rel(a, b):
    return float(((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).detach())


def test_forward_equals_group_norm():
    x, w, b = _inputs()
    assert _rel(instance_norm(x, w, b), _reference(x, w, b)) < 1e-12


@pytest.mark.parametrize("shape,channels_last", [((3, 4, 5, 5), False), ((2, 3, 7), False), ((1, 2, 3, 4), False),
                                                 ((3, 4, 5, 5), True)])
def test_first_and_second_derivatives_against_finite_differences(shape, channels_last):
    x, w, b = _inputs(shape, channels_last=channels_last)
    assert torch.autograd.gradcheck(instance_norm, (x, w, b))
    assert torch.autograd.gradgradcheck(instance_norm, (x, w, b))


@pytest.mark.parametrize("channels_last", [False, True])
def test_third_derivative_against_finite_differences(channels_last):
    """A higher order still works: mu and r are recomputed from x when the double backward is differentiated."""
    x, w, b = _inputs((2, 3, 4, 4), channels_last=channels_last)

    def first(x, w, b):
        return torch.autograd.grad(instance_norm(x, w, b).sin().sum(), (x, w, b), create_graph=True)

    assert torch.autograd.gradgradcheck(first, (x, w, b))


@pytest.mark.parametrize("use", ["all", "x only", "weight and bias only"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_double_backward_equals_group_norms(use, channels_last):
    """A meta-objective of the first derivatives (some of them unused) has F.group_norm's gradient."""

    def meta(norm):
        x, w, b = _inputs(seed=3, channels_last=channels_last)
        y = norm(x, w, b)
        probe = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y)
        gx, gw, gb = torch.autograd.grad((y.tanh() * probe).sum(), (x, w, b), create_graph=True)
        terms = {"x": (gx ** 2).sum(), "w": (gw * gw.cos()).sum(), "b": (gb ** 3).sum()}
        keys = {"all": "xwb", "x only": "x", "weight and bias only": "wb"}[use]
        total = sum(terms[k] for k in keys)
        return torch.autograd.grad(total, (x, w, b), allow_unused=True)

    for ours, theirs in zip(meta(instance_norm), meta(_reference)):
        if theirs is None:
            assert ours is None or float(ours.abs().max()) == 0.0
        else:
            assert _rel(ours, theirs) < 1e-10


def test_the_convnet_uses_it_with_group_norms_parameters():
    net = build_model("convnet", channels=1, num_classes=10, image_size=28, width=8, depth=3, norm="instancenorm")
    norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 3 and all(isinstance(m, InstanceNorm) for m in norms)
    reference = nn.GroupNorm(8, 8)
    assert norms[0].state_dict().keys() == reference.state_dict().keys()
    assert norms[0].num_groups == norms[0].num_channels == 8 and norms[0].eps == reference.eps


@pytest.mark.parametrize("depth", [2, 3])
def test_meta_gradient_through_an_unroll_equals_group_norms(depth):
    """The distillation meta-gradient (images and lr) is the same with nn.GroupNorm in float64."""
    torch.manual_seed(0)
    ours = build_model("convnet", channels=1, num_classes=3, image_size=8, width=4, depth=depth,
                       norm="instancenorm").double()
    theirs = build_model("convnet", channels=1, num_classes=3, image_size=8, width=4, depth=depth,
                         norm="instancenorm").double()
    theirs.load_state_dict(ours.state_dict())
    for name, module in list(theirs.named_modules()):
        if isinstance(module, InstanceNorm):
            parent = theirs.get_submodule(name.rpartition(".")[0]) if "." in name else theirs
            plain = nn.GroupNorm(module.num_channels, module.num_channels).double()
            plain.load_state_dict(module.state_dict())
            setattr(parent, name.rpartition(".")[2], plain)
    assert not any(isinstance(m, InstanceNorm) for m in theirs.modules())

    def meta(module):
        flat = FlatModel(module)
        start = flat.initial()
        images = torch.randn(6, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        images.requires_grad_(True)
        lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
        labels = torch.tensor([0, 0, 1, 1, 2, 2])
        student = unroll(flat, start.clone().requires_grad_(True), images, labels, lr, 3)[3]
        loss = (student - start.flip(0)).pow(2).sum()
        return torch.autograd.grad(loss, (images, lr))

    for a, b in zip(meta(ours), meta(theirs)):
        assert _rel(a, b) < 1e-6
