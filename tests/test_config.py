"""Typed configs: TOML files, --set overrides, plugin options, validation."""

import pytest

from astkit.config import RunConfig, parse_value
from astkit.errors import UserError


def test_toml_round_trip(tmp_path):
    config = RunConfig.load(overrides=["distill.ipc=3", "plugins=ast", "evaluate.models=convnet,alexnet",
                                       "smooth-experts.mu=2.5", "experts.lr_decay_epoch=7"])
    path = tmp_path / "c.toml"
    path.write_text(config.to_toml())
    again = RunConfig.load(path)
    assert again == config
    assert again.distill.ipc == 3 and again.plugins == ["ast"]
    assert again.evaluate.models == ["convnet", "alexnet"]
    assert again.plugin("smooth-experts") == {"mu": 2.5}


def test_overrides_apply_after_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("seed = 4\n[distill]\nipc = 5\nlr_img = 100\n")
    config = RunConfig.load(path, ["distill.ipc=7"])
    assert (config.seed, config.distill.ipc, config.distill.lr_img) == (4, 7, 100.0)
    assert isinstance(config.distill.lr_img, float)


@pytest.mark.parametrize(
    "override, message",
    [
        ("distill.ipcc=3", "unknown config key 'distill.ipcc'"),
        ("distill.ipc=abc", "expects an integer"),
        ("distill.ipc=2.5", "expects an integer"),
        ("distill.learn_lr=maybe", "expects true or false"),
        ("noequals", "not of the form key=value"),
        ("a.b.c=1", "unknown config key"),
    ],
)
def test_bad_overrides_are_one_line_errors(override, message):
    with pytest.raises(UserError, match=message) as info:
        RunConfig.load(overrides=[override])
    assert "\n" not in str(info.value)


def test_bad_toml_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[distill\nipc = ")
    with pytest.raises(UserError, match="not valid TOML"):
        RunConfig.load(path)
    with pytest.raises(UserError, match="does not exist"):
        RunConfig.load(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    "override, message",
    [
        ("distill.ipc=0", "ipc must be >= 1"),
        ("distill.lr_img=-1", "lr_img must be > 0"),
        ("experts.optimizer=rmsprop", "optimizer must be"),
        ("augment.mode=double", "augment.mode"),
    ],
)
def test_validation_ranges(override, message):
    config = RunConfig.load(overrides=[override])
    with pytest.raises(UserError, match=message):
        config.validate()


def test_plugin_options_defaults_types_and_unknowns():
    declared = {"p": {"rho": 0.1, "variant": "paper", "k": None, "on": True}}
    config = RunConfig.load(overrides=["p.rho=1", "p.on=false"])
    config.resolve_options(declared)
    assert config.plugin("p") == {"rho": 1.0, "variant": "paper", "k": None, "on": False}
    assert isinstance(config.plugin("p")["rho"], float)
    with pytest.raises(UserError, match="unknown option p.nope"):
        RunConfig.load(overrides=["p.nope=1"]).resolve_options(declared)
    with pytest.raises(UserError, match="unknown config section 'q'"):
        RunConfig.load(overrides=["q.x=1"]).resolve_options(declared)


def test_parse_value():
    assert parse_value("3") == 3 and parse_value("1e-5") == 1e-5 and parse_value("true") is True
    assert parse_value("convnet") == "convnet" and parse_value("a,b") == ["a", "b"]
    assert parse_value("none") is None and parse_value("[1, 2]") == [1, 2]


def test_experts_must_cover_the_last_start_plus_expert_epochs():
    RunConfig.load(overrides=["experts.epochs=11", "distill.max_start_epoch=10"]).check_expert_length()
    with pytest.raises(UserError, match="exceeds experts.epochs"):
        RunConfig.load(overrides=["experts.epochs=10", "distill.max_start_epoch=10"]).check_expert_length()
