"""What a run leaves behind: the :class:`Reporter` plugin (grids, report.md, summary).

:class:`Reporter` is a plain event plugin (``astkit.report``): it listens to
the engine's lifecycle events, saves image grids while distilling, and at
the end writes ``distilled.png``, ``curves.png``, ``avg_var.png`` and
``report.md`` to the run's folder and prints a summary table. The pictures
are drawn by :mod:`astkit.figures`; the progress bars live in
:mod:`astkit.rich_progress`.
"""

from __future__ import annotations

import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from rich.console import Console
from rich.table import Table

from astkit import distributed, store
from astkit import scores as score_rules
from astkit._version import __version__
from astkit.figures import metric_float, plot_curves, plot_experts, save_distilled_grid, save_grid
from astkit.hookspecs import hookimpl
from astkit.metrics_log import MetricsLog
from astkit.rich_progress import format_duration
from astkit.run_context import RunContext
from astkit.run_folder import RunFolder

__all__ = ["Reporter", "baseline_sections", "write_baseline_sections"]

#: the report.md sections written from the ``baseline`` records of metrics.jsonl
BASELINE_HEADINGS = ("## Baselines", "## Scores")


def _expert_record(index: int, trajectory: Any) -> dict[str, Any]:
    return {
        "index": int(trajectory.meta.get("index", index)) if getattr(trajectory, "meta", None) else index,
        "avg_var": float(trajectory.avg_var),
        "test_accuracy": [float(a) for a in trajectory.test_accuracy],
        "train_loss": [float(v) for v in trajectory.train_loss],
        "epochs": int(trajectory.num_epochs),
    }


def _as_dict(metrics: Any) -> dict[str, Any]:
    return metrics.to_json() if hasattr(metrics, "to_json") else dict(metrics)


