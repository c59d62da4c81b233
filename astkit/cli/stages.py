"""The stage commands: ``run`` (all three), ``experts``, ``distill``, ``evaluate``."""

import inspect
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from astkit.cli import common
from astkit.cli.common import PANEL_CONFIG, PANEL_OUTPUT, StageOptions, with_stage_options

GridEvery = Annotated[int, typer.Option(
    "--grid-every", metavar="N", min=0, rich_help_panel=PANEL_OUTPUT,
    help="Save OUT/grids/iter_NNNNNN.png every N iterations and the initial set (0: none).")]
Ipc = Annotated[int | None, typer.Option(
    "--ipc", metavar="N", rich_help_panel=PANEL_CONFIG, show_default=False,
    help="Synthetic images per class (distill.ipc).")]
Iterations = Annotated[int | None, typer.Option(
    "--iterations", metavar="N", rich_help_panel=PANEL_CONFIG, show_default=False,
    help="Distillation iterations (distill.iterations).")]
NumExperts = Annotated[int | None, typer.Option(
    "--num-experts", metavar="N", rich_help_panel=PANEL_CONFIG, show_default=False,
    help="How many experts to train (experts.num_experts).")]
ExpertsDir = Annotated[Path | None, typer.Option(
    "--experts", parser=common.path_value, metavar="DIR", rich_help_panel=PANEL_CONFIG, show_default=False,
    help="Use the expert trajectories in DIR (experts.dir) instead of OUT/experts.")]


# ------------------------------------------------------------------ helpers
def make_engine(config: Any, opts: StageOptions, *, grid_every: int = 0):
    """An Engine with the rich progress bars and the Reporter plugin."""
    from astkit.engine import Engine
    from astkit.report import Reporter
    from astkit.rich_progress import RichProgress

    progress = RichProgress(common.err_console(), quiet=opts.quiet)
    reporter = Reporter(grid_every=grid_every, console=common.out_console(), quiet=opts.quiet)
    engine = Engine(config, plugins=[reporter], progress=progress, plugin_set=common.session().plugins)
    return engine, reporter, progress


def describe_run(engine: Any, *, out: bool = True) -> str:
    """The one line a stage command logs before it starts."""
    c = engine.config
    plugins = [n for n in engine.enabled if n != "astkit.report"]
    line = f"astkit: {c.data.dataset}, {c.model.name}, plugins: {', '.join(plugins) or 'none (MTT baseline)'}"
    return line + (f"; out {engine.out}" if out else "")


class interruptible:
    """Turn Ctrl-C into :class:`common.Interrupted` with the line to resume."""

    def __init__(self, engine: Any, progress: Any, *, resumable: bool = True):
        self.engine, self.progress, self.resumable = engine, progress, resumable

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if self.progress is not None and kind is not None:
            self.progress.close()
        if kind is None or not issubclass(kind, KeyboardInterrupt):
            return False
        if not self.resumable:
            raise common.Interrupted("interrupted") from None
        checkpoint = self.engine.folder.checkpoint
        where = ""
        if checkpoint.is_file():
            try:
                from astkit.checkpoint import Checkpoint

                where = f"checkpoint at iteration {Checkpoint.read_iteration(checkpoint)} in {checkpoint}; "
            except Exception:  # noqa: BLE001 - the hint is best effort
                where = ""
        raise common.Interrupted(f"interrupted; {where}resume with: {common.resume_command()}") from None


def accuracy_lines(evaluation: Any, grid: Path | None = None) -> list[str]:
    """``accuracy (convnet, 5 nets): 0.8731 ± 0.0052``, one per architecture."""
    lines = []
    for name, r in evaluation.architectures.items():
        n = len(r.accuracies)
        lines.append(f"accuracy ({name}, {n} net{'s' if n != 1 else ''}): {r.mean:.4f} ± {r.std:.4f}")
    if grid is not None and lines:
        lines[-1] += f"  images: {grid}"
    return lines


def print_lines(lines: list[str]) -> None:
    from astkit import distributed

    if distributed.rank() != 0:  # under torchrun, rank 0 speaks for all
        return
    for line in lines:
        sys.stdout.write(line + "\n")
    sys.stdout.flush()


