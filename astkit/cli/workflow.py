"""A researcher's commands around runs: ``baseline`` (real baselines and
DD-Ranking scores under a run's protocol) and ``compare`` (runs side by side)."""

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer

from astkit.cli import common
from astkit.cli.common import PANEL_CONFIG, PANEL_OUTPUT, StageOptions, with_stage_options


# ------------------------------------------------------------------ helpers
def score_lines(folder: Any, *, ipc: int, soft: bool, evaluation: dict[str, Any] | None = None) -> list[str]:
    """``scores (convnet): IOR ..., HLR ..., LRS ...`` per architecture, when the
    folder's metrics.jsonl holds baseline records (else nothing)."""
    from astkit import scores
    from astkit.metrics_log import MetricsLog

    records = MetricsLog(folder.metrics).records()
    if not any(r.get("event") == "baseline" for r in records):
        return []
    return [s.line() for s in scores.from_records(records, ipc=ipc, soft=soft, evaluation=evaluation).values()]


def protocol_line(config: Any) -> str:
    """The evaluation protocol every baseline is trained with, in one line."""
    from astkit.baselines import protocol_lr

    v = config.evaluate
    source = "evaluate.lr" if v.lr is not None else "distill.lr_teacher (evaluate.lr is not set)"
    nets = f"{v.num_nets} net{'s' if v.num_nets != 1 else ''}"
    augment = config.augment.strategy if v.augment else "none"
    return (f"protocol: {nets} x {v.epochs} epochs on {', '.join(v.models) or config.model.name}, batch {v.batch_size}, "
            f"SGD momentum {v.momentum:g}, weight decay {v.weight_decay:g}, DSA {augment}; "
            f"real sets at lr {protocol_lr(config):g} from {source}")


def accuracy_text(record: dict[str, Any]) -> str:
    parts = []
    for name, a in (record.get("architectures") or {}).items():
        n = len(a.get("accuracies") or [])
        parts.append(f"accuracy ({name}, {n} net{'s' if n != 1 else ''}): {a['mean']:.4f} ± {a['std']:.4f}")
    return "; ".join(parts)


def _teacher(engine: Any) -> tuple[Any, str]:
    """The run's first expert at its last epoch, the teacher of soft-labelled subsets."""
    from astkit.errors import UserError
    from astkit.trajectory import Trajectory

    files = engine.folder.expert_files()
    if not files:
        raise UserError(f"the distilled set has soft labels, so the real subsets are labelled by a teacher (the "
                        f"run's first expert), but {engine.folder.experts} holds no expert file; set experts.dir "
                        "(--set experts.dir=DIR) to the run's experts")
    trajectory = Trajectory.load(files[0])
    engine.check_expert(trajectory, files[0])
    module = trajectory.build_model(-1, engine.models).to(engine.device)
    return module, f"{files[0].name}, epoch {trajectory.num_epochs}"