class Reporter:
    """The CLI's reporting plugin: image grids while distilling, files at the end.

    A plain event plugin: register it with ``Engine(config,
    plugins=[reporter])`` and call :meth:`finish` after the stages. The
    events tell it everything else: the initial images and labels
    (``astkit_on_distill_start``), the run folder, the dataset's
    normalisation and the enabled plugins (the ``run`` context every event
    carries) and the config.

    :param grid_every: save ``OUT/grids/iter_NNNNNN.png`` every this many
        iterations, and the set distillation starts from (0: never).
    :param console: where :meth:`finish` prints its summary (default stdout).
    :param quiet: print no summary.
    """

    astkit_plugin_name = "astkit.report"
    __version__ = __version__

    def __init__(self, *, grid_every: int = 100, console: Console | None = None, quiet: bool = False):
        self.grid_every = max(0, int(grid_every))
        self.console = console
        self.quiet = quiet
        #: the run the events came from (None until the first event)
        self.run: RunContext | None = None
        self.config: Any = None
        self.labels: torch.Tensor | None = None
        self.history: list[dict[str, Any]] = []
        self.evaluations: list[tuple[int | None, Any]] = []
        self.experts: dict[int, dict[str, Any]] = {}
        self.grids: list[Path] = []
        self.started = time.time()

    # ------------------------------------------------------------ helpers
    def _seen(self, run: RunContext | None, config: Any) -> None:
        """Remember the run context and config an event carried."""
        if run is not None:
            self.run = run
        if config is not None:
            self.config = config

    @property
    def folder(self) -> RunFolder:
        """The run's folder: from the events, else from the config, else the current folder."""
        if self.run is not None:
            return self.run.folder
        return RunFolder.of(self.config) if self.config is not None else RunFolder(Path("."))

    def _grid(self, images: torch.Tensor, iteration: int) -> None:
        path = self.folder.grid(iteration)
        normalisation = self.run.normalisation() if self.run is not None else {}
        save_grid(images, self.labels, path, title=f"iteration {iteration}", **normalisation)
        if path not in self.grids:
            self.grids.append(path)

    # -------------------------------------------------------------- hooks
    @hookimpl
    def astkit_on_distill_start(self, images, labels, iteration, run, config):
        """Keep the labels for later grids; save the starting set if a grid is due."""
        self._seen(run, config)
        self.labels = labels.detach().cpu()
        if self.grid_every and iteration % self.grid_every == 0:
            self._grid(images, iteration)

    @hookimpl
    def astkit_on_iteration_end(self, metrics, images, run, config):
        self._seen(run, config)
        self.history.append(_as_dict(metrics))
        done = int(metrics.iteration) + 1
        if self.grid_every and self.labels is not None and done % self.grid_every == 0:
            self._grid(images, done)

    @hookimpl
    def astkit_on_evaluation_done(self, result, iteration, run, config):
        self._seen(run, config)
        self.evaluations.append((iteration, result))

    @hookimpl
    def astkit_on_expert_trained(self, index, trajectory, run, config):
        self._seen(run, config)
        self.experts[int(index)] = _expert_record(int(index), trajectory)

    # ------------------------------------------------------------- finish
    def add_experts(self, trajectories: Iterable[Any]) -> None:
        """Experts loaded from files (no ``astkit_on_expert_trained`` for them)."""
        for position, trajectory in enumerate(trajectories):
            record = _expert_record(position, trajectory)
            self.experts.setdefault(record["index"], record)

    def finish(self, run_result: Any = None, *, experts: Iterable[Any] | None = None, distilled: Any = None,
               history: Sequence[Any] | None = None, evaluation: Any = None, run: RunContext | None = None,
               config: Any = None) -> dict[str, Path]:
        """Write the run's pictures and report.md; print a summary; return the files.

        Takes a :class:`astkit.RunResult`, or the parts a single stage made.
        ``run`` and ``config`` are needed only when no event reached the
        reporter (e.g. ``astkit experts --resume`` with every expert already
        written). Under torchrun only rank 0 writes and prints (other ranks
        get ``{}``).
        """
        if distributed.rank() != 0:
            return {}
        self._seen(run, config)
        if run_result is not None:
            experts = experts if experts is not None else run_result.experts
            distilled = distilled if distilled is not None else run_result.distilled
            history = history if history is not None else run_result.history
            evaluation = evaluation if evaluation is not None else run_result.evaluation
        if experts is not None:
            self.add_experts(experts)
        history_dicts = [_as_dict(m) for m in history] if history else list(self.history)
        if evaluation is None:
            finals = [r for it, r in self.evaluations if it is None]
            evaluation = finals[-1] if finals else None
        folder = self.folder
        files: dict[str, Path] = {}
        if distilled is not None:
            files["grid"] = save_distilled_grid(distilled, folder.distilled_grid)
        if history_dicts:
            last = distilled.iteration if distilled is not None else int(history_dicts[-1]["iteration"]) + 1
            points = [(it if it is not None else last, r) for it, r in self.evaluations]
            if evaluation is not None and not any(r is evaluation for _, r in self.evaluations):
                points.append((last, evaluation))
            files["curves"] = plot_curves(history_dicts, points, folder.curves)
        expert_list = [self.experts[k] for k in sorted(self.experts)]
        if expert_list:
            files["avg_var"] = plot_experts(expert_list, folder.avg_var)
        report = folder.report
        files["report"] = report
        text = self.render(expert_list, distilled, history_dicts, evaluation, files)
        store.atomic_write_text(report, text)
        if not self.quiet:
            self.print_summary(expert_list, distilled, history_dicts, evaluation, files)
        return files

    # ------------------------------------------------------------ report
    def _plugins(self, distilled: Any = None) -> dict[str, str]:
        if self.run is not None:
            versions = dict(self.run.plugins)
        elif distilled is not None:
            versions = dict(distilled.meta.get("plugins", {}))
        else:
            versions = {}
        return {k: v for k, v in versions.items() if k != self.astkit_plugin_name}

    def render(self, experts: list[dict[str, Any]], distilled: Any, history: list[dict[str, Any]],
               evaluation: Any, files: Mapping[str, Path]) -> str:
        """report.md: config summary, plugins, experts, distillation, evaluation, files."""
        c = self.config
        out = self.folder.root
        lines = [
            "# astkit report",
            "",
            f"- written: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')} by astkit {__version__}",
            f"- output folder: `{out}`",
            f"- wall time of this command: {format_duration(time.time() - self.started)}",
            "",
        ]
        if c is not None:
            d, e, v = c.distill, c.experts, c.evaluate
            model_opts = ", ".join(f"{k}={val}" for k, val in c.model.options().items())
            lines += [
                "## Configuration",
                "",
                "| key | value |",
                "|---|---|",
                f"| dataset | {c.data.dataset}{' (ZCA)' if c.data.zca else ''} |",
                f"| model | {c.model.name}{f' ({model_opts})' if model_opts else ''} |",
                f"| seed / device | {c.seed} / {c.device} |",
                f"| experts | {e.num_experts} x {e.epochs} epochs, {e.optimizer} lr {e.lr:g}, "
                f"momentum {e.momentum:g} |",
                f"| distillation | ipc {d.ipc}, {d.iterations} iterations, N={d.syn_steps} student steps, "
                f"M={d.expert_epochs} expert epochs, T+={d.max_start_epoch} |",
                f"| distillation lrs | images {d.lr_img:g}, lr {d.lr_lr:g}, initial student lr {d.lr_teacher:g} |",
                f"| augmentation | {c.augment.strategy} ({c.augment.mode}) |",
                f"| evaluation | {v.num_nets} net{'s' if v.num_nets != 1 else ''} x {v.epochs} epochs on "
                f"{', '.join(v.models) or c.model.name} |",
                "",
                f"The full configuration is in `{self.folder.config.name}` (rerun with "
                f"`astkit run --config {self.folder.config.name}`).",
                "",
            ]
        plugins = self._plugins(distilled)
        lines += ["## Plugins", ""]
        if plugins:
            lines += ["| plugin | version | options |", "|---|---|---|"]
            for name, version in plugins.items():
                options = (c.options.get(name) if c is not None else None) or {}
                shown = ", ".join(f"{k}={val}" for k, val in options.items() if val is not None)
                lines.append(f"| {name} | {version} | {shown} |")
        else:
            lines.append("None: the MTT baseline.")
        lines.append("")
        if experts:
            lines += ["## Experts", "", "| expert | epochs | final test acc | best test acc | Avg_Var |",
                      "|---|---|---|---|---|"]
            for x in experts:
                acc = [a for a in x["test_accuracy"] if math.isfinite(a)]  # an imported expert may have none
                lines.append(f"| {x['index']} | {x['epochs']} | {_fmt(acc[-1] if acc else None)} | "
                             f"{_fmt(max(acc) if acc else None)} | {x['avg_var']:.4g} |")
            mean_var = sum(x["avg_var"] for x in experts) / len(experts)
            lines += ["", f"Mean Avg_Var {mean_var:.4g} (lower means smoother trajectories).", ""]
        if history:
            last = history[-1]
            seconds = sum(s for s in (metric_float(m.get("seconds")) for m in history) if math.isfinite(s))
            lines += [
                "## Distillation",
                "",
                f"- iterations: {int(last['iteration']) + 1}",
                f"- final matching loss: {metric_float(last.get('loss')):.4g} (first {metric_float(history[0].get('loss')):.4g})",
                f"- learned student lr: {metric_float(last.get('lr')):.4g}",
                f"- time in iterations: {format_duration(seconds)}",
                "",
            ]
        if distilled is not None:
            lines += [f"Distilled set: {tuple(distilled.images.shape)} images, {distilled.ipc} per class, "
                      f"lr {distilled.lr:.4g}, after {distilled.iteration} iterations.", ""]
        rows = []
        for it, result in self.evaluations:
            if it is not None:
                rows += [(str(it), name, r) for name, r in result.architectures.items()]
        if evaluation is not None:
            rows += [("final", name, r) for name, r in evaluation.architectures.items()]
        if rows:
            lines += ["## Evaluation", "",
                      "Fresh networks trained on the distilled set, final test accuracy.", "",
                      "| iteration | architecture | nets | accuracy (mean ± std) |", "|---|---|---|---|"]
            for it, name, r in rows:
                lines.append(f"| {it} | {name} | {len(r.accuracies)} | {r.mean:.4f} ± {r.std:.4f} |")
            lines.append("")
        if c is not None:
            soft = distilled.soft_labels if distilled is not None else None
            lines += baseline_sections(MetricsLog(self.folder.metrics).records(), ipc=c.distill.ipc, soft=soft,
                                       evaluation=evaluation.to_json() if evaluation is not None else None)
        lines += ["## Files", ""]
        lines += _file_list(self.folder)
        lines.append("")
        return "\n".join(lines)

    def print_summary(self, experts: list[dict[str, Any]], distilled: Any, history: list[dict[str, Any]],
                      evaluation: Any, files: Mapping[str, Path]) -> None:
        console = self.console if self.console is not None else Console(highlight=False)
        table = Table(title="astkit summary", show_header=False, title_justify="left")
        table.add_column("what", style="bold")
        table.add_column("value")
        plugins = self._plugins(distilled)
        table.add_row("plugins", ", ".join(plugins) or "none (MTT baseline)")
        if experts:
            accs = [x["test_accuracy"][-1] for x in experts if x["test_accuracy"]]
            accs = [a for a in accs if math.isfinite(a)]
            mean_var = sum(x["avg_var"] for x in experts) / len(experts)
            shown = f"test acc {sum(accs) / len(accs):.4f}" if accs else "test acc not recorded"
            table.add_row("experts", f"{len(experts)}, {shown}, Avg_Var {mean_var:.4g}")
        if history:
            last = history[-1]
            table.add_row("distillation", f"{int(last['iteration']) + 1} iterations, loss {metric_float(last.get('loss')):.4g}, "
                                          f"lr {metric_float(last.get('lr')):.4g}")
        if evaluation is not None:
            for name, r in evaluation.architectures.items():
                n = len(r.accuracies)
                table.add_row(f"accuracy ({name})",
                              f"{r.mean:.4f} ± {r.std:.4f} over {n} net{'s' if n != 1 else ''}")
        for key, path in files.items():
            table.add_row(key, str(path))
        console.print(table)