# ----------------------------------------------------------------- commands
def run(opts: StageOptions, resume: Annotated[bool, typer.Option(
            "--resume", help="Continue an interrupted run: keep OUT/experts files, continue from "
                             "OUT/checkpoint.safetensors.")] = False,
        ipc: Ipc = None, iterations: Iterations = None, num_experts: NumExperts = None,
        experts_dir: ExpertsDir = None, grid_every: GridEvery = 100) -> None:
    """Run all three stages: train experts, distil, evaluate fresh networks.

    Writes OUT/experts/*.safetensors, OUT/distilled.safetensors, OUT/checkpoint.safetensors,
    OUT/metrics.jsonl, OUT/config.toml and the report (report.md, distilled.png, curves.png, avg_var.png,
    grids/). The last line printed is the accuracy of fresh networks on the distilled set. Ctrl-C writes a
    checkpoint; continue with --resume.
    """
    config = common.build_config(opts, shortcuts={
        "distill.ipc": ipc, "distill.iterations": iterations, "experts.num_experts": num_experts,
        "experts.dir": str(experts_dir) if experts_dir is not None else None,
    })
    engine, reporter, progress = make_engine(config, opts, grid_every=grid_every)
    progress.log(describe_run(engine))
    with interruptible(engine, progress):
        result = engine.run(resume=resume)
    files = reporter.finish(result)
    print_lines(accuracy_lines(result.evaluation, files.get("grid")))


def experts(opts: StageOptions, resume: Annotated[bool, typer.Option(
                "--resume", help="Train only the experts whose file is missing.")] = False,
            only: Annotated[str | None, typer.Option(
                "--only", metavar="I,J", show_default=False,
                help="Train only these expert indices (e.g. 0,3 to split the work across machines).")] = None,
            num_experts: NumExperts = None,
            experts_dir: Annotated[Path | None, typer.Option(
                "--experts", parser=common.path_value, metavar="DIR", rich_help_panel=PANEL_CONFIG, show_default=False,
                help="Write the trajectories to DIR (experts.dir; default OUT/experts).")] = None) -> None:
    """Stage 1: train expert networks on the real data and save their trajectories.

    Each expert is seeded by (seed, index) alone, so experts can be trained in separate processes (--only)
    and give the same files.
    """
    from astkit.errors import UserError

    config = common.build_config(opts, shortcuts={
        "experts.num_experts": num_experts,
        "experts.dir": str(experts_dir) if experts_dir is not None else None,
    })
    n = config.experts.num_experts
    indices = list(range(n))
    if only is not None:
        try:
            indices = [int(i) for i in common.split_names([only])]
        except ValueError:
            raise UserError(f"--only expects expert indices such as 0,3; got {only!r}") from None
        bad = [i for i in indices if not 0 <= i < n]
        if bad:
            raise UserError(f"--only: expert indices must be in 0..{n - 1}, got {bad}")
    engine, reporter, progress = make_engine(config, opts)
    engine.check_inputs()  # data, distill.ipc, models: refused before any expert is trained
    progress.log(describe_run(engine))
    directory = engine.folder.experts
    with interruptible(engine, progress):
        trajectories = engine.train_experts(indices, resume=resume)
    reporter.add_experts(trajectories)
    reporter.finish(run=engine.run_context, config=engine.config)  # no event when every expert was there
    accs = ", ".join(f"{t.test_accuracy[-1]:.4f}" for t in trajectories)
    print_lines([f"experts: {directory} ({len(trajectories)} trained" + (f", test acc {accs})" if accs else ")")])


def distill(opts: StageOptions, experts_dir: ExpertsDir = None,
            resume: Annotated[bool, typer.Option(
                "--resume", help="Continue from OUT/checkpoint.safetensors.")] = False,
            ipc: Ipc = None, iterations: Iterations = None, grid_every: GridEvery = 100,
            evaluate: Annotated[bool, typer.Option(
                "--evaluate/--no-evaluate", help="Evaluate the distilled set at the end.")] = False) -> None:
    """Stage 2: distil a synthetic set by matching the expert trajectories.

    Reads the experts from --experts DIR (or OUT/experts); writes OUT/distilled.safetensors,
    OUT/checkpoint.safetensors, OUT/metrics.jsonl and the report. Ctrl-C writes a checkpoint; continue
    with --resume.
    """
    config = common.build_config(opts, shortcuts={
        "distill.ipc": ipc, "distill.iterations": iterations,
        "experts.dir": str(experts_dir) if experts_dir is not None else None,
    })
    engine, reporter, progress = make_engine(config, opts, grid_every=grid_every)
    engine.check_inputs()  # data, distill.ipc, models: refused before the experts are read
    if resume:
        engine.check_checkpoint(engine.folder.checkpoint)  # also: nothing to resume
    progress.log(describe_run(engine))
    with interruptible(engine, progress):
        trajectories = engine.load_experts()
        reporter.add_experts(trajectories)
        distilled = engine.distill(trajectories, resume=resume)
        evaluation = engine.evaluate(distilled) if evaluate else None
    if evaluation is not None and engine.is_main:  # recorded as `run` records its own
        from astkit.metrics_log import MetricsLog

        MetricsLog(engine.folder.metrics).write({"event": "final_evaluation", **evaluation.to_json()})
    files = reporter.finish(distilled=distilled, history=engine.history, evaluation=evaluation)
    lines = accuracy_lines(evaluation) if evaluation is not None else []
    if evaluation is not None:
        from astkit.cli.workflow import score_lines

        lines += score_lines(engine.folder, ipc=engine.config.distill.ipc, soft=distilled.soft_labels)
    print_lines(lines + [f"distilled: {engine.folder.distilled}  images: {files.get('grid')}"])


