"""Several runs side by side: what ``astkit compare`` tabulates and plots.

:func:`load_run` reads one run folder (``config.toml``, ``metrics.jsonl``,
the distilled set's labels); :class:`Comparison` holds the runs, the config
keys that differ between them, and renders the table as rows, Markdown
(``compare.md``) and JSON (``compare.json``). The figure (``compare.png``)
is drawn by :func:`astkit.figures.plot_comparison` from :meth:`Comparison.series`.
Every output carries :data:`MARK`, so a later compare overwrites its own
files and refuses anyone else's.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from astkit import scores as score_rules
from astkit import store
from astkit._version import __version__
from astkit.config import read_config_file
from astkit.errors import UserError
from astkit.metrics_log import MetricsLog
from astkit.run_folder import RunFolder

#: the names of the three outputs in ``--out``
OUTPUTS = ("compare.md", "compare.json", "compare.png")
#: written into every output (first line of the Markdown, ``"astkit"`` of the JSON, the PNG's Software text)
MARK = "astkit compare"
#: config keys that always differ and say nothing (the folder is the column's name)
IGNORED_KEYS = ("out",)
#: the real baselines, in table order
BASELINE_KINDS = ("random", "kmeans", "full")


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


@dataclass
class RunSummary:
    """One run folder, as the comparison sees it."""

    folder: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]
    soft: bool = False
    name: str = ""

    @property
    def ipc(self) -> int | None:
        ipc = self.config.get("distill.ipc")
        return ipc if isinstance(ipc, int) else None

    @property
    def final(self) -> dict[str, Any] | None:
        """The last ``final_evaluation`` record."""
        return score_rules.latest(self.records, event="final_evaluation")

    @property
    def iterations(self) -> int:
        its = [r["iteration"] for r in self.records if r.get("event") == "iteration" and isinstance(r.get("iteration"), int)]
        return max(its) + 1 if its else 0

    def baseline(self, kind: str) -> dict[str, Any] | None:
        """The last baseline record of ``kind`` that fits the run (subsets: its ipc, labelled like its set)."""
        if kind == "full":
            return score_rules.latest(self.records, event="baseline", kind="full")
        return score_rules.latest(self.records, event="baseline", kind=kind, ipc=self.ipc,
                                  labels="soft" if self.soft else "hard")

    def scores(self) -> dict[str, score_rules.Scores]:
        return score_rules.from_records(self.records, ipc=self.ipc or 0, soft=self.soft)

    def wall_seconds(self) -> tuple[float, int]:
        """Seconds of the distillation iterations and the set's evaluations as
        recorded, and how many evaluation records hold no time."""
        total, untimed = 0.0, 0
        for r in self.records:
            if r.get("event") == "iteration":
                total += _finite(r.get("seconds")) or 0.0
            elif r.get("event") in ("evaluation", "final_evaluation"):
                seconds = _finite(r.get("seconds"))
                total += seconds or 0.0
                untimed += seconds is None
        return total, untimed

    def accuracy_points(self) -> dict[str, list[tuple[int, float, float]]]:
        """Per architecture: (iteration, mean, std) of each evaluation, the final one at the last iteration."""
        points: dict[str, list[tuple[int, float, float]]] = {}
        last = self.iterations
        for r in self.records:
            if r.get("event") == "evaluation" and isinstance(r.get("iteration"), int):
                it = r["iteration"]
            elif r.get("event") == "final_evaluation":
                it = last
            else:
                continue
            for name, a in (r.get("architectures") or {}).items():
                mean = _finite(a.get("mean"))
                if mean is not None:
                    points.setdefault(name, []).append((it, mean, _finite(a.get("std")) or 0.0))
        return points

    def loss_points(self) -> list[tuple[int, float]]:
        return [(r["iteration"] + 1, float(r["loss"])) for r in self.records
                if r.get("event") == "iteration" and isinstance(r.get("iteration"), int) and _finite(r.get("loss")) is not None]


def load_run(path: str | Path) -> RunSummary:
    """Read a run folder; a one-line error if it is not one (no ``config.toml``)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; pass run folders written by astkit run or astkit distill")
    folder = RunFolder(path)
    if not path.is_dir() or not folder.config.is_file():
        raise UserError(f"{path} is not an astkit run folder (no {folder.config.name}); pass folders written by "
                        "astkit run or astkit distill")
    config = _flatten(read_config_file(folder.config))
    soft = False
    if folder.distilled.is_file():
        from astkit.results import DistilledSet

        soft = DistilledSet.load(folder.distilled).soft_labels
    return RunSummary(path, config, MetricsLog(folder.metrics).records(), soft, name=str(path))


