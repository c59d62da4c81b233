"""Expert trajectories: the parameters of a trained network, epoch by epoch."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from astkit import store
from astkit.errors import FileFormatError, UserError
from astkit.functional import FlatModel, ParamLayout
from astkit.models.revision import REVISION, retired_network


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a network: registry name and arguments.

    ``revision`` is the revision of astkit's built-in networks the spec was
    made with (:mod:`astkit.models.revision`); files written before it was
    recorded read as revision 1. It is not part of ``==``: whether an earlier
    revision built the same network is :func:`check_made_for`'s question.
    """

    name: str
    channels: int
    num_classes: int
    image_size: tuple[int, int]
    options: dict[str, Any] = field(default_factory=dict)
    revision: int = field(default=REVISION, compare=False)

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
            "revision": self.revision,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ModelSpec":
        return cls(data["name"], int(data["channels"]), int(data["num_classes"]),
                   tuple(data["image_size"]), dict(data.get("options", {})), int(data.get("revision", 1)))

    def canonical(self) -> "ModelSpec":
        """This spec without the options given at the model's default value: the same network either way
        (``width = 128`` written out or left to the default). Models astkit does not know are left as they are."""
        from astkit.models.registry import default_options

        try:
            defaults = default_options(self.name)
        except UserError:
            return self
        options = {k: v for k, v in self.options.items() if not (k in defaults and defaults[k] == v)}
        return ModelSpec(self.name, self.channels, self.num_classes, tuple(self.image_size), options, self.revision)

    def retired(self) -> str | None:
        """What this spec's network was, if it was recorded by an earlier astkit
        that built it differently (see :func:`astkit.models.revision.retired_network`);
        None if this astkit builds the same network."""
        return retired_network(self.name, self.channels, self.image_size, self.options, self.revision)


def describe(spec: ModelSpec) -> str:
    """``convnet(width=8) on 1x8x8 images, 10 classes``."""
    options = ",".join(f"{k}={v}" for k, v in sorted(spec.options.items()))
    size = "x".join(str(s) for s in spec.image_size)
    return f"{spec.name}({options}) on {spec.channels}x{size} images, {spec.num_classes} classes"


def check_made_for(meta: dict[str, Any], path: Path | str, spec: ModelSpec, dataset: Any, *,
                   kind: str = "expert") -> None:
    """Raise unless a file's recorded model (name, options, channels, image size,
    classes) is ``spec``, built by this astkit's networks (a file of an earlier
    revision whose network astkit no longer builds is refused, saying why), and
    its recorded data is ``dataset`` (name, ZCA); from the file's metadata alone."""
    try:
        recorded = ModelSpec.from_json(meta["model"])
    except (KeyError, TypeError, ValueError):
        raise FileFormatError(f"{path}: the {kind} file records no model; the file is damaged or from another tool") from None
    if recorded.canonical() != spec.canonical():
        fix = ("point experts.dir at matching experts or retrain them" if kind == "expert"
               else "resume with the config the checkpoint was made with, or start without --resume")
        raise FileFormatError(f"{path}: made for {describe(recorded)}, this run uses {describe(spec)}; {fix}")
    if recorded.revision > spec.revision:
        raise FileFormatError(
            f"{path}: made by a newer astkit (network revision {recorded.revision}, this one builds "
            f"{spec.revision}); upgrade astkit to use this {kind} file"
        )
    retired = recorded.retired()
    if retired:
        fix = "retrain the experts" if kind == "expert" else "start without --resume (with retrained experts)"
        raise FileFormatError(f"{path}: made with {retired}, which this astkit no longer builds; {fix}")
    made_on = meta.get("dataset") or {}
    if not isinstance(made_on, dict):
        raise FileFormatError(f"{path}: the {kind} file's dataset record is damaged; use an intact copy")
    if made_on.get("name") and made_on["name"] != dataset.name:
        raise FileFormatError(f"{path}: made from {made_on['name']}, this run uses {dataset.name}; use a {kind} of this dataset")
    if "zca" in made_on and bool(made_on["zca"]) != (dataset.zca is not None):
        raise FileFormatError(
            f"{path}: made {'with' if made_on['zca'] else 'without'} ZCA whitening; set data.zca to match"
        )


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

    def check_fits(self, spec: ModelSpec, dataset: Any, max_start_epoch: int, expert_epochs: int,
                   path: Path | str = "expert") -> None:
        """Raise unless this expert is of ``spec`` on ``dataset`` and long enough to
        match ``expert_epochs`` from every start epoch below ``max_start_epoch``."""
        check_made_for({**self.meta, "model": self.model.to_json()}, path, spec, dataset)
        if self.num_epochs < max_start_epoch - 1 + expert_epochs:
            raise UserError(
                f"{path}: has {self.num_epochs} epochs, but the last start epoch "
                f"({max_start_epoch - 1}) + expert_epochs ({expert_epochs}) goes beyond; "
                "lower distill.max_start_epoch"
            )

    @staticmethod
    def check_file(path: Path, spec: ModelSpec, dataset: Any, epochs: int) -> None:
        """Raise unless the file at ``path`` is an expert of ``spec`` on ``dataset``
        trained for ``epochs`` epochs; from its metadata alone."""
        meta = store.read_metadata(path)
        if meta.get("kind") != "trajectory":
            raise FileFormatError(
                f"{path}: an astkit {meta.get('kind')} file in the experts folder; move it out (the folder holds expert trajectories only)"
            )
        check_made_for(meta, path, spec, dataset)
        recorded = meta.get("num_epochs")
        if isinstance(recorded, int) and recorded != epochs:
            raise FileFormatError(
                f"{path}: an expert of {recorded} epochs, this run trains {epochs}; "
                f"set experts.epochs={recorded} or use another experts folder"
            )

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
