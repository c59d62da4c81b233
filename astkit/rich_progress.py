"""Rich progress bars for the engine's long loops: :class:`RichProgress`.

The engine reports to a :class:`astkit.progress.Progress` and never prints;
the CLI passes a :class:`RichProgress`, which draws one bar per running loop
(expert epochs, distillation iterations, evaluation networks) with an ETA and
a live line of key numbers, or plain status lines when not on a terminal.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

from rich.console import Console

from astkit.progress import Progress

__all__ = ["RichProgress", "format_duration", "format_fields"]


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
        line += f", {format_duration(elapsed)}"
        rate_done = done - state["base"]
        if not final and rate_done > 0 and total > done:
            line += f", eta {format_duration(elapsed / rate_done * (total - done))}"
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


def format_duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {sec:02d}s" if hours else f"{minutes}m {sec:02d}s"
