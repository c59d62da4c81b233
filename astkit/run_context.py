"""What the lifecycle events tell a plugin about the run: :class:`RunContext`.

Every ``astkit_on_*`` event passes ``run``, so a plugin that writes files or
pictures needs no reference to the engine: where the run's files go
(``run.folder``, an :class:`astkit.RunFolder`), how to turn images back into
pixels (the dataset's ``mean``, ``std`` and ZCA tensors), the class names and
the enabled plugins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from astkit.run_folder import RunFolder

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from astkit.data import Dataset

__all__ = ["RunContext"]


@dataclass(frozen=True)
class RunContext:
    """The run an event belongs to.

    :param folder: the run folder; it names every file of the run
        (``folder.grid(i)``, ``folder.report``, ``folder.distilled`` ...).
    :param mean, std: the dataset's per-channel normalisation (on [0, 1]
        pixels), or ``None``.
    :param zca: the dataset's ZCA whitening tensors (``ZCA.tensors()``), or
        ``None`` when the images are not whitened.
    :param class_names: the class names, by label index.
    :param plugins: the enabled plugins: ``{name: "distribution version"}``.
    """

    folder: RunFolder
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    zca: Mapping[str, torch.Tensor] | None = None
    class_names: tuple[str, ...] = ()
    plugins: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, config: Any, dataset: Dataset | None = None, plugins: Mapping[str, str] | None = None) -> "RunContext":
        """The context of a run of ``config`` (its ``out`` and ``experts.dir``) on ``dataset``."""
        folder = RunFolder.of(config)
        if dataset is None:
            return cls(folder, plugins=dict(plugins or {}))
        zca = dataset.zca.tensors() if dataset.zca is not None else None
        return cls(folder, tuple(float(m) for m in dataset.mean), tuple(float(s) for s in dataset.std), zca,
                   tuple(str(n) for n in dataset.class_names), dict(plugins or {}))

    def normalisation(self) -> dict[str, Any]:
        """``mean``, ``std``, ``zca`` and ``class_names`` as keyword arguments of
        :func:`astkit.figures.save_grid`."""
        return {"mean": self.mean, "std": self.std, "zca": self.zca, "class_names": self.class_names or None}
