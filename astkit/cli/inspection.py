"""Commands that look rather than compute: ``plugins``, ``show``, ``datasets``, ``models``."""

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from astkit.cli import common
from astkit.cli.common import PANEL_PLUGINS


def _first_line(obj: Any) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0].strip() if doc else ""


# ----------------------------------------------------------------- plugins
def plugins(
    plugins: Annotated[list[str] | None, typer.Option(
        "--plugins", "-P", metavar="NAMES", rich_help_panel=PANEL_PLUGINS, show_default=False,
        help="Show which plugins this selection enables (plugin or preset names, comma-separated; no:NAME).")] = None,
    p: Annotated[list[str] | None, typer.Option(
        "-p", metavar="NAME", rich_help_panel=PANEL_PLUGINS, show_default=False,
        help="Add one name to the selection (repeatable); -p no:NAME disables NAME.")] = None,
    disable: Annotated[list[str] | None, typer.Option(
        "--disable", metavar="NAME", rich_help_panel=PANEL_PLUGINS, show_default=False,
        help="Disable a plugin in the selection (repeatable).")] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", metavar="FILE.toml", show_default=False,
        help="Start from the plugins a config file selects.")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    """List installed plugins, presets, plugin options, and plugins that failed to load.

    The "enabled" column shows what a run with the same --plugins / -p / --disable would use.
    """
    from astkit import __version__, hookspecs
    from astkit.config import RunConfig, read_config_file
    from astkit.errors import AstkitError
    from astkit.plugins import declared_options

    found = common.session().plugins
    chosen = RunConfig.from_dict(read_config_file(config)) if config is not None else RunConfig()
    selection = [*chosen.plugins, *common.split_names(plugins), *[x.strip() for x in p or [] if x.strip()]]
    blocked = [*chosen.disable, *common.split_names(disable)]
    enabled = found.resolve(selection, blocked)
    problems: list[str] = []
    try:
        presets = found.presets()
    except AstkitError as exc:
        presets, problems = {}, [*problems, str(exc)]
    try:
        options = declared_options(found.catalog())
    except AstkitError as exc:
        options, problems = {}, [*problems, str(exc)]

    console = common.out_console()
    table = Table(title="Installed plugins (entry-point group `astkit`)", title_justify="left")
    table.add_column("plugin", no_wrap=True, style="bold")
    table.add_column("enabled", no_wrap=True)
    table.add_column("description")
    table.add_column("hooks (astkit_...)")
    table.add_column("distribution", no_wrap=True)
    table.add_column("entry point", no_wrap=True)
    table.add_row("astkit.defaults", "always", "the MTT baseline (answers every behaviour hook last)",
                  ", ".join(h.removeprefix("astkit_") for h in hookspecs.FIRST_RESULT_HOOKS),
                  f"astkit {__version__}", "astkit._defaults")
    for name, info in sorted(found.available.items()):
        hooks = ", ".join(h.removeprefix("astkit_") for h in info.hooks)
        dist = " ".join(x for x in (info.distribution, info.version) if x) or "-"
        state = "yes" if name in enabled else "no"
        table.add_row(escape(name), state, escape(_first_line(info.plugin)), hooks, escape(dist),
                      escape(info.entry_point))
    console.print(table)
    if presets:
        table = Table(title="Presets (use like a plugin name: --plugins NAME)", title_justify="left")
        table.add_column("preset", no_wrap=True, style="bold")
        table.add_column("plugins")
        table.add_column("sets (config keys and plugin options; --set overrides)")
        table.add_column("description")
        for preset in presets.values():
            try:
                sets = "\n".join(f"{key} = {json.dumps(value)}" for key, value in preset.settings().items())
            except AstkitError as exc:
                sets = f"(invalid: {exc})"
            table.add_row(escape(preset.name), escape(", ".join(preset.plugins) or "(none)"), escape(sets or "-"),
                          escape(preset.description))
        console.print(table)
    if options:
        table = Table(title=escape("Plugin options (--set NAMESPACE.KEY=VALUE, or [options.NAMESPACE] in TOML)"),
                      title_justify="left")
        table.add_column("namespace", no_wrap=True, style="bold")
        table.add_column("key", no_wrap=True)
        table.add_column("default")
        for namespace, defaults in sorted(options.items()):
            for key, default in defaults.items():
                shown = "(unset)" if default is None else json.dumps(default) if not isinstance(default, str) \
                    else repr(default)
                table.add_row(escape(namespace), escape(key), escape(shown))
        console.print(table)
    if found.failed:
        table = Table(title="Plugins that failed to load (not usable; the others work)", title_justify="left",
                      title_style="bold red")
        table.add_column("plugin", no_wrap=True, style="bold red")
        table.add_column("entry point")
        table.add_column("error")
        for failed in found.failed:
            table.add_row(escape(failed.name), escape(failed.entry_point), escape(failed.error))
        console.print(table)
    for problem in problems:
        console.print(f"[yellow]warning:[/yellow] {escape(problem)}")
    active = [n for n in enabled] or ["none (MTT baseline)"]
    console.print(f"enabled for this selection: {escape(', '.join(active))}", highlight=False)


