"""Finding, selecting and combining astkit plugins.

Plugins are discovered through the ``astkit`` entry-point group, exactly as
for a third-party package (astkit's own AST techniques included)::

    [project.entry-points.astkit]
    my-technique = "my_package.my_module"

The entry-point name is the plugin's name. Loading every installed plugin is
cheap and safe: one that fails to import, or that :func:`check_plugin`
refuses (a hook astkit would call wrongly or never), is recorded with the
reason and the others keep working. Which plugins *act* on a run is the user's choice
(``plugins = ["ast"]``, ``--plugins a,b``, ``-p no:NAME``); the MTT baseline
in :mod:`astkit._defaults` is always registered last.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import inspect
from dataclasses import dataclass, field
from typing import Any, Iterable

import pluggy

from astkit import _defaults, hookspecs
from astkit.errors import AstkitError, PluginError

ENTRY_POINT_GROUP = "astkit"
DEFAULTS_NAME = "astkit.defaults"


@dataclass
class PluginInfo:
    """An installed plugin that loaded."""

    name: str
    plugin: Any
    entry_point: str = ""
    distribution: str = ""
    version: str = ""

    @property
    def hooks(self) -> list[str]:
        """The hooks the plugin implements: marked ``@astkit.hookimpl`` and named after a spec."""
        specs = hook_specs()
        return sorted({hook for hook, _ in _hookimpls(self.plugin) if hook in specs})


@dataclass
class FailedPlugin:
    """An installed plugin that could not be loaded."""

    name: str
    entry_point: str
    error: str


@dataclass
class Preset:
    """A name for a list of plugins, with the config keys and plugin options it sets.

    ``config`` holds sections of config keys (``{"experts": {"lr": 0.003}}``,
    or a top-level key such as ``{"seed": 1}``); ``options`` one table per
    plugin namespace (``{"balanced-inner-loss": {"base": 5}}``). Their values
    sit between astkit's defaults and the user's: a key the user sets (a
    config file, ``--set``, ``RunConfig.set``) wins.
    """

    name: str
    plugins: list[str]
    description: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def settings(self) -> dict[str, Any]:
        """``{dotted key: value}``: every config key and plugin option the preset sets."""
        out: dict[str, Any] = {}
        for head, value in self.config.items():
            if isinstance(value, dict):
                out.update({f"{head}.{key}": sub for key, sub in value.items()})
            else:
                out[head] = value
        for namespace, table in self.options.items():
            if not isinstance(table, dict):
                raise PluginError(f"preset {self.name!r}: options[{namespace!r}] must be a table of the plugin's keys")
            out.update({f"{namespace}.{key}": sub for key, sub in table.items()})
        return out


@dataclass
class PluginSet:
    """Every installed plugin, the presets they declare, and load failures."""

    available: dict[str, PluginInfo] = field(default_factory=dict)
    failed: list[FailedPlugin] = field(default_factory=list)

    # ------------------------------------------------------------ discovery
    @classmethod
    def discover(cls, extra: Iterable[Any] = ()) -> "PluginSet":
        """Load every ``astkit`` entry point, plus ``extra`` plugin objects."""
        found = cls()
        for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            if ep.name in found.available:
                continue  # the same distribution seen twice on sys.path
            try:
                plugin = ep.load()
                check_plugin(ep.name, plugin)
            except Exception as exc:  # a broken plugin must not break the others
                error = str(exc) if isinstance(exc, PluginError) else f"{type(exc).__name__}: {exc}"
                found.failed.append(FailedPlugin(ep.name, ep.value, " ".join(error.split())))
                continue
            dist = ep.dist
            found.available[ep.name] = PluginInfo(
                ep.name, plugin, ep.value, dist.name if dist else "", dist.version if dist else ""
            )
        for plugin in extra:
            found.add(plugin)
        return found

    def copy(self) -> "PluginSet":
        """A set with the same plugins that can be added to without changing this one."""
        return PluginSet(dict(self.available), list(self.failed))

    def add(self, plugin: Any, name: str | None = None) -> str:
        """Make a plugin object available under ``name`` (default: its own).

        A plugin :func:`check_plugin` refuses raises its :class:`PluginError`.
        """
        name = name or getattr(plugin, "astkit_plugin_name", None) or getattr(plugin, "__name__", None)
        name = name or type(plugin).__name__
        check_plugin(name, plugin)
        if name in self.available and self.available[name].plugin is not plugin:
            raise PluginError(f"a plugin named {name!r} is already installed; give yours another name")
        module = getattr(plugin, "__module__", None) or getattr(plugin, "__name__", "")
        self.available[name] = PluginInfo(name, plugin, module, "", str(getattr(plugin, "__version__", "")))
        return name

    # -------------------------------------------------------------- catalog
    def catalog(self) -> pluggy.PluginManager:
        """A manager holding every installed plugin, for registration hooks."""
        pm = _new_manager()
        for info in self.available.values():
            pm.register(info.plugin, name=info.name)
        return pm

    def presets(self) -> dict[str, Preset]:
        """Every preset declared by an installed plugin."""
        presets: dict[str, Preset] = {}

        def register(name: str, plugins: list[str], description: str = "", *,
                     config: dict[str, Any] | None = None, options: dict[str, dict[str, Any]] | None = None) -> None:
            if name in presets:
                raise PluginError(f"preset {name!r} is registered twice")
            if name in self.available:
                raise PluginError(f"preset {name!r} has the name of an installed plugin; rename it")
            presets[name] = Preset(name, list(plugins), description, dict(config or {}),
                                   {ns: dict(table) for ns, table in (options or {}).items()})

        self.catalog().hook.astkit_register_presets(register=register)
        return presets

    # ------------------------------------------------------------ selection
    def resolve(self, selection: Iterable[str], disable: Iterable[str] = ()) -> list[str]:
        """Expand presets and ``no:NAME`` items into the enabled plugin names."""
        presets = self.presets()
        enabled: list[str] = []
        blocked = {self._check_name(n.strip(), presets, allow_preset=False) for n in disable if n.strip()}
        for raw in selection:
            item = raw.strip()
            if not item:
                continue
            if item.startswith("no:"):
                blocked.add(self._check_name(item[3:], presets, allow_preset=False))
                continue
            self._check_name(item, presets, allow_preset=True)
            names = presets[item].plugins if item in presets else [item]
            for name in names:
                if name not in self.available:
                    raise PluginError(
                        f"preset {item!r} needs plugin {name!r}, which is not installed{self._failure_note(name)}"
                    )
                if name not in enabled:
                    enabled.append(name)
        return [n for n in enabled if n not in blocked]

    def preset_settings(self, selection: Iterable[str]) -> dict[str, tuple[Any, str]]:
        """``{dotted key: (value, preset)}`` for the presets named in ``selection``.

        Two presets that set one key to different values are refused, and so
        is a key that names no config key and no declared plugin option.
        """
        from astkit.config import RunConfig  # astkit.config does not import this module

        presets = self.presets()
        names = [item.strip() for item in selection if item.strip() in presets]
        if not names:
            return {}
        declared = declared_options(self.catalog())
        out: dict[str, tuple[Any, str]] = {}
        for name in dict.fromkeys(names):
            for key, value in presets[name].settings().items():
                _check_preset_key(name, key, value, declared, RunConfig())
                if key in out and out[key][0] != value:
                    other, theirs = out[key][1], out[key][0]
                    raise PluginError(
                        f"presets {other!r} and {name!r} both set {key} ({theirs!r} and {value!r}); "
                        "select one preset per run (`astkit plugins` lists what each sets)"
                    )
                out.setdefault(key, (value, name))
        return out

    def _check_name(self, name: str, presets: dict[str, Preset], allow_preset: bool) -> str:
        if name in self.available or (allow_preset and name in presets):
            return name
        if name in presets:
            raise PluginError(f"{name!r} is a preset; disable its plugins one by one ({', '.join(presets[name].plugins)})")
        known = sorted(self.available) + (sorted(presets) if allow_preset else [])
        raise PluginError(
            f"unknown plugin {name!r}{self._failure_note(name)}; installed: {', '.join(known) or 'none'}"
            " (see `astkit plugins`)"
        )

    def _failure_note(self, name: str) -> str:
        for failed in self.failed:
            if failed.name == name:
                return f" (it failed to load from {failed.entry_point}: {failed.error})"
        return ""

    # ------------------------------------------------------------- managers
    def manager(self, enabled: Iterable[str]) -> pluggy.PluginManager:
        """A manager with the MTT baseline and the ``enabled`` plugins.

        Refuses two enabled plugins answering the same first-result hook.
        """
        pm = _new_manager()
        pm.register(_defaults, name=DEFAULTS_NAME)
        for name in enabled:
            pm.register(self.available[name].plugin, name=name)
        check_conflicts(pm)
        return pm

    def versions(self, enabled: Iterable[str]) -> dict[str, str]:
        """``{plugin: "distribution version"}`` for metadata."""
        out = {}
        for name in enabled:
            info = self.available[name]
            out[name] = " ".join(x for x in (info.distribution, info.version) if x) or info.entry_point
        return out


def _check_preset_key(preset: str, key: str, value: Any, declared: dict[str, dict[str, Any]], probe: Any) -> None:
    """``key`` is a config key (with a valid value) or a declared plugin option; else a one-line error."""
    from astkit.config import SECTIONS

    head, _, rest = key.partition(".")
    if head in ("plugins", "disable", "options") and not rest:
        raise PluginError(f"preset {preset!r} sets {key!r}; a preset lists its plugins itself, "
                          "and sets plugin options in its options table")
    if head in SECTIONS or not rest:
        try:
            probe.set(key, value)
        except AstkitError as exc:
            raise PluginError(f"preset {preset!r} sets {key!r}, which astkit refuses: {exc}") from None
        return
    if head not in declared or rest not in declared[head] or "." in rest:
        raise PluginError(
            f"preset {preset!r} sets {key!r}, which is no config key and no declared plugin option "
            "(see `astkit plugins` and docs/configuration.md); fix the preset"
        )


def apply_presets(config: Any, plugin_set: "PluginSet", *, over_defaults_only: bool = False) -> dict[str, str]:
    """Give ``config`` the config keys and plugin options of the presets in ``config.plugins``.

    A key in ``config.explicit`` (set by a config file, ``--set`` or
    :meth:`RunConfig.set`) keeps its value. With ``over_defaults_only`` (the
    Python API, where a field may have been assigned directly), a key is also
    kept unless it still holds astkit's default (a plugin option: unset or
    the plugin's default). Returns ``{key: preset}`` for the keys applied.
    """
    settings = plugin_set.preset_settings(config.plugins)
    if not settings:
        return {}
    declared = declared_options(plugin_set.catalog()) if over_defaults_only else {}
    applied = {}
    for key, (value, preset) in settings.items():
        if key in config.explicit:
            continue
        if over_defaults_only:
            head, _, rest = key.partition(".")
            if head in declared and rest in declared[head]:
                current = config.options.get(head, {})
                if rest in current and current[rest] != declared[head][rest]:
                    continue
            elif not config.is_default(key):
                continue
        config.set(key, value, explicit=False)
        applied[key] = preset
    return applied


def _new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("astkit")
    pm.add_hookspecs(hookspecs)
    return pm


def hook_specs() -> dict[str, list[str]]:
    """``{hook name: argument names}`` of every spec in :mod:`astkit.hookspecs`, read at each call."""
    return {name: list(inspect.signature(spec).parameters) for name, spec in vars(hookspecs).items()
            if name.startswith("astkit_") and callable(spec) and hasattr(spec, "astkit_spec")}


def _hookimpls(plugin: Any) -> list[tuple[str, pluggy.HookImpl]]:
    """``(hook name, implementation)`` for each ``@astkit.hookimpl`` of ``plugin``, found as pluggy finds them."""
    pm = pluggy.PluginManager("astkit")  # no specs: nothing is verified, every marked function is kept
    pm.register(plugin, name="plugin")
    return [(caller.name, impl) for caller in pm.get_hookcallers(plugin) or [] for impl in caller.get_hookimpls()]


def _guess(name: str, choices: Iterable[str]) -> str:
    """``"did you mean X?"`` for the choice closest to ``name``, or ``""``."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f"did you mean {close[0]}?" if close else ""


