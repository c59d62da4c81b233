"""The 2x2 average pooling written as strided additions equals F.avg_pool2d at every order."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from astkit.functional import FlatModel
from astkit.matching import unroll
from astkit.models import build_model
from astkit.models.avg_pool import AvgPool2d, avg_pool_2x2


def _x(shape=(2, 3, 6, 4), seed=0, channels_last=False):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x.requires_grad_(True)


@pytest.mark.parametrize("channels_last", [False, True])
def test_values_and_derivatives_of_every_order_equal_avg_pool2d(channels_last):
    x = _x(channels_last=channels_last)
    assert torch.allclose(avg_pool_2x2(x), F.avg_pool2d(x, 2), rtol=0, atol=1e-15)
    assert torch.autograd.gradcheck(avg_pool_2x2, (x,))
    assert torch.autograd.gradgradcheck(avg_pool_2x2, (x,))
    u = torch.randn(2, 3, 3, 2, dtype=torch.float64)

    def first_and_second(pool):  # the gradient kept as a graph, then differentiated again
        (g,) = torch.autograd.grad((pool(x) * u).sin().sum(), x, create_graph=True)
        return g, torch.autograd.grad((g ** 2).sum(), x)[0]

    ours, reference = first_and_second(avg_pool_2x2), first_and_second(lambda t: F.avg_pool2d(t, 2))
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-15) for a, b in zip(ours, reference))


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (2, 3, 4, 7), (3, 6, 4)])
def test_odd_sizes_and_other_ranks_fall_back_to_avg_pool2d(shape):
    x = _x(shape)
    assert torch.equal(avg_pool_2x2(x), F.avg_pool2d(x, 2))


def test_the_module_takes_the_fast_path_only_for_2x2_windows_with_stride_2():
    x = _x((1, 2, 8, 8))
    fast = AvgPool2d(2, 2)(x)
    assert fast.grad_fn.name().endswith("_AvgPool2x2Backward")
    for other in (AvgPool2d(2, 1), AvgPool2d(3, 2), AvgPool2d(2, 2, padding=1), AvgPool2d(2, 2, ceil_mode=True),
                  AvgPool2d((2, 1), (2, 1))):
        reference = nn.AvgPool2d(other.kernel_size, other.stride, other.padding, other.ceil_mode)
        out = other(x)
        assert "AvgPool2x2" not in out.grad_fn.name() and torch.equal(out, reference(x))


def test_the_convnet_pools_with_it_and_its_meta_gradient_equals_avg_pool2ds():
    """Swap the ConvNet's pools for nn.AvgPool2d: the unroll's image and lr gradients agree in float64."""
    torch.manual_seed(0)
    net = build_model("convnet", channels=1, num_classes=3, image_size=28, width=4, depth=2).double()
    assert sum(isinstance(m, AvgPool2d) for m in net.modules()) == 2
    reference = build_model("convnet", channels=1, num_classes=3, image_size=28, width=4, depth=2).double()
    reference.load_state_dict(net.state_dict())
    for i, m in enumerate(reference.features):
        if isinstance(m, AvgPool2d):
            reference.features[i] = nn.AvgPool2d(2, 2)
    images = torch.randn(6, 1, 28, 28, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    target = torch.randn(sum(p.numel() for p in net.parameters()), dtype=torch.float64)
    grads = []
    for model in (net, reference):
        flat = FlatModel(model)
        x = images.clone().requires_grad_(True)
        lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
        theta = unroll(flat, flat.initial().requires_grad_(True), x, labels, lr, 3)[3]
        ((theta - target) ** 2).sum().backward()
        grads.append((x.grad, lr.grad))
    (gx, glr), (rx, rlr) = grads
    assert torch.allclose(gx, rx, rtol=1e-10, atol=1e-14) and torch.allclose(glr, rlr, rtol=1e-10)
