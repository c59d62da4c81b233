"""Real-data baselines, trained and tested with a run's own evaluation protocol.

* ``random``: ``ipc`` distinct real images per class drawn at random (MTT's
  "random real" row; the same draw as the default initialisation);
* ``kmeans``: per class, scikit-learn's K-Means (``ipc`` clusters, ``n_init``
  10, seeded by the config's seed plus the class) on the images as the run
  holds them (normalised, and ZCA-whitened under ``data.zca``), and the real
  image nearest each centroid;
* ``full``: the whole real training set (DD-Ranking's Acc(real-hard)).

Each is evaluated by :meth:`astkit.Engine.evaluate` (the run's evaluation
networks, epochs, batch size and DSA) at ``evaluate.lr`` if set, else
``distill.lr_teacher`` (:func:`protocol_lr`). :func:`measure` returns the
``metrics.jsonl`` record; ``astkit baseline`` writes it. When the run's
distilled set has soft labels, the real subsets are labelled by a teacher
(the logits of the run's first expert at its last epoch), as DD-Ranking
labels its random subsets with the same teacher as the method.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterable

import torch

from astkit import _defaults
from astkit import labels as label_rules
from astkit.errors import UserError
from astkit.results import DistilledSet

#: the real sets ``astkit baseline --real`` knows
KINDS = ("random", "kmeans", "full")
#: the subsets of ``ipc`` images per class among them
SUBSETS = ("random", "kmeans")
#: K-Means restarts (fixed, so a baseline is reproducible)
KMEANS_N_INIT = 10


def parse_kinds(text: str | Iterable[str]) -> list[str]:
    """``"random,kmeans"`` -> ``["random", "kmeans"]``; an unknown kind is a one-line error."""
    parts = text.split(",") if isinstance(text, str) else [p for item in text for p in item.split(",")]
    kinds = list(dict.fromkeys(p.strip() for p in parts if p.strip()))
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise UserError(f"unknown --real kind {unknown[0]!r}; choose from {', '.join(KINDS)} (comma-separated)")
    if not kinds:
        raise UserError(f"--real is empty; choose from {', '.join(KINDS)} (comma-separated)")
    return kinds


def check_ipc(dataset: Any, ipc: int, option: str = "--ipc") -> None:
    """``ipc`` is at least 1 and fits the smallest class of ``dataset``."""
    if isinstance(ipc, bool) or not isinstance(ipc, int) or ipc < 1:
        raise UserError(f"{option} must be a whole number of at least 1, got {ipc!r}")
    smallest = min(len(i) for i in dataset.class_indices())
    if ipc > smallest:
        raise UserError(f"{option} {ipc} exceeds the smallest class of {dataset.name} ({smallest} images); "
                        f"lower {option}")


def protocol_lr(config: Any) -> float:
    """The lr real sets are trained at: ``evaluate.lr`` if set, else ``distill.lr_teacher``."""
    return config.evaluate.lr if config.evaluate.lr is not None else config.distill.lr_teacher


def kmeans_seed(seed: int, label: int) -> int:
    """The K-Means ``random_state`` of one class (scikit-learn takes < 2**32)."""
    return (seed + label) % 2**32


# ------------------------------------------------------------------ subsets
def random_subset(dataset: Any, ipc: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``ipc`` distinct real images per class, drawn by a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return _defaults.astkit_init_synthetic(dataset=dataset, ipc=ipc, generator=generator)


def nearest_to_centroids(features: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Indices of the rows of ``features`` nearest each of ``k`` K-Means
    centroids (scikit-learn, ``n_init`` :data:`KMEANS_N_INIT`, ``random_state``
    ``seed``), centroid by centroid; a row already taken goes to the next nearest."""
    from sklearn.cluster import KMeans

    x = features.detach().double().flatten(1)
    kmeans = KMeans(n_clusters=k, n_init=KMEANS_N_INIT, random_state=seed).fit(x.numpy())
    distances = torch.cdist(torch.from_numpy(kmeans.cluster_centers_), x)
    chosen: list[int] = []
    for row in distances:
        chosen.append(next(i for i in row.argsort().tolist() if i not in chosen))
    return torch.tensor(chosen, dtype=torch.long)


