"""Running under ``torchrun``: which process am I, and waiting for the others.

astkit uses PyTorch's own distributed runtime (gloo on CPU, NCCL on GPU).
Under ``torchrun --nproc-per-node K``, expert ``i`` is trained by rank
``i % K`` and evaluation network ``j`` by rank ``j % K``; each rank writes
its own expert files, which never collide. Distillation splits every
synthetic mini-batch across the ranks (:mod:`astkit.collectives`) and rank 0
writes its files.
"""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist


def launched() -> bool:
    """True when started by torchrun (or another launcher) with WORLD_SIZE > 1."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> None:
    """Join the process group once (gloo on CPU, NCCL on CUDA)."""
    if launched() and not dist.is_initialized():
        # torch.distributed.nn.functional binds ``group.WORLD`` as a default
        # argument when first imported. Imported after this point (torch does
        # so lazily: the first optimizer imports torch._dynamo, which imports
        # it), it would keep the group alive past destroy_process_group.
        # Imported now, it binds None.
        import torch.distributed.nn.functional  # noqa: F401

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(leave)


def leave() -> None:
    """Leave the process group and stop its threads (registered at exit by :func:`init`).

    A gloo worker thread that drops the last reference to a tensor while the
    interpreter shuts down aborts the process ("terminate called without an
    active exception"). Freeing the group while Python is fully alive joins
    those threads first.
    """
    if dist.is_initialized():
        dist.destroy_process_group()


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


def gather_floats(values: list[float], mine: list[int]) -> list[float]:
    """Every rank's ``values[i]`` for the ``i`` in its ``mine``, on every rank.

    Each rank fills in the entries it computed; the result holds all of them
    (a single process returns ``values`` unchanged).
    """
    if world_size() == 1:
        return list(values)
    own = torch.zeros(len(values), dtype=torch.float64)
    for i in mine:
        own[i] = values[i]
    dist.all_reduce(own)
    return own.tolist()


def local_device(device: torch.device) -> torch.device:
    """Under torchrun, a bare ``cuda`` means this process's GPU: ``cuda:LOCAL_RANK``."""
    if device.type == "cuda" and device.index is None and launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device