def _fmt(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4f}"


# ------------------------------------------------------- baselines, scores
def baseline_sections(records: list[dict[str, Any]], *, ipc: int, soft: bool | None,
                      evaluation: Mapping[str, Any] | None = None) -> list[str]:
    """report.md's "Baselines" and "Scores" sections, from a run's metrics records
    (nothing when there is no ``baseline`` record). ``soft``: whether the run's
    distilled set has soft labels (None: unknown, taken from the baseline records)."""
    baselines = [r for r in records if r.get("event") == "baseline"]
    if not baselines:
        return []
    latest: dict[tuple, dict[str, Any]] = {}
    for r in baselines:  # the last record of each kind, ipc, labelling and epochs, in the order last written
        key = (r.get("kind"), r.get("ipc"), r.get("labels"), r.get("epochs"), r.get("stated"))
        latest.pop(key, None)
        latest[key] = r
    lines = ["## Baselines", "",
             "Real images trained and tested with this run's evaluation protocol (`astkit baseline`); real sets "
             "at `evaluate.lr` if set, else `distill.lr_teacher`; `syn-hard` is the distilled set with hard labels.",
             "", "| set | ipc | labels | epochs | lr | architecture | nets | accuracy (mean ± std) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in latest.values():
        kind, ipc_text = str(r.get("kind")), "-" if r.get("ipc") is None else str(r.get("ipc"))
        if r.get("stated"):
            lines.append(f"| full (stated) | - | hard | - | - | all | - | {_fmt(metric_float(r.get('accuracy')))} |")
            continue
        for name, a in (r.get("architectures") or {}).items():
            lines.append(f"| {kind} | {ipc_text} | {r.get('labels', 'hard')} | {r.get('epochs', '-')} | "
                         f"{metric_float(r.get('lr')):.4g} | {name} | {len(a.get('accuracies') or [])} | "
                         f"{metric_float(a.get('mean')):.4f} ± {metric_float(a.get('std')):.4f} |")
    lines.append("")
    if soft is None:
        soft = any(r.get("kind") == "syn-hard" for r in baselines)
    found = score_rules.from_records(records, ipc=ipc, soft=soft, evaluation=evaluation)
    lines += ["## Scores", ""]
    if not found:
        lines += ["No evaluation of the distilled set yet (`astkit distill --evaluate`, `astkit run`); the "
                  "DD-Ranking scores compare it with the baselines above.", ""]
        return lines
    lines += [f"DD-Ranking's label-robust scores (arXiv 2505.13300; w = {score_rules.W}), under this run's "
              "protocol; definitions in docs/workflow.md.", "",
              "| architecture | Acc(syn-any) | Acc(syn-hard) | Acc(rdm-any) | Acc(real-hard) | IOR | HLR | LRS |",
              "|---|---|---|---|---|---|---|---|"]
    notes = []
    for s in found.values():
        lines.append(f"| {s.model} | {_fmt(s.syn_any)} | {_fmt(s.syn_hard)} | {_fmt(s.rdm_any)} | "
                     f"{_fmt(s.real_hard)} | {_signed(s.ior)} | {_signed(s.hlr)} | {_fmt(s.lrs)} |")
        notes += [f"{key.upper()} n/a: {why}." for key, why in s.missing.items()]
    lines += ["", *[f"- {n}" for n in dict.fromkeys(notes)], ""] if notes else [""]
    return lines


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.4f}"