def check_plugin(name: str, plugin: Any) -> None:
    """Refuse, in one line naming the plugin and the hook, a plugin astkit would call wrongly or never.

    Refused: a hook implementation with an argument its spec does not pass; a
    function marked ``@astkit.hookimpl``, or a callable named ``astkit_*``,
    whose name is no hook; a function named after a hook but not marked
    ``@astkit.hookimpl`` (pluggy would ignore it); a wrapper that is not a
    generator function, or that is both ``wrapper`` and ``hookwrapper``.
    """
    specs = hook_specs()
    listed = "see docs/hooks.md for the hooks"
    for hook, impl in _hookimpls(plugin):
        if hook not in specs:
            raise PluginError(f"plugin {name!r}: {hook} is marked @astkit.hookimpl but is no astkit hook"
                              f" ({_guess(hook, specs) or listed}); rename it, or remove the marker")
        unknown = [arg for arg in [*impl.argnames, *impl.kwargnames] if arg not in specs[hook]]
        if unknown:
            guesses = [f"{close[0]!r} for {arg!r}" if len(unknown) > 1 else repr(close[0])
                       for arg in unknown if (close := difflib.get_close_matches(arg, specs[hook], n=1))]
            hint = f" (did you mean {', '.join(guesses)}?)" if guesses else ""
            raise PluginError(
                f"plugin {name!r}: {hook} takes argument{'s' * (len(unknown) > 1)} "
                f"{', '.join(map(repr, unknown))}, which the hook does not pass{hint}; "
                f"take only the hook's arguments: {', '.join(specs[hook]) or 'none'}"
            )
        if impl.wrapper and impl.hookwrapper:
            raise PluginError(f"plugin {name!r}: {hook} is marked both wrapper=True and hookwrapper=True; "
                              "keep wrapper=True")
        if (impl.wrapper or impl.hookwrapper) and not inspect.isgeneratorfunction(impl.function):
            raise PluginError(f"plugin {name!r}: {hook} is marked as a wrapper but is no generator function; "
                              "a wrapper gets the answer of the rest of the chain with `result = yield`")
    marker = pluggy.PluginManager("astkit")
    for attr in dir(plugin):
        if not attr.startswith("astkit_") or marker.parse_hookimpl_opts(plugin, attr) is not None:
            continue
        if not callable(getattr(plugin, attr, None)):
            continue  # astkit_plugin_name and other plain values
        if attr not in specs:
            raise PluginError(f"plugin {name!r}: {attr} is no astkit hook ({_guess(attr, specs) or listed}); "
                              "rename it (names starting with astkit_ are kept for hooks)")
        raise PluginError(f"plugin {name!r}: {attr} is named after a hook but astkit would never call it; "
                          "decorate it with @astkit.hookimpl")
    try:
        _new_manager().register(plugin, name=name)
    except pluggy.PluginValidationError as exc:  # anything pluggy refuses that the checks above do not name
        reason = ": ".join(line.strip() for line in str(exc).splitlines())
        raise PluginError(f"plugin {name!r} is refused by pluggy: {reason}; fix the hook it names") from None


