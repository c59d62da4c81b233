"""What every astkit command shares: the command's :class:`Session` (its
argv and the installed plugins, discovered once), consoles, the stage
options, config building, and turning exceptions into one-line errors and
exit codes.

Exit codes: 0 success, 1 divergence or an unexpected error, 2 a user error
(bad option, unknown name, bad file), 130 interrupted (Ctrl-C).
"""

import dataclasses
import errno
import inspect
import os
import shlex
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any, Callable

import typer
from rich.console import Console

from astkit.errors import AstkitError, DivergenceError, UserError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

PANEL_PLUGINS = "Plugins"
PANEL_CONFIG = "Configuration"
PANEL_OUTPUT = "Output"


# ------------------------------------------------------------------ session
class Session:
    """One run of the command line: its arguments and the installed plugins.

    ``build_app`` makes one per invocation and gives it to click as the root
    context's ``obj``; commands reach it with :func:`session`. The plugins
    are discovered once, on first use (``build_app`` uses them for the help
    of ``--plugins`` and for plugin commands), and the same
    :class:`astkit.plugins.PluginSet` goes to the ``Engine`` a stage command
    makes and to the ``plugins``/``datasets``/``models`` listings.
    """

    def __init__(self, argv: list[str] | None = None, plugins: Any = None):
        #: the arguments after ``astkit`` (for the "resume with:" line)
        self.argv = list(sys.argv[1:] if argv is None else argv)
        self._plugins = plugins

    @property
    def plugins(self) -> Any:
        """Every installed plugin (a :class:`astkit.plugins.PluginSet`), discovered on first use."""
        if self._plugins is None:
            from astkit.plugins import PluginSet

            self._plugins = PluginSet.discover()
        return self._plugins


def _current_context() -> Any:
    """The click context of the running command (Typer's vendored click or click), or None."""
    import importlib

    for name in ("typer._click.globals", "click.globals"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        ctx = module.get_current_context(silent=True)
        if ctx is not None:
            return ctx
    return None


def session() -> Session:
    """The running command's :class:`Session`; outside a command (a command
    function called directly), a new one for ``sys.argv``."""
    ctx = _current_context()
    found = ctx.find_object(Session) if ctx is not None else None
    if found is None:
        found = Session()
        if ctx is not None and ctx.obj is None:
            ctx.find_root().obj = found
    return found


# ------------------------------------------------------------------ consoles
def _width(stream) -> int | None:
    """Rich's width, except that a pipe gets 160 columns instead of 80."""
    if os.environ.get("COLUMNS"):
        return None
    try:
        if stream.isatty():
            return None
    except (AttributeError, ValueError):
        pass
    return 160


def out_console() -> Console:
    """Results (tables, the accuracy line) go to stdout."""
    return Console(width=_width(sys.stdout), highlight=False, soft_wrap=False)


def err_console() -> Console:
    """Progress bars and log lines go to stderr, so stdout stays the results."""
    return Console(stderr=True, width=_width(sys.stderr), highlight=False)


def split_names(values: list[str] | None) -> list[str]:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]``."""
    out: list[str] = []
    for value in values or []:
        out.extend(part.strip() for part in value.split(",") if part.strip())
    return out


# ------------------------------------------------------------------- errors
class Interrupted(Exception):
    """Ctrl-C in a command, with the one line that says how to go on."""


def one_line(message: str) -> str:
    return " ".join(str(message).split())


def print_error(message: str) -> None:
    sys.stderr.write(f"error: {one_line(message)}\n")
    sys.stderr.flush()


def wants_debug(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("ASTKIT_DEBUG", "") not in ("", "0")


def _click_modules() -> list[Any]:
    """The click exception modules in use: Typer's vendored copy and/or click."""
    modules = []
    try:
        from typer._click import exceptions as vendored  # Typer >= 0.2x carries its own click

        modules.append(vendored)
    except ImportError:
        pass
    try:
        import click.exceptions as upstream

        modules.append(upstream)
    except ImportError:
        pass
    return modules


def _types(name: str) -> tuple[type, ...]:
    return tuple(getattr(m, name) for m in _click_modules() if hasattr(m, name))


