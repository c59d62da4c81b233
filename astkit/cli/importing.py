"""Commands that bring in files of the reference scripts: ``import-buffer``, ``import-distilled``.

Both load ``.pt`` files with ``torch.load(weights_only=True)`` only (see
:mod:`astkit.importing`) and need the dataset the files were made on: its
shapes and classes check the tensors, and its metadata (normalisation,
class names, ZCA) is recorded as astkit's own files record it.
"""

import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from astkit.cli import common
from astkit.cli.common import PANEL_CONFIG, PANEL_OUTPUT, StageOptions

PANEL_MODEL = "Network (read from the shapes when not given)"

Dataset = Annotated[str | None, typer.Option(
    "--dataset", "-d", metavar="NAME", rich_help_panel=PANEL_CONFIG, show_default=False,
    help="The dataset the files were made on (see `astkit datasets`); required unless --config or --set names it.")]
DataRoot = Annotated[Path | None, typer.Option(
    "--data-root", parser=common.path_value, metavar="DIR", rich_help_panel=PANEL_CONFIG, show_default=False,
    help="Folder holding the dataset files.")]
Download = Annotated[bool, typer.Option(
    "--download", rich_help_panel=PANEL_CONFIG, help="Download the dataset into --data-root if missing.")]
Zca = Annotated[bool, typer.Option(
    "--zca", rich_help_panel=PANEL_CONFIG,
    help="The files were made on ZCA-whitened data (the reference scripts' --zca; data.zca=true).")]
Config = Annotated[Path | None, typer.Option(
    "--config", "-c", parser=common.path_value, metavar="FILE.toml", rich_help_panel=PANEL_CONFIG,
    show_default=False, help="Take data.* and model.* from a run's config file.")]
Overrides = Annotated[list[str] | None, typer.Option(
    "--set", "-s", metavar="KEY=VALUE", rich_help_panel=PANEL_CONFIG, show_default=False,
    help="Override one config key, repeatable (data.zca_eps=0.1, model.width=64).")]
Debug = Annotated[bool, typer.Option("--debug", rich_help_panel=PANEL_OUTPUT, help="Show tracebacks on errors.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", rich_help_panel=PANEL_OUTPUT, help="No log lines.")]


def _engine(opts: StageOptions, shortcuts: dict[str, Any]):
    """The config (data and model keys) and an Engine that loads the dataset and knows every model."""
    from astkit.engine import Engine
    from astkit.errors import UserError
    from astkit.rich_progress import RichProgress

    config = common.build_config(opts, shortcuts=shortcuts)
    if opts.dataset is None and "data.dataset" not in config.explicit:
        raise UserError("name the dataset the files were made on: --dataset NAME (see `astkit datasets`)")
    progress = RichProgress(common.err_console(), quiet=opts.quiet)
    engine = Engine(config, progress=progress, plugin_set=common.session().plugins)
    engine.dataset  # noqa: B018 - load (and check) the data before reading the files
    return engine, progress


def _note(progress: Any, notes: list[str]) -> None:
    for note in notes:
        progress.log(f"note: {note}")


# ------------------------------------------------------------ import-buffer
def import_buffer(
    buffers: Annotated[list[Path], typer.Argument(
        parser=common.path_value, metavar="BUFFER.pt...", show_default=False,
        help="Expert buffers of MTT, AST, FTD or DATM (replay_buffer_N.pt), one or more.")],
    out: Annotated[Path, typer.Option(
        "--out", "-o", parser=common.path_value, metavar="EXPERTS_DIR", rich_help_panel=PANEL_OUTPUT,
        show_default=False, help="Folder the expert files go to (created if missing; files already there "
                                 "must be experts of the same network and data).")],
    dataset: Dataset = None, data_root: DataRoot = None, download: Download = False, zca: Zca = False,
    model: Annotated[str | None, typer.Option(
        "--model", metavar="NAME", rich_help_panel=PANEL_MODEL, show_default=False,
        help="The reference network: convnet (the only one whose parameter order is mapped; the default).")] = None,
    width: Annotated[int | None, typer.Option(
        "--width", metavar="W", rich_help_panel=PANEL_MODEL, show_default=False,
        help="Channels per block (read from the first convolution).")] = None,
    depth: Annotated[int | None, typer.Option(
        "--depth", metavar="D", rich_help_panel=PANEL_MODEL, show_default=False,
        help="Blocks (read from the number of convolutions).")] = None,
    norm: Annotated[str | None, typer.Option(
        "--norm", metavar="NAME", rich_help_panel=PANEL_MODEL, show_default=False,
        help="instancenorm, batchnorm, layernorm or none (read from the norm parameters; per-channel ones "
             "are taken as instancenorm, give batchnorm for a ConvNetBN buffer).")] = None,
    activation: Annotated[str | None, typer.Option(
        "--activation", metavar="NAME", rich_help_panel=PANEL_MODEL, show_default=False,
        help="relu (default), leakyrelu, sigmoid, ...: not visible in the shapes.")] = None,
    pooling: Annotated[str | None, typer.Option(
        "--pooling", metavar="NAME", rich_help_panel=PANEL_MODEL, show_default=False,
        help="avgpool (default), maxpool or none (none is read from the classifier's shape).")] = None,
    config: Config = None, overrides: Overrides = None, quiet: Quiet = False, debug: Debug = False,
) -> None:
    """Convert expert buffers of the reference scripts into astkit expert files (one per trajectory).

    Each buffer is a list of trajectories, each a list of per-epoch lists of the reference ConvNet's
    parameters. It is loaded with torch.load(weights_only=True) only: a file that needs full unpickling is
    refused. The network's width, depth, norm and pooling are read from the shapes unless given, every
    shape is checked against astkit's ConvNet on the dataset, and each trajectory is written to
    EXPERTS_DIR/expert_NNN.safetensors (numbered from the first free number), ready for
    `astkit distill --experts EXPERTS_DIR` with the printed settings. An error removes what was written.
    """
    from astkit.importing import import_buffers
    from astkit.importing.buffers import check_paths
    from astkit.importing.convnet import check_model_name
    from astkit.trajectory import describe

    opts = StageOptions(config=config, set=overrides, dataset=dataset, data_root=data_root, download=download,
                        debug=debug, quiet=quiet)
    if model is not None:
        check_model_name(model)
    check_paths(buffers, out)  # before the data is loaded
    engine, progress = _engine(opts, {
        "data.zca": True if zca else None, "model.name": model, "model.width": width, "model.depth": depth,
        "model.norm": norm, "model.activation": activation, "model.pooling": pooling,
    })
    c = engine.config
    check_model_name(c.model.name)
    result = import_buffers(buffers, engine.dataset, out, model=c.model.name, given=c.model.options(),
                            registry=engine.models, data_config=c.to_dict()["data"], progress=progress)
    spec, epochs = result.spec, sorted(set(result.epochs))
    span = f"{epochs[0]}" if len(epochs) == 1 else f"{epochs[0]}-{epochs[-1]}"
    command = ["astkit", "distill", *(["--config", str(config)] if config is not None else []),
               "--dataset", c.data.dataset, "--experts", str(out)]
    if c.data.root:
        command += ["--data-root", c.data.root]
    if c.data.zca:
        command += ["--set", "data.zca=true"]
    for key, value in spec.options.items():
        command += ["--set", f"model.{key}={value}"]
    d = c.distill
    if epochs[0] < d.max_start_epoch - 1 + d.expert_epochs:
        command += ["--set", f"distill.max_start_epoch={max(1, epochs[0] - d.expert_epochs + 1)}"]
    _print([f"experts: {out} ({len(result.files)} imported, {span} epochs each, {describe(spec)})",
            f"distil with: {shlex.join(command)}"])


