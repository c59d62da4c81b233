"""The model zoo: shapes, parameter counts, functional_call, registry errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from astkit.errors import UserError
from astkit.models import (
    BUILTIN_MODELS,
    ConvNet,
    Variant,
    auto_depth,
    build_model,
    describe_model,
    model_names,
)

INPUTS = [(1, 28, 28), (3, 32, 32), (1, 8, 8)]
NAMES = model_names()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tiny(name: str, channels: int, size, num_classes: int = 10) -> nn.Module:
    """``name`` at a tiny width unless the variant fixes its width."""
    factory = BUILTIN_MODELS[name]
    fixed = factory.fixed if isinstance(factory, Variant) else {}
    options = {} if "width" in fixed else {"width": 4}
    torch.manual_seed(0)
    return build_model(name, channels=channels, num_classes=num_classes, image_size=size, **options)


def test_registered_names():
    expected = {"convnet", "convnet-bn", "convnet-nonorm", "convnet-ln", "convnet-w32", "convnet-w64",
                *(f"convnet-d{d}" for d in range(1, 6)), "resnet18", "resnet18-bn", "vgg11", "vgg11-bn", "alexnet"}
    assert set(NAMES) == expected
    assert NAMES == sorted(NAMES) and all(n == n.lower() for n in NAMES)
    assert all(describe_model(n) and "\n" not in describe_model(n) for n in NAMES)


def test_convnet_parameter_count_matches_mtt():
    model = build_model("convnet", channels=3, num_classes=10, image_size=32)
    assert n_params(model) == 320_010
    assert n_params(ConvNet(3, 10, 32, width=128, depth=3)) == 320_010
    assert sum(isinstance(m, nn.GroupNorm) and m.num_groups == 128 for m in model.modules()) == 3


def test_resnet18_parameter_count_matches_cifar_resnet18():
    assert n_params(build_model("resnet18", channels=3, num_classes=10, image_size=32)) == 11_173_962


@pytest.mark.parametrize("shape", INPUTS, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", NAMES)
def test_shapes_embed_and_functional_call(name, shape):
    channels, h, w = shape
    model = tiny(name, channels, h).eval()
    x = torch.randn(2, *shape)
    logits = model(x)
    assert logits.shape == (2, 10)
    features = model.embed(x)
    assert features.ndim == 2 and features.shape[0] == 2
    assert features.shape[1] == model.classifier.in_features
    torch.testing.assert_close(model.classifier(features), logits)

    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    out = torch.func.functional_call(model, params, (x,))
    torch.testing.assert_close(out, logits)
    grads = torch.autograd.grad(out.square().sum(), list(params.values()))  # every parameter is used
    assert all(g.shape == p.shape for g, p in zip(grads, params.values()))


@pytest.mark.parametrize("name", ["convnet-bn", "resnet18-bn", "vgg11-bn"])
def test_batchnorm_models_train_mode_functional_call(name):
    model = tiny(name, 3, 32).train()
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(torch.func.functional_call(model, dict(model.named_parameters()), (x,)), model(x))


@pytest.mark.parametrize("size,depth", [(28, 3), (32, 3), (64, 4), (128, 5), (8, 2), (4, 1), ((8, 64), 2), (16, 3)])
def test_auto_depth(size, depth):
    assert auto_depth(size) == depth
    model = ConvNet(1, 10, size, width=2)
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == depth


def test_auto_depth_without_pooling_is_not_capped():
    assert auto_depth(8, "none") == 3 and auto_depth(128, "none") == 5


def test_convnet_spatial_sizes():
    assert ConvNet(3, 10, 8, width=4).classifier.in_features == 4 * 2 * 2  # 8 -> 4 -> 2
    assert ConvNet(1, 10, 28, width=4).classifier.in_features == 4 * 4 * 4  # DC/MTT: 28 -> 32 (padding 3) -> 4
    assert ConvNet(3, 10, 28, width=4).classifier.in_features == 4 * 3 * 3  # padding 3 is for 1 channel only
    assert ConvNet(1, 10, 8, width=4, depth=5).classifier.in_features == 4  # extra pools skipped
    model = ConvNet(3, 10, (16, 32), width=4)  # non-square: 16x32 -> 2x4
    assert model.classifier.in_features == 4 * 2 * 4
    assert model(torch.randn(2, 3, 16, 32)).shape == (2, 10)
    assert ConvNet(1, 10, 8, width=4, pooling="none").classifier.in_features == 4 * 8 * 8


@pytest.mark.parametrize("norm,kind", [("instancenorm", nn.GroupNorm), ("batchnorm", nn.BatchNorm2d),
                                       ("layernorm", nn.LayerNorm), ("none", None)])
@pytest.mark.parametrize("activation", ["relu", "leakyrelu", "sigmoid", "gelu", "tanh"])
@pytest.mark.parametrize("pooling", ["avgpool", "maxpool", "none"])
def test_convnet_options(norm, kind, activation, pooling):
    model = build_model("convnet", channels=1, num_classes=3, image_size=8, width=4, depth=2,
                        norm=norm, activation=activation, pooling=pooling)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    norms = [m for m in model.modules() if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d, nn.LayerNorm))]
    assert len(norms) == (0 if kind is None else 2) and all(isinstance(m, kind) for m in norms)
    if norm == "layernorm":  # MTT's: over C x H x W of that depth's map, per-element affine
        assert tuple(norms[0].normalized_shape) == (4, 8, 8) and norms[0].weight.shape == (4, 8, 8)
        assert tuple(norms[1].normalized_shape) == ((4, 8, 8) if pooling == "none" else (4, 4, 4))


def test_variants_fix_their_options():
    assert sum(isinstance(m, nn.Conv2d) for m in build_model("convnet-d5", channels=3, num_classes=10,
                                                             image_size=32, width=2).modules()) == 5
    assert build_model("convnet-w32", channels=3, num_classes=10, image_size=32).classifier.in_features == 32 * 16
    assert any(isinstance(m, nn.BatchNorm2d) for m in tiny("convnet-bn", 3, 32).modules())
    build_model("convnet-d2", channels=3, num_classes=10, image_size=32, width=2, depth=2)  # same value is fine
    with pytest.raises(UserError, match="'convnet-d2' fixes depth=2"):
        build_model("convnet-d2", channels=3, num_classes=10, image_size=32, depth=3)


def test_dc_reference_feature_sizes():
    assert build_model("vgg11", channels=1, num_classes=10, image_size=28).classifier.in_features == 512
    assert build_model("vgg11", channels=3, num_classes=10, image_size=32).classifier.in_features == 512
    assert build_model("alexnet", channels=3, num_classes=10, image_size=32).classifier.in_features == 192 * 4 * 4
    assert build_model("alexnet", channels=1, num_classes=10, image_size=28).classifier.in_features == 192 * 4 * 4
    assert build_model("resnet18", channels=1, num_classes=10, image_size=28).classifier.in_features == 512


def test_unknown_model_is_a_one_line_user_error():
    with pytest.raises(UserError) as info:
        build_model("foo", channels=3, num_classes=10, image_size=32)
    message = str(info.value)
    assert message.startswith("unknown model 'foo'; known models: alexnet, convnet,") and "\n" not in message
    with pytest.raises(UserError, match="unknown model"):
        describe_model("foo")


def test_unknown_option_names_option_and_model():
    with pytest.raises(UserError, match="model 'resnet18' has no option 'depth'"):
        build_model("resnet18", channels=3, num_classes=10, image_size=32, depth=3)
    with pytest.raises(UserError, match="'alexnet' has no option 'norm'"):
        build_model("alexnet", channels=3, num_classes=10, image_size=32, norm="batchnorm")


def test_bad_option_values_are_user_errors():
    with pytest.raises(UserError, match="unknown norm 'groupy'"):
        build_model("convnet", channels=3, num_classes=10, image_size=32, norm="groupy")
    with pytest.raises(UserError, match="width must be a positive integer"):
        build_model("vgg11", channels=3, num_classes=10, image_size=32, width=0)
    with pytest.raises(UserError, match="image_size"):
        build_model("convnet", channels=3, num_classes=10, image_size=(1, 2, 3))


def test_none_option_means_default_and_names_are_case_insensitive():
    model = build_model("ConvNet", channels=3, num_classes=10, image_size=[32, 32], width=None, depth=None)
    assert n_params(model) == 320_010


def test_custom_registry():
    def mlp(channels, num_classes, image_size, **options):
        """A tiny MLP."""
        return nn.Sequential(nn.Flatten(), nn.Linear(channels * image_size * image_size, num_classes))

    registry = {**BUILTIN_MODELS, "mlp": mlp}
    assert "mlp" in model_names(registry) and "mlp" not in model_names()
    assert describe_model("mlp", registry) == "A tiny MLP."
    assert build_model("mlp", channels=1, num_classes=3, image_size=4, registry=registry, anything=1)(
        torch.randn(2, 1, 4, 4)).shape == (2, 3)
    with pytest.raises(UserError, match="known models: mlp$"):
        build_model("convnet", channels=1, num_classes=3, image_size=4, registry={"mlp": mlp})
