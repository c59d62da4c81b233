"""``metrics.jsonl``: the run's record of iterations and evaluations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from astkit import store


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, appended as a run goes
    (``path=None``: a log that writes nothing, for ranks other than 0).

    ``restart_from`` (the distiller's iteration history) rewrites the file
    with those iterations, dropping records of iterations a resumed run
    will redo; ``keep_evaluations_upto`` keeps the file's evaluation records
    up to that iteration (the last one the checkpoint records as made). The
    ``baseline`` records (``astkit baseline``) are kept, at the end.
    """

    def __init__(self, path: Path | None, restart_from: list[dict] | None = None, *,
                 keep_evaluations_upto: int | None = None):
        self.path = path
        if path is not None and restart_from is not None:
            upto = -1 if keep_evaluations_upto is None else keep_evaluations_upto
            kept = self.records()
            evaluations = [r for r in kept if r.get("event") == "evaluation"
                           and isinstance(r.get("iteration"), int) and r["iteration"] <= upto]
            records = [{"event": "iteration", **m} for m in restart_from] + evaluations
            records.sort(key=lambda r: (r["iteration"] + (-0.5 if r["event"] == "evaluation" else 0)))
            records += [r for r in kept if r.get("event") == "baseline"]  # real baselines outlive a restart
            store.atomic_write_text(path, "".join(store.json_line(r) + "\n" for r in records))

    def records(self) -> list[dict]:
        """The file's records that parse (a line cut by a kill is skipped;
        non-finite numbers are ``null``)."""
        if self.path is None or not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one whole line of strict JSON (NaN/Infinity as
        ``null``); a full disk leaves the file as it was (a one-line error)."""
        if self.path is None:
            return
        store.append_line(self.path, store.json_line(record))
