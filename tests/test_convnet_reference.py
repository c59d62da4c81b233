"""astkit's ConvNet is DC/DSA/MTT's ``ConvNet`` (``_make_layers`` in their
networks.py), and files made with astkit's earlier ConvNet are refused.

The reference, restated: a 28 px image is planned as a 32 px one, the first
convolution of a 1-channel input pads by 3 (every other pads by 1), and every
norm is sized by the planned map at its depth (``layernorm``: a LayerNorm over
C x H x W with per-element affine parameters). No training here: every model
is only built, or run on two images.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from astkit.errors import FileFormatError
from astkit.functional import ParamLayout
from astkit.models import BUILTIN_MODELS, Variant, build_model
from astkit.models.convnet import MODELS as CONVNETS
from astkit.models.revision import REVISION
from astkit.trajectory import ModelSpec, Trajectory, check_made_for

EARLIER_28 = ("made with astkit's earlier ConvNet for 28x28 images (first convolution padded by 1; "
              "DC/DSA/MTT pad by 3), which this astkit no longer builds; retrain the experts")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def reference_convnet(channels: int, num_classes: int, image_size: tuple[int, int], width: int = 128,
                      depth: int = 3, norm: str = "instancenorm", pooling: str = "avgpool") -> nn.Module:
    """DC/DSA/MTT's ConvNet, restated from its rule (ReLU activation)."""
    h, w = (32, 32) if image_size[0] == 28 else image_size
    layers: list[nn.Module] = []
    in_channels = channels
    for d in range(depth):
        layers.append(nn.Conv2d(in_channels, width, 3, padding=3 if channels == 1 and d == 0 else 1))
        if norm == "instancenorm":
            layers.append(nn.GroupNorm(width, width, affine=True))
        elif norm == "batchnorm":
            layers.append(nn.BatchNorm2d(width))
        elif norm == "layernorm":
            layers.append(nn.LayerNorm([width, h, w], elementwise_affine=True))
        layers.append(nn.ReLU())
        if pooling != "none":
            layers.append(nn.AvgPool2d(2, 2) if pooling == "avgpool" else nn.MaxPool2d(2, 2))
            h, w = h // 2, w // 2
        in_channels = width
    return nn.Sequential(nn.Sequential(*layers), nn.Flatten(), nn.Linear(width * h * w, num_classes))


def reference_options(name: str, image_size: tuple[int, int]) -> dict:
    """The reference's settings for astkit's variant ``name`` (MTT's get_network defaults)."""
    factory = BUILTIN_MODELS[name]
    fixed = dict(factory.fixed) if isinstance(factory, Variant) else {}
    side = max(image_size)
    return {"width": 128, "depth": 3 if side <= 32 else 4 if side <= 64 else 5, "norm": "instancenorm", **fixed}


# ------------------------------------------------------------------ the network
def test_parameter_counts_at_width_128():
    fmnist = build_model("convnet", channels=1, num_classes=10, image_size=(28, 28))
    cifar = build_model("convnet", channels=3, num_classes=10, image_size=(32, 32))
    assert n_params(fmnist) == 317_706 and n_params(cifar) == 320_010
    assert fmnist.classifier.in_features == cifar.classifier.in_features == 128 * 4 * 4 == 2048
    assert n_params(reference_convnet(1, 10, (28, 28))) == 317_706
    assert n_params(reference_convnet(3, 10, (32, 32))) == 320_010


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)], ids=["1x28x28", "3x32x32"])
def test_feature_map_sizes_per_block(shape):
    model = build_model("convnet", channels=shape[0], num_classes=10, image_size=shape[1:]).eval()
    seen: dict[str, list[tuple[int, int]]] = {"conv": [], "pool": []}

    def record(kind):
        return lambda module, args, out: seen[kind].append(tuple(out.shape[-2:]))

    for module in model.features:
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(record("conv"))
        elif isinstance(module, nn.AvgPool2d):
            module.register_forward_hook(record("pool"))
    with torch.no_grad():
        model(torch.randn(2, *shape))
    assert seen["conv"] == [(32, 32), (16, 16), (8, 8)]
    assert seen["pool"] == [(16, 16), (8, 8), (4, 4)]
    assert [m.padding for m in model.features if isinstance(m, nn.Conv2d)] == \
        [(3, 3) if shape[0] == 1 else (1, 1), (1, 1), (1, 1)]


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)], ids=["1x28x28", "3x32x32"])
def test_layernorm_is_mtts_per_element_layernorm(shape):
    model = build_model("convnet-ln", channels=shape[0], num_classes=10, image_size=shape[1:])
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    expected = [(128, 32, 32), (128, 16, 16), (128, 8, 8)]
    assert [tuple(m.normalized_shape) for m in norms] == expected
    assert [tuple(m.weight.shape) for m in norms] == expected and [tuple(m.bias.shape) for m in norms] == expected
    assert not any(isinstance(m, nn.GroupNorm) for m in model.modules())


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 64, 64)], ids=["1x28x28", "3x32x32", "3x64x64"])
@pytest.mark.parametrize("name", sorted(CONVNETS))
def test_every_convnet_variant_equals_the_reference(name, shape):
    """Same parameter shapes in the same order, and the same logits with the same weights."""
    channels, size = shape[0], shape[1:]
    opts = reference_options(name, size)
    if shape == (3, 64, 64) and opts["width"] == 128:  # keep the 64 px case small
        opts["width"] = 16
    torch.manual_seed(0)
    reference = reference_convnet(channels, 10, size, width=opts["width"], depth=opts["depth"], norm=opts["norm"])
    mine = build_model(name, channels=channels, num_classes=10, image_size=size,
                       **{k: v for k, v in opts.items() if k not in getattr(BUILTIN_MODELS[name], "fixed", {})})
    ours, theirs = list(mine.parameters()), list(reference.parameters())
    assert [p.shape for p in ours] == [p.shape for p in theirs]
    with torch.no_grad():
        for mine_p, ref_p in zip(ours, theirs):
            mine_p.copy_(ref_p)
    x = torch.randn(2, *shape)
    torch.testing.assert_close(mine(x), reference(x))


