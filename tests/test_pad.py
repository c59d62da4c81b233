"""PAD (plugin ``pad``): the parameter-selective distance by hand on a tiny
vector and against a transcription of PAD's selection, the depth cut and the
layer groups on the real ConvNet layouts, a float64 finite-difference
gradient, the baseline at ratio 0, a tiny distillation on digits that uses
PAD's distance, bad options refused in one line, and the ``pad-reference``
preset."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from astkit import Engine, MatchPoint, RunConfig, UserError, hookimpl
from astkit.functional import ParamLayout
from astkit.models.convnet import convnet
from astkit.plugins import PluginSet, declared_options
from astkit_plugins import pad

from conftest import TINY, tiny_config


@pytest.fixture(scope="module")
def found() -> PluginSet:
    return PluginSet.discover()


def manager(found, *overrides: str, plugins=("pad",)):
    """The plugin manager of ``plugins`` and a config with their options resolved."""
    config = RunConfig.load(overrides=list(overrides))
    config.resolve_options(declared_options(found.catalog()))
    return found.manager(found.resolve(list(plugins))), config


def distance(pm, config, student, start, target, layout):
    return pm.hook.astkit_matching_distance(student=student, start=start, target=target, layout=layout,
                                            point=MatchPoint(1, 1), start_epoch=0, expert_index=0, iteration=0,
                                            state={}, config=config)


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and message
    return message


def pad_code(student, start, target, loss_ratio, depth_ratio=0.0):
    """PAD's matching loss, transcribed: distill/PAD.py L557-576 (sort the per-element errors ascending,
    drop the int(loss_ratio * P) smallest, same indices in the denominator) and the deleted
    PAD_depth.py L563-585 (keep the elements from int(depth_ratio * P) on)."""
    param_loss = (student - target) ** 2
    param_dist = (start - target) ** 2
    if depth_ratio > 0:
        depth_index = int(depth_ratio * len(param_loss))
        param_loss, param_dist = param_loss[depth_index:], param_dist[depth_index:]
    if loss_ratio > 0:
        _, indices = torch.sort(param_loss.detach())
        drop = int(loss_ratio * len(param_loss))
        keep = indices[drop:]
        return param_loss[keep].sum() / param_dist[keep].sum()
    return param_loss.sum() / param_dist.sum()


# ------------------------------------------------------- a tiny vector by hand
#: P = 10: two layers, [l1 (weight 3x1, bias 3) + n1 (norm weight, bias)] = elements 0..7, [l2] = 8..9
TINY_LAYOUT = ParamLayout(("l1.weight", "l1.bias", "n1.weight", "n1.bias", "l2.weight", "l2.bias"),
                          ((3, 1), (3,), (1,), (1,), (1, 1), (1,)))
#: errors e = (s - t)^2 = .01 9 .04 1 .25 4 .0025 16 .49 2.25; spans d = 1 4 1 4 1 4 1 4 1 4
STUDENT = torch.tensor([0.1, 3.0, -0.2, 1.0, 0.5, -2.0, 0.05, 4.0, -0.7, 1.5], dtype=torch.float64)
START = torch.tensor([1.0, 2.0, -1.0, 2.0, 1.0, -2.0, 1.0, 2.0, -1.0, 2.0], dtype=torch.float64)
TARGET = torch.zeros(10, dtype=torch.float64)


def kept_and_value(found, *overrides):
    """The hook's value and the elements it keeps (where its gradient is not zero)."""
    pm, config = manager(found, *overrides)
    student = STUDENT.clone().requires_grad_(True)
    value = distance(pm, config, student, START, TARGET, TINY_LAYOUT)
    (grad,) = torch.autograd.grad(value, student)
    return sorted(grad.nonzero().flatten().tolist()), value.item()


