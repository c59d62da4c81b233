"""What the engine's stages return: plain objects, not printed text."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from astkit import labels as label_rules
from astkit import store
from astkit.errors import FileFormatError

#: distilled files store the whitening tensors under this prefix
ZCA_PREFIX = "zca."


@dataclass
class IterationMetrics:
    """The numbers of one distillation iteration."""

    iteration: int
    loss: float
    lr: float
    start_epoch: int
    expert: int
    inner_weight: float
    terms: list[float]
    seconds: float
    grad_norm: float = 0.0
    #: the update was rolled back to the last sane state and the image lr lowered
    rolled_back: bool = False
    lr_img: float = 0.0
    #: why it was rolled back (see ``Distiller.state_problem``), else None
    rollback_reason: str | None = None
    #: the loss exceeded ``distill.max_loss_to_update``: nothing was updated
    skipped: bool = False

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class DistilledSet:
    """Synthetic images, their labels and the learned student lr.

    Labels are hard (int64 ``(N,)``) or soft (float logits ``(N, C)``, see
    :mod:`astkit.labels`).

    ``meta`` holds what is needed to use the set elsewhere: the dataset's
    class names and normalisation (``meta["dataset"]``), the model, the
    config and plugins of the run. ``zca`` holds the whitening tensors when
    the images live in ZCA space.
    """

    images: torch.Tensor
    labels: torch.Tensor
    lr: float
    iteration: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    zca: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def ipc(self) -> int:
        """Images per class: the largest class of hard labels; for soft labels (whose argmax may
        move while they are learned) the run's ``distill.ipc``, else images / classes rounded up."""
        if self.soft_labels:
            recorded = ((self.meta.get("config") or {}).get("distill") or {}).get("ipc")
            if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded >= 1:
                return recorded
            classes = self.labels.shape[1]
            return -(-self.labels.shape[0] // classes) if classes else 0
        counts = torch.bincount(label_rules.classes(self.labels))
        return int(counts.max()) if counts.numel() else 0

    @property
    def soft_labels(self) -> bool:
        return label_rules.is_soft(self.labels)

    def save(self, path: str | Path) -> Path:
        tensors = {"images": self.images, "labels": self.labels, "lr": torch.tensor([self.lr])}
        tensors.update({ZCA_PREFIX + k: v for k, v in self.zca.items()})
        return store.save(path, "distilled", tensors, {**self.meta, "iteration": self.iteration, "lr": self.lr})

    def check_fits(self, dataset: Any) -> None:
        """Raise unless the set can be evaluated on ``dataset`` (its name, image
        shape, classes and ZCA whitening)."""
        made_on = self.meta.get("dataset", {}).get("name")
        if made_on and made_on != dataset.name:
            raise FileFormatError(f"the distilled set was made from {made_on}, this run tests on {dataset.name}; pass --dataset {made_on}")
        if tuple(self.images.shape[1:]) != (dataset.channels, *dataset.image_size):
            raise FileFormatError(
                f"distilled images are {tuple(self.images.shape[1:])}, {dataset.name} has "
                f"{(dataset.channels, *dataset.image_size)}; evaluate on the dataset it was distilled from"
            )
        why = label_rules.problem(self.labels, self.images.shape[0], dataset.num_classes)
        if why is not None:
            raise FileFormatError(f"the distilled set's labels do not fit the {dataset.num_classes} classes of "
                                  f"{dataset.name} ({why}); evaluate on the dataset it was distilled from")
        if bool(self.zca) != (dataset.zca is not None):
            raise FileFormatError("the distilled set and this run disagree on ZCA whitening; set data.zca to match")

    @staticmethod
    def zca_in(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The whitening tensors among a distilled file's tensors (stored under ``zca.``)."""
        return {k[len(ZCA_PREFIX):]: v for k, v in tensors.items() if k.startswith(ZCA_PREFIX)}

    @classmethod
    def load(cls, path: str | Path) -> "DistilledSet":
        tensors, meta = store.load(path, "distilled")
        try:
            images, labels, lr = tensors["images"], tensors["labels"], float(tensors["lr"][0])
        except KeyError as exc:
            raise FileFormatError(f"{path}: distilled file is missing tensor {exc}") from None
        if images.ndim != 4 or labels.shape[:1] != images.shape[:1] or labels.ndim not in (1, 2):
            raise FileFormatError(f"{path}: images and labels do not match")
        labels = labels.float() if labels.ndim == 2 else labels.long()
        zca = cls.zca_in(tensors)
        meta.pop("lr", None)
        return cls(images, labels, lr, int(meta.pop("iteration", 0)), meta, zca)


@dataclass
class ArchitectureResult:
    """Final test accuracies of fresh networks of one architecture."""

    model: str
    accuracies: list[float]
    max_accuracies: list[float] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return sum(self.accuracies) / len(self.accuracies)

    @property
    def std(self) -> float:
        m = self.mean
        return math.sqrt(sum((a - m) ** 2 for a in self.accuracies) / len(self.accuracies))

    def to_json(self) -> dict[str, Any]:
        out = {"model": self.model, "mean": self.mean, "std": self.std, "accuracies": self.accuracies}
        if self.max_accuracies:
            out["max_during_training_peeks_at_test"] = self.max_accuracies
        return out


@dataclass
class EvaluationResult:
    """Accuracies per architecture (final accuracy; max only if asked)."""

    architectures: dict[str, ArchitectureResult]
    lr: float
    epochs: int
    #: wall-clock seconds the evaluation took (None: not measured)
    seconds: float | None = None

    def __getitem__(self, model: str) -> ArchitectureResult:
        return self.architectures[model]

    def to_json(self) -> dict[str, Any]:
        out = {"lr": self.lr, "epochs": self.epochs,
               "architectures": {k: v.to_json() for k, v in self.architectures.items()}}
        if self.seconds is not None:
            out["seconds"] = self.seconds
        return out


@dataclass
class RunResult:
    """Everything ``Engine.run`` produced."""

    experts: list
    distilled: DistilledSet
    evaluation: EvaluationResult
    history: list[IterationMetrics]
    out: Path | None = None