@pytest.mark.parametrize("name", ["vgg11", "resnet18"])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 8, 8)], ids=["1x28x28", "3x32x32", "1x8x8"])
def test_layernorm_in_the_other_models_is_the_same_layernorm(name, shape):
    model = build_model(name, channels=shape[0], num_classes=10, image_size=shape[1:], width=4, norm="layernorm")
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(m.weight.shape == m.normalized_shape for m in norms)
    assert model(torch.randn(2, *shape)).shape == (2, 10)  # every LayerNorm matched its map


# ------------------------------------------------------- files of the old network
DATA = SimpleNamespace(name="fashion-mnist", zca=None)


def write_expert(path, spec: ModelSpec, *, drop_revision: bool = True, dataset: str = "fashion-mnist"):
    """An expert file of ``spec`` as the current astkit writes it, then (``drop_revision``)
    its model record edited to read as an earlier astkit's, which recorded no revision."""
    module = spec.build()
    layout = ParamLayout.of(module)
    snapshots = torch.zeros(2, layout.size)
    Trajectory(snapshots, layout, spec, [0.1], [1.0], {"dataset": {"name": dataset, "zca": False}, "index": 0}).save(path)
    if drop_revision:
        from astkit import store

        tensors, meta = store.load(path)
        assert meta["model"]["revision"] == REVISION
        del meta["model"]["revision"]
        store.save(path, "trajectory", tensors, {k: v for k, v in meta.items() if k not in ("kind", "format")})
    return path


def test_a_new_file_records_the_revision_and_is_accepted(tmp_path):
    spec = ModelSpec("convnet", 1, 10, (28, 28), {"width": 8})
    path = write_expert(tmp_path / "expert_000.safetensors", spec, drop_revision=False)
    Trajectory.check_file(path, spec, DATA, epochs=1)
    assert Trajectory.load(path).model.revision == REVISION == 2


def test_an_expert_of_the_old_28x28_convnet_is_refused_saying_why(tmp_path):
    spec = ModelSpec("convnet", 1, 10, (28, 28), {"width": 8})
    path = write_expert(tmp_path / "expert_000.safetensors", spec)
    with pytest.raises(FileFormatError) as info:
        Trajectory.check_file(path, spec, DATA, epochs=1)
    assert str(info.value) == f"{path}: {EARLIER_28}"
    trajectory = Trajectory.load(path)  # the engine's path: load, then check_fits
    assert trajectory.model.revision == 1
    with pytest.raises(FileFormatError, match="earlier ConvNet for 28x28 images"):
        trajectory.check_fits(spec, DATA, max_start_epoch=1, expert_epochs=1, path=path)