def check_conflicts(pm: pluggy.PluginManager) -> None:
    """Raise if two non-default plugins answer the same first-result hook."""
    for hook_name in hookspecs.FIRST_RESULT_HOOKS:
        answering = [
            impl.plugin_name
            for impl in getattr(pm.hook, hook_name).get_hookimpls()
            if impl.plugin_name != DEFAULTS_NAME and not (impl.wrapper or impl.hookwrapper)
        ]
        if len(answering) > 1:
            a, b = answering[-1], answering[-2]
            raise PluginError(
                f"plugins {a!r} and {b!r} both answer {hook_name}; enable only one (e.g. --disable {b})"
            )


def declared_options(pm: pluggy.PluginManager) -> dict[str, dict[str, Any]]:
    """Merge the ``astkit_plugin_options`` answers of ``pm``'s plugins."""
    merged: dict[str, dict[str, Any]] = {}
    for answer in pm.hook.astkit_plugin_options():
        for namespace, defaults in (answer or {}).items():
            if namespace in merged:
                raise PluginError(f"option namespace {namespace!r} is declared by two plugins")
            merged[namespace] = dict(defaults)
    return merged


def collect_registrations(pm: pluggy.PluginManager, kind: str, builtin: dict[str, Any]) -> dict[str, Any]:
    """Call ``astkit_register_<kind>s`` and return ``builtin`` plus the additions."""
    merged = dict(builtin)

    def register(name: str, factory: Any) -> None:
        if name in merged:
            raise PluginError(f"{kind} {name!r} is registered twice; rename one")
        merged[name] = factory

    getattr(pm.hook, f"astkit_register_{kind}s")(register=register)
    return merged