def _print(lines: list[str]) -> None:
    for line in lines:
        sys.stdout.write(line + "\n")
    sys.stdout.flush()


# --------------------------------------------------------- import-distilled
def import_distilled(
    images: Annotated[Path, typer.Option(
        "--images", parser=common.path_value, metavar="FILE.pt", show_default=False,
        help="The images, float (N, C, H, W) in the dataset's normalised space (images_best.pt).")],
    out: Annotated[Path, typer.Option(
        "--out", "-o", parser=common.path_value, metavar="FILE.safetensors", rich_help_panel=PANEL_OUTPUT,
        show_default=False, help="The astkit distilled file to write (must not exist).")],
    labels: Annotated[Path | None, typer.Option(
        "--labels", parser=common.path_value, metavar="FILE.pt", show_default=False,
        help="Class indices (N,) or soft logits (N, C) (labels_best.pt); default: N / classes images per "
             "class, in class order.")] = None,
    lr: Annotated[Path | None, typer.Option(
        "--lr", parser=common.path_value, metavar="FILE.pt", show_default=False,
        help="The learned student lr, a number or one-element tensor (lr_best.pt); "
             "default distill.lr_teacher.")] = None,
    dataset: Dataset = None, data_root: DataRoot = None, download: Download = False, zca: Zca = False,
    config: Config = None, overrides: Overrides = None, quiet: Quiet = False, debug: Debug = False,
) -> None:
    """Convert a distilled set published by MTT, AST, FTD or DATM (images, labels, lr tensors) into an astkit
    distilled file.

    Each .pt file is loaded with torch.load(weights_only=True) only. The images must have the dataset's shape;
    labels are checked against its classes. With --zca the images are taken to be ZCA-whitened, as the
    reference scripts' CIFAR sets are, and astkit's whitening of the dataset is stored with them. The file
    works with `astkit evaluate FILE` and `astkit show FILE`.
    """
    from astkit.importing import import_distilled as convert
    from astkit.importing.distilled import check_paths

    opts = StageOptions(config=config, set=overrides, dataset=dataset, data_root=data_root, download=download,
                        debug=debug, quiet=quiet)
    check_paths(images, labels, lr, out)  # before the data is loaded
    engine, progress = _engine(opts, {"data.zca": True if zca else None})
    c = engine.config
    record = {"data": c.to_dict()["data"], "model": c.to_dict()["model"]}
    distilled, notes = convert(images, engine.dataset, out, labels=labels, lr=lr,
                               default_lr=c.distill.lr_teacher, config=record)
    _note(progress, notes)
    kind = "soft labels" if distilled.soft_labels else "hard labels"
    _print([f"distilled: {out} ({distilled.images.shape[0]} images, {distilled.ipc} per class, {kind}, "
            f"lr {distilled.lr:.4g}{', ZCA' if distilled.zca else ''})",
            f"evaluate with: {shlex.join(['astkit', 'evaluate', str(out)])}"])


def register(app: typer.Typer) -> None:
    from astkit.cli.stages import command_help

    for func, name in ((import_buffer, "import-buffer"), (import_distilled, "import-distilled")):
        app.command(name, help=command_help(func))(func)
