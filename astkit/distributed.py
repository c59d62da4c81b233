"""Running under ``torchrun``: which process am I, and waiting for the others.

astkit uses PyTorch's own distributed runtime (gloo on CPU, NCCL on GPU).
Under ``torchrun --nproc-per-node K``, expert ``i`` is trained by rank
``i % K``; each rank writes its own files, which never collide.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def launched() -> bool:
    """True when started by torchrun (or another launcher) with WORLD_SIZE > 1."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> None:
    """Join the process group once (gloo on CPU, NCCL on CUDA)."""
    if launched() and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def my_share(indices: list[int]) -> list[int]:
    """The items this rank handles: every ``world_size``-th, from ``rank``."""
    return [i for i in indices if i % world_size() == rank()]