@pytest.mark.parametrize("overrides, kept, value", [
    # drop the 5 smallest errors (.0025 .01 .04 .25 .49: elements 6 0 2 4 8): (9+1+4+16+2.25) / (5*4)
    (("pad.loss_ratio=0.5",), [1, 3, 5, 7, 9], 32.25 / 20),
    # floor(0.35 * 10) = 3: drop 6 0 2: (9+1+.25+4+16+.49+2.25) / (4+4+1+4+4+1+4)
    (("pad.loss_ratio=0.35",), [1, 3, 4, 5, 7, 8, 9], 32.99 / 22),
    # depth: keep 3..9 (floor(0.35 * 10) = 3)
    (("pad.loss_ratio=0", "pad.depth_ratio=0.35"), [3, 4, 5, 6, 7, 8, 9], 23.9925 / 19),
    # depth then selection among the 7 remaining: drop floor(3.5) = 3 of them (.0025 .25 .49: 6 4 8)
    (("pad.loss_ratio=0.5", "pad.depth_ratio=0.35"), [3, 5, 7, 9], 23.25 / 16),
    # skip the first layer (l1 + n1, elements 0..7): only l2
    (("pad.loss_ratio=0", "pad.skip_layers=1"), [8, 9], 2.74 / 5),
    # both cuts: the later one wins (skip 1 -> 8 beats depth 0.35 -> 3), then drop floor(0.5 * 2) = 1 (.49)
    (("pad.loss_ratio=0.5", "pad.depth_ratio=0.35", "pad.skip_layers=1"), [9], 2.25 / 4),
    # everything off: all ten, MTT's ratio
    (("pad.loss_ratio=0",), list(range(10)), 33.0425 / 25),
])
def test_the_distance_keeps_the_hand_computed_elements(found, overrides, kept, value):
    got_kept, got = kept_and_value(found, *overrides)
    assert got_kept == kept
    assert got == pytest.approx(value, rel=1e-12)


def test_the_default_is_loss_ratio_one_half(found):
    assert kept_and_value(found) == kept_and_value(found, "pad.loss_ratio=0.5")
    assert pad.OPTIONS == {"loss_ratio": 0.5, "depth_ratio": 0.0, "skip_layers": 0}


@pytest.mark.parametrize("loss_ratio, depth_ratio", [(0.1, 0), (0.5, 0), (0.25, 0), (0.9, 0), (0.999, 0),
                                                     (0, 0.5), (0.5, 0.25), (0.3, 0.7)])
def test_the_distance_equals_pads_code(found, loss_ratio, depth_ratio):
    generator = torch.Generator().manual_seed(int(loss_ratio * 1000 + depth_ratio * 100))
    layout = ParamLayout(("a.weight", "a.bias"), ((100, 10), (1000,)))
    student, start, target = (torch.randn(2000, generator=generator, dtype=torch.float64) for _ in range(3))
    pm, config = manager(found, f"pad.loss_ratio={loss_ratio}", f"pad.depth_ratio={depth_ratio}")
    got = distance(pm, config, student, start, target, layout)
    assert got.item() == pytest.approx(pad_code(student, start, target, loss_ratio, depth_ratio).item(), rel=1e-12)
    assert got.item() != pytest.approx(pad_code(student, start, target, 0.0).item(), rel=1e-6)


# ---------------------------------------------------------- the real ConvNet
def cifar_convnet() -> ParamLayout:
    return ParamLayout.of(convnet(3, 10, 32))  # MTT's ConvNet-3 on 3x32x32, width 128


def test_the_layers_of_the_default_convnet(found):
    layout = cifar_convnet()
    assert layout.size == 320_010
    groups = pad.layers(layout)
    assert [names for names, _, _ in groups] == [
        ("features.0.weight", "features.0.bias", "features.1.weight", "features.1.bias"),   # conv1 + its norm
        ("features.4.weight", "features.4.bias", "features.5.weight", "features.5.bias"),   # conv2 + its norm
        ("features.8.weight", "features.8.bias", "features.9.weight", "features.9.bias"),   # conv3 + its norm
        ("classifier.weight", "classifier.bias"),
    ]
    # METHOD-MORE 3.2.4: the blocks end at 3,840 / 151,680 / 299,520
    assert [(a, b) for _, a, b in groups] == [(0, 3840), (3840, 151_680), (151_680, 299_520), (299_520, 320_010)]
    assert [pad.cut_index(layout, 0.0, s) for s in range(4)] == [0, 3840, 151_680, 299_520]
    # the 8x8 digits get depth 2: conv1+norm, conv2+norm, classifier
    digits = pad.layers(ParamLayout.of(convnet(1, 10, 8)))
    assert [(names[0], a, b) for names, a, b in digits] == [
        ("features.0.weight", 0, 1536), ("features.4.weight", 1536, 149_376), ("classifier.weight", 149_376, 154_506)]


@pytest.mark.parametrize("norm, members", [("layernorm", 4), ("batchnorm", 4), ("none", 2)])
def test_every_norm_joins_its_convolution(norm, members):
    """LayerNorm's per-element affine parameters (C x H x W) join the conv too; without a norm, a conv alone."""
    groups = pad.layers(ParamLayout.of(convnet(3, 10, 32, width=8, norm=norm)))
    assert len(groups) == 4 and [len(names) for names, _, _ in groups] == [members] * 3 + [2]
    assert all(names[0].endswith(".weight") and "classifier" not in names[0] for names, _, _ in groups[:3])


