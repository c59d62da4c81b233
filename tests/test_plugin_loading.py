"""Broken plugins fail clearly and alone (issue 15).

A plugin whose hook astkit would call wrongly or never (an argument the spec
does not pass, a misspelt hook name, a hook function without
``@astkit.hookimpl``, a wrapper that does not ``yield``) is refused in one
line naming the plugin and the hook: at once when it is added, and as a
failed plugin, next to the working ones, when it is installed.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap
import tomllib
import types
from pathlib import Path

import pytest

from astkit import hookimpl
from astkit.errors import PluginError
from astkit.plugins import PluginInfo, PluginSet, check_plugin

ROOT = Path(__file__).resolve().parents[1]


class MisnamedArgument:
    astkit_plugin_name = "misnamed-argument"

    @hookimpl
    def astkit_on_iteration_end(self, metric):
        pass


class MisspeltHook:
    astkit_plugin_name = "misspelt-hook"

    @hookimpl
    def astkit_on_iteration_ends(self, metrics):
        pass


class WrapperWithoutYield:
    astkit_plugin_name = "no-yield"

    @hookimpl(wrapper=True)
    def astkit_expert_loss(self, batch):
        return None


class WrapperAndHookwrapper:
    astkit_plugin_name = "two-wrappers"

    @hookimpl(wrapper=True, hookwrapper=True)
    def astkit_expert_loss(self, batch):
        yield


def module(name: str, source: str) -> types.ModuleType:
    """A plugin module built from ``source``, as an installed one would be."""
    plugin = types.ModuleType(name)
    exec(textwrap.dedent(source), plugin.__dict__)
    return plugin


UNMARKED = module("unmarked_hook", """
    import astkit

    def astkit_inner_loss_weight(start_epoch):
        return 2.0
""")
MISSPELT_UNMARKED = module("misspelt_unmarked", """
    def astkit_expert_los(batch):
        return None