# -------------------------------------------------------------------- show
def show(
    file: Annotated[Path, typer.Argument(parser=common.path_value, metavar="FILE", show_default=False,
                                         help="An astkit .safetensors file (trajectory, distilled set, checkpoint).")],
    png: Annotated[Path | None, typer.Option(
        "--png", parser=common.path_value, metavar="PATH", show_default=False,
        help="Where to write the image grid of a distilled set or checkpoint (default: FILE with .png).")] = None,
    no_png: Annotated[bool, typer.Option("--no-png", help="Do not write the image grid.")] = False,
    full: Annotated[bool, typer.Option("--full", help="Do not shorten long metadata lists.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print metadata and tensor shapes as JSON.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    """Show the metadata and tensor shapes of an astkit file; draw a distilled set as a PNG grid."""
    import torch
    from rich.pretty import Pretty

    from astkit import store
    from astkit.config import dump_toml

    store.require_file(file, "an astkit file")
    meta = store.read_metadata(file)
    tensors, _ = store.load(file)
    kind = meta.get("kind")
    shapes = {name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
              for name, t in tensors.items()}

    grid = None
    if kind in ("distilled", "checkpoint") and not no_png and "images" in tensors and "labels" in tensors:
        grid = png if png is not None else file.with_suffix(".png")
        _check_png_path(grid)
        _write_grid(tensors, meta, grid)

    if as_json:
        sys.stdout.write(json.dumps({"file": str(file), "meta": meta, "tensors": shapes}, indent=2) + "\n")
        if grid is not None:
            sys.stderr.write(f"grid: {grid}\n")
        return

    console = common.out_console()
    console.print(f"[bold]{escape(str(file))}[/bold]: astkit {kind} file "
                  f"(format {meta.get('format')}, written by astkit {meta.get('astkit_version')})")
    summary = Table(show_header=False, box=None, pad_edge=False)
    summary.add_column(style="bold")
    summary.add_column()
    for key, value in _summary(kind, meta, tensors):
        summary.add_row(key, escape(str(value)))
    console.print(summary)

    table = Table(title="tensors", title_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("shape", no_wrap=True)
    table.add_column("dtype")
    table.add_column("min", justify="right")
    table.add_column("max", justify="right")
    for name, t in tensors.items():
        lo = hi = ""
        if t.numel() and not name.endswith("_state") and t.dtype != torch.bool:  # RNG states: bytes
            lo, hi = f"{float(t.min()):.4g}", f"{float(t.max()):.4g}"
        table.add_row(escape(name), "x".join(str(s) for s in t.shape) or "scalar",
                      shapes[name]["dtype"], lo, hi)
    console.print(table)

    rest = {k: v for k, v in meta.items() if k not in ("config",)}
    if not full and isinstance(rest.get("state"), dict) and "history" in rest["state"]:
        history = rest["state"]["history"]
        rest["state"] = {**rest["state"], "history": f"<{len(history)} iterations; --full to show>"}
    console.print("[bold]metadata[/bold]")
    console.print(Pretty(rest, max_length=None if full else 12, max_string=None if full else 200,
                         indent_guides=False))
    if meta.get("config"):
        console.print("[bold]config[/bold] (as TOML; reuse with --config)")
        console.print(dump_toml(meta["config"]).rstrip(), markup=False, highlight=False)
    if grid is not None:
        console.print(f"grid: {escape(str(grid))}", highlight=False)


def _check_png_path(grid: Path) -> None:
    """The grid can be written at ``grid``: its folder exists (show creates no folders) and is writable."""
    from astkit.errors import UserError

    parent = grid.parent if str(grid.parent) else Path(".")
    if grid.is_dir():
        raise UserError(f"--png {grid} is a folder; pass a file name such as {grid / 'grid.png'}")
    if not parent.is_dir():
        what = "is a file" if parent.exists() else "does not exist"
        raise UserError(f"cannot write {grid}: the folder {parent} {what}; create the folder first or pass another --png PATH (or --no-png)")
    if not os.access(parent, os.W_OK):
        raise UserError(f"cannot write {grid}: the folder {parent} is not writable; pass --png PATH or --no-png")


def _summary(kind: str, meta: dict[str, Any], tensors: dict[str, Any]) -> list[tuple[str, Any]]:
    from astkit.checkpoint import Checkpoint

    rows: list[tuple[str, Any]] = []
    ds = meta.get("dataset") or {}
    model = meta.get("model") or {}
    if ds:
        rows.append(("dataset", f"{ds.get('name')} ({ds.get('channels')}x"
                                f"{'x'.join(str(s) for s in ds.get('image_size', []))}, "
                                f"{len(ds.get('class_names', []))} classes{', ZCA' if ds.get('zca') else ''})"))
    if model:
        options = ", ".join(f"{k}={v}" for k, v in (model.get("options") or {}).items())
        rows.append(("model", f"{model.get('name')}{f' ({options})' if options else ''}"))
    if kind == "trajectory":
        acc = meta.get("test_accuracy") or []
        rows += [("expert", meta.get("index")), ("epochs", meta.get("num_epochs")),
                 ("final test accuracy", f"{acc[-1]:.4f}" if acc else "-"),
                 ("Avg_Var", f"{meta.get('avg_var', float('nan')):.4g}")]
    if kind in ("distilled", "checkpoint") and "labels" in tensors:
        import torch

        from astkit import labels as label_rules

        labels = tensors["labels"]
        counts = torch.bincount(label_rules.classes(labels).long().flatten())
        iteration = meta.get("iteration") if kind == "distilled" else Checkpoint.iteration_in(meta)
        lr = meta.get("lr") if kind == "distilled" else float(tensors["lr"][0]) if "lr" in tensors else None
        rows += [("images", "x".join(str(s) for s in tensors["images"].shape)),
                 ("images per class", int(counts.max()) if counts.numel() else 0),
                 ("labels", f"soft ({'x'.join(str(s) for s in labels.shape)} logits)" if label_rules.is_soft(labels)
                  else "hard (class indices)"),
                 ("iteration", iteration),
                 ("learned lr", f"{lr:.4g}" if isinstance(lr, float) else lr)]
    plugins = meta.get("plugins")
    if plugins is not None:
        shown = {k: v for k, v in plugins.items() if k != "astkit.report"}
        rows.append(("plugins", ", ".join(f"{k} ({v})" for k, v in shown.items()) or "none (MTT baseline)"))
    return rows


def _write_grid(tensors: dict[str, Any], meta: dict[str, Any], path: Path) -> Path:
    from astkit.checkpoint import Checkpoint
    from astkit.figures import save_distilled_grid
    from astkit.results import DistilledSet

    zca = DistilledSet.zca_in(tensors)
    iteration = meta.get("iteration", Checkpoint.iteration_in(meta))
    lr = float(tensors["lr"].flatten()[0]) if "lr" in tensors else float("nan")
    labels = tensors["labels"]
    labels = labels.float() if labels.ndim == 2 else labels.long().flatten()
    distilled = DistilledSet(tensors["images"], labels, lr, int(iteration or 0), meta, zca)
    return save_distilled_grid(distilled, path)


# ------------------------------------------------------- datasets, models
def _owners(found: Any, kind: str) -> dict[str, str]:
    """Which installed plugin registered each name of ``kind``."""
    import pluggy

    from astkit import hookspecs
    from astkit.plugins import collect_registrations

    owners: dict[str, str] = {}
    for name, info in found.available.items():
        pm = pluggy.PluginManager("astkit")
        pm.add_hookspecs(hookspecs)
        try:
            pm.register(info.plugin, name=name)
            for key in collect_registrations(pm, kind, {}):
                owners[key] = name
        except Exception:  # noqa: BLE001 - reported by the catalog call below
            continue
    return owners


def _registry_table(kind: str, builtin: dict, title: str, columns: dict[str, Any]) -> None:
    """Print one row per registered ``kind`` name (built in and from plugins): name, origin, then ``columns``.

    ``columns`` maps a column's heading to ``f(name, registry) -> str``; a
    cell that raises shows ``(no <heading>: reason)``, so one bad entry never
    hides the rest.
    """
    from astkit.plugins import collect_registrations

    found = common.session().plugins
    registry = collect_registrations(found.catalog(), kind, builtin)
    owners = _owners(found, kind)
    table = Table(title=title, title_justify="left")
    table.add_column("name", no_wrap=True, style="bold")
    table.add_column("from", no_wrap=True)
    for heading in columns:
        table.add_column(heading)
    for name in sorted(registry):
        cells = []
        for heading, cell in columns.items():
            try:
                cells.append(cell(name, registry))
            except Exception as exc:  # noqa: BLE001 - one bad entry must not hide the rest
                cells.append(f"(no {heading}: {exc})")
        source = "built in" if name in builtin else f"plugin {owners.get(name, '?')}"
        table.add_row(escape(name), escape(source), *(escape(c) for c in cells))
    common.out_console().print(table)


def datasets() -> None:
    """List the dataset names a run accepts (--dataset), built in and from plugins."""
    from astkit.data import BUILTIN_DATASETS, describe_dataset

    def description(name: str, registry: dict) -> str:
        text = describe_dataset(name, registry)
        return text[len(name) + 1:].strip() if text.startswith(f"{name}:") else text

    _registry_table("dataset", BUILTIN_DATASETS, "Datasets (--dataset NAME)", {"description": description})


def models() -> None:
    """List the network architectures (model.name, evaluate --models), built in and from plugins."""
    from astkit.models import BUILTIN_MODELS, describe_model, model_options

    def options(name: str, registry: dict) -> str:
        opts = model_options(registry[name])
        return "any" if opts is None else ", ".join(opts) or "-"

    _registry_table("model", BUILTIN_MODELS, "Models (--set model.name=NAME, evaluate --models A,B)",
                    {"options": options, "description": describe_model})


def register(app: typer.Typer) -> None:
    app.command("plugins")(plugins)
    app.command("show")(show)
    app.command("datasets")(datasets)
    app.command("models")(models)