@pytest.mark.parametrize("ratio, cut", [(0.5, 160_005), (0.25, 80_002), (0.75, 240_007)])
def test_depth_ratio_cuts_the_real_layout_at_floor_r_p(found, ratio, cut):
    layout = cifar_convnet()
    assert pad.cut_index(layout, ratio, 0) == cut == math.floor(ratio * 320_010)
    generator = torch.Generator().manual_seed(3)
    start, target = (torch.randn(layout.size, generator=generator, dtype=torch.float64) for _ in range(2))
    student = torch.randn(layout.size, generator=generator, dtype=torch.float64).requires_grad_(True)
    pm, config = manager(found, "pad.loss_ratio=0", f"pad.depth_ratio={ratio}")
    got = distance(pm, config, student, start, target, layout)
    assert got.item() == pytest.approx(pad_code(student.detach(), start, target, 0.0, ratio).item(), rel=1e-12)
    (grad,) = torch.autograd.grad(got, student)
    assert int(grad.nonzero()[0]) == cut and bool((grad[:cut] == 0).all()) and bool((grad[cut:] != 0).all())
    # an element-count cut: 0.5 falls inside conv3 (151,680..299,520), 0.25 inside conv2
    # and skip_layers=2 moves the cut of 0.25 to conv3's first element
    assert pad.cut_index(layout, ratio, 2) == max(cut, 151_680)


# -------------------------------------------------------------- the gradient
def test_the_gradient_matches_finite_differences_with_the_kept_set_fixed(found):
    generator = torch.Generator().manual_seed(0)
    layout = ParamLayout(("c.weight", "c.bias", "n.weight", "n.bias", "fc.weight", "fc.bias"),
                         ((2, 3), (2,), (2,), (2,), (2, 2), (2,)))  # P = 18, layers 0..11 and 12..17
    target = torch.randn(18, generator=generator, dtype=torch.float64)
    start = target + torch.randn(18, generator=generator, dtype=torch.float64)
    # distinct errors, at least 0.01 apart: the eps = 1e-6 steps never change the kept set
    gaps = (torch.randperm(18, generator=generator).to(torch.float64) + 1) * 0.1
    signs = torch.where(torch.rand(18, generator=generator) < 0.5, -1.0, 1.0).to(torch.float64)
    student = (target + signs * gaps).requires_grad_(True)
    for overrides in (("pad.loss_ratio=0.5",), ("pad.loss_ratio=0.3", "pad.depth_ratio=0.2"),
                      ("pad.loss_ratio=0.4", "pad.skip_layers=1"), ("pad.loss_ratio=0",)):
        pm, config = manager(found, *overrides)
        assert torch.autograd.gradcheck(lambda s: distance(pm, config, s, start, target, layout), (student,),
                                        eps=1e-6, atol=1e-8, rtol=1e-6)
        # and by hand: 2 (s_i - t_i) / sum_K d_i on K, 0 elsewhere
        value = distance(pm, config, student, start, target, layout)
        (grad,) = torch.autograd.grad(value, student)
        kept = grad != 0
        errors = (student.detach() - target) ** 2
        expected = torch.where(kept, 2 * (student.detach() - target) / (start - target)[kept].pow(2).sum(), 0.0)
        assert torch.allclose(grad, expected, rtol=1e-12, atol=0)
        # the kept elements: the largest errors of the elements from the cut on
        loss_ratio, depth_ratio, skip_layers = pad.options_of(config)
        cut = pad.cut_index(layout, depth_ratio, skip_layers)
        rest, remaining = kept[cut:], 18 - cut
        assert not kept[:cut].any() and int(rest.sum()) == remaining - math.floor(loss_ratio * remaining)
        if not rest.all():
            assert errors[cut:][rest].min() > errors[cut:][~rest].max()


def test_ratio_zero_is_the_baseline_exactly(found):
    layout = cifar_convnet()
    generator = torch.Generator().manual_seed(1)
    student, start, target = (torch.randn(layout.size, generator=generator) for _ in range(3))
    baseline_pm, baseline_config = manager(found, plugins=())
    pm, config = manager(found, "pad.loss_ratio=0", "pad.depth_ratio=0")
    s1, s2 = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    ours, theirs = distance(pm, config, s1, start, target, layout), distance(baseline_pm, baseline_config, s2,
                                                                              start, target, layout)
    assert torch.equal(ours, theirs)
    assert torch.equal(torch.autograd.grad(ours, s1)[0], torch.autograd.grad(theirs, s2)[0])
    default = distance(*manager(found), student, start, target, layout)  # loss_ratio 0.5: not the baseline
    assert not torch.isclose(default, theirs)