def evaluate(opts: StageOptions,
             file: Annotated[Path, typer.Argument(
                 parser=common.path_value, metavar="FILE", show_default=False, help="A distilled set (.safetensors) written by astkit.")],
             models: Annotated[str | None, typer.Option(
                 "--models", "-m", metavar="A,B", show_default=False,
                 help="Architectures to train (cross-architecture; see `astkit models`); "
                      "default evaluate.models or the run's model.")] = None,
             num_nets: Annotated[int | None, typer.Option(
                 "--num-nets", metavar="N", rich_help_panel=PANEL_CONFIG, show_default=False,
                 help="Fresh networks per architecture (evaluate.num_nets).")] = None,
             epochs: Annotated[int | None, typer.Option(
                 "--epochs", metavar="N", rich_help_panel=PANEL_CONFIG, show_default=False,
                 help="Training epochs per network (evaluate.epochs).")] = None) -> None:
    """Stage 3: train fresh networks on a distilled set and test them on the real test set.

    The dataset, model and evaluation protocol default to those recorded in FILE; --config and --set override them.
    """
    from astkit import store
    from astkit.errors import UserError
    from astkit.results import DistilledSet

    meta = store.read_metadata(store.require_file(file, "a distilled set"))
    if meta.get("kind") != "distilled":
        raise UserError(f"{file}: expected an astkit distilled file, this one holds a {meta.get('kind')}; "
                        "pass a distilled.safetensors (astkit show FILE tells what a file holds)")
    base = recorded_config(meta)
    config = common.build_config(opts, base=base, shortcuts={"evaluate.num_nets": num_nets,
                                                             "evaluate.epochs": epochs})
    distilled = DistilledSet.load(file)
    engine, reporter, progress = make_engine(config, opts)
    names = common.split_names([models]) if models else None
    if names:
        engine.check_evaluation_models(names, "--models")
    progress.log(describe_run(engine, out=False) + f"; evaluating {file}")
    with interruptible(engine, progress, resumable=False):
        result = engine.evaluate(distilled, names)
    from astkit.cli.workflow import score_lines
    from astkit.run_folder import RunFolder

    ipc = distilled.images.shape[0] // engine.dataset.num_classes  # images per class (soft labels: not by argmax)
    print_lines(accuracy_lines(result) + score_lines(RunFolder(file.parent), ipc=ipc, soft=distilled.soft_labels,
                                                     evaluation=result.to_json()))


def recorded_config(meta: dict[str, Any]) -> dict[str, Any]:
    """The parts of a file's recorded config that say how to evaluate it.

    Plugins, their options, the output folder and the device are left out:
    they may not exist here and do not change the evaluation.
    """
    recorded = dict(meta.get("config") or {})
    kept = {key: recorded[key] for key in ("seed", "data", "model", "augment", "evaluate") if key in recorded}
    temperature = (recorded.get("distill") or {}).get("label_temperature")
    if temperature is not None:  # soft labels are evaluated at the temperature they were distilled with
        kept["distill"] = {"label_temperature": temperature}
    return kept


def command_help(func: Any) -> str:
    """The docstring with each paragraph on one line (Typer keeps single line breaks)."""
    doc = inspect.cleandoc(func.__doc__ or "")
    return "\n\n".join(" ".join(paragraph.split()) for paragraph in doc.split("\n\n"))


def register(app: typer.Typer, plugin_help: str) -> None:
    for func in (run, experts, distill, evaluate):
        app.command(func.__name__, help=command_help(func))(with_stage_options(func, plugin_help))
