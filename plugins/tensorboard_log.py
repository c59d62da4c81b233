"""TensorBoard logging: the run's numbers and pictures as event files in ``OUT/tensorboard/``.

An event plugin (``--plugins tensorboard``; needs the optional extra:
``pip install 'astkit[tensorboard]'``), then ``tensorboard --logdir OUT``.

* per distillation iteration: ``distill/loss``, ``lr``, ``grad_norm``,
  ``inner_weight``, ``start_epoch``, ``lr_img``, ``seconds``, at the step
  metrics.jsonl records as its ``iteration``;
* per evaluation: ``evaluation/<model>/accuracy_mean`` and ``accuracy_std``
  at the iteration evaluated (the final evaluation: the last iteration);
* per expert: ``experts/final_test_accuracy`` and ``experts/avg_var`` at
  the expert's index;
* images ``synthetic``: the set distillation starts from, every
  ``tensorboard.image_every`` iterations, and the saved distilled set at the
  end; one row per class, un-normalised with :func:`astkit.to_pixels`.

Events fire on rank 0 (experts: on the rank that trained them; only rank
0's are logged). The writer is flushed and closed when distillation ends
and after the final evaluation.
"""

from __future__ import annotations

import atexit
from pathlib import Path
from typing import Any

import torch

from astkit import UserError, hookimpl, to_pixels

NAME = "tensorboard"
#: the options (namespace ``tensorboard``) and their defaults
OPTIONS = {"image_every": 0, "flush_secs": 120}
INSTALL = "pip install 'astkit[tensorboard]'"
#: the IterationMetrics fields logged as ``distill/<field>``
ITERATION_SCALARS = ("loss", "lr", "grad_norm", "inner_weight", "start_epoch", "lr_img", "seconds")


def summary_writer_class():
    """torch's ``SummaryWriter``, imported on first use; a one-line error when tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise UserError(f"the tensorboard plugin cannot import torch.utils.tensorboard ({reason}); "
                        f"install the extra: {INSTALL}") from None
    return SummaryWriter


def _options(config: Any) -> dict[str, Any]:
    options = config.plugin(NAME)
    every, flush = options["image_every"], options["flush_secs"]
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise UserError(f"{NAME}.image_every must be a whole number >= 0 (0: images only at the start and end), "
                        f"got {every!r}")
    if isinstance(flush, bool) or not isinstance(flush, (int, float)) or not flush > 0:
        raise UserError(f"{NAME}.flush_secs must be a number of seconds > 0, got {flush!r}")
    return {"image_every": int(every), "flush_secs": flush}


def _is_main() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def class_grid(pixels: torch.Tensor, labels: torch.Tensor, pad: int = 1) -> torch.Tensor:
    """``(C, H', W')``: one row per class (soft labels: argmax), one column per image of it, white gaps;
    images under 32 pixels high are enlarged (nearest neighbour)."""
    classes = labels.argmax(dim=1) if labels.ndim == 2 else labels.flatten()
    classes = classes.long().cpu()
    rows = [(classes == k).nonzero().flatten() for k in sorted(set(classes.tolist()))]
    n, c, h, w = pixels.shape
    cols = max((len(r) for r in rows), default=1)
    grid = torch.ones(c, pad + len(rows) * (h + pad), pad + cols * (w + pad))
    for r, members in enumerate(rows):
        for col, index in enumerate(members.tolist()):
            y, x = pad + r * (h + pad), pad + col * (w + pad)
            grid[:, y:y + h, x:x + w] = pixels[index]
    scale = max(1, 32 // max(h, 1))  # small images (digits' 8x8) drawn at least 32 pixels high
    return grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2) if scale > 1 else grid


class RunLog:
    """One run's writer: scalars and image grids into ``run.folder.tensorboard``."""

    def __init__(self, folder: Path, options: dict[str, Any]):
        writer_class = summary_writer_class()
        try:
            self.writer = writer_class(log_dir=str(folder), flush_secs=options["flush_secs"])
        except OSError as exc:
            raise UserError(f"cannot write TensorBoard events to {folder}: {exc.strerror or exc}; check the "
                            "folder's permissions and the disk") from None
        self.folder = folder
        self.image_every = options["image_every"]
        self.labels: torch.Tensor | None = None

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, float(value), int(step))

    def images(self, images: torch.Tensor, step: int, run: Any) -> None:
        if self.labels is None or len(self.labels) != len(images):
            return
        pixels = to_pixels(images, run.mean, run.std, run.zca)
        self.writer.add_image("synthetic", class_grid(pixels, self.labels), int(step))

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


#: open writers, by log folder
_LOGS: dict[Path, RunLog] = {}
#: the last iteration of each log folder's distillation (the step of its final evaluation)
_ENDS: dict[Path, int] = {}


def _log(run: Any, config: Any) -> RunLog | None:
    """The run's writer (opened on first use); None on ranks other than 0."""
    if not _is_main():
        return None
    folder = Path(run.folder.tensorboard)
    if folder not in _LOGS:
        _LOGS[folder] = RunLog(folder, _options(config))
    return _LOGS[folder]


def _close(run: Any) -> None:
    log = _LOGS.pop(Path(run.folder.tensorboard), None)
    if log is not None:
        log.close()


@atexit.register
def _close_all() -> None:
    """An interrupted or failed run: write what is queued."""
    while _LOGS:
        _LOGS.popitem()[1].close()


# ------------------------------------------------------------------ hooks
@hookimpl
def astkit_plugin_options():
    return {NAME: dict(OPTIONS)}


@hookimpl
def astkit_check_config(config):
    """Refuse bad options, or a missing tensorboard package, before any work."""
    _options(config)
    summary_writer_class()


@hookimpl
def astkit_on_expert_trained(index, trajectory, run, config):
    log = _log(run, config)
    if log is None:
        return
    if trajectory.test_accuracy:
        log.scalar("experts/final_test_accuracy", trajectory.test_accuracy[-1], index)
    log.scalar("experts/avg_var", trajectory.avg_var, index)
    log.writer.flush()


@hookimpl
def astkit_on_distill_start(images, labels, iteration, run, config):
    log = _log(run, config)
    if log is None:
        return
    log.labels = labels.detach().cpu()
    log.images(images, iteration, run)


@hookimpl
def astkit_on_iteration_end(metrics, images, run, config):
    log = _log(run, config)
    if log is None:
        return
    step = int(metrics.iteration)
    for key in ITERATION_SCALARS:
        log.scalar(f"distill/{key}", getattr(metrics, key), step)
    done = step + 1
    if log.image_every and done % log.image_every == 0 and done < config.distill.iterations:
        log.images(images, done, run)  # the last iteration's: the saved set, at distill end


@hookimpl
def astkit_on_evaluation_done(result, iteration, run, config):
    log = _log(run, config)
    if log is None:
        return
    folder = Path(run.folder.tensorboard)
    step = iteration if iteration is not None else _ENDS.get(folder, config.distill.iterations)
    for name, architecture in result.architectures.items():
        log.scalar(f"evaluation/{name}/accuracy_mean", architecture.mean, step)
        log.scalar(f"evaluation/{name}/accuracy_std", architecture.std, step)
    if iteration is None:  # the final evaluation comes after distill end
        _close(run)
    else:
        log.writer.flush()


@hookimpl
def astkit_on_distill_end(distilled, run, config):
    log = _log(run, config)
    if log is None:
        return
    log.labels = distilled.labels.detach().cpu()
    log.images(distilled.images, distilled.iteration, run)
    _ENDS[Path(run.folder.tensorboard)] = int(distilled.iteration)
    _close(run)