# ----------------------------------------------------------------- commands
def baseline(opts: StageOptions,
             run_dir: Annotated[Path | None, typer.Argument(
                 parser=common.path_value, metavar="RUN_DIR", show_default=False,
                 help="A run folder (its config.toml gives the protocol; results go to its metrics.jsonl and "
                      "report.md). Or give --config FILE instead.")] = None,
             real: Annotated[str, typer.Option(
                 "--real", metavar="KINDS",
                 help="Real sets to evaluate, comma-separated: random (ipc images per class drawn at random), "
                      "kmeans (the image nearest each K-Means centroid of its class), full (the whole training "
                      "set, for DD-Ranking's HLR).")] = "random,kmeans",
             ipc: Annotated[int | None, typer.Option(
                 "--ipc", metavar="N", min=1, rich_help_panel=PANEL_CONFIG, show_default=False,
                 help="Real images per class (default distill.ipc of the run).")] = None,
             full_epochs: Annotated[int, typer.Option(
                 "--full-epochs", metavar="N", min=1, rich_help_panel=PANEL_CONFIG,
                 help="Epochs of each network trained on the full training set (--real full).")] = 30,
             real_accuracy: Annotated[float | None, typer.Option(
                 "--real-accuracy", metavar="ACC", rich_help_panel=PANEL_CONFIG, show_default=False,
                 help="State Acc(real-hard), the accuracy of the full training set (a fraction, e.g. 0.93), "
                      "instead of measuring it with --real full.")] = None) -> None:
    """Real baselines trained and tested with exactly the protocol of a run (or of --config FILE).

    Each real set (random or K-Means subsets of --ipc images per class, or the full training set) trains the
    run's evaluation networks (evaluate.* keys) at evaluate.lr, or distill.lr_teacher when evaluate.lr is not
    set; a soft-labelled distilled set is also evaluated with hard labels. Results are appended to
    OUT/metrics.jsonl as baseline records and shown in OUT/report.md, with DD-Ranking's scores (IOR, HLR, LRS)
    once their inputs are recorded.
    """
    from astkit import baselines, store
    from astkit.cli.stages import interruptible, print_lines
    from astkit.engine import Engine
    from astkit.errors import UserError
    from astkit.metrics_log import MetricsLog
    from astkit.report import write_baseline_sections
    from astkit.results import DistilledSet
    from astkit.rich_progress import RichProgress
    from astkit.run_folder import RunFolder

    kinds = baselines.parse_kinds(real)
    stated = baselines.stated_full(real_accuracy) if real_accuracy is not None else None
    shortcuts: dict[str, Any] = {}
    if run_dir is not None:
        if opts.config is not None or opts.out is not None:
            raise UserError("give RUN_DIR, or --config FILE (with --out), not both")
        folder = RunFolder(run_dir)
        if not run_dir.is_dir() or not folder.config.is_file():
            raise UserError(f"{run_dir} is not an astkit run folder (no {folder.config.name}); pass a folder "
                            "written by astkit run or astkit distill, or --config FILE")
        opts = dataclasses.replace(opts, config=folder.config)
        shortcuts["out"] = str(run_dir)
    elif opts.config is None:
        raise UserError("give a run folder (astkit baseline RUN_DIR) or a config (--config FILE)")
    config = common.build_config(opts, shortcuts=shortcuts)
    progress = RichProgress(common.err_console(), quiet=opts.quiet)
    engine = Engine(config, progress=progress, plugin_set=common.session().plugins)
    folder = engine.folder
    folder.check_folders()
    ipc = config.distill.ipc if ipc is None else ipc
    subsets = [k for k in kinds if k in baselines.SUBSETS]
    if subsets:
        baselines.check_ipc(engine.dataset, ipc)
    distilled = DistilledSet.load(folder.distilled) if folder.distilled.is_file() else None
    if distilled is not None:
        distilled.check_fits(engine.dataset)
    soft = distilled is not None and distilled.soft_labels
    teacher, teacher_name = _teacher(engine) if soft and subsets else (None, "")
    main = engine.is_main
    lines = [protocol_line(engine.config)]
    if main:
        folder.create()
        if not folder.config.is_file():
            store.atomic_write_text(folder.config, engine.config.to_toml())
    log = MetricsLog(folder.metrics if main else None)
    print_lines(lines)
    with interruptible(engine, progress, resumable=False):
        for kind in kinds:
            progress.log(f"baseline: {kind} real" + ("" if kind == "full" else f", ipc {ipc}"))
            record = baselines.measure(engine, kind, ipc, full_epochs=full_epochs, teacher=teacher)
            if teacher is not None and kind != "full":
                record["teacher"] = teacher_name
            log.write(record)
            what = (f"full real training set ({record['images']} images, {full_epochs} epochs)" if kind == "full"
                    else f"{kind} real, ipc {ipc}, {record['labels']} labels")
            print_lines([f"{what}: {accuracy_text(record)}"])
        if soft:
            record = baselines.measure_hard_labels(engine, distilled)
            log.write(record)
            print_lines([f"distilled set with hard labels (syn-hard): {accuracy_text(record)}"])
    if stated is not None:
        log.write(stated)
        print_lines([f"full real training set: accuracy {stated['accuracy']:.4f} (stated)"])
    if not main:
        return
    report = write_baseline_sections(folder, ipc=config.distill.ipc, soft=soft if distilled is not None else None)
    print_lines(score_lines(folder, ipc=config.distill.ipc, soft=soft)
                + [f"baselines: {folder.metrics}  report: {report}"])


def compare(run_dirs: Annotated[list[Path], typer.Argument(
                parser=common.path_value, metavar="RUN_DIR", show_default=False,
                help="Run folders written by astkit run or astkit distill.")],
            out: Annotated[Path, typer.Option(
                "--out", "-o", parser=common.path_value, metavar="DIR", rich_help_panel=PANEL_OUTPUT,
                help="Where compare.md, compare.json and compare.png go (files of an earlier compare are "
                     "replaced, any other file of those names is refused).")] = Path("."),
            debug: Annotated[bool, typer.Option(
                "--debug", rich_help_panel=PANEL_OUTPUT, help="Show tracebacks on errors.")] = False) -> None:
    """Runs side by side: one table and one figure.

    The table holds the config keys that differ between the runs, the final accuracy (mean ± std) per evaluation
    model, the real baselines and DD-Ranking scores recorded by astkit baseline, and the recorded time of
    distillation and evaluation; the figure, accuracy and matching loss against iterations, one line per run.
    """
    from rich.table import Table

    from astkit.cli.stages import print_lines
    from astkit.compare import MARK, Comparison, check_outputs, write_tables
    from astkit.figures import plot_comparison

    comparison = Comparison.of(run_dirs)
    paths = check_outputs(out)
    write_tables(comparison, paths)
    plot_comparison(comparison.series(), paths[2], software=MARK)
    table = Table(title="astkit compare", title_justify="left")
    for index, name in enumerate(comparison.header()):
        table.add_column(name, style="bold" if index == 0 else None)
    for label, cells in comparison.rows():
        table.add_row(label, *cells)
    common.out_console().print(table)
    print_lines([f"written: {', '.join(str(p) for p in paths)}"])


def register(app: typer.Typer, plugin_help: str) -> None:
    from astkit.cli.stages import command_help

    app.command("baseline", help=command_help(baseline))(with_stage_options(baseline, plugin_help))
    app.command("compare", help=command_help(compare))(compare)