def kmeans_subset(dataset: Any, ipc: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class, the real image nearest each of ``ipc`` K-Means centroids of its images."""
    images, labels = [], []
    for label, indices in enumerate(dataset.class_indices()):
        chosen = nearest_to_centroids(dataset.train_images[indices], ipc, kmeans_seed(seed, label))
        images.append(dataset.train_images[indices[chosen]])
        labels.append(torch.full((ipc,), label, dtype=torch.long))
    return torch.cat(images).clone(), torch.cat(labels)


def real_subset(dataset: Any, ipc: int, kind: str = "random", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``ipc`` real images per class chosen by ``kind`` (``random`` or ``kmeans``), with hard labels."""
    if kind not in SUBSETS:
        raise UserError(f"unknown real subset kind {kind!r}; choose from {', '.join(SUBSETS)}")
    check_ipc(dataset, ipc, "ipc")
    return (random_subset if kind == "random" else kmeans_subset)(dataset, ipc, seed)


@torch.no_grad()
def teacher_logits(teacher: torch.nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Soft labels of ``images``: the ``teacher``'s logits (eval mode), on CPU."""
    teacher.eval()
    device = next(teacher.parameters()).device
    out = [teacher(images[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def with_hard_labels(distilled: DistilledSet) -> DistilledSet:
    """The set with each label replaced by its class (the argmax of soft labels):
    DD-Ranking's syn-hard."""
    return DistilledSet(distilled.images, label_rules.classes(distilled.labels).long(), distilled.lr,
                        distilled.iteration, {**distilled.meta, "origin": "distilled set, hard labels"},
                        distilled.zca)


# ------------------------------------------------------------------ measure
@contextlib.contextmanager
def evaluation_epochs(engine: Any, epochs: int | None):
    """Within the block, ``engine`` evaluates for ``epochs`` epochs (None: as configured)."""
    saved = engine.config.evaluate.epochs
    if epochs is not None:
        engine.config.evaluate.epochs = epochs
    try:
        yield
    finally:
        engine.config.evaluate.epochs = saved


def measure(engine: Any, kind: str, ipc: int, *, seed: int | None = None, full_epochs: int = 30,
            teacher: torch.nn.Module | None = None) -> dict[str, Any]:
    """Evaluate one real baseline under ``engine``'s protocol; return its
    ``metrics.jsonl`` record: ``{"event": "baseline", "kind", "ipc", "labels",
    "seed", "seconds", ...the evaluation's JSON}``.

    ``full`` trains on the whole training set for ``full_epochs`` epochs
    (``ipc`` is then the smallest class's size and not used). ``teacher``
    (a network) labels the subsets with its logits (soft labels).
    """
    if kind not in KINDS:
        raise UserError(f"unknown --real kind {kind!r}; choose from {', '.join(KINDS)}")
    seed = engine.config.seed if seed is None else seed
    ds = engine.dataset
    lr = protocol_lr(engine.config)
    epochs = None
    if kind == "full":
        images, labels = ds.train_images, ds.train_labels.long()
        zca = ds.zca.tensors() if ds.zca is not None else {}
        distilled = DistilledSet(images, labels, lr, 0, {**engine.metadata(), "origin": "full real training set"},
                                 zca)
        epochs, teacher = full_epochs, None
    else:
        distilled = engine.real_subset(ipc, kind, lr=lr, seed=seed)
        if teacher is not None:
            distilled.labels = teacher_logits(teacher, distilled.images)
    started = time.perf_counter()
    with evaluation_epochs(engine, epochs):
        result = engine.evaluate(distilled)
    record = {"event": "baseline", "kind": kind, "ipc": None if kind == "full" else ipc,
              "labels": "soft" if teacher is not None else "hard", "seed": seed,
              "images": int(distilled.images.shape[0]), "seconds": time.perf_counter() - started}
    return {**record, **result.to_json()}


def measure_hard_labels(engine: Any, distilled: DistilledSet) -> dict[str, Any]:
    """Evaluate a soft-labelled distilled set with its hard labels (DD-Ranking's
    syn-hard); return the ``baseline`` record of kind ``syn-hard`` (its ``ipc``:
    images per class of the set, whatever classes the argmax gives)."""
    started = time.perf_counter()
    result = engine.evaluate(with_hard_labels(distilled))
    ipc = int(distilled.images.shape[0]) // engine.dataset.num_classes
    record = {"event": "baseline", "kind": "syn-hard", "ipc": ipc, "labels": "hard",
              "images": int(distilled.images.shape[0]), "seconds": time.perf_counter() - started}
    return {**record, **result.to_json()}


def stated_full(accuracy: float) -> dict[str, Any]:
    """The record of an Acc(real-hard) the user states (``--real-accuracy``)."""
    if isinstance(accuracy, bool) or not 0.0 <= float(accuracy) <= 1.0:
        raise UserError(f"--real-accuracy must be a fraction from 0 to 1 (e.g. 0.93), got {accuracy!r}")
    return {"event": "baseline", "kind": "full", "ipc": None, "labels": "hard", "stated": True,
            "accuracy": float(accuracy)}