def invoke(build: Callable[[], Any], argv: list[str]) -> int:
    """Build the click command and run it; map every outcome to an exit code.

    Errors print one line ``error: ...`` on stderr (a traceback too with
    ``--debug``).
    """
    import typer

    debug = wants_debug(argv)
    no_args, usage, click_error = _types("NoArgsIsHelpError"), _types("UsageError"), _types("ClickException")
    exits = (*_types("Exit"), typer.Exit)
    aborts = (*_types("Abort"), typer.Abort, KeyboardInterrupt)
    try:
        command = build()
        result = command.main(args=argv, prog_name="astkit", standalone_mode=False)
        return result if isinstance(result, int) else EXIT_OK
    except no_args as exc:  # `astkit` alone: the help (Typer's rich help is printed when raised)
        text = exc.format_message()
        if text.strip():
            sys.stdout.write(text + "\n")
        return EXIT_OK
    except usage as exc:
        message = exc.format_message()
        ctx = getattr(exc, "ctx", None)
        if ctx is not None:
            message += f" (see `{ctx.command_path} --help`)"
        print_error(message)
        return EXIT_USAGE
    except click_error as exc:
        print_error(exc.format_message())
        return getattr(exc, "exit_code", EXIT_FAILED) or EXIT_FAILED
    except exits as exc:
        return exc.exit_code
    except aborts:
        sys.stderr.write("\ninterrupted\n")
        return EXIT_INTERRUPTED
    except Interrupted as exc:
        sys.stderr.write(f"\n{one_line(str(exc))}\n")
        return EXIT_INTERRUPTED
    except DivergenceError as exc:
        _debug_traceback(debug)
        print_error(str(exc))
        return EXIT_FAILED
    except AstkitError as exc:
        _debug_traceback(debug)
        print_error(str(exc))
        return EXIT_USAGE
    except MemoryError:
        _debug_traceback(debug)
        print_error("out of memory; lower distill.ipc, distill.syn_steps or distill.batch_syn")
        return EXIT_FAILED
    except Exception as exc:  # a bug or an environment problem: one line, traceback on --debug
        _debug_traceback(debug)
        mapped = os_error_message(exc)
        if mapped is not None:
            print_error(mapped)
            return EXIT_USAGE
        hint = "" if debug else " (rerun with --debug for the traceback)"
        print_error(f"{type(exc).__name__}: {exc}{hint}")
        return EXIT_FAILED


def os_error_message(exc: BaseException) -> str | None:
    """The one-line message for an OSError that escaped the guarded writes
    (permission denied, read-only file system, disk full, a file where a
    folder should be, or the reverse), worded by :func:`astkit.store.raise_write_error`;
    None for anything else."""
    from astkit import store

    if not isinstance(exc, OSError) or exc.errno not in store.WRITE_ERRNOS - {errno.EEXIST}:
        return None

    try:
        store.raise_write_error(exc.filename or "a file", exc, writing=False)
    except UserError as mapped:
        return str(mapped)
    return None


def _debug_traceback(debug: bool) -> None:
    if debug:
        traceback.print_exc(file=sys.stderr)


# ------------------------------------------------------------ stage options
@dataclasses.dataclass
class StageOptions:
    """The options shared by ``run``, ``experts``, ``distill`` and ``evaluate``."""

    plugins: list[str] | None = None
    p: list[str] | None = None
    disable: list[str] | None = None
    config: Path | None = None
    set: list[str] | None = None
    out: Path | None = None
    seed: int | None = None
    device: str | None = None
    dataset: str | None = None
    data_root: Path | None = None
    download: bool = False
    debug: bool = False
    quiet: bool = False


def shared_parameters(plugin_help: str) -> list[inspect.Parameter]:
    """The typer parameters of :class:`StageOptions` (help computed at build time)."""

    def param(name: str, annotation: Any, default: Any = None) -> inspect.Parameter:
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)

    return [
        param("plugins", Annotated[list[str] | None, typer.Option(
            "--plugins", "-P", metavar="NAMES", rich_help_panel=PANEL_PLUGINS, show_default=False,
            help=plugin_help)]),
        param("p", Annotated[list[str] | None, typer.Option(
            "-p", metavar="NAME", rich_help_panel=PANEL_PLUGINS, show_default=False,
            help="Enable one plugin or preset (pytest style, repeatable); -p no:NAME disables NAME.")]),
        param("disable", Annotated[list[str] | None, typer.Option(
            "--disable", metavar="NAME", rich_help_panel=PANEL_PLUGINS, show_default=False,
            help="Disable a plugin even if a preset or the config enables it (repeatable).")]),
        param("config", Annotated[Path | None, typer.Option(
            "--config", "-c", parser=path_value, metavar="FILE.toml", rich_help_panel=PANEL_CONFIG, show_default=False,
            help="Read the run's configuration from a TOML file (as written to OUT/config.toml).")]),
        param("set", Annotated[list[str] | None, typer.Option(
            "--set", "-s", metavar="KEY=VALUE", rich_help_panel=PANEL_CONFIG, show_default=False,
            help="Override one config key, repeatable: distill.ipc=10, experts.epochs=50, "
                 "smooth-experts.mu=2 (a plugin's option).")]),
        param("out", Annotated[Path | None, typer.Option(
            "--out", "-o", parser=path_value, metavar="DIR", rich_help_panel=PANEL_OUTPUT, show_default=False,
            help="Output folder (config key out; default runs/astkit).")]),
        param("seed", Annotated[int | None, typer.Option(
            "--seed", metavar="N", rich_help_panel=PANEL_CONFIG, show_default=False,
            help="Random seed of the run (default 0).")]),
        param("device", Annotated[str | None, typer.Option(
            "--device", metavar="cpu|cuda|auto", rich_help_panel=PANEL_CONFIG, show_default=False,
            help="Where to compute: cpu, cuda, cuda:N or auto (default cpu).")]),
        param("dataset", Annotated[str | None, typer.Option(
            "--dataset", "-d", metavar="NAME", rich_help_panel=PANEL_CONFIG, show_default=False,
            help="Dataset name (see `astkit datasets`; default digits).")]),
        param("data_root", Annotated[Path | None, typer.Option(
            "--data-root", parser=path_value, metavar="DIR", rich_help_panel=PANEL_CONFIG, show_default=False,
            help="Folder holding the dataset files.")]),
        param("download", Annotated[bool, typer.Option(
            "--download", rich_help_panel=PANEL_CONFIG,
            help="Download the dataset into --data-root if missing.")], False),
        param("debug", Annotated[bool, typer.Option(
            "--debug", rich_help_panel=PANEL_OUTPUT, help="Show tracebacks on errors.")], False),
        param("quiet", Annotated[bool, typer.Option(
            "--quiet", "-q", rich_help_panel=PANEL_OUTPUT, help="No progress bars or log lines.")], False),
    ]