# ------------------------------------------------------------- a tiny run
class Spy:
    """Records each matching term's inputs and the answer the engine got."""

    astkit_plugin_name = "spy"

    def __init__(self):
        self.calls = []

    @hookimpl(wrapper=True)
    def astkit_matching_distance(self, student, start, target):
        answer = yield
        self.calls.append((student.detach().clone(), start.clone(), target.clone(), answer.detach().clone()))
        return answer


@pytest.fixture(scope="module")
def experts(tmp_path_factory, digits):
    return Engine(tiny_config(tmp_path_factory.mktemp("pad-experts")), dataset=digits).train_experts()


def test_a_tiny_distillation_on_digits_matches_with_pads_distance(tmp_path, digits, experts):
    spy = Spy()
    engine = Engine(tiny_config(tmp_path, "plugins=pad"), dataset=digits, plugins=[spy])
    assert engine.enabled[0] == "pad"
    engine.distill(experts)
    assert len(engine.history) == 3 and len(spy.calls) == 3
    for metrics, (student, start, target, answer) in zip(engine.history, spy.calls):
        assert math.isfinite(metrics.loss) and metrics.loss > 0
        assert answer.item() == pytest.approx(pad_code(student, start, target, 0.5).item(), rel=1e-5)
        assert answer.item() != pytest.approx(pad_code(student, start, target, 0.0).item(), rel=1e-3)
        assert metrics.loss == pytest.approx(answer.item(), rel=1e-6)
    lines = [json.loads(line) for line in engine.folder.metrics.read_text().splitlines()]
    losses = [line["loss"] for line in lines if line.get("event") == "iteration"]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)


# --------------------------------------------------------------- bad options
@pytest.mark.parametrize("option, fragment", [
    ("pad.loss_ratio=1", "pad.loss_ratio must be a number in [0, 1), got 1"),
    ("pad.loss_ratio=-0.1", "pad.loss_ratio must be a number in [0, 1), got -0.1"),
    ("pad.depth_ratio=1.5", "pad.depth_ratio must be a number in [0, 1), got 1.5"),
    ("pad.skip_layers=-1", "pad.skip_layers must be a whole number >= 0, got -1"),
    # types the option resolution itself refuses (from the defaults' types)
    ("pad.loss_ratio=true", "config key pad.loss_ratio expects a number, got True"),
    ("pad.depth_ratio=nan", "config key pad.depth_ratio expects a finite number, got nan"),
    ("pad.skip_layers=1.5", "config key pad.skip_layers expects an integer, got 1.5"),
])
def test_bad_options_are_refused_in_one_line_when_the_engine_is_built(tmp_path, digits, found, option, fragment):
    with pytest.raises(UserError) as exc:
        Engine(tiny_config(tmp_path, "plugins=pad", option), dataset=digits, plugin_set=found)
    assert fragment in one_line(exc)
    assert not (tmp_path / "run").exists()
    if fragment.startswith("pad."):  # and the hook itself refuses them
        pm, config = manager(found, option)
        with pytest.raises(UserError) as exc:
            distance(pm, config, STUDENT, START, TARGET, TINY_LAYOUT)
        assert fragment in one_line(exc)


class Options:
    """A configuration whose pad options skipped the resolution's type checks."""

    def __init__(self, **options):
        self.options = {**pad.OPTIONS, **options}

    def plugin(self, name):
        assert name == "pad"
        return self.options


@pytest.mark.parametrize("options, fragment", [
    ({"loss_ratio": True}, "pad.loss_ratio must be a number in [0, 1), got True"),
    ({"depth_ratio": float("nan")}, "pad.depth_ratio must be a number in [0, 1), got nan"),
    ({"loss_ratio": "half"}, "pad.loss_ratio must be a number in [0, 1), got 'half'"),
    ({"skip_layers": 1.5}, "pad.skip_layers must be a whole number >= 0, got 1.5"),
    ({"skip_layers": float("inf")}, "pad.skip_layers must be a whole number >= 0, got inf"),
])
def test_the_plugin_checks_types_itself_too(found, options, fragment):
    pm = found.manager(["pad"])
    with pytest.raises(UserError) as exc:
        distance(pm, Options(**options), STUDENT, START, TARGET, TINY_LAYOUT)
    assert fragment in one_line(exc)
    assert distance(pm, Options(skip_layers=1.0), STUDENT, START, TARGET, TINY_LAYOUT).item() == pytest.approx(2.25 / 4)