def test_the_refusal_from_metadata_alone_and_for_checkpoints():
    old = {"name": "convnet-d3", "channels": 1, "num_classes": 10, "image_size": [28, 28], "options": {}}
    spec = ModelSpec("convnet-d3", 1, 10, (28, 28))
    with pytest.raises(FileFormatError) as info:
        check_made_for({"model": old}, "e.safetensors", spec, DATA)
    assert str(info.value) == f"e.safetensors: {EARLIER_28}" and "\n" not in str(info.value)
    with pytest.raises(FileFormatError, match=r"no longer builds; start without --resume \(with retrained experts\)$"):
        check_made_for({"model": old}, "c.safetensors", spec, DATA, kind="checkpoint")
    check_made_for({"model": {**old, "revision": REVISION}}, "e.safetensors", spec, DATA)  # this astkit's file


def test_other_differences_keep_the_usual_message():
    old = {"name": "convnet", "channels": 1, "num_classes": 10, "image_size": [28, 28], "options": {"width": 4}}
    with pytest.raises(FileFormatError) as info:
        check_made_for({"model": old}, "e.safetensors", ModelSpec("convnet", 1, 10, (28, 28), {"width": 8}), DATA)
    assert "made for convnet(width=4) on 1x28x28 images, 10 classes, this run uses convnet(width=8)" in str(info.value)
    assert "earlier" not in str(info.value)


def test_options_written_at_their_default_value_name_the_same_network():
    """``width = 128`` written out, or a variant's fixed option repeated, is the network of the default; a real
    difference (or a model astkit does not know) is still compared as written."""
    def recorded(name, options):
        return {"model": {"name": name, "channels": 1, "num_classes": 10, "image_size": [28, 28], "options": options,
                          "revision": REVISION}}

    check_made_for(recorded("convnet", {"width": 128, "norm": "instancenorm"}), "e", ModelSpec("convnet", 1, 10, (28, 28)), DATA)
    check_made_for(recorded("convnet", {}), "e", ModelSpec("convnet", 1, 10, (28, 28), {"pooling": "avgpool"}), DATA)
    check_made_for(recorded("convnet-w32", {"width": 32}), "e", ModelSpec("convnet-w32", 1, 10, (28, 28)), DATA)
    with pytest.raises(FileFormatError, match=r"made for convnet\(width=64\)"):
        check_made_for(recorded("convnet", {"width": 64}), "e", ModelSpec("convnet", 1, 10, (28, 28)), DATA)
    with pytest.raises(FileFormatError, match=r"made for mine\(width=128\)"):
        check_made_for(recorded("mine", {"width": 128}), "e", ModelSpec("mine", 1, 10, (28, 28)), DATA)


def test_old_files_whose_network_did_not_change_stay_valid():
    for spec in (ModelSpec("convnet", 1, 10, (8, 8), {"width": 8}),    # digits
                 ModelSpec("convnet", 3, 10, (32, 32)),                  # CIFAR
                 ModelSpec("convnet", 3, 10, (28, 28)),                  # 3-channel 28 px: padding 1 in both
                 ModelSpec("resnet18", 1, 10, (28, 28)), ModelSpec("vgg11", 1, 10, (28, 28))):
        old = {k: v for k, v in spec.to_json().items() if k != "revision"}
        check_made_for({"model": old}, "e.safetensors", spec, SimpleNamespace(name="x", zca=None))


def test_old_layernorm_files_are_refused_and_newer_files_too():
    for spec in (ModelSpec("convnet-ln", 3, 10, (32, 32)), ModelSpec("convnet", 3, 10, (32, 32), {"norm": "layernorm"}),
                 ModelSpec("resnet18", 3, 10, (32, 32), {"norm": "layernorm"})):
        old = {k: v for k, v in spec.to_json().items() if k != "revision"}
        with pytest.raises(FileFormatError, match="earlier layer norm .*; retrain the experts$"):
            check_made_for({"model": old}, "e.safetensors", spec, DATA)
    spec = ModelSpec("convnet", 3, 10, (32, 32))
    newer = {**spec.to_json(), "revision": REVISION + 1}
    with pytest.raises(FileFormatError, match=f"made by a newer astkit \\(network revision {REVISION + 1}"):
        check_made_for({"model": newer}, "e.safetensors", spec, DATA)


def test_show_prints_an_old_file(tmp_path, capsys):
    from astkit.cli import main

    path = write_expert(tmp_path / "expert_000.safetensors", ModelSpec("convnet", 1, 10, (28, 28), {"width": 8}))
    assert main(["show", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["meta"]["kind"] == "trajectory" and "revision" not in data["meta"]["model"]
    assert main(["show", str(path)]) == 0
    assert "trajectory" in capsys.readouterr().out
