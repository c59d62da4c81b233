"""The run folder: every path and file name of a run, in one place.

::

    OUT/
      config.toml            the exact config used
      experts/expert_000.safetensors ...   (or experts.dir)
      checkpoint.safetensors
      distilled.safetensors  distilled.png
      metrics.jsonl          report.md
      grids/iter_000000.png ...
      curves.png             avg_var.png
      tensorboard/           event files of the tensorboard plugin
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from astkit import store

@dataclass(frozen=True)
class RunFolder:
    """Paths of one run under ``root``; ``experts_dir`` overrides where experts live."""

    root: Path
    experts_dir: Path | None = None

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))
        if self.experts_dir is not None:
            object.__setattr__(self, "experts_dir", Path(self.experts_dir))

    @classmethod
    def of(cls, config) -> "RunFolder":
        """The folder a :class:`~astkit.config.RunConfig` names (``out``, ``experts.dir``)."""
        return cls(Path(config.out), Path(config.experts.dir) if config.experts.dir else None)

    def check_folders(self) -> None:
        """Raise if the run folder or the experts folder (or a folder above
        either) is a file, before anything is written there."""
        from astkit.errors import UserError

        for key, folder in (("out", self.root), ("experts.dir", self.experts)):
            blocker = next((p for p in (folder, *folder.parents) if p.exists()), None)
            if blocker is not None and not blocker.is_dir():
                raise UserError(f"{key} {folder}: {blocker} is a file, not a folder; remove it or choose another folder")

    def create(self) -> Path:
        """Make the folder (guarded: a one-line error if it cannot be)."""
        store.make_dir(self.root)
        return self.root

    # ------------------------------------------------------------ experts
    @property
    def experts(self) -> Path:
        return self.experts_dir if self.experts_dir is not None else self.root / "experts"

    def expert(self, index: int) -> Path:
        return self.experts / f"expert_{index:03d}.safetensors"

    def expert_files(self) -> list[Path]:
        """Every trajectory file of the experts folder, in name order."""
        return sorted(self.experts.glob("*.safetensors")) if self.experts.is_dir() else []

    def missing_experts(self, indices) -> list[int]:
        """Those of ``indices`` whose expert file is not written yet."""
        return [i for i in indices if not self.expert(i).is_file()]

    # ------------------------------------------------------------- stages
    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint.safetensors"

    @property
    def distilled(self) -> Path:
        return self.root / "distilled.safetensors"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    # ------------------------------------------------------------ figures
    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def distilled_grid(self) -> Path:
        return self.root / "distilled.png"

    @property
    def grids(self) -> Path:
        return self.root / "grids"

    def grid(self, iteration: int) -> Path:
        return self.grids / f"iter_{iteration:06d}.png"

    @property
    def curves(self) -> Path:
        return self.root / "curves.png"

    @property
    def avg_var(self) -> Path:
        return self.root / "avg_var.png"

    @property
    def tensorboard(self) -> Path:
        """TensorBoard's log folder (the ``tensorboard`` plugin's event files)."""
        return self.root / "tensorboard"