def write_baseline_sections(folder: RunFolder, *, ipc: int, soft: bool | None) -> Path:
    """Rewrite the "Baselines" and "Scores" sections of the run's report.md from
    its metrics.jsonl (the rest of the report is kept; a report is started if
    there is none); return the report's path."""
    sections = baseline_sections(MetricsLog(folder.metrics).records(), ipc=ipc, soft=soft)
    path = folder.report
    text = path.read_text(errors="replace") if path.is_file() else ""
    if not text.strip():
        text = "\n".join(["# astkit report", "",
                          f"- written: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')} by astkit "
                          f"{__version__}", f"- output folder: `{folder.root}`", "", "## Files", "",
                          *_file_list(folder), ""])
    store.atomic_write_text(path, _with_sections(text, sections))
    return path


def _with_sections(text: str, sections: list[str]) -> str:
    """``text`` with its baseline sections replaced by ``sections`` (placed
    where they were, else before "## Files", else at the end)."""
    lines, out, at, skipping = text.split("\n"), [], None, False
    for line in lines:
        if line.startswith("## "):
            skipping = line.rstrip() in BASELINE_HEADINGS
            if skipping and at is None:
                at = len(out)
            if line.rstrip() == "## Files" and at is None:
                at = len(out)
        if not skipping:
            out.append(line)
    at = len(out) if at is None else at
    return "\n".join(out[:at] + sections + out[at:])


def _file_list(folder: RunFolder) -> list[str]:
    """``- name (size)`` for the run folder's files; folders summarised."""
    out = folder.root
    if not out.is_dir():
        return ["(none yet)"]
    lines = []
    for entry in sorted(out.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            members = [p for p in entry.rglob("*") if p.is_file() and not p.name.startswith(".")]
            lines.append(f"- `{entry.name}/` ({len(members)} file{'s' if len(members) != 1 else ''})")
        else:
            lines.append(f"- `{entry.name}` ({_size(entry.stat().st_size)})")
    if not folder.report.is_file():
        lines.append(f"- `{folder.report.name}` (this file)")
    return lines


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
