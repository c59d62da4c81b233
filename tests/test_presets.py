"""Presets that carry configuration: ``ast``, ``ast-reference`` and ``mtt``.

Each preset resolves to its documented plugins, config keys and plugin
options (Python API and command line); the user's keys win; conflicting
presets and unknown keys are refused in one line; and ``ast-reference``'s
expert training, balanced weight and student momentum equal plain-PyTorch
transcriptions of the authors' code.
"""

from __future__ import annotations

import math
import subprocess
import tomllib

import pytest
import torch
import torch.nn.functional as F

from astkit import Engine, hookimpl
from astkit.config import RunConfig
from astkit.data.dataset import Dataset
from astkit.errors import PluginError
from astkit.evaluate import train_on_synthetic
from astkit.experts import decay_epoch, expert_seed, train_expert
from astkit.functional import FlatModel
from astkit.matching import unroll
from astkit.plugins import PluginSet, apply_presets
from astkit_plugins import balanced_inner_loss

from test_cli import assert_one_error_line, astkit, ok

AST = ["smooth-experts", "representative-init", "balanced-inner-loss", "intermediate-matching", "weight-perturbation"]

#: what each preset must give: (plugins, config keys, plugin options)
EXPECTED = {
    "ast": (AST, {
        "experts.optimizer": "sgd", "experts.lr": 0.003, "experts.momentum": 0.9, "experts.weight_decay": 1e-3,
        "experts.lr_decay": 0.5, "experts.lr_decay_fraction": 0.5, "experts.lr_decay_epoch": None,
        "experts.reset_optimizer_on_decay": False, "distill.student_momentum": 0.0,
        "evaluate.weight_decay": 5e-4, "evaluate.lr_decay": 0.1, "evaluate.momentum_after_decay": None,
        "evaluate.report_max": False,
    }, {
        "smooth-experts": {"variant": "paper"}, "balanced-inner-loss": {"variant": "paper", "base": 5.0},
        "weight-perturbation": {"variant": "paper"}, "representative-init": {"variant": "paper"},
        "intermediate-matching": {"beta": "equal"},
    }),
    "ast-reference": (AST, {
        "experts.optimizer": "sgd", "experts.lr": 0.003, "experts.momentum": 0.9, "experts.weight_decay": 1e-3,
        "experts.lr_decay": 0.6, "experts.lr_decay_epoch": None, "experts.lr_decay_fraction": None,
        "experts.reset_optimizer_on_decay": True, "distill.student_momentum": 0.9,
        "evaluate.weight_decay": 1e-3, "evaluate.lr_decay": 0.5, "evaluate.momentum_after_decay": 0.8,
        "evaluate.momentum": 0.9, "evaluate.report_max": False,
    }, {
        "smooth-experts": {"variant": "reference"}, "balanced-inner-loss": {"variant": "reference"},
        "weight-perturbation": {"variant": "reference"}, "representative-init": {"variant": "reference"},
        "intermediate-matching": {"beta": "equal"},
    }),
    "mtt": ([], {
        "experts.optimizer": "sgd", "experts.lr": 0.01, "experts.momentum": 0.0, "experts.weight_decay": 0.0,
        "experts.lr_decay": 1.0, "distill.student_momentum": 0.0, "evaluate.weight_decay": 5e-4,
    }, {}),
}


@pytest.fixture(scope="module")
def found() -> PluginSet:
    return PluginSet.discover()


def check(config: RunConfig, keys: dict, options: dict) -> None:
    for key, value in keys.items():
        assert config.get(key) == value, key
    for namespace, table in options.items():
        for key, value in table.items():
            assert config.options[namespace][key] == value, f"{namespace}.{key}"


# ---------------------------------------------------------------- resolving
@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_preset_resolves_to_its_plugins_config_and_options(name, found):
    plugins, keys, options = EXPECTED[name]
    engine = Engine(RunConfig.load(overrides=[f"plugins={name}"]), plugin_set=found)
    assert engine.enabled == plugins
    check(engine.config, keys, options)
    assert found.presets()[name].description  # says what it is
    written = tomllib.loads(engine.config.to_toml())  # what config.toml records
    assert written["experts"]["lr"] == keys["experts.lr"]


