"""Stage 1: train expert networks on the real data and record trajectories."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from astkit.augment import DSA
from astkit.config import RunConfig
from astkit.data import Dataset
from astkit.errors import UserError
from astkit.functional import FlatModel
from astkit.trajectory import ModelSpec, Trajectory


@dataclass
class ExpertBatch:
    """One training batch of an expert, as the ``astkit_expert_loss`` hook sees it."""

    model: nn.Module
    images: torch.Tensor
    labels: torch.Tensor
    clean_images: torch.Tensor
    #: a seed fixed for this batch (the same in every call of the step's closure, e.g. both passes of a
    #: sharpness-aware step), derived from the expert's seed, the epoch and the batch
    seed: int = 0
    _logits: torch.Tensor | None = field(default=None, repr=False)

    def generator(self) -> torch.Generator:
        """A fresh generator on the images' device seeded with :attr:`seed`: the batch's own random draws."""
        return torch.Generator(device=self.images.device).manual_seed(self.seed)

    def require_input_grad(self) -> torch.Tensor:
        """Make ``images`` require grad (call before :meth:`logits`)."""
        if self._logits is not None and not self.images.requires_grad:
            raise RuntimeError("require_input_grad() must be called before logits()")
        if not self.images.requires_grad:
            self.images = self.images.detach().requires_grad_(True)
        return self.images

    def logits(self) -> torch.Tensor:
        """The model's output on ``images``, computed once."""
        if self._logits is None:
            self._logits = self.model(self.images)
        return self._logits


def make_optimizer(params, config: RunConfig, lr: float) -> torch.optim.Optimizer:
    e = config.experts
    if e.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=e.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=e.momentum, weight_decay=e.weight_decay)


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode for the call; no graph is kept)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, images.shape[0], batch_size):
        logits = model(images[i : i + batch_size].to(device))
        correct += int((logits.argmax(1).cpu() == labels[i : i + batch_size]).sum())
    model.train(was_training)
    return correct / max(1, images.shape[0])


def decay_epoch(config: RunConfig) -> int | None:
    """The epoch (from 0) after which the expert lr is multiplied by ``lr_decay``.

    ``lr_decay_epoch`` when set; else, with ``lr_decay_fraction = f``, after
    the first ``int(f * epochs)`` epochs (at least one), so ``f = 0.5`` halves
    the run at half its epochs for any ``epochs`` (the AST paper); else
    ``epochs // 2 + 1``, as in the MTT and AST scripts.
    """
    e = config.experts
    if e.lr_decay == 1.0:
        return None
    if e.lr_decay_epoch is not None:
        return e.lr_decay_epoch
    if e.lr_decay_fraction is not None:
        return max(1, int(e.lr_decay_fraction * e.epochs)) - 1
    return e.epochs // 2 + 1


def train_expert(
    index: int,
    dataset: Dataset,
    spec: ModelSpec,
    config: RunConfig,
    hooks,
    augment: DSA,
    *,
    registry=None,
    device: torch.device | str = "cpu",
    on_epoch: Callable[[int, float, float], None] | None = None,
) -> Trajectory:
    """Train one expert for ``experts.epochs`` epochs; snapshot every epoch.

    Seeded by ``(config.seed, index)`` only, so any subset of experts can be
    trained in any order or process and gives the same files.
    """
    e = config.experts
    seed = expert_seed(config.seed, index)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = spec.build(registry).to(device)
    flat = FlatModel(model)
    lr = e.lr
    optimizer = make_optimizer(model.parameters(), config, lr)
    snapshots = [flat.initial().cpu()]
    accuracies, losses = [], []
    images, labels = dataset.train_images, dataset.train_labels
    n = images.shape[0]
    decay_at = decay_epoch(config)
    for epoch in range(e.epochs):
        model.train()
        order = torch.randperm(n, generator=generator)
        total, count = 0.0, 0
        for batch_index, start in enumerate(range(0, n, e.batch_size)):
            idx = order[start : start + e.batch_size]
            batch_seed = expert_seed(seed, epoch * (n // e.batch_size + 1) + batch_index)
            clean = images[idx].to(device)
            x = augment(clean, generator=generator) if (e.augment and augment.enabled) else clean
            y = labels[idx].to(device)

            def closure() -> torch.Tensor:
                loss = hooks.astkit_expert_loss(batch=ExpertBatch(model, x, y, clean, batch_seed), epoch=epoch,
                                                num_epochs=e.epochs, config=config)
                if loss is None or not torch.is_tensor(loss) or loss.ndim != 0:
                    raise UserError("the astkit_expert_loss hook must return a scalar tensor; fix or disable the plugin that answers it")
                if not torch.isfinite(loss):
                    raise UserError(f"expert {index} diverged at epoch {epoch} (loss {float(loss)}); lower experts.lr")
                return loss

            loss = hooks.astkit_expert_step(model=model, closure=closure, optimizer=optimizer, epoch=epoch,
                                            num_epochs=e.epochs, config=config)
            if not torch.is_tensor(loss) or loss.numel() != 1:
                raise UserError("the astkit_expert_step hook must return the batch's loss as a scalar tensor; "
                                "fix or disable the plugin that answers it")
            total += loss.item() * idx.numel()
            count += idx.numel()
        if decay_at is not None and epoch == decay_at:
            lr *= e.lr_decay
            if e.reset_optimizer_on_decay:
                optimizer = make_optimizer(model.parameters(), config, lr)
            else:
                for group in optimizer.param_groups:
                    group["lr"] = lr
        snapshots.append(flat.initial().cpu())
        acc = accuracy(model, dataset.test_images, dataset.test_labels)
        accuracies.append(acc)
        losses.append(total / max(1, count))
        if on_epoch is not None:
            on_epoch(epoch, losses[-1], acc)
    meta = {
        "index": index,
        "seed": seed,
        "dataset": dataset.metadata(),
        "experts": dict(e.__dict__),
        "augment": dict(config.augment.__dict__) if e.augment else None,
    }
    return Trajectory(torch.stack(snapshots), flat.layout, spec, accuracies, losses, meta)


def expert_seed(seed: int, index: int) -> int:
    """The seed of expert ``index`` in a run seeded ``seed``."""
    return (seed * 1_000_003 + index * 7919 + 17) % (2**63 - 1)
