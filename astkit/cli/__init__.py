"""The ``astkit`` command line (Typer).

Commands: ``run`` (all stages), ``experts``, ``distill``, ``evaluate`` (see
:mod:`astkit.cli.stages`); ``plugins``, ``show``, ``datasets``, ``models`` (see
:mod:`astkit.cli.inspection`); plus any command an installed plugin adds with the
``astkit_register_commands`` hook.

Installed plugins are discovered once per command, by the command's
:class:`astkit.cli.common.Session`, and that one ``PluginSet`` serves the
help, plugin commands, the listings and the ``Engine``.

``main()`` is the console script: it returns the exit code (0 ok, 1 failure,
2 user error, 130 interrupted) and prints errors as one ``error: ...`` line.
"""

import sys
import warnings
from typing import Annotated, Any

import typer

from astkit.cli import common

__all__ = ["build_app", "main"]

HELP = """Dataset distillation by trajectory matching (MTT) with AST's techniques as plugins.

Typical use: [bold]astkit run --plugins ast --set distill.ipc=10[/bold]; see [bold]astkit plugins[/bold]
for the installed techniques and presets, and [bold]astkit COMMAND --help[/bold] for each command.
"""


def _version(value: bool) -> None:
    if value:
        from astkit import __version__

        typer.echo(f"astkit {__version__}")
        raise typer.Exit(0)


def plugin_help_text(found: Any) -> str:
    """The help of --plugins: how to select, the presets and the installed plugins."""
    from rich.markup import escape

    text = ("Plugins or presets to enable, comma-separated or repeated (added to the config's plugins); "
            "no:NAME disables one.")
    try:
        presets = found.presets()
    except Exception as exc:  # noqa: BLE001 - the help must still work
        presets = {}
        text += f" Presets unavailable: {exc}."
    if presets:
        text += " Presets: " + "; ".join(f"{p.name} = {', '.join(p.plugins) or 'no plugin'}" for p in presets.values())
        text += " (presets also set config keys, listed by `astkit plugins`; --set overrides them)."
    names = sorted(found.available)
    text += f" Installed plugins: {', '.join(names) if names else 'none'} (see `astkit plugins`)."
    if found.failed:
        text += f" Failed to load: {', '.join(f.name for f in found.failed)}."
    return escape(text)


def _command_names(app: typer.Typer) -> set[str]:
    names = set()
    for info in app.registered_commands:
        name = info.name or (info.callback.__name__.lower().replace("_", "-") if info.callback else "")
        names.add(name)
    return names


def register_plugin_commands(app: typer.Typer, found: Any) -> None:
    """Let each installed plugin add commands; one that fails is reported and skipped."""
    catalog = found.catalog()
    plugins = {name: info.plugin for name, info in found.available.items()}
    for name, plugin in plugins.items():
        if not hasattr(plugin, "astkit_register_commands"):
            continue
        before = len(app.registered_commands)
        taken = _command_names(app)
        caller = catalog.subset_hook_caller(
            "astkit_register_commands", remove_plugins=[p for n, p in plugins.items() if n != name]
        )
        try:
            caller(app=app)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the CLI
            del app.registered_commands[before:]
            sys.stderr.write(f"warning: plugin {name!r} could not add its commands: {type(exc).__name__}: {exc}\n")
            continue
        added = app.registered_commands[before:]
        del app.registered_commands[before:]
        for info in added:
            command = info.name or (info.callback.__name__.lower().replace("_", "-") if info.callback else "")
            if command in taken:
                sys.stderr.write(f"warning: plugin {name!r} tried to replace the command {command!r}; ignored\n")
                continue
            taken.add(command)
            app.registered_commands.append(info)


def build_app(session: common.Session | None = None) -> typer.Typer:
    """The Typer app: built-in commands, then the commands of installed plugins.

    ``session`` (default: one for ``sys.argv``) becomes the root context's
    ``obj``, where commands find it (:func:`astkit.cli.common.session`).
    """
    from astkit.cli import exporting, importing, inspection, stages, workflow

    session = session if session is not None else common.Session()
    app = typer.Typer(
        name="astkit",
        help=HELP,
        no_args_is_help=True,
        add_completion=False,
        rich_markup_mode="rich",
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"], "obj": session},
    )

    @app.callback()
    def root(
        version: Annotated[bool, typer.Option(
            "--version", callback=_version, is_eager=True, help="Print astkit's version and exit.")] = False,
    ) -> None:
        """Dataset distillation by trajectory matching (MTT) with AST's techniques as plugins."""

    found = session.plugins
    stages.register(app, plugin_help_text(found))
    inspection.register(app)
    exporting.register(app)
    importing.register(app)
    workflow.register(app, plugin_help_text(found))
    register_plugin_commands(app, found)
    return app


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    session = common.Session(argv)
    if not common.wants_debug(argv):
        # raised inside torch by experts.py's float(loss); harmless and noisy
        warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")
    return common.invoke(lambda: typer.main.get_command(build_app(session)), argv)


def __getattr__(name: str) -> Any:
    if name == "app":  # for tools that want the Typer object (docs generators)
        return build_app()
    raise AttributeError(name)
