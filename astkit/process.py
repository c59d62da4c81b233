"""Setting up the process for a run: device, allocator, torch.distributed."""

from __future__ import annotations

import os

import torch

from astkit import allocator, distributed
from astkit.config import RunConfig
from astkit.errors import UserError


def setup(config: RunConfig) -> torch.device:
    """Prepare this process for ``config`` and return its device.

    Resolves ``config.device`` (under torchrun a bare ``cuda`` is this rank's
    GPU, made the current device for NCCL), configures the allocator and joins
    the process group when torchrun started the process.
    """
    device = distributed.local_device(resolve_device(config.device))
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL uses the current device
    allocator.configure(config.allocator)
    distributed.init(device)
    return device


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:1``, ``mps`` or ``auto`` (the best available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda requested but no CUDA GPU is available; use --device cpu")
    return device


def device_memory_bytes(device: torch.device) -> int:
    """The total memory of ``device``: the GPU's, or the machine's physical memory."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): assume 16 GiB
        return 16 * 2**30