SHARED_NAMES = tuple(f.name for f in dataclasses.fields(StageOptions))


def with_stage_options(func: Callable, plugin_help: str) -> Callable:
    """Give ``func(opts, ...)`` the shared options as typer parameters.

    The returned function's signature is ``func``'s (without ``opts``) plus
    the shared options; typer reads it, and the call gathers the shared
    values into a :class:`StageOptions` passed as ``opts``.
    """
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
           for p in inspect.signature(func).parameters.values() if p.name != "opts"]
    shared = shared_parameters(plugin_help)
    first = [p for p in shared if p.name in ("plugins", "p", "disable")]  # the Plugins panel on top
    params = first + own + [p for p in shared if p not in first]

    def command(**kwargs: Any) -> Any:
        opts = StageOptions(**{name: kwargs.pop(name) for name in SHARED_NAMES})
        return func(opts, **kwargs)

    command.__name__ = func.__name__
    command.__qualname__ = func.__qualname__
    command.__doc__ = func.__doc__
    command.__module__ = func.__module__
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


# ------------------------------------------------------------ config build
def path_value(value: Any) -> Path:
    """Typer's parser of path options and arguments: an empty path is refused
    (it would silently mean the current folder)."""
    if isinstance(value, Path):
        return value
    if not str(value).strip():
        raise typer.BadParameter("the path is empty; give a path (. for the current folder)")
    return Path(value)


def build_config(opts: StageOptions, *, base: dict[str, Any] | None = None,
                 shortcuts: dict[str, Any] | None = None):
    """The run's config: ``base`` < presets < ``--config`` < ``--set`` < dedicated options.

    Plugin selections add to the config's ``plugins`` / ``disable`` lists;
    the config keys and plugin options of the selected presets then fill
    every key the user did not set (``base``, a file's recorded config, does
    not count as set by the user).
    """
    from astkit.config import RunConfig, read_config_file
    from astkit.plugins import apply_presets

    config = RunConfig.from_dict(base or {})
    config.explicit.clear()
    config.update(read_config_file(opts.config) if opts.config is not None else {})
    for item in opts.set or []:
        config.apply_override(item)
    dedicated = {
        "out": str(opts.out) if opts.out is not None else None,
        "seed": opts.seed,
        "device": opts.device,
        "data.dataset": opts.dataset,
        "data.root": str(opts.data_root) if opts.data_root is not None else None,
        "data.download": True if opts.download else None,
        **(shortcuts or {}),
    }
    for key, value in dedicated.items():
        if value is not None:
            config.set(key, value)
    selection = split_names(opts.plugins) + [p.strip() for p in opts.p or [] if p.strip()]
    config.plugins = list(dict.fromkeys([*config.plugins, *selection]))
    config.disable = list(dict.fromkeys([*config.disable, *split_names(opts.disable)]))
    apply_presets(config, session().plugins)
    return config


def resume_command(argv: list[str] | None = None) -> str:
    """The command line that was run (default: the running command's,
    :attr:`Session.argv`), with ``--resume`` (once)."""
    args = [a for a in (session().argv if argv is None else argv) if a != "--resume"]
    return shlex.join(["astkit", *args, "--resume"])