def test_the_ast_variants_are_the_papers_values(found):
    """`ast` keeps the plugins' paper variants: ramp 0.5 over 5 epochs, mu 1, K 1, vartheta 8, rho 0.1."""
    from astkit_plugins import smooth_experts, weight_perturbation

    engine = Engine(RunConfig(plugins=["ast"]), plugin_set=found)
    s = smooth_experts.settings(engine.config)
    assert (s["ramp_start"], s["ramp_epochs"], s["mu"], s["K"]) == (0.5, 5, 1.0, 1.0)
    assert weight_perturbation.DEFAULT_RHO["paper"] == 0.1
    nu = engine.hooks.astkit_inner_loss_weight(start_epoch=9, max_start_epoch=10, expert_index=0, iteration=0, config=engine.config)
    assert nu == pytest.approx(math.log(9 - 5 + 8, 5))


def test_the_users_keys_win_over_the_preset(found):
    config = RunConfig.load(overrides=["plugins=ast-reference", "experts.lr=0.01", "experts.momentum=0.0",
                                       "balanced-inner-loss.base=2.0"])
    engine = Engine(config, plugin_set=found)
    assert engine.config.experts.lr == 0.01 and engine.config.experts.momentum == 0.0  # set, even to the default
    assert engine.config.options["balanced-inner-loss"]["base"] == 2.0
    assert engine.config.experts.weight_decay == 1e-3 and engine.config.distill.student_momentum == 0.9
    # Python API: a field assigned directly keeps its value unless it still holds astkit's default
    direct = RunConfig(plugins=["ast"])
    direct.experts.lr = 0.05
    assert Engine(direct, plugin_set=found).config.experts.lr == 0.05
    assert config.experts.weight_decay == 0.0, "the caller's config is not changed"


def test_preset_values_are_not_marked_as_set_by_the_user(found):
    config = RunConfig(plugins=["mtt"])
    applied = apply_presets(config, found)
    assert applied["experts.lr"] == "mtt" and "experts.lr" not in config.explicit


def test_the_ast_lr_is_halved_at_half_the_epochs():
    for epochs, after in [(50, 24), (15, 6), (4, 1), (1, 0)]:
        config = RunConfig.load(overrides=["experts.lr_decay=0.5", "experts.lr_decay_fraction=0.5",
                                           f"experts.epochs={epochs}"])
        assert decay_epoch(config) == after  # the first max(1, epochs // 2) epochs run at the full lr
    config = RunConfig.load(overrides=["experts.lr_decay=0.5", "experts.lr_decay_fraction=0.5",
                                       "experts.lr_decay_epoch=3"])
    assert decay_epoch(config) == 3, "an explicit lr_decay_epoch wins"
    assert decay_epoch(RunConfig.load(overrides=["experts.lr_decay=0.6", "experts.epochs=50"])) == 26
    with pytest.raises(Exception, match="lr_decay_fraction"):
        RunConfig.load(overrides=["experts.lr_decay_fraction=1.5"]).validate()


# ---------------------------------------------------------------- refusals
class BadPresets:
    astkit_plugin_name = "bad-presets"

    @staticmethod
    @hookimpl
    def astkit_register_presets(register):
        register("typo", [], "a key that is no config key", config={"experts": {"lrr": 0.1}})
        register("typo-option", [], "an option no plugin declares", options={"smooth-experts": {"muu": 1}})
        register("fast-experts", [], "clashes with mtt", config={"experts": {"lr": 0.1}})


@pytest.fixture
def with_bad_presets(found):
    bad = found.copy()
    bad.add(BadPresets)
    return bad


@pytest.mark.parametrize("selection, fragments", [
    (["ast", "mtt"], ["presets 'ast' and 'mtt'", "experts.lr"]),
    (["ast", "ast-reference"], ["presets 'ast' and 'ast-reference'"]),
    (["mtt", "fast-experts"], ["presets 'mtt' and 'fast-experts'", "experts.lr"]),
    (["typo"], ["preset 'typo'", "experts.lrr"]),
    (["typo-option"], ["preset 'typo-option'", "smooth-experts.muu"]),
])
def test_conflicts_and_unknown_keys_are_refused_naming_both(selection, fragments, with_bad_presets):
    with pytest.raises(PluginError) as info:
        Engine(RunConfig(plugins=selection), plugin_set=with_bad_presets)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize("args, fragments", [
    (["--plugins", "ast,mtt"], ["presets 'ast' and 'mtt'", "experts.lr"]),
    (["--plugins", "typo"], ["preset 'typo'", "experts.lrr"]),
])
def test_cli_refuses_them_in_one_line_with_exit_2(args, fragments, with_bad_presets, monkeypatch, capsys, tmp_path):
    from astkit.cli import main

    monkeypatch.setattr(PluginSet, "discover", classmethod(lambda cls, *a, **k: with_bad_presets.copy()))
    monkeypatch.chdir(tmp_path)
    code = main(["run", *args, "--out", str(tmp_path / "run"), "-q"])
    captured = capsys.readouterr()
    assert code == 2
    assert_one_error_line(subprocess.CompletedProcess(args, code, captured.out, captured.err), *fragments)