""")


@pytest.mark.parametrize("plugin, fragments", [
    (MisnamedArgument(), ["plugin 'misnamed-argument'", "astkit_on_iteration_end", "argument 'metric'",
                          "did you mean 'metrics'?", "take only the hook's arguments: ", "metrics"]),
    (MisspeltHook(), ["plugin 'misspelt-hook'", "astkit_on_iteration_ends is marked @astkit.hookimpl but is no "
                      "astkit hook", "did you mean astkit_on_iteration_end?"]),
    (UNMARKED, ["plugin 'unmarked_hook'", "astkit_inner_loss_weight", "decorate it with @astkit.hookimpl"]),
    (MISSPELT_UNMARKED, ["plugin 'misspelt_unmarked'", "astkit_expert_los is no astkit hook",
                         "did you mean astkit_expert_loss?"]),
    (WrapperWithoutYield(), ["plugin 'no-yield'", "astkit_expert_loss", "no generator function"]),
    (WrapperAndHookwrapper(), ["plugin 'two-wrappers'", "astkit_expert_loss", "both wrapper=True and hookwrapper"]),
])
def test_a_broken_plugin_object_is_refused_at_once_in_one_line(plugin, fragments):
    found = PluginSet.discover()
    with pytest.raises(PluginError) as refused:
        found.add(plugin)
    message = str(refused.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    assert not set(found.available) - set(PluginSet.discover().available)  # nothing was added


def test_the_engine_refuses_a_broken_plugin_object_before_any_work(tmp_path):
    from astkit import Engine, RunConfig

    with pytest.raises(PluginError, match="'misnamed-argument': astkit_on_iteration_end takes argument 'metric'"):
        Engine(RunConfig(out=str(tmp_path / "run")), plugins=[MisnamedArgument()])
    assert not (tmp_path / "run").exists()


def test_an_argument_with_a_default_and_several_unknown_arguments_are_named():
    plugin = module("two_typos", """
        import astkit

        @astkit.hookimpl
        def astkit_on_iteration_end(metric, cfg=None):
            pass
    """)
    with pytest.raises(PluginError, match="takes arguments 'metric', 'cfg', which the hook does not pass "
                                          r"\(did you mean 'metrics' for 'metric', 'config' for 'cfg'\?\)"):
        check_plugin("two-typos", plugin)


class Correct:
    """Wrappers, trylast, subsets of the arguments, options and a plain name: all fine."""

    astkit_plugin_name = "correct"
    astkit_notes = "a string attribute named astkit_* is not a hook"

    @hookimpl(wrapper=True)
    def astkit_expert_loss(self, batch):
        return (yield)

    @hookimpl(hookwrapper=True)
    def astkit_matching_schedule(self):
        yield

    @hookimpl(trylast=True)
    def astkit_inner_loss_weight(self, start_epoch, config):
        return 1.0

    @hookimpl(tryfirst=True)
    def astkit_on_iteration_end(self, metrics):
        pass

    @hookimpl
    def astkit_plugin_options(self):
        return {}

    @staticmethod
    @hookimpl
    def astkit_register_models(register):
        pass

    def helper(self, metric):  # not a hook: any name and arguments
        return metric


def test_a_correct_plugin_loads_and_lists_only_its_real_hooks():
    found = PluginSet.discover()
    name = found.add(Correct())
    found.manager([name])
    assert found.available[name].hooks == [
        "astkit_expert_loss", "astkit_inner_loss_weight", "astkit_matching_schedule", "astkit_on_iteration_end",
        "astkit_plugin_options", "astkit_register_models"]
    check_plugin("correct", Correct)  # the class itself, unbound methods and all


def test_hooks_lists_neither_unmarked_nor_unknown_functions():
    both = module("both", """
        import astkit

        @astkit.hookimpl
        def astkit_inner_loss_weight(start_epoch):
            return 1.0

        def astkit_expert_loss(batch):
            return None

        @astkit.hookimpl
        def astkit_expert_los(batch):
            return None
    """)
    assert PluginInfo("both", both).hooks == ["astkit_inner_loss_weight"]


def shipped_entry_points() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["astkit"]


def test_every_plugin_astkit_ships_passes():
    import importlib

    from astkit import _defaults

    check_plugin("astkit.defaults", _defaults)
    for name, target in shipped_entry_points().items():
        check_plugin(name, importlib.import_module(target))
    found = PluginSet.discover()
    assert set(shipped_entry_points()) <= set(found.available)
    assert not [f for f in found.failed if f.name in shipped_entry_points()]


# ------------------------------------------------ an installed broken plugin
BROKEN_MODULE = "broken_astkit_hooks"
REASON = "astkit_on_iteration_end takes argument 'metric', which the hook does not pass (did you mean 'metrics'?)"


@pytest.fixture
def installed_broken(tmp_path, monkeypatch) -> Path:
    """A real installed distribution whose plugin misnames an argument, on ``sys.path``."""
    site = tmp_path / "site"
    dist = site / "broken_astkit_hooks-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-astkit-hooks\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[astkit]\nbroken = {BROKEN_MODULE}\n")
    (site / f"{BROKEN_MODULE}.py").write_text(textwrap.dedent('''
        """Listens to every iteration, with a typo."""
        import astkit


        @astkit.hookimpl
        def astkit_on_iteration_end(metric):
            print(metric)
    '''))
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop(BROKEN_MODULE, None)


def test_an_installed_broken_plugin_is_failed_and_the_others_work(installed_broken):
    assert "broken" in [ep.name for ep in importlib.metadata.entry_points(group="astkit")]
    found = PluginSet.discover()
    assert [f.name for f in found.failed] == ["broken"]
    failed = found.failed[0]
    assert failed.entry_point == BROKEN_MODULE
    assert REASON in failed.error and "plugin 'broken'" in failed.error and "\n" not in failed.error
    assert "broken" not in found.available
    assert {"smooth-experts", "representative-init"} <= set(found.available)
    found.manager(found.resolve(["ast"]))  # the others still combine
    found.catalog()
    with pytest.raises(PluginError, match=r"unknown plugin 'broken' \(it failed to load from "
                                          rf"{BROKEN_MODULE}: plugin 'broken': astkit_on_iteration_end"):
        found.resolve(["broken"])


def astkit_cli(*args: str, site: Path, cwd: Path) -> subprocess.CompletedProcess:
    path = os.pathsep.join(x for x in (str(site), os.environ.get("PYTHONPATH", "")) if x)
    env = {**os.environ, "PYTHONPATH": path, "PYTHONWARNINGS": "ignore", "COLUMNS": "400"}
    return subprocess.run([sys.executable, "-m", "astkit", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=env)


def test_the_cli_lists_the_broken_plugin_and_refuses_it_in_one_line(installed_broken, tmp_path):
    listed = astkit_cli("plugins", site=installed_broken, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "Traceback" not in listed.stderr
    assert "failed to load" in listed.stdout and "broken" in listed.stdout
    assert " ".join(REASON.split()) in " ".join(listed.stdout.split()), listed.stdout
    assert "smooth-experts" in listed.stdout

    refused = astkit_cli("run", "--plugins", "broken", "--out", "run", site=installed_broken, cwd=tmp_path)
    assert refused.returncode == 2, refused.stdout
    assert "Traceback" not in refused.stderr, refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and refused.stderr.strip() == errors[0], refused.stderr
    assert "unknown plugin 'broken' (it failed to load from" in errors[0] and REASON in errors[0]
    assert not (tmp_path / "run").exists()
