"""What a run shows and leaves behind: progress bars, image grids, plots, report.md.

* :class:`RichProgress` draws the engine's progress (expert epochs,
  distillation iterations, evaluation networks) as rich progress bars with
  an ETA and a live line of key numbers (loss, lr, start epoch, accuracy).
* :class:`Reporter` is a plugin (``astkit.report``) that listens to the
  engine's lifecycle hooks, saves image grids while distilling, and at the
  end writes ``distilled.png``, ``curves.png``, ``avg_var.png`` and
  ``report.md`` to the run's folder and prints a summary table.
* :func:`save_grid` writes a PNG of images, one row per class.

Plots use matplotlib's Agg canvas directly (no pyplot, no display needed);
every file is written atomically with :func:`astkit.store.atomic_write`.
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
from astkit.hookspecs import hookimpl
from astkit.progress import Progress

__all__ = ["Reporter", "RichProgress", "denormalise", "format_fields", "save_grid"]


# ========================================================== progress bars
def format_fields(fields: Mapping[str, Any]) -> str:
    """``{"loss": 0.12345, "lr": 0.01}`` -> ``"loss 0.1235  lr 0.01"``."""
    parts = []
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, bool):
            text = str(value).lower()
        elif isinstance(value, float):
            text = f"{value:.4g}"
        else:
            text = str(value)
        parts.append(f"{key.replace('_', ' ')} {text}")
    return "  ".join(parts)


class RichProgress(Progress):
    """Rich progress bars for the engine's loops; nothing at all when ``quiet``.

    On a terminal: one bar per running loop (expert epochs, distillation
    iterations, evaluation networks) with elapsed time, ETA and the latest
    key numbers. Elsewhere (a pipe, a log file): a plain status line per loop
    at most every ``interval`` seconds, so long runs still show progress.

    :param console: where to draw (default: a stderr console, so stdout keeps
        only results).
    :param quiet: no bars and no log lines.
    :param interval: seconds between status lines when not on a terminal.
    """

    def __init__(self, console: Console | None = None, *, quiet: bool = False, interval: float = 30.0):
        self.console = console if console is not None else Console(stderr=True, highlight=False)
        self.quiet = quiet
        self.interval = interval
        self.live = self.console.is_terminal and not self.console.is_dumb_terminal
        self._bars = None
        self._tasks: dict[str, Any] = {}
        self._plain: dict[str, dict[str, Any]] = {}

    def _display(self):
        if self._bars is None:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress as Bars,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bars = Bars(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}", markup=False),
                console=self.console,
                transient=True,
            )
            self._bars.start()
        return self._bars

    def start(self, task: str, description: str, total: int) -> None:
        if self.quiet:
            return
        if not self.live:
            now = time.monotonic()
            self._plain[task] = {"description": description, "total": max(0, int(total)), "done": 0,
                                 "info": "", "started": now, "printed": now, "lines": 0, "base": 0}
            return
        bars = self._display()
        if task in self._tasks:
            bars.remove_task(self._tasks.pop(task))
        self._tasks[task] = bars.add_task(description, total=max(0, int(total)), info="")

    def advance(self, task: str, steps: int = 1, **fields: Any) -> None:
        if self.quiet:
            return
        if not self.live:
            state = self._plain.get(task)
            if state is None:
                return
            if state["done"] == 0 and not fields:  # a resumed loop: steps already done earlier
                state["base"] = steps
            state["done"] += steps
            if fields:
                state["info"] = format_fields(fields)
            now = time.monotonic()
            if now - state["printed"] >= self.interval:
                self._status(state, now)
            return
        if task not in self._tasks:
            return
        update: dict[str, Any] = {"advance": steps}
        if fields:
            update["info"] = format_fields(fields)
        self._bars.update(self._tasks[task], **update)

    def _status(self, state: dict[str, Any], now: float, final: bool = False) -> None:
        done, total = state["done"], state["total"]
        elapsed = now - state["started"]
        line = f"{state['description']}: {done}/{total}"
        if total:
            line += f" ({100 * done / total:.0f}%)"
        line += f", {_duration(elapsed)}"
        rate_done = done - state["base"]
        if not final and rate_done > 0 and total > done:
            line += f", eta {_duration(elapsed / rate_done * (total - done))}"
        if state["info"]:
            line += f"  {state['info']}"
        self.console.print(line, markup=False, highlight=False)
        state["printed"] = now
        state["lines"] += 1

    def stop(self, task: str) -> None:
        if self.quiet:
            return
        if not self.live:
            state = self._plain.pop(task, None)
            if state is not None and state["lines"]:
                self._status(state, time.monotonic(), final=True)
            return
        if task not in self._tasks:
            return
        self._bars.remove_task(self._tasks.pop(task))
        if not self._tasks:
            self.close()

    def log(self, message: str) -> None:
        if self.quiet:
            return
        console = self._bars.console if self._bars is not None else self.console
        console.print(message, markup=False, highlight=False)

    def close(self) -> None:
        """Remove every bar (e.g. after an error or Ctrl-C)."""
        if self._bars is not None:
            self._bars.stop()
        self._bars = None
        self._tasks.clear()
        self._plain.clear()


# ============================================================ image grids
def _zca_object(zca: Any):
    if zca is None:
        return None
    if isinstance(zca, Mapping):
        if not zca:
            return None
        from astkit.data import ZCA

        return ZCA.from_tensors(0.0, dict(zca))
    return zca


def denormalise(images: torch.Tensor, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                zca: Any = None) -> torch.Tensor:
    """Images in [0, 1] for display: undo ZCA (a ``ZCA`` or its tensors), then
    ``x * std + mean``; without mean/std each image is min-max scaled."""
    x = images.detach().float().cpu()
    zca = _zca_object(zca)
    if zca is not None:
        x = zca.invert(x)
    channels = x.shape[1]
    if mean is not None and std is not None and len(mean) == channels and len(std) == channels:
        m = torch.tensor([float(v) for v in mean]).view(1, -1, 1, 1)
        s = torch.tensor([float(v) for v in std]).view(1, -1, 1, 1)
        return (x * s + m).clamp(0.0, 1.0)
    flat = x.flatten(1)
    lo, hi = flat.min(dim=1).values.view(-1, 1, 1, 1), flat.max(dim=1).values.view(-1, 1, 1, 1)
    return ((x - lo) / (hi - lo).clamp_min(1e-12)).clamp(0.0, 1.0)


def _mosaic(pixels: torch.Tensor, labels: torch.Tensor, pad: int = 1):
    """One array: a row per class (sorted labels), a column per image of it."""
    import numpy as np

    n, c, h, w = pixels.shape
    if c == 3:
        pix = pixels.permute(0, 2, 3, 1).numpy()
    else:  # 1 channel (or an unusual count): grey
        pix = pixels.mean(dim=1).numpy()
    classes = sorted(set(labels.tolist()))
    groups = [(labels == k).nonzero().flatten().tolist() for k in classes]
    cols = max((len(g) for g in groups), default=1)
    shape = (len(classes) * (h + pad) + pad, cols * (w + pad) + pad) + ((3,) if c == 3 else ())
    mosaic = np.ones(shape, dtype=np.float32)
    for r, members in enumerate(groups):
        for col, index in enumerate(members):
            y, x = pad + r * (h + pad), pad + col * (w + pad)
            mosaic[y:y + h, x:x + w] = pix[index]
    return mosaic, classes, cols


def save_grid(
    images: torch.Tensor,
    labels: torch.Tensor,
    path: str | Path,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    zca: Any = None,
    class_names: Sequence[str] | None = None,
    *,
    title: str | None = None,
) -> Path:
    """Write a PNG of ``images``: one row per class, ``ipc`` columns.

    :param images: ``(N, C, H, W)`` in the dataset's normalised (and maybe
        ZCA-whitened) space.
    :param mean, std: per-channel normalisation of the dataset (on [0, 1]
        pixels); without them each image is min-max scaled.
    :param zca: a fitted :class:`astkit.data.ZCA` or its ``tensors()``; undone first.
    :param class_names: row labels (by label index).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    labels = labels.detach().long().cpu().flatten()
    pixels = denormalise(images, mean, std, zca)
    mosaic, classes, cols = _mosaic(pixels, labels)
    height, width = mosaic.shape[:2]
    scale = max(1, min(round(32 / max(1, pixels.shape[2])), 4000 // max(height, width, 1)))
    names = [str(class_names[k]) if class_names is not None and k < len(class_names) else str(k) for k in classes]
    label_px = 0 if len(classes) > 120 else 8 + 7 * max((len(n) for n in names), default=1)
    title_px = 22 if title else 4
    dpi = 100
    content_w = width * scale + label_px + 4
    fig_w = max(content_w, 6.2 * len(title) + 12 if title else 0)
    fig_h = height * scale + title_px + 4
    fig = Figure(figsize=(fig_w / dpi, fig_h / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    left = label_px + (fig_w - content_w) / 2
    ax = fig.add_axes((left / fig_w, 4 / fig_h, width * scale / fig_w, height * scale / fig_h))
    if mosaic.ndim == 2:
        ax.imshow(mosaic, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(mosaic, interpolation="nearest")
    ax.set_xticks([])
    if label_px:
        h = pixels.shape[2]
        ax.set_yticks([1 + r * (h + 1) + h / 2 - 0.5 for r in range(len(classes))], names, fontsize=8)
        ax.tick_params(axis="y", length=0, pad=2)
    else:
        ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        fig.text(0.5, 1 - 4 / fig_h, title, fontsize=9, ha="center", va="top")
    store.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    return path


# ================================================================= plots
def _figure(ncols: int, width: float = 4.2, height: float = 3.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _save_figure(fig, path: Path) -> Path:
    store.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


def plot_curves(history: Sequence[Mapping[str, Any]], evaluations: Sequence[tuple[int, Any]], path: Path) -> Path:
    """Matching loss and learned lr per iteration; accuracy at each evaluation."""
    its = [int(m["iteration"]) + 1 for m in history]
    fig, axes = _figure(3 if evaluations else 2)
    losses = [_num(m.get("loss")) for m in history]
    axes[0].plot(its, losses, lw=1, marker="." if len(its) < 50 else None)
    finite = [v for v in losses if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 20:
        axes[0].set_yscale("log")
    axes[0].set(title="matching loss", xlabel="iteration")
    axes[1].plot(its, [_num(m.get("lr")) for m in history], lw=1, color="tab:orange",
                 marker="." if len(its) < 50 else None)
    axes[1].set(title="learned student lr", xlabel="iteration")
    if evaluations:
        archs = sorted({name for _, result in evaluations for name in result.architectures})
        for name in archs:
            points = [(it, r[name]) for it, r in evaluations if name in r.architectures]
            axes[2].errorbar([p[0] for p in points], [p[1].mean for p in points], yerr=[p[1].std for p in points],
                             marker="o", capsize=3, label=name)
        axes[2].set(title="test accuracy of fresh nets", xlabel="iteration")
        axes[2].legend(fontsize=8)
    _finish_axes(axes)
    return _save_figure(fig, path)


def _finish_axes(axes) -> None:
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_experts(experts: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Avg_Var per expert (bars) and each expert's test accuracy per epoch."""
    fig, axes = _figure(2)
    indices = [e["index"] for e in experts]
    axes[0].bar([str(i) for i in indices], [e["avg_var"] for e in experts], color="tab:blue")
    axes[0].set(title="Avg_Var (mean squared step per epoch)", xlabel="expert")
    for e in experts:
        acc = e["test_accuracy"]
        axes[1].plot(range(1, len(acc) + 1), acc, marker=".", lw=1, label=f"expert {e['index']}")
    axes[1].set(title="expert test accuracy", xlabel="epoch")
    if len(experts) <= 10:
        axes[1].legend(fontsize=7)
    _finish_axes(axes)
    return _save_figure(fig, path)


# ============================================================== reporter
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

    Register it with ``Engine(config, plugins=[reporter])``, then call
    :meth:`bind` with the engine (for the dataset's normalisation, the
    config and the plugin versions) and :meth:`finish` after the stages.

    :param grid_every: save ``OUT/grids/iter_NNNNNN.png`` every this many
        iterations, and the initial set as ``iter_000000.png`` (0: never).
    :param console: where :meth:`finish` prints its summary (default stdout).
    :param quiet: print no summary.
    """

    astkit_plugin_name = "astkit.report"

    def __init__(self, *, grid_every: int = 100, console: Console | None = None, quiet: bool = False):
        from astkit._version import __version__

        self.__version__ = __version__
        self.grid_every = max(0, int(grid_every))
        self.console = console
        self.quiet = quiet
        self.engine: Any = None
        self.config: Any = None
        self.history: list[dict[str, Any]] = []
        self.evaluations: list[tuple[int | None, Any]] = []
        self.experts: dict[int, dict[str, Any]] = {}
        self.grids: list[Path] = []
        self.started = time.time()

    def bind(self, engine: Any) -> "Reporter":
        self.engine = engine
        self.config = engine.config
        return self

    # ------------------------------------------------------------ helpers
    def _out(self, config: Any = None) -> Path:
        config = config if config is not None else self.config
        return Path(config.out) if config is not None else Path(".")

    def _normalisation(self) -> dict[str, Any]:
        """mean/std/zca/class names of the bound engine's dataset (or nothing)."""
        if self.engine is None:
            return {}
        ds = self.engine.dataset
        return {"mean": ds.mean, "std": ds.std, "zca": ds.zca, "class_names": ds.class_names}

    def _grid(self, images: torch.Tensor, labels: torch.Tensor, iteration: int, config: Any) -> None:
        path = self._out(config) / "grids" / f"iter_{iteration:06d}.png"
        save_grid(images, labels, path, title=f"iteration {iteration}", **self._normalisation())
        if path not in self.grids:
            self.grids.append(path)

    # -------------------------------------------------------------- hooks
    @hookimpl(wrapper=True)
    def astkit_init_synthetic(self, config):
        """Save the initial set (whatever plugin made it) as iteration 0."""
        images, labels = answer = yield
        self.config = self.config or config
        if self.grid_every:
            self._grid(images, labels, 0, config)
        self._labels = labels.detach().cpu()
        return answer

    @hookimpl
    def astkit_on_iteration_end(self, metrics, images, config):
        self.config = self.config or config
        self.history.append(_as_dict(metrics))
        done = int(metrics.iteration) + 1
        labels = getattr(self, "_labels", None)
        if self.grid_every and labels is not None and done % self.grid_every == 0:
            self._grid(images, labels, done, config)

    @hookimpl
    def astkit_on_evaluation_done(self, result, iteration, config):
        self.config = self.config or config
        self.evaluations.append((iteration, result))

    @hookimpl
    def astkit_on_expert_trained(self, index, trajectory, config):
        self.config = self.config or config
        self.experts[int(index)] = _expert_record(int(index), trajectory)

    # ------------------------------------------------------------- finish
    def add_experts(self, trajectories: Iterable[Any]) -> None:
        """Experts loaded from files (no ``astkit_on_expert_trained`` for them)."""
        for position, trajectory in enumerate(trajectories):
            record = _expert_record(position, trajectory)
            self.experts.setdefault(record["index"], record)

    def finish(self, run_result: Any = None, *, experts: Iterable[Any] | None = None, distilled: Any = None,
               history: Sequence[Any] | None = None, evaluation: Any = None) -> dict[str, Path]:
        """Write the run's pictures and report.md; print a summary; return the files.

        Takes a :class:`astkit.RunResult`, or the parts a single stage made.
        Under torchrun only rank 0 writes and prints (other ranks get ``{}``).
        """
        if distributed.rank() != 0:
            return {}
        if run_result is not None:
            experts = experts if experts is not None else run_result.experts
            distilled = distilled if distilled is not None else run_result.distilled
            history = history if history is not None else run_result.history
            evaluation = evaluation if evaluation is not None else run_result.evaluation
        if experts is not None:
            self.add_experts(experts)
        if history is None and self.engine is not None and getattr(self.engine, "history", None):
            history = self.engine.history
        history_dicts = [_as_dict(m) for m in history] if history else list(self.history)
        if evaluation is None:
            finals = [r for it, r in self.evaluations if it is None]
            evaluation = finals[-1] if finals else None
        out = self._out()
        files: dict[str, Path] = {}
        if distilled is not None:
            dmeta = distilled.meta.get("dataset", {})
            files["grid"] = save_grid(
                distilled.images, distilled.labels, out / "distilled.png", dmeta.get("mean"), dmeta.get("std"),
                distilled.zca or None, dmeta.get("class_names"),
                title=f"{dmeta.get('name', 'distilled')}: {distilled.ipc} images per class, "
                      f"iteration {distilled.iteration}",
            )
        if history_dicts:
            last = distilled.iteration if distilled is not None else int(history_dicts[-1]["iteration"]) + 1
            points = [(it if it is not None else last, r) for it, r in self.evaluations]
            if evaluation is not None and not any(r is evaluation for _, r in self.evaluations):
                points.append((last, evaluation))
            files["curves"] = plot_curves(history_dicts, points, out / "curves.png")
        expert_list = [self.experts[k] for k in sorted(self.experts)]
        if expert_list:
            files["avg_var"] = plot_experts(expert_list, out / "avg_var.png")
        report = out / "report.md"
        files["report"] = report
        text = self.render(expert_list, distilled, history_dicts, evaluation, files)
        store.atomic_write_text(report, text)
        if not self.quiet:
            self.print_summary(expert_list, distilled, history_dicts, evaluation, files)
        return files

    # ------------------------------------------------------------ report
    def _plugins(self, distilled: Any = None) -> dict[str, str]:
        if self.engine is not None:
            versions = self.engine.plugin_set.versions(self.engine.enabled)
        elif distilled is not None:
            versions = dict(distilled.meta.get("plugins", {}))
        else:
            versions = {}
        return {k: v for k, v in versions.items() if k != self.astkit_plugin_name}

    def render(self, experts: list[dict[str, Any]], distilled: Any, history: list[dict[str, Any]],
               evaluation: Any, files: Mapping[str, Path]) -> str:
        """report.md: config summary, plugins, experts, distillation, evaluation, files."""
        from astkit._version import __version__

        c = self.config
        out = self._out()
        lines = [
            "# astkit report",
            "",
            f"- written: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')} by astkit {__version__}",
            f"- output folder: `{out}`",
            f"- wall time of this command: {_duration(time.time() - self.started)}",
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
                "The full configuration is in `config.toml` (rerun with `astkit run --config config.toml`).",
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
                acc = x["test_accuracy"]
                lines.append(f"| {x['index']} | {x['epochs']} | {_fmt(acc[-1] if acc else None)} | "
                             f"{_fmt(max(acc) if acc else None)} | {x['avg_var']:.4g} |")
            mean_var = sum(x["avg_var"] for x in experts) / len(experts)
            lines += ["", f"Mean Avg_Var {mean_var:.4g} (lower means smoother trajectories).", ""]
        if history:
            last = history[-1]
            seconds = sum(s for s in (_num(m.get("seconds")) for m in history) if math.isfinite(s))
            lines += [
                "## Distillation",
                "",
                f"- iterations: {int(last['iteration']) + 1}",
                f"- final matching loss: {_num(last.get('loss')):.4g} (first {_num(history[0].get('loss')):.4g})",
                f"- learned student lr: {_num(last.get('lr')):.4g}",
                f"- time in iterations: {_duration(seconds)}",
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
        lines += ["## Files", ""]
        lines += _file_list(out)
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
            mean_acc = sum(accs) / len(accs) if accs else float("nan")
            mean_var = sum(x["avg_var"] for x in experts) / len(experts)
            table.add_row("experts", f"{len(experts)}, test acc {mean_acc:.4f}, Avg_Var {mean_var:.4g}")
        if history:
            last = history[-1]
            table.add_row("distillation", f"{int(last['iteration']) + 1} iterations, loss {_num(last.get('loss')):.4g}, "
                                          f"lr {_num(last.get('lr')):.4g}")
        if evaluation is not None:
            for name, r in evaluation.architectures.items():
                n = len(r.accuracies)
                table.add_row(f"accuracy ({name})",
                              f"{r.mean:.4f} ± {r.std:.4f} over {n} net{'s' if n != 1 else ''}")
        for key, path in files.items():
            table.add_row(key, str(path))
        console.print(table)


def _num(value: Any) -> float:
    """A metric as a float: ``null`` (how metrics.jsonl writes NaN/Infinity) or missing is NaN."""
    if value is None:
        return float("nan")
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {sec:02d}s" if hours else f"{minutes}m {sec:02d}s"


def _file_list(out: Path) -> list[str]:
    """``- name (size)`` for the run folder's files; folders summarised."""
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
    if not any("report.md" in line for line in lines):
        lines.append("- `report.md` (this file)")
    return lines


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