def test_skipping_every_layer_is_refused_in_one_line(tmp_path, digits, found, experts):
    pm, config = manager(found, "pad.skip_layers=2")
    with pytest.raises(UserError) as exc:
        distance(pm, config, STUDENT, START, TARGET, TINY_LAYOUT)
    assert "pad.skip_layers = 2, but the network has 2 layers" in one_line(exc)
    with pytest.raises(UserError) as exc:  # a selection that leaves nothing (ratios < 1 always leave one)
        pad.selective_distance(STUDENT, START, TARGET, cut=10, loss_ratio=0.5)
    assert "pad keeps no parameter: 0 remain" in one_line(exc)
    # on digits (3 layers) the first match refuses 3; 2 (the classifier alone) is fine
    assert distance(*manager(found, "pad.skip_layers=1"), STUDENT, START, TARGET, TINY_LAYOUT).item() \
        == pytest.approx(2.25 / 4)
    engine = Engine(tiny_config(tmp_path, "plugins=pad", "pad.skip_layers=3"), dataset=digits, plugin_set=found)
    with pytest.raises(UserError) as exc:
        engine.distill(experts)
    assert "pad.skip_layers = 3, but the network has 3 layers (0..2 can be skipped)" in one_line(exc)
    assert not engine.folder.distilled.exists()


def test_a_bad_option_on_the_command_line_is_one_error_line_and_writes_nothing(tmp_path):
    sets = [x for item in [*TINY, "pad.loss_ratio=1.0"] for x in ("--set", item)]
    result = subprocess.run([sys.executable, "-m", "astkit", "run", "-p", "pad", "--out", str(tmp_path / "out"),
                             *sets], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "pad.loss_ratio must be a number in [0, 1), got 1.0" in errors[0], result.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------- preset
def test_the_preset_names_datm_ftd_and_pad_with_pads_values(found):
    preset = found.presets()["pad-reference"]
    assert preset.plugins == ["datm", "ftd", "pad"]
    assert preset.settings() == {
        "experts.optimizer": "sgd", "experts.lr": 0.01, "experts.momentum": 0.0, "experts.weight_decay": 0.0,
        "experts.lr_decay": 1.0, "distill.learn_labels": True, "distill.lr_labels": 2.0,
        "distill.labels_momentum": 0.9, "distill.max_loss_to_update": 1.0, "evaluate.batch_size": 128,
        "ftd.sharpness": "gsam", "ftd.rho": 0.01, "ftd.alpha": 0.3, "ftd.ema_decay": 0.0,
        "datm.init": "correct", "datm.soft_labels": True, "datm.min_start_epoch": 0,
        "datm.initial_max_start_epoch": 10, "datm.expansion_end": 1000,
        "pad.loss_ratio": 0.5, "pad.depth_ratio": 0.0,
    }


def test_the_preset_resolves_and_is_listed(found):
    missing = [name for name in ("datm", "ftd") if name not in found.available]
    if missing:
        pytest.skip(f"plugin(s) {', '.join(missing)} not installed yet: the preset resolves once they declare "
                    f"their options")
    settings = found.preset_settings(["pad-reference"])
    assert settings["pad.loss_ratio"] == (0.5, "pad-reference") and settings["ftd.rho"] == (0.01, "pad-reference")
    engine = Engine(RunConfig.load(overrides=["plugins=pad-reference", "distill.max_start_epoch=20",
                                              "experts.epochs=22"]), plugin_set=found)
    assert engine.enabled == ["datm", "ftd", "pad"]
    c = engine.config
    assert (c.experts.lr, c.experts.momentum, c.distill.lr_labels, c.distill.max_loss_to_update) == (0.01, 0.0, 2.0, 1.0)
    assert c.options["pad"] == {"loss_ratio": 0.5, "depth_ratio": 0.0, "skip_layers": 0}
    assert c.options["datm"]["initial_max_start_epoch"] == 10 and c.options["ftd"]["alpha"] == 0.3
    user = Engine(RunConfig.load(overrides=["plugins=pad-reference", "pad.loss_ratio=0.25"]), plugin_set=found)
    assert user.config.options["pad"]["loss_ratio"] == 0.25
    listed = subprocess.run([sys.executable, "-m", "astkit", "plugins"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "COLUMNS": "300"})
    assert listed.returncode == 0, listed.stderr
    assert "pad-reference" in listed.stdout and "pad.loss_ratio = 0.5" in listed.stdout