# --------------------------------------------------------------- comparison
@dataclass
class Comparison:
    """Runs side by side: config differences, accuracies, baselines, scores, time."""

    runs: list[RunSummary]
    differing: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, folders: list[str | Path]) -> "Comparison":
        if not folders:
            raise UserError("give at least one run folder to compare")
        runs = [load_run(f) for f in folders]
        keys = sorted({k for r in runs for k in r.config} - set(IGNORED_KEYS))
        differing = [k for k in keys if len({json.dumps(r.config.get(k), sort_keys=True) for r in runs}) > 1]
        return cls(runs, differing)

    def architectures(self) -> list[str]:
        names: dict[str, None] = {}
        for r in self.runs:
            for record in (r.final, *(r.baseline(k) for k in BASELINE_KINDS)):
                names.update(dict.fromkeys((record or {}).get("architectures") or {}))
        return list(names)

    def rows(self) -> list[tuple[str, list[str]]]:
        """The table: ``(what, [one cell per run])``."""
        rows: list[tuple[str, list[str]]] = []
        for key in self.differing:
            rows.append((key, [_cell(r.config.get(key)) for r in self.runs]))
        rows.append(("iterations", [str(r.iterations) for r in self.runs]))
        archs = self.architectures()
        for name in archs:
            rows.append((f"accuracy ({name})", [_accuracy(r.final, name) for r in self.runs]))
        for kind in BASELINE_KINDS:
            if any(r.baseline(kind) for r in self.runs):
                for name in archs:
                    rows.append((f"{kind} real ({name})", [_accuracy(r.baseline(kind), name) for r in self.runs]))
        scored = [r.scores() for r in self.runs]
        if any(any(s.ior is not None or s.hlr is not None for s in found.values()) for found in scored):
            for label, attr in (("IOR", "ior"), ("HLR", "hlr"), ("LRS", "lrs")):
                for name in archs:
                    rows.append((f"{label} ({name})", [_score(found.get(name), attr) for found in scored]))
        rows.append(("wall time (distil + evaluate)", [_wall(*r.wall_seconds()) for r in self.runs]))
        return rows

    def header(self) -> list[str]:
        return ["", *(r.name for r in self.runs)]

    def to_markdown(self) -> str:
        head = self.header()
        lines = [f"<!-- {MARK}: written by astkit {__version__}; rerun `astkit compare` to update -->", "",
                 "# astkit compare", "",
                 "Config keys that differ between the runs, the final accuracy of fresh networks (mean ± std over "
                 "the nets), the real baselines and DD-Ranking scores where recorded (`astkit baseline`), and "
                 "the recorded time of distillation and evaluation.", "",
                 "| " + " | ".join(_md(h) for h in head) + " |", "|" + "---|" * len(head)]
        for label, cells in self.rows():
            lines.append("| " + " | ".join(_md(c) for c in (label, *cells)) + " |")
        lines += ["", f"Figure: `{OUTPUTS[2]}` (accuracy and matching loss against iterations).", ""]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        runs = []
        for r in self.runs:
            seconds, untimed = r.wall_seconds()
            final = r.final or {}
            runs.append({
                "folder": str(r.folder),
                "config": {k: r.config.get(k) for k in self.differing},
                "ipc": r.ipc,
                "labels": "soft" if r.soft else "hard",
                "iterations": r.iterations,
                "accuracy": _arch_json(final),
                "baselines": {k: _arch_json(r.baseline(k) or {}) | _stated(r.baseline(k)) for k in BASELINE_KINDS
                              if r.baseline(k)},
                "scores": {name: s.to_json() for name, s in r.scores().items()},
                "wall_seconds": seconds,
                "untimed_evaluations": untimed,
            })
        return {"astkit": MARK, "astkit_version": __version__, "differing_keys": list(self.differing), "runs": runs}

    def series(self) -> list[dict[str, Any]]:
        """What the figure draws: per run its label, loss and accuracy points."""
        return [{"label": r.name, "loss": r.loss_points(), "accuracy": r.accuracy_points()} for r in self.runs]


