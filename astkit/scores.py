"""DD-Ranking's label-robust scores, as pure functions of accuracies.

Source: DD-Ranking (NUS-HPC-AI-Lab; Li et al., "DD-Ranking: Rethinking the
Evaluation of Dataset Distillation", arXiv 2505.13300; the ``ddranking``
package). Accuracies are fractions in [0, 1]:

* HLR, hard label recovery: ``Acc(real-hard) - Acc(syn-hard)`` (lower is better);
* IOR, improvement over random: ``Acc(syn-any) - Acc(rdm-any)`` (higher is better);
* ``alpha = w * IOR - (1 - w) * HLR``, ``w = 0.5``;
* LRS, the label-robust score: ``(e^alpha - e^-1) / (e - e^-1)`` (DD-Ranking
  shows it times 100%).

:func:`from_records` picks those accuracies out of a run's ``metrics.jsonl``
records; the rule is documented in docs/workflow.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

#: DD-Ranking's default weight of IOR against HLR (their leaderboard's)
W = 0.5

#: what to run when an input is missing
NEEDS_FULL = "run `astkit baseline --real full` (or pass --real-accuracy)"
NEEDS_RANDOM = "run `astkit baseline --real random`"
NEEDS_SYN_HARD = "run `astkit baseline` (it evaluates a soft-labelled set with hard labels)"


def hlr(acc_real_hard: float, acc_syn_hard: float) -> float:
    """Hard label recovery (DD-Ranking): ``Acc(real-hard) - Acc(syn-hard)``, how
    far the distilled images with hard labels stay below the full real training set."""
    return acc_real_hard - acc_syn_hard


def ior(acc_syn_any: float, acc_rdm_any: float) -> float:
    """Improvement over random (DD-Ranking): ``Acc(syn-any) - Acc(rdm-any)``, the
    set as evaluated (soft labels included) minus a random real subset of the same
    ipc evaluated the same way."""
    return acc_syn_any - acc_rdm_any


def alpha(ior: float, hlr: float, w: float = W) -> float:
    """DD-Ranking's ``alpha = w * IOR - (1 - w) * HLR``."""
    return w * ior - (1.0 - w) * hlr


def lrs(alpha: float) -> float:
    """DD-Ranking's label-robust score ``(e^alpha - e^-1) / (e - e^-1)`` (alpha in
    [-1, 1] maps to [0, 1]; as a fraction, not DD-Ranking's percent)."""
    return (math.exp(alpha) - math.exp(-1.0)) / (math.e - math.exp(-1.0))


@dataclass
class Scores:
    """One architecture's scores and the accuracies they come from (None: not available)."""

    model: str
    syn_any: float | None = None
    syn_hard: float | None = None
    rdm_any: float | None = None
    real_hard: float | None = None
    ior: float | None = None
    hlr: float | None = None
    alpha: float | None = None
    lrs: float | None = None
    #: why a score is missing: {"ior": "run ...", "hlr": "run ..."}
    missing: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, model: str, syn_any: float | None, syn_hard: float | None, rdm_any: float | None,
           real_hard: float | None, w: float = W) -> "Scores":
        """The scores of whichever inputs are given."""
        s = cls(model, syn_any, syn_hard, rdm_any, real_hard)
        if syn_any is not None and rdm_any is not None:
            s.ior = ior(syn_any, rdm_any)
        if real_hard is not None and syn_hard is not None:
            s.hlr = hlr(real_hard, syn_hard)
        if s.ior is not None and s.hlr is not None:
            s.alpha = alpha(s.ior, s.hlr, w)
            s.lrs = lrs(s.alpha)
        return s

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "acc_syn_any": self.syn_any, "acc_syn_hard": self.syn_hard,
                "acc_rdm_any": self.rdm_any, "acc_real_hard": self.real_hard, "ior": self.ior, "hlr": self.hlr,
                "alpha": self.alpha, "lrs": self.lrs, "missing": dict(self.missing)}

    def line(self) -> str:
        """``scores (convnet): IOR +0.0123, HLR 0.0456, LRS 0.4921``; n/a with what to run."""
        def show(name: str, value: float | None, signed: bool = False) -> str:
            if value is not None:
                return f"{name} {value:+.4f}" if signed else f"{name} {value:.4f}"
            return f"{name} n/a ({self.missing.get(name.lower(), 'missing inputs')})"

        lrs_missing = self.missing.get("hlr") or self.missing.get("ior")
        lrs_text = f"LRS {self.lrs:.4f}" if self.lrs is not None else f"LRS n/a ({lrs_missing or 'missing inputs'})"
        return f"scores ({self.model}): {show('IOR', self.ior, True)}, {show('HLR', self.hlr, True)}, {lrs_text}"


# ------------------------------------------------------------ from records
def _mean(record: Mapping[str, Any] | None, model: str) -> float | None:
    if not record:
        return None
    value = ((record.get("architectures") or {}).get(model) or {}).get("mean")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def latest(records: Iterable[Mapping[str, Any]], **match: Any) -> dict[str, Any] | None:
    """The last record whose keys equal ``match`` (``None`` values must be absent or None)."""
    found = None
    for record in records:
        if all(record.get(k) == v for k, v in match.items()):
            found = dict(record)
    return found


def from_records(records: list[Mapping[str, Any]], *, ipc: int, soft: bool,
                 evaluation: Mapping[str, Any] | None = None, w: float = W) -> dict[str, Scores]:
    """The scores of a run, per evaluation architecture, from its metrics records.

    * Acc(syn-any): ``evaluation`` (an evaluation's JSON) or else the last
      ``final_evaluation`` record;
    * Acc(syn-hard): the same for a hard-labelled set; for a soft-labelled one
      (``soft``) the last ``baseline`` record of kind ``syn-hard``;
    * Acc(rdm-any): the last ``baseline`` record of kind ``random`` with this
      ``ipc``, labelled like the set (``labels`` "soft" or "hard") and trained
      for as many epochs as the set's evaluation;
    * Acc(real-hard): the last ``baseline`` record of kind ``full``: an
      architecture's measured mean, or the ``accuracy`` a user stated.

    Returns ``{}`` when there is no evaluation of the set.
    """
    evaluation = evaluation if evaluation is not None else latest(records, event="final_evaluation")
    if not evaluation:
        return {}
    baselines = [r for r in records if r.get("event") == "baseline"]
    labels = "soft" if soft else "hard"
    random = latest([r for r in baselines if r.get("epochs") == evaluation.get("epochs")],
                    kind="random", ipc=ipc, labels=labels)
    full = latest(baselines, kind="full")
    syn_hard = latest(baselines, kind="syn-hard") if soft else evaluation
    out = {}
    for model in (evaluation.get("architectures") or {}):
        real = full.get("accuracy") if full and full.get("stated") else _mean(full, model)
        s = Scores.of(model, _mean(evaluation, model), _mean(syn_hard, model), _mean(random, model),
                      float(real) if real is not None else None, w)
        if s.ior is None:
            s.missing["ior"] = NEEDS_RANDOM + (f" with ipc {ipc}, {labels} labels, {evaluation.get('epochs')} epochs"
                                               if any(r.get("kind") == "random" for r in baselines) else "")
        if s.hlr is None:
            s.missing["hlr"] = NEEDS_FULL if s.real_hard is None else NEEDS_SYN_HARD
        out[model] = s
    return out
