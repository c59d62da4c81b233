"""``checkpoint.safetensors``: distillation's state between two iterations."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from astkit import store
from astkit.errors import FileFormatError, UserError
from astkit.trajectory import ModelSpec, check_made_for

KIND = "checkpoint"


@dataclass
class Checkpoint:
    """Images, lr, optimiser momenta, random states and counters of a distiller.

    ``state`` holds the counters (``iteration``, ``failures``, ``lr_img``,
    ``image_scale``, ``evaluated``, ``expert_order``, ``history``); ``meta``
    what every file of the run records (config, dataset, model, plugins).
    """

    images: torch.Tensor
    labels: torch.Tensor
    lr: torch.Tensor
    generator_state: torch.Tensor
    torch_rng_state: torch.Tensor
    state: dict[str, Any]
    #: ``img`` and ``lr``: the optimisers' momentum buffers, once they exist
    momentum: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def iteration(self) -> int:
        return int(self.state["iteration"])

    def save(self, path: str | Path) -> Path:
        tensors = {
            "images": self.images.detach(),
            "labels": self.labels,
            "lr": self.lr.detach().reshape(1),
            "generator_state": self.generator_state,
            "torch_rng_state": self.torch_rng_state,
            **{f"momentum.{k}": v.reshape(-1) if k == "lr" else v for k, v in self.momentum.items()},
        }
        return store.save(path, KIND, tensors, {**self.meta, "state": self.state})

    @classmethod
    def load(cls, path: str | Path) -> "Checkpoint":
        tensors, meta = store.load(path, KIND)
        try:
            state = meta.pop("state")
            checkpoint = cls(tensors["images"], tensors["labels"], tensors["lr"][0], tensors["generator_state"],
                             tensors["torch_rng_state"], state, meta=meta)
            missing = [k for k in ("iteration", "failures", "lr_img", "expert_order", "history") if k not in state]
        except (KeyError, IndexError, TypeError) as exc:
            raise FileFormatError(f"{path}: checkpoint is missing {exc}; start without --resume") from None
        if missing:
            raise FileFormatError(f"{path}: checkpoint state is missing {missing[0]!r}; start without --resume")
        checkpoint.momentum = {k[len("momentum."):]: v for k, v in tensors.items() if k.startswith("momentum.")}
        return checkpoint

    def check_images(self, dataset: Any, ipc: int, path: str | Path) -> None:
        """Raise unless the images and labels are ``ipc`` per class of ``dataset``."""
        expected = (ipc * dataset.num_classes, dataset.channels, *dataset.image_size)
        if tuple(self.images.shape) != expected or tuple(self.labels.shape) != (expected[0],):
            raise UserError(
                f"{path}: holds images {tuple(self.images.shape)}, this run makes {expected}; "
                "resume with the config the checkpoint was made with"
            )

    @staticmethod
    def iteration_in(meta: dict[str, Any]) -> int | None:
        """The iteration recorded in a checkpoint file's metadata (None if none)."""
        iteration = (meta.get("state") or {}).get("iteration")
        return iteration if isinstance(iteration, int) else None

    @staticmethod
    def read_iteration(path: str | Path) -> int | None:
        """The iteration a checkpoint file was written at, from its metadata alone."""
        return Checkpoint.iteration_in(store.read_metadata(path))

    @staticmethod
    def check_file(path: str | Path, spec: ModelSpec, dataset: Any, ipc: int) -> None:
        """Before resuming from ``path``: it is a checkpoint of model ``spec``, of
        ``dataset`` and of ``ipc`` images per class; from its metadata alone."""
        path = Path(path)
        if path.is_dir():
            raise UserError(f"the checkpoint {path} is a folder; remove it or start without --resume")
        if not path.is_file():
            raise UserError(f"nothing to resume: no {path}; run without --resume")
        meta = store.read_metadata(path)
        if meta.get("kind") != KIND:
            raise FileFormatError(f"{path}: expected an astkit checkpoint, this one holds a {meta.get('kind')}; start without --resume")
        check_made_for(meta, path, spec, dataset, kind=KIND)
        recorded = ((meta.get("config") or {}).get("distill") or {}).get("ipc")
        if isinstance(recorded, int) and recorded != ipc:
            shape = (dataset.channels, *dataset.image_size)
            found, expected = (recorded * dataset.num_classes, *shape), (ipc * dataset.num_classes, *shape)
            raise FileFormatError(
                f"{path}: holds images {found}, this run makes {expected} (distill.ipc {recorded}, not {ipc}); "
                f"set distill.ipc={recorded} to resume, or start without --resume"
            )
