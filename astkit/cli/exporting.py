"""``astkit export``: a distilled set as an image folder (PNGs plus labels.json)."""

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from astkit.cli import common


def export(
    file: Annotated[Path, typer.Argument(
        parser=common.path_value, metavar="FILE", show_default=False,
        help="A distilled .safetensors file, or a run folder (its distilled.safetensors).")],
    out: Annotated[Path, typer.Option(
        "--out", "-o", parser=common.path_value, metavar="DIR", show_default=False,
        help="The folder to write: new, empty, or a previous export (replaced).")],
    fmt: Annotated[str, typer.Option(
        "--format", metavar="FORMAT", help="Image format of the files (png).")] = "png",
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    """Export a distilled set as an image folder: DIR/<class>/<index>.png and DIR/labels.json.

    Pixels are un-normalised with the dataset's mean and std (ZCA undone when the
    images are whitened); labels.json records each file's class (and soft logits),
    the learned lr and the normalisation. Read it back with astkit.load_distilled(DIR).
    """
    from astkit.export import LABELS_FILE, export_distilled

    record = export_distilled(file, out, fmt)
    count, classes = len(record["images"]), len(record["class_names"])
    note = f"; {record['clipped_values']} values clipped to [0, 255]" if record["clipped_values"] else ""
    common.out_console().print(
        escape(f"exported {count} image{'s' if count != 1 else ''} of {classes} classes to {out} "
               f"({LABELS_FILE}: labels, lr {record['lr']:.4g}, normalisation{note})"), highlight=False)


def register(app: typer.Typer) -> None:
    app.command("export")(export)