class GuardedHooks:
    """``pm.hook``, except that an exception raised inside a plugin is turned
    into a one-line :class:`PluginError` naming the plugin and its entry point.

    Errors astkit raises on purpose (``AstkitError``) pass through unchanged,
    and so do errors in astkit's own baseline implementations (bugs).
    """

    def __init__(self, pm: pluggy.PluginManager, plugins: PluginSet):
        self._pm = pm
        self._plugins = plugins

    def __getattr__(self, hook_name: str):
        caller = getattr(self._pm.hook, hook_name)

        def call(**kwargs):
            try:
                return caller(**kwargs)
            except AstkitError:
                raise
            except Exception as exc:
                culprit = self._culprit(hook_name, exc)
                if culprit is None:
                    raise
                info = self._plugins.available.get(culprit)
                where = f" ({info.entry_point})" if info and info.entry_point else ""
                raise PluginError(
                    f"plugin {culprit!r}{where} failed in {hook_name}: {type(exc).__name__}: {exc}; "
                    f"disable it with --disable {culprit}"
                ) from exc

        return call

    def _culprit(self, hook_name: str, exc: BaseException) -> str | None:
        codes = {}
        for impl in getattr(self._pm.hook, hook_name).get_hookimpls():
            function = getattr(impl.function, "__func__", impl.function)
            code = getattr(function, "__code__", None)
            if code is not None:
                codes[code] = impl.plugin_name
        culprit = None
        tb = exc.__traceback__
        while tb is not None:
            culprit = codes.get(tb.tb_frame.f_code, culprit)
            tb = tb.tb_next
        return None if culprit == DEFAULTS_NAME else culprit
