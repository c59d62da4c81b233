"""Plugin discovery, selection, presets, conflicts and broken plugins."""

import sys
import textwrap

import pytest

from astkit import hookimpl
from astkit.errors import PluginError
from astkit.plugins import DEFAULTS_NAME, PluginSet, check_conflicts

BUILTIN = ["balanced-inner-loss", "intermediate-matching", "representative-init", "smooth-experts",
           "weight-perturbation"]


def test_builtin_plugins_come_from_entry_points():
    found = PluginSet.discover()
    for name in BUILTIN:
        info = found.available[name]
        assert info.distribution == "astkit"
        assert info.entry_point.startswith("astkit_plugins.")
        assert info.plugin.__name__ == info.entry_point
    assert found.presets()["ast"].plugins == [
        "smooth-experts", "representative-init", "balanced-inner-loss", "intermediate-matching",
        "weight-perturbation"]


def test_resolve_presets_and_blocking():
    found = PluginSet.discover()
    assert found.resolve(["ast"], ["weight-perturbation"]) == [
        "smooth-experts", "representative-init", "balanced-inner-loss", "intermediate-matching"]
    assert found.resolve(["ast", "no:smooth-experts"]) == [
        "representative-init", "balanced-inner-loss", "intermediate-matching", "weight-perturbation"]
    assert found.resolve([]) == []
    with pytest.raises(PluginError, match="unknown plugin 'nope'.*installed: .*smooth-experts"):
        found.resolve(["nope"])
    with pytest.raises(PluginError, match="is a preset"):
        found.resolve(["ast"], ["ast"])


class InitA:
    astkit_plugin_name = "init-a"

    @hookimpl
    def astkit_init_synthetic(self, ipc):
        return None


class InitB:
    astkit_plugin_name = "init-b"

    @hookimpl
    def astkit_init_synthetic(self, ipc):
        return None


def test_two_answers_to_a_first_result_hook_are_refused_naming_both():
    found = PluginSet.discover()
    a, b = found.add(InitA()), found.add(InitB())
    found.manager([a])  # one is fine
    with pytest.raises(PluginError, match="'init-b' and 'init-a' both answer astkit_init_synthetic"):
        found.manager([a, b])
    with pytest.raises(PluginError, match="representative-init"):
        found.manager(["representative-init", a])


def test_wrappers_do_not_conflict():
    class Wrap:
        astkit_plugin_name = "wrap"

        @hookimpl(wrapper=True)
        def astkit_expert_loss(self):
            return (yield) * 2

    found = PluginSet.discover()
    pm = found.manager(["smooth-experts", found.add(Wrap())])
    check_conflicts(pm)
    assert pm.get_plugin(DEFAULTS_NAME) is not None


def test_broken_plugin_is_reported_by_name_and_others_still_load(tmp_path, monkeypatch):
    dist = tmp_path / "broken_astkit_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-astkit-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[astkit]\nbroken = broken_astkit_module\n")
    (tmp_path / "broken_astkit_module.py").write_text(textwrap.dedent("""
        raise ImportError("needs a library that is not installed")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    found = PluginSet.discover()
    assert [f.name for f in found.failed] == ["broken"]
    assert found.failed[0].entry_point == "broken_astkit_module"
    assert "needs a library" in found.failed[0].error
    assert set(BUILTIN) <= set(found.available)
    with pytest.raises(PluginError, match="unknown plugin 'broken' \\(it failed to load from broken_astkit_module"):
        found.resolve(["broken"])
    sys.modules.pop("broken_astkit_module", None)


def test_a_plugin_raising_inside_a_hook_is_named():
    from astkit.config import RunConfig
    from astkit.plugins import GuardedHooks

    class Faulty:
        astkit_plugin_name = "faulty"

        @hookimpl
        def astkit_inner_loss_weight(self, start_epoch):
            return 1.0 / (start_epoch - start_epoch)

    found = PluginSet.discover()
    pm = found.manager([found.add(Faulty())])
    hooks = GuardedHooks(pm, found)
    kwargs = dict(start_epoch=1, max_start_epoch=4, expert_index=0, iteration=0, config=RunConfig())
    with pytest.raises(PluginError, match="plugin 'faulty' .*failed in astkit_inner_loss_weight: ZeroDivisionError"):
        hooks.astkit_inner_loss_weight(**kwargs)
    with pytest.raises(ZeroDivisionError):  # the raw manager is unchanged
        pm.hook.astkit_inner_loss_weight(**kwargs)
    ok = GuardedHooks(found.manager([]), found)
    assert ok.astkit_inner_loss_weight(**kwargs) == 1.0
