"""``checkpoint.safetensors``: distillation's state between two iterations."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from astkit import labels as label_rules
from astkit import store
from astkit.errors import FileFormatError, UserError
from astkit.trajectory import ModelSpec, check_made_for

KIND = "checkpoint"


@dataclass
class Checkpoint:
    """Images, lr, optimiser momenta, random states and counters of a distiller.

    ``state`` holds the counters (``iteration``, ``failures``, ``lr_img``,
    ``image_scale``, ``evaluated``, ``history``); ``meta`` what every file of
    the run records (config, dataset, model, plugins); ``plugin_state`` the
    enabled plugins' per-run state (tensors and JSON values, see
    :mod:`astkit.hookspecs`).
    """

    images: torch.Tensor
    labels: torch.Tensor
    lr: torch.Tensor
    generator_state: torch.Tensor
    torch_rng_state: torch.Tensor
    state: dict[str, Any]
    #: ``img``, ``lr`` (and ``labels``): the optimisers' momentum buffers, once they exist
    momentum: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    plugin_state: dict[str, Any] = field(default_factory=dict)

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
        packed = pack_state(self.plugin_state, tensors)
        return store.save(path, KIND, tensors, {**self.meta, "state": self.state, "plugin_state": packed})

    @classmethod
    def load(cls, path: str | Path) -> "Checkpoint":
        tensors, meta = store.load(path, KIND)
        try:
            state = meta.pop("state")
            checkpoint = cls(tensors["images"], tensors["labels"], tensors["lr"][0], tensors["generator_state"],
                             tensors["torch_rng_state"], state, meta=meta)
            missing = [k for k in ("iteration", "failures", "lr_img", "history") if k not in state]
            checkpoint.plugin_state = unpack_state(meta.pop("plugin_state", {}), tensors)
        except (KeyError, IndexError, TypeError) as exc:
            raise FileFormatError(f"{path}: checkpoint is missing {exc}; start without --resume") from None
        if missing:
            raise FileFormatError(f"{path}: checkpoint state is missing {missing[0]!r}; start without --resume")
        if "expert_order" in state:  # written before the draw hooks: the baseline's expert cycle
            checkpoint.plugin_state.setdefault("astkit.defaults", {})["expert_order"] = list(state.pop("expert_order"))
        checkpoint.momentum = {k[len("momentum."):]: v for k, v in tensors.items() if k.startswith("momentum.")}
        return checkpoint

    def check_images(self, dataset: Any, ipc: int, path: str | Path) -> None:
        """Raise unless the images and labels are ``ipc`` per class of ``dataset``."""
        expected = (ipc * dataset.num_classes, dataset.channels, *dataset.image_size)
        if tuple(self.images.shape) != expected or label_rules.problem(self.labels, expected[0], dataset.num_classes):
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


#: plugin-state tensors are stored under this prefix, numbered in the order met
STATE_PREFIX = "plugin_state."


def pack_state(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` with every tensor moved into ``tensors`` (under ``plugin_state.<n>``)
    and replaced by ``{"__tensor__": n}``, so the rest is JSON."""
    if torch.is_tensor(value):
        key = f"{STATE_PREFIX}{sum(k.startswith(STATE_PREFIX) for k in tensors)}"
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key[len(STATE_PREFIX):]}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise UserError("plugin state: dict keys must be strings")
        return {k: pack_state(v, tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [pack_state(v, tensors) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise UserError(f"plugin state holds a {type(value).__name__}; keep tensors and JSON values (numbers, strings, "
                    "lists, dicts) in it")


def unpack_state(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`pack_state`."""
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[STATE_PREFIX + str(value["__tensor__"])]
        return {k: unpack_state(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [unpack_state(v, tensors) for v in value]
    return value
