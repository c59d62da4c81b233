"""Expert trajectories: the parameters of a trained network, epoch by epoch."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from astkit import store
from astkit.errors import FileFormatError
from astkit.functional import FlatModel, ParamLayout


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a network: registry name and arguments."""

    name: str
    channels: int
    num_classes: int
    image_size: tuple[int, int]
    options: dict[str, Any] = field(default_factory=dict)

    def build(self, registry: Mapping | None = None) -> nn.Module:
        from astkit.models import build_model

        return build_model(
            self.name,
            channels=self.channels,
            num_classes=self.num_classes,
            image_size=self.image_size,
            registry=registry,
            **self.options,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "channels": self.channels,
            "num_classes": self.num_classes,
            "image_size": list(self.image_size),
            "options": dict(self.options),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ModelSpec":
        return cls(data["name"], int(data["channels"]), int(data["num_classes"]),
                   tuple(data["image_size"]), dict(data.get("options", {})))


def avg_var(snapshots: torch.Tensor) -> float:
    """Mean squared L2 distance between consecutive snapshots (AST's Avg_Var)."""
    if snapshots.shape[0] < 2:
        return 0.0
    diffs = snapshots[1:].double() - snapshots[:-1].double()
    return float(diffs.pow(2).sum(dim=1).mean())


@dataclass
class Trajectory:
    """``snapshots[k]`` is the flat parameter vector after ``k`` epochs."""

    snapshots: torch.Tensor
    layout: ParamLayout
    model: ModelSpec
    test_accuracy: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    #: model registry used by :meth:`build_model` (the engine sets its own,
    #: which includes models registered by plugins).
    registry: Mapping | None = field(default=None, repr=False, compare=False)

    @property
    def num_epochs(self) -> int:
        return self.snapshots.shape[0] - 1

    @property
    def avg_var(self) -> float:
        return avg_var(self.snapshots)

    def params(self, epoch: int) -> dict[str, torch.Tensor]:
        return self.layout.split(self.snapshots[epoch])

    def build_model(self, snapshot: int = -1, registry: Mapping | None = None) -> nn.Module:
        """The network with the parameters of ``snapshot`` loaded."""
        module = self.model.build(registry if registry is not None else self.registry)
        FlatModel(module).load_into(self.snapshots[snapshot])
        return module

    # ----------------------------------------------------------------- files
    def save(self, path: str | Path) -> Path:
        meta = {
            **self.meta,
            "model": self.model.to_json(),
            "layout": self.layout.to_json(),
            "test_accuracy": self.test_accuracy,
            "train_loss": self.train_loss,
            "avg_var": self.avg_var,
            "num_epochs": self.num_epochs,
        }
        return store.save(path, "trajectory", {"snapshots": self.snapshots}, meta)

    @classmethod
    def load(cls, path: str | Path) -> "Trajectory":
        tensors, meta = store.load(path, "trajectory")
        try:
            snapshots = tensors["snapshots"]
            layout = ParamLayout.from_json(meta.pop("layout"))
            model = ModelSpec.from_json(meta.pop("model"))
        except (KeyError, TypeError, ValueError) as exc:
            raise FileFormatError(f"{path}: trajectory file is missing {exc}") from None
        if snapshots.ndim != 2 or snapshots.shape[1] != layout.size:
            raise FileFormatError(f"{path}: snapshots do not match the recorded parameter layout")
        for key in ("avg_var", "num_epochs"):
            meta.pop(key, None)
        return cls(snapshots, layout, model, list(meta.pop("test_accuracy", [])),
                   list(meta.pop("train_loss", [])), meta)
