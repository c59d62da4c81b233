"""Stage 3: train fresh networks on a distilled set and test them."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from astkit.augment import DSA
from astkit.config import EvalConfig
from astkit.experts import accuracy


def train_on_synthetic(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    lr: float,
    config: EvalConfig,
    augment: DSA,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    generator: torch.Generator,
    on_epoch: Callable[[int], None] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[float, float | None]:
    """MTT's evaluation protocol on one fresh network.

    SGD (momentum, weight decay) at ``lr`` for ``config.epochs`` epochs over
    shuffled batches with DSA, minimising the mean of ``loss_fn(logits,
    labels)`` (per-sample losses; default: cross-entropy on hard labels, soft
    labels need the engine's ``astkit_student_loss``), the lr multiplied by ``lr_decay`` (and the optimiser
    rebuilt, with momentum ``momentum_after_decay`` when set: the AST code's
    0.8) after epoch ``epochs // 2 + 1``; then one test on the real test set.

    :return: ``(final accuracy, max accuracy seen every test_every epochs)``;
        the max is ``None`` unless ``config.report_max`` (it peeks at the
        test set, as the AST code does).
    """
    device = next(model.parameters()).device
    images, labels = images.detach().to(device), labels.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    decay_at = config.epochs // 2 + 1
    n = images.shape[0]
    best = None
    model.train()
    for epoch in range(config.epochs):
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, config.batch_size):
            idx = order[start : start + config.batch_size]
            x = images[idx]
            if config.augment and augment.enabled:
                x = augment(x, generator=generator)
            logits = model(x)
            loss = loss_fn(logits, labels[idx]).mean() if loss_fn is not None else F.cross_entropy(logits, labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if epoch == decay_at:  # MTT rebuilds the optimiser here (momentum reset)
            lr *= config.lr_decay
            momentum = config.momentum if config.momentum_after_decay is None else config.momentum_after_decay
            optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=config.weight_decay)
        if config.report_max and (epoch + 1) % config.test_every == 0:
            acc = accuracy(model, test_images, test_labels)
            best = acc if best is None else max(best, acc)
        if on_epoch is not None:
            on_epoch(epoch)
    final = accuracy(model, test_images, test_labels)
    if config.report_max:
        best = final if best is None else max(best, final)
    return final, best