# ---------------------------------------------------------------- the CLI
def test_cli_run_records_the_preset_values_and_set_overrides_them(tmp_path):
    tiny = ["--set", "model.width=8", "--set", "experts.num_experts=1", "--set", "experts.epochs=2",
            "--set", "experts.batch_size=512", "--set", "distill.iterations=1", "--set", "distill.syn_steps=2",
            "--set", "distill.ipc=1", "--set", "distill.max_start_epoch=1", "--set", "distill.expert_epochs=1",
            "--set", "evaluate.epochs=1", "--set", "evaluate.num_nets=1"]
    ok(astkit("run", "--plugins", "ast-reference", *tiny, "--set", "experts.lr=0.01", "--out", "ref", "-q",
              cwd=tmp_path))
    written = tomllib.loads((tmp_path / "ref" / "config.toml").read_text())
    assert written["plugins"] == ["ast-reference"]
    assert written["experts"]["lr"] == 0.01  # --set wins
    experts = written["experts"]
    assert (experts["momentum"], experts["weight_decay"], experts["lr_decay"]) == (0.9, 1e-3, 0.6)
    assert experts["reset_optimizer_on_decay"] is True
    assert written["distill"]["student_momentum"] == 0.9
    assert written["evaluate"]["weight_decay"] == 1e-3 and written["evaluate"]["momentum_after_decay"] == 0.8
    assert written["options"]["balanced-inner-loss"]["variant"] == "reference"
    assert written["options"]["smooth-experts"]["variant"] == "reference"


def test_a_config_file_wins_over_the_preset(tmp_path, monkeypatch):
    from astkit.cli import common

    (tmp_path / "my.toml").write_text('plugins = ["ast"]\n[experts]\nmomentum = 0.0\n'
                                      '[options.balanced-inner-loss]\nbase = 10.0\n')
    config = common.build_config(common.StageOptions(config=tmp_path / "my.toml", set=["experts.lr=0.02"]))
    assert config.experts.momentum == 0.0 and config.experts.lr == 0.02
    assert config.options["balanced-inner-loss"]["base"] == 10.0
    assert config.experts.weight_decay == 1e-3 and config.experts.lr_decay_fraction == 0.5
    # a distilled file's recorded config (evaluate's base) sits below the preset
    config = common.build_config(common.StageOptions(plugins=["ast-reference"]),
                                 base={"evaluate": {"weight_decay": 5e-4, "epochs": 7}})
    assert config.evaluate.weight_decay == 1e-3 and config.evaluate.epochs == 7


def test_plugins_command_lists_each_presets_config_and_options():
    result = ok(astkit("plugins", cwd=None, timeout=60))
    text = " ".join(result.stdout.split())
    for fragment in ("ast-reference", "experts.reset_optimizer_on_decay = true", "distill.student_momentum = 0.9",
                     "balanced-inner-loss.base = 5.0", "experts.lr = 0.01", "mtt"):
        assert fragment in text, fragment


# ------------------------------------------ ast-reference = the authors' code
class Flip:
    """A deterministic stand-in for DSA, so the transcription sees the same augmented batch."""

    enabled = True

    def __call__(self, x, generator=None):
        return x.flip(-1) * 0.9 + 0.05


def tiny_dataset() -> Dataset:
    g = torch.Generator().manual_seed(3)
    images = torch.randn(16, 3, 8, 8, generator=g)
    labels = torch.arange(16) % 4
    return Dataset("tiny", images, labels, images[:4], labels[:4], ["a", "b", "c", "d"], (0.5,) * 3, (0.25,) * 3)