def _arch_json(record: dict[str, Any]) -> dict[str, Any]:
    return {name: {"mean": a.get("mean"), "std": a.get("std"), "nets": len(a.get("accuracies") or [])}
            for name, a in (record.get("architectures") or {}).items()}


def _stated(record: dict[str, Any] | None) -> dict[str, Any]:
    return {"stated_accuracy": record.get("accuracy")} if record and record.get("stated") else {}


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return json.dumps(value) if isinstance(value, (list, dict, bool)) else str(value)


def _md(text: str) -> str:
    return str(text).replace("|", "\\|")


def _accuracy(record: dict[str, Any] | None, name: str) -> str:
    if not record:
        return "-"
    if record.get("stated"):
        return f"{record['accuracy']:.4f} (stated)"
    a = (record.get("architectures") or {}).get(name)
    mean = _finite((a or {}).get("mean"))
    if mean is None:
        return "-"
    n = len(a.get("accuracies") or [])
    return f"{mean:.4f} ± {_finite(a.get('std')) or 0.0:.4f} ({n} net{'s' if n != 1 else ''})"


def _score(s: score_rules.Scores | None, attr: str) -> str:
    if s is None:
        return "-"
    value = getattr(s, attr)
    if value is None:
        return "n/a"
    return f"{value:.4f}" if attr == "lrs" else f"{value:+.4f}"


def _wall(seconds: float, untimed: int) -> str:
    from datetime import timedelta

    text = str(timedelta(seconds=round(seconds)))
    return text + (f" (+ {untimed} untimed evaluation{'s' if untimed != 1 else ''})" if untimed else "")


# ------------------------------------------------------------------ outputs
def output_paths(out: str | Path) -> list[Path]:
    """``compare.md``, ``compare.json`` and ``compare.png`` in ``out``."""
    return [Path(out) / name for name in OUTPUTS]


def is_ours(path: Path) -> bool:
    """Whether an existing output file was written by ``astkit compare``."""
    try:
        if path.suffix == ".md":
            return MARK in path.read_text(errors="replace").split("\n", 1)[0]
        if path.suffix == ".json":
            data = json.loads(path.read_text(errors="replace"))
            return isinstance(data, dict) and data.get("astkit") == MARK
        with open(path, "rb") as fh:  # the PNG's text chunks come before its pixels
            head = fh.read(4096)
        return head.startswith(b"\x89PNG") and MARK.encode() in head
    except (OSError, ValueError):
        return False


def check_outputs(out: str | Path) -> list[Path]:
    """Raise, before anything is written, if ``out`` or one of the outputs is in
    the way (a file where the folder goes, a folder or another program's file
    under an output's name); return the output paths."""
    out = Path(out)
    blocker = next((p for p in (out, *out.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise UserError(f"--out {out}: {blocker} is a file, not a folder; choose another --out")
    paths = output_paths(out)
    for path in paths:
        if path.is_dir():
            raise UserError(f"{path} is a folder; remove it or choose another --out")
        if path.exists() and not is_ours(path):
            raise UserError(f"{path} exists and was not written by astkit compare; move it or choose another --out")
    return paths


def write_tables(comparison: Comparison, paths: list[Path]) -> None:
    """Write ``compare.md`` and ``compare.json`` (the first two of ``paths``)."""
    store.make_dir(paths[0].parent)
    store.atomic_write_text(paths[0], comparison.to_markdown())
    store.atomic_write_text(paths[1], json.dumps(store.finite_json(comparison.to_json()), indent=2) + "\n")
