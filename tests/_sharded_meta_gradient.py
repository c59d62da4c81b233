"""Worker for tests/test_distributed.py: one rank's meta-gradient with the batch split across ranks.

Run as ``torchrun --nproc-per-node K tests/_sharded_meta_gradient.py OUT_DIR``
(or with WORLD_SIZE unset for the single-process reference). Writes
``OUT_DIR/CASE.rankR.safetensors`` with the images' gradient (summed over
ranks), the lr's gradient, the soft labels' gradient (summed over ranks) where
they are learned, and the matching loss for every case.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from astkit.augment import DSA
from astkit.collectives import BatchShard
from astkit.functional import FlatModel
from astkit.labels import per_sample_loss
from astkit.matching import MatchPoint, matching_loss, unroll

#: name -> unroll options. batch_syn 15 of 30 images splits 8/7 over two ranks.
CASES = {
    "full": {},
    "batch_momentum_dsa": {"batch_syn": 15, "momentum": 0.9, "augment": True, "inner_weight": 1.7},
    "recompute": {"batch_syn": 15, "momentum": 0.5, "augment": True, "segment": 2},
    "soft_labels": {"batch_syn": 15, "augment": True, "soft": True},
    "soft_labels_recompute": {"batch_syn": 15, "momentum": 0.5, "soft": True, "segment": 2},
}
STEPS = 5


def problem():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(4, 4), nn.ReLU(), nn.AvgPool2d(2),
                        nn.Flatten(), nn.Linear(4 * 4 * 4, 10)).double()
    flat = FlatModel(net)
    g = torch.Generator().manual_seed(1)
    start = flat.initial()
    target = start + 0.1 * torch.randn(start.shape, generator=g, dtype=torch.float64)
    images = torch.randn(30, 1, 8, 8, generator=g, dtype=torch.float64)
    labels = torch.arange(10).repeat_interleave(3)
    return flat, start, target, images, labels


def meta_gradient(case: dict, shard):
    flat, start, target, images, labels = problem()
    x = images.clone().requires_grad_(True)
    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    loss_fn = None
    if case.get("soft"):  # learned soft labels: logits, soft cross-entropy at T = 2
        labels = (torch.nn.functional.one_hot(labels, 10).double() * 2).requires_grad_(True)
        loss_fn = lambda logits, y: per_sample_loss(logits, y, 2.0)  # noqa: E731
    schedule = [MatchPoint(3, 1, 0.5), MatchPoint(STEPS, 2, 1.0)]
    student = unroll(
        flat, start.clone().requires_grad_(True), x, labels, lr, STEPS,
        inner_weight=case.get("inner_weight", 1.0), augment=DSA() if case.get("augment") else None,
        batch_syn=case.get("batch_syn"), generator=torch.Generator().manual_seed(2),
        momentum=case.get("momentum", 0.0), keep={p.student_step for p in schedule},
        segment=case.get("segment", 0), shard=shard, loss_fn=loss_fn,
    )
    loss, _ = matching_loss(student, start, {1: target * 0.5 + start * 0.5, 2: target}, schedule)
    loss.backward()
    if shard is not None:
        shard.sum_(x.grad)
    out = {"images": x.grad, "lr": lr.grad.reshape(1), "loss": loss.detach().reshape(1)}
    if labels.requires_grad:
        if shard is not None:
            shard.sum_(labels.grad)
        out["labels"] = labels.grad
    return out


def main(out: Path) -> None:
    shard, rank = None, 0
    if "WORLD_SIZE" in __import__("os").environ:
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        shard = BatchShard(rank, dist.get_world_size())
    for name, case in CASES.items():
        save_file({k: v.contiguous() for k, v in meta_gradient(case, shard).items()},
                  str(out / f"{name}.rank{rank}.safetensors"))
    if shard is not None:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