def test_ast_reference_expert_training_equals_the_authors_buffer_loop(found):
    """Two batches per epoch over 5 epochs: the clipping multiplier, the
    per-pixel channel-norm penalty x2 on the clean batch, weight decay 1e-3,
    momentum 0.9, lr 0.003, x0.6 after epoch T//2+1 with the optimiser rebuilt."""
    ds = tiny_dataset()
    config = RunConfig.load(overrides=["plugins=ast-reference", "model.width=4", "experts.epochs=5",
                                       "experts.batch_size=8", "experts.num_experts=1"])
    engine = Engine(config, dataset=ds, plugin_set=found)
    trajectory = train_expert(0, ds, engine.model_spec, engine.config, engine.hooks, Flip(), registry=engine.models)

    # the authors' buffer loop, transcribed
    seed = expert_seed(0, 0)
    torch.manual_seed(seed)
    net = engine.model_spec.build(engine.models)
    generator = torch.Generator().manual_seed(seed)
    lr, epochs = 0.003, 5
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=1e-3)
    lambdas = [0.5 + 0.05 * e for e in range(10)]  # 0.50, 0.55, ..., 0.95, then 1
    flat = FlatModel(net)
    snapshots = [flat.initial().clone()]
    for epoch in range(epochs):
        order = torch.randperm(16, generator=generator)
        for start in range(0, 16, 8):
            idx = order[start:start + 8]
            x, y = ds.train_images[idx], ds.train_labels[idx]
            ce = F.cross_entropy(net(Flip()(x)), y) * (lambdas[epoch] if epoch < 10 else 1.0)
            clean = x.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(net(clean).sum(), clean, create_graph=True)
            penalty = ((grad.norm(2, dim=1) - 1) ** 2).mean()
            loss = ce + 2 * penalty
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if epoch == epochs // 2 + 1:
            lr *= 0.6
            optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=1e-3)
        snapshots.append(flat.initial().clone())
    assert not torch.equal(snapshots[0], snapshots[1])
    torch.testing.assert_close(trajectory.snapshots, torch.stack(snapshots), rtol=1e-5, atol=1e-6)


def test_ast_reference_balanced_weight_is_the_codes_base_5(found):
    engine = Engine(RunConfig(plugins=["ast-reference"]), plugin_set=found)
    for max_start in (4, 10, 20):
        middle = max_start // 2
        for start in range(max_start):
            code = (math.log(start - middle + 8) / math.log(5) if start >= middle
                    else 1 / (math.log(middle - start + 8) / math.log(5)))
            nu = engine.hooks.astkit_inner_loss_weight(start_epoch=start, max_start_epoch=max_start, expert_index=0, iteration=0,
                                                       config=engine.config)
            assert nu == pytest.approx(code, rel=1e-12)
            assert balanced_inner_loss.balanced_weight(start, max_start, 8.0, 5.0) == pytest.approx(code)


def test_ast_reference_student_momentum_is_the_codes_heavy_ball_restarted_each_iteration(found):
    engine = Engine(RunConfig(plugins=["ast-reference"]), plugin_set=found)
    momentum = engine.config.distill.student_momentum
    torch.manual_seed(0)
    w0 = torch.randn(12)
    images, labels = torch.randn(6, 3), torch.tensor([0, 1, 2, 3, 0, 1])
    lr = torch.tensor(0.1)

    def forward(theta, x):
        return x @ theta.view(3, 4)

    def code(start):  # b_n = 0.9 b_{n-1} + g_n, b_0 = g_0; theta <- theta - lr b_n
        theta, b = start.clone().requires_grad_(True), None
        for _ in range(3):
            (g,) = torch.autograd.grad(F.cross_entropy(forward(theta, images), labels), theta)
            b = g if b is None else 0.9 * b + g
            theta = (theta - lr * b).detach().requires_grad_(True)
        return theta.detach()

    for iteration in range(2):  # every iteration restarts the velocity
        out = unroll(forward, w0.clone().requires_grad_(True), images, labels, lr, 3, momentum=momentum)[3]
        torch.testing.assert_close(out.detach(), code(w0))
    plain = unroll(forward, w0.clone().requires_grad_(True), images, labels, lr, 3)[3]
    assert not torch.allclose(plain.detach(), code(w0))


def test_evaluation_momentum_after_decay(monkeypatch):
    """evaluate.momentum_after_decay: the optimiser rebuilt at E//2+1 uses it (the AST code's 0.8)."""
    from astkit.augment import build_augmentation
    from astkit.config import EvalConfig

    made = []
    real = torch.optim.SGD

    class Recording(real):
        def __init__(self, params, **kwargs):
            made.append((kwargs["lr"], kwargs["momentum"], kwargs["weight_decay"]))
            super().__init__(params, **kwargs)

    monkeypatch.setattr(torch.optim, "SGD", Recording)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    x, y = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 0, 1])
    for after, expected in [(None, 0.9), (0.8, 0.8)]:
        made.clear()
        config = EvalConfig(epochs=4, lr_decay=0.5, weight_decay=1e-3, momentum_after_decay=after, augment=False)
        train_on_synthetic(model, x, y, 0.01, config, build_augmentation("none", "single"), x, y,
                           generator=torch.Generator().manual_seed(0))
        assert made == [(0.01, 0.9, 1e-3), (0.005, expected, 1e-3)]
